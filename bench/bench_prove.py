"""Benchmark: proving one segment's adjudication circuit vs proving the whole model in one circuit.

For each model (an 8×256 MLP and a small CNN), in fresh child processes so peak memory is the
child's own (``ru_maxrss``):

* **segment**: the adjudication circuit of the model's most expensive segment (hashed inputs x, y;
  fixed params; public maxdiff), calibrated, compiled, set up and proven;
* **whole**: the whole model as one EZKL circuit with the same visibilities (hashed input, fixed
  params, public output), calibrated, compiled, set up and proven;

and prints wall time of setup and prove, peak memory, logrows, the whole/segment ratios, and the
on-chain ``verifyProof`` gas of each circuit that proved (anvil). A child that fails (error, memory
cap, time limit) is reported as such: that is a result, not a crash.

Run: ``.venv/bin/python bench/bench_prove.py [--models mlp_8x256,cnn] [--mem-gb 20]
[--timeout 1800] [--no-gas]``. Uses a development SRS (unsafe; fine for timing).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Build and prove one circuit; runs in a fresh process."""
    import ezkl

    from circuits.adjudication import adjudication_bytes
    from prover.circuit import run_args, write_input_json
    from prover.srs import SrsStore
    from refute import zoo
    from refute.executor import DeterministicExecutor
    from refute.provider import prepare_model
    from refute.segmentation import node_cost, run_segments

    model = getattr(zoo, job["model"])()
    prepared = prepare_model(model.onnx_bytes)
    seg = prepared.segmentation
    inputs = model.sample_input(0)
    states = run_segments(DeterministicExecutor(), seg, inputs)
    work = Path(job["workdir"])
    if job["kind"] == "segment":
        segment = max(seg.segments, key=lambda s: sum(
            node_cost(prepared.loaded, n) for n in prepared.loaded.nodes[s.start:s.end]))
        graph = adjudication_bytes(segment)
        tensors = [*states[segment.index - 1], *states[segment.index]]
        label = f"segment {segment.index}/{seg.num_segments}"
    else:
        graph = model.onnx_bytes
        tensors = list(states[0])
        label = f"whole ({seg.num_segments} segments)"
    (work / "g.onnx").write_bytes(graph)
    data = write_input_json(work / "in.json", tensors)
    paths = {k: str(work / k) for k in ("s.json", "c.compiled", "w.json", "vk", "pk", "p.json")}
    ezkl.gen_settings(str(work / "g.onnx"), paths["s.json"], py_run_args=run_args(7))
    ezkl.calibrate_settings(str(data), str(work / "g.onnx"), paths["s.json"], "resources",
                            scales=[7])
    logrows = json.loads(Path(paths["s.json"]).read_text())["run_args"]["logrows"]
    ezkl.compile_circuit(str(work / "g.onnx"), paths["c.compiled"], paths["s.json"])
    srs = SrsStore(dev_cache=Path(job["srs"])).for_logrows(logrows)
    ezkl.gen_witness(str(data), paths["c.compiled"], paths["w.json"])
    start = time.perf_counter()
    ezkl.setup(paths["c.compiled"], paths["vk"], paths["pk"], srs_path=str(srs.path))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    ezkl.prove(paths["w.json"], paths["c.compiled"], paths["pk"], paths["p.json"],
               srs_path=str(srs.path))
    prove = time.perf_counter() - start
    assert ezkl.verify(paths["p.json"], paths["s.json"], paths["vk"], srs_path=str(srs.path))
    gas = None
    if job["gas"]:
        from prover.evm import (
            Anvil,
            compile_solidity,
            deploy,
            verify_transaction,
            write_verifier_sol,
        )

        sol = write_verifier_sol(work / "vk", work / "s.json", work / "V.sol", srs.path)
        with Anvil() as chain:
            address = deploy(chain.rpc_url, compile_solidity(sol))
            gas = verify_transaction(chain.rpc_url, address, work / "p.json").gas_used
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    pk_gb = (work / "pk").stat().st_size / 2**30
    return {"label": label, "logrows": logrows, "setup": setup, "prove": prove, "peak_gb": peak,
            "pk_gb": pk_gb, "gas": gas}


def _run(job: dict[str, Any], mem_gb: float, timeout: float) -> dict[str, Any]:
    def limit() -> None:
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
            text=True, timeout=timeout, preexec_fn=limit, cwd=REPO, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {"error": f"failed after {time.perf_counter() - start:.0f} s "
                         f"(exit {done.returncode}): {tail}"}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    return result


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--models", default="mlp_8x256,cnn")
    parser.add_argument("--mem-gb", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--no-gas", action="store_true")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return
    console = Console(width=200)
    table = Table(title=f"segment vs whole-model proving (memory cap {args.mem_gb} GB)")
    for column in ("model", "circuit", "logrows", "setup s", "prove s", "peak GB", "pk GB",
                   "verify gas", "whole/segment (setup+prove)"):
        table.add_column(column, justify="right")
    srs = Path.home() / ".cache" / "refute" / "srs"
    for model in args.models.split(","):
        results = {}
        for kind in ("segment", "whole"):
            console.print(f"[dim]{model}: proving {kind}…[/dim]")
            with tempfile.TemporaryDirectory(prefix="refute-bench-") as tmp:
                job = {"model": model, "kind": kind, "workdir": tmp, "srs": str(srs),
                       "gas": not args.no_gas}
                results[kind] = _run(job, args.mem_gb, args.timeout)
        seg = results["segment"]
        for kind, r in results.items():
            if "error" in r:
                table.add_row(model, kind, "-", "-", "-", "-", "-", "-", r["error"])
                continue
            ratio = ""
            if kind == "whole" and "error" not in seg:
                ratio = (f"{(r['setup'] + r['prove']) / (seg['setup'] + seg['prove']):.1f}x time, "
                         f"{r['peak_gb'] / seg['peak_gb']:.1f}x memory")
            table.add_row(model, r["label"], str(r["logrows"]), f"{r['setup']:.1f}",
                          f"{r['prove']:.1f}", f"{r['peak_gb']:.2f}", f"{r['pk_gb']:.2f}",
                          f"{r['gas']:,}" if r.get("gas") else "-", ratio)
    console.print(table)


if __name__ == "__main__":
    main()
