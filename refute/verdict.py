"""The verdict rule, written once: when a proven number convicts the provider.

Every place that turns a proof into a verdict calls this module: the game
(``challenge/game.py``), the prover (``prover/step.py``, ``prover/prover.py``), the offline
check of a proof bundle (``prover/offline.py``) and ``replay`` (``challenge/replay.py``).

**The step rule** (DESIGN.md "The dispute game", step 4): the adjudication proof of segment
``hi`` on (state lo, state hi) proves ``maxdiff = max |f(state lo) − state hi|``;
``maxdiff > τ_hi`` → PROVIDER_FAULT, else CHALLENGER_FAULT. A maxdiff *equal* to τ is within
tolerance: the challenger is at fault (:func:`step_fault`).

**The range rule** (DESIGN.md "Range rule"): the range proof of a revealed state proves its
``max |v|``; ``max |v| > R`` → PROVIDER_FAULT, by itself; else the state is in range after all
and the bisection goes on (:func:`range_fault`). Equal to R is in range.

Conventions, the same everywhere:

* **Units.** Both sides of a comparison are in quantized units of the model scale ``s`` (a float
  ``v`` is ``round(v·2^s)`` units). A proof's public output is an integer at the circuit's
  output scale ``o``; in units of ``s`` it is ``raw · 2^s / 2^o`` (:func:`proven_units`).
* **Exact.** Proven values are :class:`~fractions.Fraction` (or ``int``), never ``float``, and
  are compared without rounding. Thresholds are integers: τ is one by construction
  (calibration), and R in units is ``⌊R · 2^s⌋`` (:func:`range_bound_units`) — the largest
  whole number of units within R. A quantized state holds whole units, so for any whole
  ``max |v|``, ``max |v| > ⌊R·2^s⌋`` exactly when ``max |v| > R·2^s``.
* **Strict.** Only a value strictly greater than its threshold convicts the provider.
* **Non-negative.** A negative proven value or threshold is malformed (:class:`VerdictError`),
  never a verdict.

:func:`within_range` is the quick range check on float tensors (finite and ``|v| ≤ R``) that
decides whether a revealed state needs a range proof at all; a range proof overrules it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import TypeAlias

import numpy as np

from refute.errors import RefuteError

__all__ = [
    "Exact",
    "Verdict",
    "VerdictError",
    "proven_units",
    "range_bound_units",
    "range_fault",
    "range_verdict",
    "step_fault",
    "step_verdict",
    "within_range",
]

Exact: TypeAlias = Fraction | int
"""An exact number: what a proof establishes, compared without rounding."""


class VerdictError(RefuteError):
    """A number given to the verdict rule is malformed (inexact, negative, not an integer)."""

    code = "verdict_error"


class Verdict(enum.StrEnum):
    """What one proof decides, named as the transcript records it."""

    PROVIDER_FAULT = "PROVIDER_FAULT"
    CHALLENGER_FAULT = "CHALLENGER_FAULT"
    """For a step proof: the challenger loses. For a range proof: the provider is *not*
    convicted by it (the state is in range, and the bisection goes on)."""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_exact(x: object) -> bool:
    return isinstance(x, Fraction) or _is_int(x)


def _checked(value: object, threshold: object, value_name: str, threshold_name: str) -> None:
    if not (_is_exact(value) and _is_int(threshold)):
        raise VerdictError(f"{value_name} must be an exact number (a Fraction or an integer) "
                           f"and {threshold_name} an integer")
    assert isinstance(value, Fraction | int) and isinstance(threshold, int)
    if value < 0 or threshold < 0:
        raise VerdictError(f"{value_name} and {threshold_name} must be non-negative")


def step_fault(maxdiff_units: Exact, tolerance: int) -> bool:
    """Whether a step proof convicts the provider: ``maxdiff > τ`` (equal is within τ).

    DESIGN.md "The dispute game", step 4. Raises :class:`VerdictError` if ``maxdiff_units`` is
    not exact or ``tolerance`` not an integer, or either is negative.
    """
    _checked(maxdiff_units, tolerance, "maxdiff", "the tolerance")
    return maxdiff_units > tolerance


def range_fault(max_abs_units: Exact, bound: int) -> bool:
    """Whether a range proof convicts the provider: ``max |v| > R`` in units (equal is in range).

    DESIGN.md "Range rule". ``bound`` is R in units, :func:`range_bound_units`. Raises
    :class:`VerdictError` on malformed numbers, like :func:`step_fault`.
    """
    _checked(max_abs_units, bound, "max |v|", "the bound R")
    return max_abs_units > bound


def step_verdict(maxdiff_units: Exact, tolerance: int) -> Verdict:
    """:func:`step_fault` as a :class:`Verdict`."""
    return Verdict.PROVIDER_FAULT if step_fault(maxdiff_units, tolerance) \
        else Verdict.CHALLENGER_FAULT


def range_verdict(max_abs_units: Exact, bound: int) -> Verdict:
    """:func:`range_fault` as a :class:`Verdict` (CHALLENGER_FAULT: not convicted by it)."""
    return Verdict.PROVIDER_FAULT if range_fault(max_abs_units, bound) \
        else Verdict.CHALLENGER_FAULT


def proven_units(raw: int, *, output_scale: int, scale: int) -> Fraction:
    """A proof's public output ``raw`` (an integer at ``output_scale``) in units of ``scale``:
    ``raw · 2^scale / 2^output_scale``, exactly. A negative ``raw`` is a :class:`VerdictError`
    (a max of absolute values is never negative)."""
    if not (_is_int(raw) and _is_int(output_scale) and _is_int(scale)):
        raise VerdictError("a proven value and its scales must be integers")
    if raw < 0:
        raise VerdictError("the proven value is negative")
    return Fraction(raw * 2**scale, 2**output_scale)


def range_bound_units(range_r: float, scale: int) -> int:
    """R in units of ``scale``: ``⌊R · 2^scale⌋``, computed exactly from the float R.

    The whole number of units a quantized state may reach and still be within R (see the
    module docstring). Raises :class:`VerdictError` for a negative or non-finite R.
    """
    if not (isinstance(range_r, float | int) and not isinstance(range_r, bool)
            and math.isfinite(range_r) and range_r >= 0):
        raise VerdictError(f"the range R must be a finite, non-negative number, not {range_r!r}")
    if not _is_int(scale):
        raise VerdictError(f"the scale must be an integer, not {scale!r}")
    return math.floor(Fraction(range_r) * Fraction(2) ** scale)


def within_range(tensors: Iterable[np.ndarray], bound: float | None) -> bool:
    """The quick range check of a state's float tensors: every value finite and, when the
    manifest declares R (``bound``), ``|v| ≤ R``. An empty tensor is in range.

    DESIGN.md "Range rule". It decides whether a revealed state needs a range proof; the proof,
    exact in units (:func:`range_fault`), has the last word.
    """
    for tensor in tensors:
        values = np.asarray(tensor)
        if values.size == 0:
            continue
        if not bool(np.isfinite(values).all()):
            return False
        if bound is not None and float(np.max(np.abs(values))) > bound:
            return False
    return True


def agrees(ours: Sequence[np.ndarray], theirs: Sequence[np.ndarray], *, scale: int,
           tolerance: int) -> bool:
    """An honest challenger's answer about a revealed state (DESIGN.md "The dispute game",
    step 2): whether every value of ``theirs`` lies within ``tolerance`` quantized units
    (``|a − b| · 2^scale ≤ tolerance``) of its own execution ``ours``, the tensors paired in
    state order. A provider may execute however it likes (optimized, on a GPU): its honest
    states differ from the challenger's deterministic ones by float rounding, far inside τ, so
    comparing leaves would make an honest challenger dispute honest states and lose its bond.
    Use ``tolerance`` τ_k for state k ≥ 1 (:func:`state_tolerance`) and 0 for the inputs.
    A non-finite value or a shape that differs never agrees.
    """
    if len(ours) != len(theirs):
        return False
    bound = tolerance / 2**scale
    for a, b in zip(ours, theirs, strict=True):
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
            return False
        if x.size and float(np.max(np.abs(x - y))) > bound:
            return False
    return True


def state_tolerance(tolerances: Sequence[int] | None, k: int) -> int:
    """The tolerance a challenger compares state ``k`` with: τ_k of the segment that produced
    it, and 0 for the inputs (state 0) or an uncalibrated manifest."""
    if k == 0 or tolerances is None:
        return 0
    return int(tolerances[k - 1])
