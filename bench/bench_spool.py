"""Benchmark the provider's memory: states held in the process, or spooled to a file.

For each model (``bench/bench_models.py``, ``--max-segments`` as in ``bench_commitment``; and
``wide``, built here: 8 element-wise layers over 12M floats, cut after every layer, 9 states of
48 MB, where the states and not the weights dominate a provider's memory) and each mode, a
fresh child process prepares the model, calls ``run_trace`` once in that mode to warm ONNX
Runtime, then once more, measured, and writes the bundle, and reports:

* ``anon_mb``: the process's *anonymous* resident memory (``RssAnon``) after ``run_trace``,
  with the trace held (and ``anon_after_mb``, its growth over the call; a warm-up call in the
  same mode comes first): the states a process keeps in its own memory show here; the spool's
  pages are file-backed, which the kernel writes back and evicts as it needs;
* ``hwm_mb``: growth of peak resident memory (``VmHWM``, anonymous and file pages together)
  over the same call, and the same for writing the bundle;
* ``run_trace_ms`` and ``write_ms``: the times of the two calls (once each);
* the state bytes of the trace, for scale.

Run: ``.venv/bin/python -m bench.bench_spool [--models wide,gpt2,mobilenet] [--max-segments K]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from bench.bench_commitment import ALIASES, prepare
from bench.bench_models import bench_model
from refute.provider import PreparedModel, prepare_model, random_inputs, run_trace

MODES = ("memory", "spool")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


#: The ``wide`` model: layers and elements.
WIDE_LAYERS, WIDE_ELEMENTS = 8, 12_000_000


def wide_model() -> PreparedModel:
    """x[1, 12M] → (×0.5, +1) alternating, 8 layers, one segment each."""
    nodes, weights, name = [], [], "x"
    for i in range(WIDE_LAYERS):
        op = "Mul" if i % 2 == 0 else "Add"
        weights.append(numpy_helper.from_array(np.array([0.5 if op == "Mul" else 1.0],
                                                        np.float32), f"c{i}"))
        nodes.append(helper.make_node(op, [name, f"c{i}"], [f"h{i}"]))
        name = f"h{i}"
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      [1, WIDE_ELEMENTS])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, WIDE_ELEMENTS])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return prepare_model(model.SerializeToString(), cuts=list(range(1, WIDE_LAYERS)))


def child(name: str, mode: str, max_segments: int | None) -> dict[str, Any]:
    """One measurement (run in a fresh process)."""
    prepared = (wide_model() if name == "wide"
                else prepare(bench_model(name), max_segments)[0])
    inputs = random_inputs(prepared.loaded, seed=0)
    with tempfile.TemporaryDirectory(dir=Path.cwd() / "out") as tmp:
        def spool_file(stem: str) -> Path | None:
            return Path(tmp) / f"{stem}.spool" if mode == "spool" else None

        run_trace(prepared, inputs, spool=spool_file("warm"))  # warm ONNX Runtime, same mode
        spool = spool_file("trace")
        anon, hwm = _status_kb("RssAnon"), _status_kb("VmHWM")
        start = time.perf_counter()
        trace = run_trace(prepared, inputs, spool=spool)
        run_s = time.perf_counter() - start
        anon_after, hwm_after = _status_kb("RssAnon"), _status_kb("VmHWM")
        start = time.perf_counter()
        trace.write(Path(tmp) / "t.rtrace")
        write_s = time.perf_counter() - start
        hwm_write = _status_kb("VmHWM")
        state_bytes = sum(t.nbytes for s in trace.states for t in s)
    return {"model": name, "mode": mode, "segments": prepared.segmentation.num_segments,
            "state_mb": state_bytes / 1e6, "anon_before_mb": anon / 1e3,
            "anon_mb": anon_after / 1e3, "anon_after_mb": (anon_after - anon) / 1e3,
            "hwm_mb": (hwm_after - hwm) / 1e3, "hwm_write_mb": (hwm_write - hwm_after) / 1e3,
            "run_trace_ms": run_s * 1e3, "write_ms": write_s * 1e3}


def main() -> None:
    """Measure every model in both modes and print the table (JSON with ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="wide,gpt2,mobilenet")
    parser.add_argument("--max-segments", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.max_segments)))
        return
    console = Console()
    Path("out").mkdir(exist_ok=True)
    rows = []
    for alias in args.models.split(","):
        name = ALIASES.get(alias, alias)
        for mode in MODES:
            console.print(f"[dim]{name}, {mode}…[/dim]")
            command = [sys.executable, "-m", "bench.bench_spool", "--child", name, mode]
            if args.max_segments is not None:
                command += ["--max-segments", str(args.max_segments)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name} {mode} failed: {done.stderr.strip()[-400:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = Table(title="provider memory: states in the process vs spooled to a file")
    for column in ("model", "mode", "segments", "state MB", "RssAnon MB (trace held)",
                   "RssAnon +MB",
                   "VmHWM +MB run", "VmHWM +MB write", "run_trace ms", "write ms"):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for r in rows:
        table.add_row(r["model"], r["mode"], str(r["segments"]), f"{r['state_mb']:.1f}",
                      f"{r['anon_mb']:.1f}", f"{r['anon_after_mb']:.1f}", f"{r['hwm_mb']:.1f}",
                      f"{r['hwm_write_mb']:.1f}", f"{r['run_trace_ms']:.1f}",
                      f"{r['write_ms']:.1f}")
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
