"""Spot-check sampling and the check of one segment against a perturbed trace."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from refute import zoo
from refute.executor import DeterministicExecutor
from refute.provider import prepare_model, run_trace
from refute.trace import Trace
from verifier.spotcheck import Finding, SpotCheckError, check_segment, sample_segments

KEY = b"service secret"


def test_sampling_is_keyed_deterministic_and_respects_p_and_k() -> None:
    picks = [sample_segments(KEY, f"res_{n}", num_segments=8, probability=0.1, count=2)
             for n in range(2000)]
    assert picks == [sample_segments(KEY, f"res_{n}", num_segments=8, probability=0.1, count=2)
                     for n in range(2000)]
    sampled = [p for p in picks if p]
    assert 140 <= len(sampled) <= 260  # ≈ 10 % of 2000
    assert all(len(p) == 2 and len(set(p)) == 2 and all(1 <= i <= 8 for i in p) for p in sampled)
    # Another key gives another (unpredictable) selection.
    other = [sample_segments(b"other", f"res_{n}", num_segments=8, probability=0.1, count=2)
             for n in range(2000)]
    assert other != picks
    assert sample_segments(KEY, "r", num_segments=3, probability=1.0, count=9) == [1, 2, 3]
    assert sample_segments(KEY, "r", num_segments=3, probability=0.0, count=1) == []
    with pytest.raises(SpotCheckError):
        sample_segments(KEY, "r", num_segments=3, probability=1.5, count=1)


def test_check_passes_honest_and_catches_perturbed_segment() -> None:
    model = zoo.mlp_8x256()
    prepared = prepare_model(model.onnx_bytes)
    manifest = dataclasses.replace(prepared.manifest, tolerances=(2,) * 8, range=64.0)
    prepared = dataclasses.replace(prepared, manifest=manifest)
    trace = run_trace(prepared, model.sample_input(0))
    executor = DeterministicExecutor()
    for i in range(1, 9):
        check = check_segment(executor, prepared.segmentation, trace, i)
        assert check.finding is Finding.PASS and check.maxdiff_units == 0
    states = [list(s) for s in trace.states]
    states[5][0] = states[5][0].copy()
    states[5][0].flat[7] += 0.5  # 64 quantized units at scale 7, far beyond 2·τ
    cheat = Trace.from_states(manifest, states)
    assert check_segment(executor, prepared.segmentation, cheat, 5).finding is Finding.FAULT
    # Segment 6 starts from the perturbed state: its own step is honest *given* that state,
    # except that it no longer matches the committed state 6.
    assert check_segment(executor, prepared.segmentation, cheat, 6).finding is Finding.FAULT
    assert check_segment(executor, prepared.segmentation, cheat, 4).finding is Finding.PASS
    uncalibrated = Trace.from_states(dataclasses.replace(manifest, tolerances=None),
                                     [list(s) for s in trace.states])
    with pytest.raises(SpotCheckError, match="calibrated"):
        check_segment(executor, prepared.segmentation, uncalibrated, 1)
    with pytest.raises(SpotCheckError, match="outside"):
        check_segment(executor, prepared.segmentation, trace, 9)
    assert np.isfinite(trace.states[0][0]).all()
