"""Fixed-point quantization of states, exactly as ``ezkl.float_to_felt`` does it.

A float ``v`` at scale ``s`` becomes the integer ``round(v · 2^s)``, rounding half away from zero
(Rust's ``f64::round``), and that integer maps into the BN254 scalar field as ``n mod p``. EZKL
quietly turns NaN into 0 and saturates huge values; refuse both instead, so that a committed
state always means what it says.
"""

from __future__ import annotations

import numpy as np

from refute.errors import CommitmentError

#: Scales (log2 of the fixed-point multiplier) refute accepts.
MIN_SCALE = 0
MAX_SCALE = 30
#: The scale used until the prover's calibration picks one for a model; EZKL's own default.
DEFAULT_SCALE = 7
#: Largest |round(v · 2^s)| accepted: far inside both int64 and EZKL's i128 representation.
MAX_QUANTIZED = 2**62


def check_scale(scale: int) -> int:
    """Return ``scale`` if it is an integer within the accepted range, else raise."""
    if isinstance(scale, bool) or not isinstance(scale, int) or not MIN_SCALE <= scale <= MAX_SCALE:
        raise CommitmentError(
            f"scale must be an integer in {MIN_SCALE}..{MAX_SCALE}, got {scale!r}"
        )
    return scale


def quantize(values: np.ndarray, scale: int) -> np.ndarray:
    """Quantize a float tensor to int64 fixed point at ``scale`` (same shape).

    Raises :class:`CommitmentError` on NaN, infinities, or values too large to represent.
    """
    check_scale(scale)
    x = np.asarray(values)
    if x.dtype.kind != "f":
        raise CommitmentError(f"only floating-point tensors are quantized, got {x.dtype}")
    x = x.astype(np.float64)  # exact from float32
    finite = np.isfinite(x)
    if not finite.all():
        first = int(np.flatnonzero(~finite.ravel())[0])
        raise CommitmentError(
            f"tensor holds a non-finite value {x.ravel()[first]} at index {first}"
        )
    y = x * float(2**scale)  # multiplying by a power of two is exact
    if y.size and float(np.abs(y).max()) >= MAX_QUANTIZED:
        raise CommitmentError(f"tensor holds a value too large to quantize at scale {scale}")
    whole = np.trunc(y)
    frac = y - whole  # exact in IEEE arithmetic
    rounded = whole + np.where(np.abs(frac) >= 0.5, np.sign(y), 0.0)
    return np.asarray(rounded, dtype=np.int64)  # a 0-d input stays an array, not a scalar


def quantize_whole(values: np.ndarray) -> np.ndarray:
    """A tensor of whole numbers (an integer or boolean input carried as float32) as int64, at
    scale 0, the way EZKL takes an integer input.

    Raises :class:`CommitmentError` as :func:`quantize` does, and on any value that is not a
    whole number: there is exactly one committed form of such a tensor (rounding would let two
    different tensors, which the model reads differently, share one hash).
    """
    quantized = quantize(values, 0)
    x = np.asarray(values, dtype=np.float64)
    if x.size and not np.array_equal(quantized, x):
        first = int(np.flatnonzero((quantized != x).ravel())[0])
        raise CommitmentError(f"tensor of whole numbers holds {x.ravel()[first]} at index "
                              f"{first}")
    return quantized


def dequantize(quantized: np.ndarray, scale: int) -> np.ndarray:
    """The float64 values a quantized tensor stands for."""
    check_scale(scale)
    return np.asarray(quantized, dtype=np.float64) / float(2**scale)
