"""Full-size models for benchmarks: MobileNet v1 at 224×224 and a GPT-2-small-shaped transformer.

A thin wrapper over :mod:`refute.large_models`, which defines and exports them (seeded random
weights, opset 17, BatchNorm folded): here they are cached as
``out/bench_models/<name>-seed<seed>-v<VERSION>.onnx`` (``out/`` is gitignored) rather than under
the settings' home. Exporting the transformer (≈ 340 MB of weights) takes about a minute and
needs torch, reading the cache needs neither. Delete the file to rebuild it.

* ``mobilenet_v1``: input ``image`` 1×3×224×224, output ``logits`` 1×1000.
* ``gpt2_small``: input ``embeddings`` 1×128×768, output ``hidden`` 1×128×768.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refute.large_models import NAMES, OPSET, VERSION, large_model
from refute.large_models import gpt2_small_module as _gpt2_small
from refute.large_models import mobilenet_v1_module as _mobilenet_v1

__all__ = ["CACHE", "NAMES", "OPSET", "VERSION", "BenchModel", "_gpt2_small", "_mobilenet_v1",
           "bench_model"]

#: Where exported models are cached (``out/`` is gitignored).
CACHE = Path(__file__).resolve().parents[1] / "out" / "bench_models"


@dataclass(frozen=True)
class BenchModel:
    """One exported model: cache name, what it is, its ONNX bytes."""

    name: str
    description: str
    onnx_bytes: bytes


def bench_model(name: str, *, seed: int = 0, cache: Path = CACHE) -> BenchModel:
    """The model called ``name`` (one of :data:`NAMES`), exported on first use and then read
    from ``cache``; ValueError for another name, :class:`~refute.errors.RefuteError` when it
    must be built and cannot be (no torch)."""
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(NAMES)}")
    model = large_model(name, seed=seed, cache=cache)
    return BenchModel(model.name, model.description, model.onnx_bytes)
