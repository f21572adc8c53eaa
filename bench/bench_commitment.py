"""Benchmark the trace commitment against inference on full-size models.

For MobileNet v1 (224×224) and a GPT-2-small-shaped transformer (``bench/bench_models.py``;
random weights, cached under ``out/bench_models/``) it loads and segments the model as a
provider does (``prepare_model``; ``--max-segments`` to cut fewer), runs it once in the
provider's optimized session to get the states the provider commits, and prints, all
measured in this process (medians of ``--repeat`` runs unless said):

* the model: segments, states, state elements and bytes, preparation time (and the loader's
  refusal when the default :class:`~refute.loading.LoadLimits` refuse it: the model is then
  loaded with raised limits, and the table says so);
* **inference**: ONNX Runtime's default configuration on the exported model (the baseline);
* **commitment**: ``TraceCommitment.of_states`` (SHA-256 chunked leaves + Merkle root) on all
  cores and on one thread: time, share of inference, GB/s, elements/s;
* **old Poseidon commitment**: ``hash_states`` (quantize + Poseidon of every tensor, which is
  what the Poseidon leaves cost), timed once; when it would take more than
  ``--poseidon-budget`` seconds it is timed on evenly spread states and extrapolated by element
  count (the table says so); its share of inference and SHA-256's speed-up over it;
* **provider call**: ``run_trace`` (one optimized run + commitment) and its ratio to
  inference, beside the deterministic segment-by-segment ``run_trace(deterministic=True)``;
* the issue's targets beside the figures (commitment ≤ 10 % of inference on MobileNet, ≤ 2 % on
  the transformer; ``run_trace`` ≤ 1.5× inference on MobileNet);
* bytes moved per result at spot-check probability p = 0.1 with k = 1 segment checked: states
  i-1 and i of the sampled segment plus the commitment, against uploading the whole trace.

Run: ``.venv/bin/python -m bench.bench_commitment [--repeat R] [--models mobilenet,gpt2]
[--max-segments K] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from bench.bench_models import BenchModel, bench_model
from bench.bench_trace import median_time
from refute.commitment import TraceCommitment
from refute.errors import ModelTooLarge
from refute.instances import hash_states
from refute.loading import LoadLimits
from refute.provider import PreparedModel, prepare_model, random_inputs, run_trace

State = Sequence[np.ndarray]

#: Scale of the commitment (and of the old Poseidon leaves' quantization).
SCALE = 7
#: Spot-check probability and segments checked per sampled result, for the bytes moved.
SPOT_CHECK_P = 0.1
SEGMENTS_CHECKED = 1
#: Bytes of one commitment word (a leaf or the root).
WORD = 32
#: Limits a model is loaded with when the defaults refuse it.
RAISED_LIMITS = LoadLimits(max_file_bytes=2**30, max_initializer_bytes=2**30,
                           max_model_work=2**40)
#: ``--models`` aliases to bench_models names.
ALIASES = {"mobilenet": "mobilenet_v1", "gpt2": "gpt2_small"}
#: The issue's targets: largest commitment / inference, largest run_trace / inference.
COMMIT_TARGET = {"mobilenet_v1": 0.10, "gpt2_small": 0.02}
RUN_TRACE_TARGET = {"mobilenet_v1": 1.5}


def warm_median(fn: Callable[[], object], repeat: int) -> float:
    """:func:`bench.bench_trace.median_time` of ``fn`` after one untimed call."""
    fn()
    return median_time(fn, repeat)


def elements(states: Sequence[State]) -> int:
    """Number of values held by ``states``."""
    return sum(int(t.size) for s in states for t in s)


def state_nbytes(state: State) -> int:
    """Bytes of a state's float32 values (headers of the canonical form left out)."""
    return sum(int(t.nbytes) for t in state)


def spread(states: Sequence[State], target: float, min_tensors: int) -> list[int]:
    """Indices of the fewest evenly spread states that hold at least ``target`` elements and
    ``min_tensors`` tensors (all of them if the states hold fewer)."""
    for n in range(1, len(states) + 1):
        picked = sorted({round(x) for x in np.linspace(0, len(states) - 1, n)})
        chosen = [states[k] for k in picked]
        if elements(chosen) >= target and sum(len(s) for s in chosen) >= min_tensors:
            return picked
    return list(range(len(states)))


@dataclass(frozen=True)
class PoseidonTime:
    """Time of ``hash_states`` over all states, measured or extrapolated."""

    seconds: float
    measured_states: int
    measured_elements: int
    extrapolated: bool


def time_poseidon(states: Sequence[State], budget: float) -> PoseidonTime:
    """Time ``hash_states`` once: over all states when a pilot run on about 2 % of them
    predicts at most ``budget`` seconds, else over evenly spread states holding about half the
    budget's worth of elements, extrapolated linearly to all of them."""
    total = elements(states)
    min_tensors = 2 * (os.cpu_count() or 1)  # enough tensors to keep every worker busy

    def timed(picked: list[int]) -> tuple[float, int]:
        subset = [states[k] for k in picked]
        start = time.perf_counter()
        hash_states(subset, SCALE)
        return time.perf_counter() - start, elements(subset)

    pilot_s, pilot_elements = timed(spread(states, total / 50, min_tensors))
    if total * pilot_s / pilot_elements <= budget:
        seconds, _ = timed(list(range(len(states))))
        return PoseidonTime(seconds, len(states), total, extrapolated=False)
    picked = spread(states, budget / 2 * pilot_elements / pilot_s, min_tensors)
    seconds, measured = timed(picked)
    return PoseidonTime(seconds * total / measured, len(picked), measured, extrapolated=True)


def prepare(model: BenchModel, max_segments: int | None) -> tuple[PreparedModel, float, str]:
    """Prepare the model (at most ``max_segments`` segments, or refute's default cuts) under
    the default load limits, else under :data:`RAISED_LIMITS`; with the preparation time and
    the default limits' refusal (empty when none)."""
    refusal = ""
    start = time.perf_counter()
    try:
        prepared = prepare_model(model.onnx_bytes, max_segments=max_segments)
    except ModelTooLarge as exc:
        refusal = str(exc)
        start = time.perf_counter()
        prepared = prepare_model(model.onnx_bytes, limits=RAISED_LIMITS,
                                 max_segments=max_segments)
    return prepared, time.perf_counter() - start, refusal


def measure(model: BenchModel, repeat: int, budget: float, console: Console,
            max_segments: int | None = None) -> dict[str, Any]:
    """Every figure of one model, as a JSON-ready dict (seconds and bytes); the states are
    those of the provider's optimized run (:class:`refute.provider_session.StateSession`)."""
    console.print(f"[dim]{model.name}: preparing…[/dim]")
    prepared, prepare_s, refusal = prepare(model, max_segments)
    inputs = random_inputs(prepared.loaded, seed=0)
    states = prepared.state_session.run(inputs)
    n = prepared.segmentation.num_segments
    total_elements = elements(states)
    sizes = [state_nbytes(s) for s in states]
    total_bytes = sum(sizes)

    console.print(f"[dim]{model.name}: inference…[/dim]")
    session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
    inference_s = warm_median(lambda: session.run(None, feeds), repeat)

    console.print(f"[dim]{model.name}: commitment…[/dim]")
    commit_s = warm_median(lambda: TraceCommitment.of_states(SCALE, states), repeat)
    commit_1t_s = warm_median(lambda: TraceCommitment.of_states(SCALE, states, threads=1),
                              repeat)
    console.print(f"[dim]{model.name}: Poseidon…[/dim]")
    poseidon = time_poseidon(states, budget)
    console.print(f"[dim]{model.name}: run_trace…[/dim]")
    run_trace_s = warm_median(lambda: run_trace(prepared, inputs), repeat)
    deterministic_s = warm_median(lambda: run_trace(prepared, inputs, deterministic=True),
                                  max(1, repeat // 5))

    disclosed = statistics.mean(sizes[i - 1] + sizes[i] for i in range(1, n + 1))
    commitment_bytes = WORD * (n + 1) + WORD
    per_result = SPOT_CHECK_P * SEGMENTS_CHECKED * disclosed + commitment_bytes
    return {
        "description": model.description,
        "onnx_bytes": len(model.onnx_bytes),
        "default_limits_refusal": refusal,
        "limits": dataclasses.asdict(RAISED_LIMITS) if refusal else None,
        "prepare_s": prepare_s,
        "segments": n,
        "states": len(states),
        "state_elements": total_elements,
        "state_bytes": total_bytes,
        "inference_s": inference_s,
        "commit_s": commit_s,
        "commit_1thread_s": commit_1t_s,
        "poseidon_s": poseidon.seconds,
        "poseidon_extrapolated": poseidon.extrapolated,
        "poseidon_measured_states": poseidon.measured_states,
        "poseidon_measured_elements": poseidon.measured_elements,
        "run_trace_s": run_trace_s,
        "run_trace_deterministic_s": deterministic_s,
        "commit_target": COMMIT_TARGET.get(model.name),
        "run_trace_target": RUN_TRACE_TARGET.get(model.name),
        "bytes_moved": {
            "p": SPOT_CHECK_P,
            "segments_checked": SEGMENTS_CHECKED,
            "mean_disclosed_bytes": disclosed,
            "commitment_bytes": commitment_bytes,
            "expected_per_result": per_result,
            "whole_trace_per_result": total_bytes,
        },
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _ratio(ratio: float) -> str:
    return f"{ratio:.1%}" if ratio < 1 else f"{ratio:,.2f}×"


def _mark(ratio: float, target: float | None, fmt: str) -> str:
    if target is None:
        return "—"
    ok = "[green]met[/green]" if ratio <= target else "[red]missed[/red]"
    return f"≤ {fmt.format(target)} {ok}"


def model_table(name: str, r: dict[str, Any], repeat: int) -> Table:
    """Timing rows of one model's figures."""
    table = Table(title=f"{name}: {r['description']}  (median of {repeat} unless noted)")
    for column in ("figure", "ms", "vs inference", "GB/s", "elements/s", "target", "note"):
        table.add_column(column, justify="left" if column in ("figure", "note") else "right")
    inference = r["inference_s"]
    nbytes, count = r["state_bytes"], r["state_elements"]
    target = r["commit_target"]
    table.add_row("inference (ORT default)", _ms(inference), "1.00×", "", "", "", "baseline")
    for label, key, goal in (("commitment, all cores", "commit_s", target),
                             ("commitment, 1 thread", "commit_1thread_s", None)):
        seconds = r[key]
        table.add_row(label, _ms(seconds), _ratio(seconds / inference),
                      f"{nbytes / seconds / 1e9:.2f}", f"{count / seconds:,.0f}",
                      _mark(seconds / inference, goal, "{:.0%}"), "SHA-256 chunked leaves")
    poseidon = r["poseidon_s"]
    note = (f"extrapolated from {r['poseidon_measured_elements']:,} elements "
            f"({r['poseidon_measured_states']} states), timed once"
            if r["poseidon_extrapolated"] else "timed once")
    table.add_row("old Poseidon (hash_states)", _ms(poseidon), _ratio(poseidon / inference),
                  f"{nbytes / poseidon / 1e9:.3f}", f"{count / poseidon:,.0f}", "",
                  f"{note}; SHA-256 is {poseidon / r['commit_s']:,.0f}× faster")
    trace = r["run_trace_s"]
    table.add_row("run_trace (optimized run + commit)", _ms(trace), _ratio(trace / inference),
                  "", "", _mark(trace / inference, r["run_trace_target"], "{:.1f}×"), "")
    slow = r["run_trace_deterministic_s"]
    table.add_row("run_trace (deterministic, segment by segment)", _ms(slow),
                  _ratio(slow / inference), "", "", "", "")
    return table


def bytes_table(results: dict[str, dict[str, Any]]) -> Table:
    """Bytes moved per result: disclosed states + commitment vs the whole trace."""
    table = Table(title=f"bytes moved per result (spot-check p = {SPOT_CHECK_P}, "
                        f"k = {SEGMENTS_CHECKED} segment, states i-1 and i disclosed)")
    for column in ("model", "mean states i-1 + i", "commitment", "expected per result",
                   "whole trace per result", "whole / expected"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        b = r["bytes_moved"]
        table.add_row(name, f"{b['mean_disclosed_bytes'] / 1e6:,.3f} MB",
                      f"{b['commitment_bytes']:,} B", f"{b['expected_per_result'] / 1e6:,.3f} MB",
                      f"{b['whole_trace_per_result'] / 1e6:,.1f} MB",
                      f"{b['whole_trace_per_result'] / b['expected_per_result']:,.0f}×")
    return table


def main() -> None:
    """Run the benchmark, print its tables and write the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--models", default="mobilenet,gpt2",
                        help="comma-separated: mobilenet, gpt2")
    parser.add_argument("--poseidon-budget", type=float, default=120.0,
                        help="seconds hash_states may take before it is extrapolated")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    parser.add_argument("--max-segments", type=int, default=None,
                        help="cut each model into at most this many segments (default: "
                             "refute's cuts, one per compute-heavy node)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    names = [ALIASES.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    console = Console(width=200)
    models = []
    for name in names:
        try:
            models.append(bench_model(name))
        except ValueError as exc:
            parser.error(str(exc))

    results: dict[str, dict[str, Any]] = {}
    summary = Table(title="models and their states")
    for column in ("model", "ONNX MB", "prepare s", "segments", "states", "state elements",
                   "state MB", "loader"):
        summary.add_column(column, justify="left" if column in ("model", "loader") else "right")
    for model in models:
        r = results[model.name] = measure(model, args.repeat, args.poseidon_budget, console,
                                          args.max_segments)
        loader = (f"default limits refused: {r['default_limits_refusal']}; loaded with "
                  "max_file_bytes = max_initializer_bytes = 2^30, max_model_work = 2^40"
                  if r["default_limits_refusal"] else "default limits")
        summary.add_row(model.name, f"{r['onnx_bytes'] / 1e6:,.1f}", f"{r['prepare_s']:.1f}",
                        str(r["segments"]), str(r["states"]), f"{r['state_elements']:,}",
                        f"{r['state_bytes'] / 1e6:,.1f}", loader)
    console.print(summary)
    for name, r in results.items():
        console.print(model_table(name, r, args.repeat))
    console.print(bytes_table(results))
    if args.out is not None:
        doc = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "onnxruntime": ort.__version__},
            "repeat": args.repeat,
            "scale": SCALE,
            "models": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"summary written to {args.out}")


if __name__ == "__main__":
    main()
