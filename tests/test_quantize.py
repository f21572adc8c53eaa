"""Quantization equals ezkl.float_to_felt exactly, and refuses what EZKL silently mangles."""

from __future__ import annotations

import ezkl
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refute.errors import CommitmentError
from refute.quantize import dequantize, quantize


def _ezkl_int(value: float, scale: int) -> int:
    return int(ezkl.felt_to_int(ezkl.float_to_felt(float(value), scale)))


EDGES = [0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999999999999994, 1e-9, -1e-9,
         0.0078125, 0.00390625, -0.00390625, 3.999, 1234.5678, -98765.4321]


@pytest.mark.parametrize("scale", [0, 1, 7, 13, 20])
def test_edges_match_ezkl(scale: int) -> None:
    values = np.array(EDGES, dtype=np.float64)
    assert quantize(values, scale).tolist() == [_ezkl_int(v, scale) for v in EDGES]


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32),
    st.integers(min_value=0, max_value=16),
)
def test_float32_values_match_ezkl(value: float, scale: int) -> None:
    array = np.array([value], dtype=np.float32)
    assert int(quantize(array, scale)[0]) == _ezkl_int(float(array[0]), scale)


def test_half_ulp_ties_round_away_from_zero() -> None:
    # k + 0.5 at scale 0 for many k: numpy's round-half-even would differ on even k.
    values = np.arange(-50, 50, dtype=np.float64) + 0.5
    assert quantize(values, 0).tolist() == [_ezkl_int(v, 0) for v in values]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused(bad: float) -> None:
    with pytest.raises(CommitmentError, match="non-finite"):
        quantize(np.array([1.0, bad], dtype=np.float32), 7)


def test_too_large_and_bad_scale_are_refused() -> None:
    with pytest.raises(CommitmentError, match="too large"):
        quantize(np.array([2.0**60], dtype=np.float64), 7)
    for scale in (-1, 31, 7.0, True):
        with pytest.raises(CommitmentError, match="scale"):
            quantize(np.zeros(2, np.float32), scale)  # type: ignore[arg-type]
    with pytest.raises(CommitmentError, match="floating"):
        quantize(np.zeros(2, np.int64), 7)


def test_roundtrip_error_is_half_a_step() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 4, size=1000).astype(np.float32)
    back = dequantize(quantize(x, 7), 7)
    assert np.max(np.abs(back - x)) <= 0.5 / 128 + 1e-12
