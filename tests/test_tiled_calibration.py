"""Calibration of a tiled segment: a few tile models per tile shape go through EZKL, the others
take their group's settings and largest τ (the EZKL side is replaced here by a recorder; the
real one runs in tests/test_tiled_step.py)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from prover.calibration import (
    MODEL_SAMPLES,
    CalibrationRules,
    SegmentCalibration,
    calibrate_tiled_segment,
)
from refute.executor import DeterministicExecutor
from refute.loading import load_model
from refute.segmentation import Segment, run_segment, run_segments, segment_model
from refute.tiling import plan_tiling, rows_bound
from tests.test_tiling import _conv


def test_a_few_models_per_tile_shape_are_calibrated_the_rest_inherit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    segment = _conv(4, 12, 6, kernel=1, pad=0)  # 12 output channels in blocks of 2: 6 models
    calls: list[dict[str, Any] | None] = []

    def fake(self: CalibrationRules, graph: bytes, index: int,
             samples: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], *,
             settings: dict[str, Any] | None = None) -> SegmentCalibration:
        calls.append(settings)
        assert samples and all(x[0].shape == (1, 4, 6, 6) for x, _ in samples)
        found = {"run_args": {"logrows": 12, "num_inner_cols": 2}, "num_rows": 100}
        return SegmentCalibration(index, settings or found, tolerance=len(calls),
                                  honest_maxdiff=None, logrows=12)

    monkeypatch.setattr(CalibrationRules, "segment", fake)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    y = run_segment(DeterministicExecutor(), segment, (x,))
    rules = CalibrationRules(scale=7, bound=8.0, safety=2.0, max_logrows=20, timeout_s=60)
    found = calibrate_tiled_segment(segment, [1, 2, 6, 6], [[[x], list(y)]], rules)
    assert found.tiling is not None
    models = found.tiling["models"]
    assert len(models) == 6 and sum(m["tiles"] for m in models) == found.tiling["tiles"] == 6
    assert len(calls) == MODEL_SAMPLES == 3
    assert calls[0] is None and calls[1] == calls[2] == models[0]["settings"]  # searched once
    inherited = [m for m in models if m.get("calibrated") is False]
    assert len(inherited) == 3
    assert all(m["settings"] == models[0]["settings"] and m["tolerance"] == 3
               for m in inherited)
    assert found.tolerance == 3  # the segment's τ: the largest calibrated


def test_a_later_segment_of_the_same_tile_structure_skips_the_search(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any] | None] = []

    def fake(self: CalibrationRules, graph: bytes, index: int,
             samples: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], *,
             settings: dict[str, Any] | None = None) -> SegmentCalibration:
        calls.append(settings)
        found = {"run_args": {"logrows": 12 + len(calls)}, "num_rows": 100}
        return SegmentCalibration(index, settings or found, tolerance=1, honest_maxdiff=None,
                                  logrows=12)

    monkeypatch.setattr(CalibrationRules, "segment", fake)
    rules = CalibrationRules(scale=7, bound=8.0, safety=2.0, max_logrows=20, timeout_s=60)
    known: dict[str, dict[str, Any]] = {}

    def calibrate(segment: Segment) -> list[dict[str, Any] | None]:
        x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
        y = run_segment(DeterministicExecutor(), segment, (x,))
        calls.clear()
        calibrate_tiled_segment(segment, [1, 2, 6, 6], [[[x], list(y)]], rules, known=known)
        return list(calls)

    first = calibrate(_conv(4, 12, 6, kernel=1, pad=0))
    assert first[0] is None and len(known) == 1  # searched once, remembered
    again = calibrate(_conv(4, 12, 6, kernel=1, pad=0))  # another block, same structure
    assert again == [first[1]] * MODEL_SAMPLES  # no search: the first block's settings
    other = calibrate(_conv(4, 12, 6, kernel=3, pad=1))  # another structure: its own search
    assert other[0] is None and len(known) == 2


def test_tile_shapes_calibrate_in_parallel_into_the_same_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tile shapes of a segment (here the fused QKV projection of a small transformer:
    one per output) calibrate at once, up to ``workers``; the record does not depend on it."""
    from tests.test_tiling_gpt2 import _export

    segmentation = segment_model(load_model(_export()))
    segment = segmentation.segments[0]
    x = np.random.default_rng(0).uniform(-2, 2, (1, 8, 16)).astype(np.float32)
    run = [list(s) for s in run_segments(DeterministicExecutor(), segmentation,
                                         {"embeddings": x})]
    blocks = plan_tiling(segment, rows_bound(12)).blocks
    lock = threading.Lock()
    active, peak = 0, 0

    def fake(self: CalibrationRules, graph: bytes, index: int,
             samples: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], *,
             settings: dict[str, Any] | None = None) -> SegmentCalibration:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        digest = int(hashlib.sha256(graph).hexdigest(), 16)
        found = {"run_args": {"logrows": 12}, "of": digest % 97}
        return SegmentCalibration(index, settings or found, tolerance=1 + digest % 5,
                                  honest_maxdiff=None, logrows=12)

    monkeypatch.setattr(CalibrationRules, "segment", fake)
    records = []
    for workers in (1, 2):
        peak = 0
        rules = CalibrationRules(scale=7, bound=8.0, safety=2.0, max_logrows=20,
                                 timeout_s=60, workers=workers)
        found = calibrate_tiled_segment(segment, blocks, [run], rules)
        records.append((found.tiling, found.tolerance))
        assert peak == workers
    assert records[0] == records[1]
    assert records[0][0] is not None and len(records[0][0]["models"]) > 2
