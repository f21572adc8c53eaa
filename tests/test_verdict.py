"""The one verdict rule (``refute/verdict.py``): boundaries, exactness, units, and that the game and
the prover decide by it."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from challenge import game
from prover import step as prover_step
from refute.errors import RefuteError
from refute.verdict import (
    Verdict,
    VerdictError,
    agrees,
    proven_units,
    range_bound_units,
    range_fault,
    range_verdict,
    state_tolerance,
    step_fault,
    step_verdict,
    within_range,
)

fractions = st.fractions(min_value=0, max_value=10**6, max_denominator=2**20)
thresholds = st.integers(min_value=0, max_value=10**6)

# --- the step rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maxdiff", "tolerance", "convicted"),
    [
        (Fraction(5), 5, False),  # equal to τ: within tolerance, the challenger is at fault
        (5, 5, False),  # an int is as exact as a Fraction
        (Fraction(5) + Fraction(1, 2**40), 5, True),  # the smallest excess still convicts
        (Fraction(5) - Fraction(1, 2**40), 5, False),
        (Fraction(6), 5, True),
        (Fraction(0), 0, False),
        (Fraction(1, 3), 0, True),
    ],
)
def test_step_rule_is_strictly_greater(maxdiff: Fraction | int, tolerance: int,
                                       convicted: bool) -> None:
    assert step_fault(maxdiff, tolerance) is convicted
    assert step_verdict(maxdiff, tolerance) is (
        Verdict.PROVIDER_FAULT if convicted else Verdict.CHALLENGER_FAULT)


@pytest.mark.parametrize(
    ("max_abs", "bound", "convicted"),
    [(Fraction(128), 128, False), (Fraction(257, 2), 128, True), (Fraction(0), 0, False),
     (129, 128, True)],
)
def test_range_rule_is_strictly_greater(max_abs: Fraction | int, bound: int,
                                        convicted: bool) -> None:
    assert range_fault(max_abs, bound) is convicted
    assert range_verdict(max_abs, bound) is (
        Verdict.PROVIDER_FAULT if convicted else Verdict.CHALLENGER_FAULT)


@pytest.mark.parametrize(
    ("value", "threshold", "fragment"),
    [
        (5.0, 5, "Fraction"),  # a float is never compared: the rule is exact
        (Fraction(5), 4.5, "integer"),
        (Fraction(5), Fraction(5), "integer"),
        (True, 5, "Fraction"),
        (Fraction(5), True, "integer"),
        ("5", 5, "Fraction"),
        (Fraction(-1), 5, "non-negative"),
        (Fraction(1), -1, "non-negative"),
    ],
)
def test_malformed_numbers_are_refused_not_judged(value: Any, threshold: Any,
                                                  fragment: str) -> None:
    for rule in (step_fault, range_fault, step_verdict, range_verdict):
        with pytest.raises(VerdictError, match=fragment) as info:
            rule(value, threshold)
        assert isinstance(info.value, RefuteError) and "\n" not in info.value.reason


@given(fractions, thresholds)
def test_verdicts_name_the_rule(value: Fraction, threshold: int) -> None:
    assert (step_verdict(value, threshold) is Verdict.PROVIDER_FAULT) is (value > threshold)
    assert (range_verdict(value, threshold) is Verdict.PROVIDER_FAULT) is (value > threshold)


def test_verdict_names_are_the_transcripts() -> None:
    assert [v.value for v in Verdict] == ["PROVIDER_FAULT", "CHALLENGER_FAULT"]
    assert {v.value for v in Verdict} <= {v.value.upper() for v in game.Verdict}


# --- units ------------------------------------------------------------------------------------


def test_proven_units_are_exact() -> None:
    assert proven_units(3, output_scale=2, scale=0) == Fraction(3, 4)
    assert proven_units(3, output_scale=7, scale=7) == 3
    assert proven_units(1, output_scale=0, scale=7) == 128
    assert proven_units(0, output_scale=9, scale=3) == 0
    with pytest.raises(VerdictError, match="negative"):
        proven_units(-1, output_scale=7, scale=7)
    with pytest.raises(VerdictError, match="integers"):
        proven_units(1.0, output_scale=7, scale=7)  # type: ignore[arg-type]


def test_the_prover_wraps_a_negative_instance_as_a_rejected_proof() -> None:
    from prover.errors import ProofRejected

    assert prover_step.maxdiff_units(5, output_scale=8, scale=7) == Fraction(5, 2)
    with pytest.raises(ProofRejected, match="negative"):
        prover_step.maxdiff_units(-5, output_scale=8, scale=7)


@pytest.mark.parametrize(
    ("range_r", "scale", "units"),
    [(1.0, 7, 128), (3.7, 7, 473), (0.0, 7, 0), (2.5, 1, 5), (0.1, 10, 102), (3, 0, 3),
     (1.0, -1, 0)],
)
def test_the_range_bound_is_the_whole_units_within_r(range_r: float, scale: int,
                                                     units: int) -> None:
    assert range_bound_units(range_r, scale) == units
    assert type(range_bound_units(range_r, scale)) is int


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5, True, "1.0", None])
def test_a_malformed_range_is_refused(bad: Any) -> None:
    with pytest.raises(VerdictError, match="range R"):
        range_bound_units(bad, 7)


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
       st.integers(min_value=0, max_value=24), st.integers(min_value=0, max_value=2**45))
def test_whole_units_compare_the_same_with_the_floored_bound(range_r: float, scale: int,
                                                             units: int) -> None:
    """A quantized state holds whole units: against ⌊R·2^s⌋ or the exact R·2^s, the range rule
    convicts the same states."""
    bound = range_bound_units(range_r, scale)
    assert bound <= Fraction(range_r) * 2**scale < bound + 1
    assert range_fault(units, bound) is (units > Fraction(range_r) * 2**scale)


# --- the quick range check --------------------------------------------------------------------


def test_within_range_needs_finite_values_within_r() -> None:
    ok = [np.array([[-2.0, 1.5]], dtype=np.float32), np.array([0.25], dtype=np.float32)]
    assert within_range(ok, 2.0)  # |v| equal to R is in range
    assert not within_range(ok, 1.99)
    assert within_range(ok, None)  # no R declared: only finiteness
    assert within_range([np.zeros((0, 3), dtype=np.float32)], 0.0)  # empty: nothing breaks it
    assert within_range([], 1.0)
    for bad in (math.nan, math.inf, -math.inf):
        tensors = [*ok, np.array([bad], dtype=np.float32)]
        assert not within_range(tensors, 1e9)
        assert not within_range(tensors, None)


# --- every caller decides by it ---------------------------------------------------------------

T0 = 1_700_000_000.0
CLOCKS = game.TimeControl(provider=60.0, challenger=60.0, proof_timeout=60.0)


def _step_proof_state() -> game.DisputeState:
    state, _ = game.apply(None, game.Open.single_step(
        actor=game.Actor.CHALLENGER, at=T0, n=4, step=2, clocks=CLOCKS))
    assert state.phase is game.Phase.STEP_PROOF
    return state


def _range_proof_state() -> game.DisputeState:
    state, _ = game.apply(None, game.Open.whole_trace(
        actor=game.Actor.CHALLENGER, at=T0, n=4, clocks=CLOCKS))
    state, _ = game.apply(state, game.Reveal(actor=game.Actor.PROVIDER, at=T0 + 1, state=2,
                                             matches_leaf=True, in_range=False))
    assert state.phase is game.Phase.RANGE_PROOF
    return state


@given(fractions, thresholds)
def test_the_game_judges_a_step_proof_by_the_rule(maxdiff: Fraction, tolerance: int) -> None:
    new, _ = game.apply(_step_proof_state(), game.ProofOutcome(
        actor=game.Actor.SERVICE, at=T0 + 1, step=2, maxdiff_units=maxdiff, tolerance=tolerance,
        valid=True))
    assert new.verdict is not None
    assert new.verdict.value.upper() == step_verdict(maxdiff, tolerance).value


@given(fractions, thresholds)
def test_the_game_judges_a_range_proof_by_the_rule(max_abs: Fraction, bound: int) -> None:
    new, _ = game.apply(_range_proof_state(), game.RangeOutcome(
        actor=game.Actor.SERVICE, at=T0 + 2, state=2, max_abs_units=max_abs, bound=bound,
        valid=True))
    if range_fault(max_abs, bound):
        assert new.verdict is game.Verdict.PROVIDER_FAULT
    else:  # in range after all: the challenger answers about the state
        assert (new.verdict, new.phase) == (None, game.Phase.ANSWER)


def test_the_game_refuses_what_the_rule_refuses() -> None:
    state = _step_proof_state()
    move = game.ProofOutcome(actor=game.Actor.SERVICE, at=T0 + 1, step=2,
                             maxdiff_units=Fraction(-1), tolerance=3, valid=True)
    with pytest.raises(game.IllegalMove, match="step proof: maxdiff and the tolerance must be "
                                               "non-negative"):
        game.apply(state, move)


def test_the_prover_uses_the_same_verdict() -> None:
    assert prover_step.Verdict is Verdict


def test_a_challenger_agrees_within_tau_of_its_own_execution() -> None:
    ours = [np.array([1.0, -2.0, 3.5], np.float32), np.zeros((2, 2), np.float32)]
    ulp = [np.nextafter(t, np.float32(np.inf)) for t in ours]
    assert agrees(ours, ulp, scale=7, tolerance=1)         # float rounding: far inside τ
    assert not agrees(ours, ulp, scale=7, tolerance=0)     # the inputs: exact
    assert agrees(ours, [t.copy() for t in ours], scale=7, tolerance=0)
    at_tau = [ours[0] + np.float32(3 / 128), ours[1]]
    assert agrees(ours, at_tau, scale=7, tolerance=3)      # exactly τ units: agree
    assert not agrees(ours, at_tau, scale=7, tolerance=2)  # beyond τ: disagree
    assert not agrees(ours, [ours[0], np.full((2, 2), np.nan, np.float32)], scale=7,
                      tolerance=10**6)
    assert not agrees(ours, [ours[0]], scale=7, tolerance=1)             # a tensor missing
    assert not agrees(ours, [ours[0], np.zeros(4, np.float32)], scale=7, tolerance=1)  # shape
    assert state_tolerance((5, 9), 0) == 0 and state_tolerance((5, 9), 2) == 9
    assert state_tolerance(None, 1) == 0
