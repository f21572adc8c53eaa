"""Benchmark the foundation: segmentation, segment-wise execution, commitment throughput.

Prints, per model:

* load + segmentation time;
* deterministic execution of all segments in sequence vs one whole-model run (both under the
  deterministic configuration, and the whole model under ONNX Runtime's default configuration),
  with ratios;
* commitment (SHA-256 chunked leaves + Merkle root) time, elements per second, and its ratio
  to the model's own inference time.

Run: ``.venv/bin/python bench/bench_trace.py [--repeat R] [--workers W]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from refute import zoo
from refute.commitment import TraceCommitment
from refute.executor import DeterministicExecutor
from refute.loading import LoadedModel, load_model
from refute.provider import random_inputs
from refute.segmentation import run_segments, run_whole, segment_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall-clock seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _models() -> list[tuple[str, bytes, dict[str, int]]]:
    models: list[tuple[str, bytes, dict[str, int]]] = [(m.name, m.onnx_bytes, {}) for m in
              (zoo.mlp_8x256(), zoo.cnn(), zoo.residual_block(), zoo.attention_block())]
    shared = SHARED / "3l_relu_conv_fc" / "network.onnx"
    if shared.is_file():
        models.append(("shared/3l_relu_conv_fc", shared.read_bytes(), {"batch_size": 1}))
    return models


def _measure(
    name: str, data: bytes, dims: dict[str, int], repeat: int, workers: int | None
) -> list[str]:
    start = time.perf_counter()
    loaded: LoadedModel = load_model(data, dims=dims)
    seg = segment_model(loaded)
    t_segment = time.perf_counter() - start
    inputs = random_inputs(loaded, seed=1)
    executor = DeterministicExecutor()
    run_whole(executor, loaded, inputs)  # warm the session caches
    states = run_segments(executor, seg, inputs)
    t_whole = median_time(lambda: run_whole(executor, loaded, inputs), repeat)
    t_segs = median_time(lambda: run_segments(executor, seg, inputs), repeat)
    default = ort.InferenceSession(loaded.onnx_bytes, providers=["CPUExecutionProvider"])
    default.run(None, inputs)
    t_default = median_time(lambda: default.run(None, inputs), repeat)
    elements = sum(t.size for s in states for t in s)

    def commit() -> TraceCommitment:
        return TraceCommitment.of_states(7, states, threads=workers)

    t_commit = median_time(commit, max(3, repeat // 5))
    return [
        name, str(seg.num_segments), f"{elements:,}", f"{t_segment * 1e3:.1f}",
        f"{t_whole * 1e3:.3f}", f"{t_segs * 1e3:.3f}", f"{t_segs / t_whole:.2f}x",
        f"{t_default * 1e3:.3f}", f"{t_segs / t_default:.2f}x", f"{t_commit * 1e3:.1f}",
        f"{elements / t_commit:,.0f}", f"{t_commit / t_default:.2f}x",
    ]


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    console = Console(width=200)
    table = Table(title="refute foundation benchmark (median of runs, this machine)")
    for column in ("model", "segs", "elements", "load+segment ms", "whole det. ms",
                   "segments ms", "segs/whole", "whole ORT-default ms", "segs/default",
                   "commit ms", "elem/s", "commit/inference"):
        table.add_column(column, justify="right")
    for name, data, dims in _models():
        console.print(f"[dim]measuring {name}…[/dim]")
        table.add_row(*_measure(name, data, dims, args.repeat, args.workers))
    console.print(table)


if __name__ == "__main__":
    main()
