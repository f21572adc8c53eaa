"""Calibration of a tiled segment: a few tile models per tile shape go through EZKL, the others
take their group's settings and largest τ (the EZKL side is replaced here by a recorder; the
real one runs in tests/test_tiled_step.py)."""

from __future__ import annotations

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
from refute.segmentation import run_segment
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
