"""The dispute game (challenge/game.py): every transition and refusal, clocks and timeouts, and a
stateful property test with scripted honest and dishonest actors."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from challenge import game
from challenge.game import (
    TRANSITIONS,
    Actor,
    Answer,
    Choice,
    Close,
    Disclose,
    DisputeState,
    Effect,
    GameError,
    IllegalMove,
    InvalidDisputeState,
    Move,
    NameTile,
    Open,
    Phase,
    ProofOutcome,
    RangeOutcome,
    RequestAnswer,
    RequestDisclosure,
    RequestRangeProof,
    RequestReveal,
    RequestStepProof,
    RequestTile,
    Resolved,
    Reveal,
    Tick,
    TimeControl,
    Verdict,
    apply,
    max_rounds,
    timeout_at,
)
from challenge.ledger import Ledger
from refute.errors import RefuteError

P, C, S = Actor.PROVIDER, Actor.CHALLENGER, Actor.SERVICE
CLOCKS = TimeControl(provider=3600.0, challenger=3600.0, proof_timeout=600.0)
T0 = 1000.0
STAKE, BOND = 1000, 100
TOL = 4
R = 1 << 20


# --- helpers ---------------------------------------------------------------------------------


def open_whole(n: int = 8, at: float = T0, clocks: TimeControl = CLOCKS) -> DisputeState:
    state, effects = apply(None, Open.whole_trace(actor=C, at=at, n=n, clocks=clocks))
    assert len(effects) == 1
    return state


def open_undisclosed(n: int, *, clocks: TimeControl = CLOCKS, single: int | None = None
                     ) -> DisputeState:
    """Open over a result whose trace the service does not have (whole trace or one step)."""
    move = (Open.whole_trace(actor=C, at=T0, n=n, clocks=clocks, disclosed=False) if single is None
            else Open.single_step(actor=C, at=T0, n=n, step=single, clocks=clocks,
                                  disclosed=False))
    state, effects = apply(None, move)
    assert effects == [RequestDisclosure()]
    return state


def open_step(n: int, step: int, at: float = T0) -> DisputeState:
    state, _ = apply(None, Open.single_step(actor=C, at=at, n=n, step=step, clocks=CLOCKS))
    return state


def open_tiled(n: int = 8, step: int = 3, tiles: int = 4, at: float = T0) -> DisputeState:
    """Open one step of a trace whose every segment is cut into ``tiles`` tiles."""
    state, effects = apply(None, Open.single_step(actor=C, at=at, n=n, step=step, clocks=CLOCKS,
                                                  tiles=(tiles,) * n))
    assert effects == [RequestTile(step, tiles)] and state.phase is Phase.TILE
    return state


def reveal(state: DisputeState, at: float, *, ok: bool = True, in_range: bool = True) -> Reveal:
    assert state.pending is not None
    return Reveal(actor=P, at=at, state=state.pending, matches_leaf=ok, in_range=in_range)


def answer(state: DisputeState, at: float, choice: Choice) -> Answer:
    assert state.pending is not None
    return Answer(actor=C, at=at, state=state.pending, choice=choice)


def proof(state: DisputeState, at: float, maxdiff: Fraction | int, *,
          valid: bool = True) -> ProofOutcome:
    return ProofOutcome(
        actor=S, at=at, step=state.hi, maxdiff_units=Fraction(maxdiff), tolerance=TOL, valid=valid,
        tile=state.tile,
    )


def range_outcome(state: DisputeState, at: float, max_abs: int, *, valid: bool = True) -> Move:
    assert state.pending is not None
    return RangeOutcome(
        actor=S,
        at=at,
        state=state.pending,
        max_abs_units=Fraction(max_abs),
        bound=R,
        valid=valid,
    )


def refused(state: DisputeState | None, move: Move, *fragments: str) -> str:
    """Apply ``move``, expect IllegalMove mentioning every fragment; return the reason."""
    with pytest.raises(IllegalMove) as info:
        apply(state, move)
    reason = info.value.reason
    assert "\n" not in reason
    for fragment in fragments:
        assert fragment in reason, reason
    return reason


def to_step_proof(n: int, choices: list[Choice]) -> DisputeState:
    """Open over the whole trace and answer ``choices`` until the step proof (one second each)."""
    state = open_whole(n)
    t = T0
    for choice in choices:
        t += 1
        state, _ = apply(state, reveal(state, t))
        t += 1
        state, _ = apply(state, answer(state, t, choice))
    assert state.phase is Phase.STEP_PROOF
    return state


def example_move(move_type: type[Move], state: DisputeState | None, actor: Actor) -> Move:
    """A well-formed move of ``move_type`` for ``state`` (legal or not), made by ``actor``."""
    at = T0 if state is None else state.last_move_at
    pending = 1 if state is None or state.pending is None else state.pending
    hi = 1 if state is None else state.hi
    if move_type is Open:
        return Open.whole_trace(actor=actor, at=at, n=8, clocks=CLOCKS)
    if move_type is Disclose:
        return Disclose(actor=actor, at=at, matches_commitment=True)
    if move_type is Reveal:
        return Reveal(actor=actor, at=at, state=pending, matches_leaf=True, in_range=True)
    if move_type is Answer:
        return Answer(actor=actor, at=at, state=pending, choice=Choice.AGREE)
    if move_type is NameTile:
        return NameTile(actor=actor, at=at, step=hi, tile=0)
    if move_type is RangeOutcome:
        return RangeOutcome(
            actor=actor, at=at, state=pending, max_abs_units=Fraction(0), bound=R, valid=True
        )
    if move_type is ProofOutcome:
        return ProofOutcome(
            actor=actor, at=at, step=hi, maxdiff_units=Fraction(0), tolerance=TOL, valid=True,
            tile=None if state is None else state.tile,
        )
    if move_type is Close:
        return Close(actor=actor, at=at, by="dsp_convicting")
    return Tick(actor=actor, at=at)


MOVE_TYPES: list[type[Move]] = [Open, Disclose, Reveal, Answer, NameTile, RangeOutcome,
                                ProofOutcome, Tick, Close]
MOVER: dict[type[Move], Actor] = {
    Open: C,
    Disclose: P,
    Reveal: P,
    Answer: C,
    NameTile: C,
    RangeOutcome: S,
    ProofOutcome: S,
    Tick: S,
    Close: S,
}


def state_in(phase: Phase | None) -> DisputeState | None:
    """A reachable state in ``phase`` (``None`` is "no dispute yet")."""
    if phase is None:
        return None
    if phase is Phase.DISCLOSE:
        return open_undisclosed(8)
    if phase is Phase.TILE:
        return open_tiled()
    state = open_whole(8)
    if phase is Phase.REVEAL:
        return state
    if phase is Phase.RANGE_PROOF:
        return apply(state, reveal(state, T0 + 1, in_range=False))[0]
    state = apply(state, reveal(state, T0 + 1))[0]
    if phase is Phase.ANSWER:
        return state
    if phase is Phase.STEP_PROOF:
        return open_step(8, 3)
    return apply(open_step(8, 3), proof(open_step(8, 3), T0 + 1, 0))[0]


ALL_PHASES: list[Phase | None] = [None, *Phase]


# --- errors, enums, helpers ------------------------------------------------------------------


def test_errors_are_refute_errors_with_codes() -> None:
    for cls, code in (
        (IllegalMove, "illegal_move"),
        (GameError, "game_error"),
        (InvalidDisputeState, "invalid_dispute_state"),
    ):
        assert issubclass(cls, RefuteError)
        assert cls.code == code
        assert str(cls("why")) == "why"


def test_phase_has_no_zero_or_default_member() -> None:
    assert all(isinstance(p.value, str) and p.value for p in Phase)
    fields = dataclasses.fields(DisputeState)
    assert all(f.default is dataclasses.MISSING for f in fields)
    assert all(f.default_factory is dataclasses.MISSING for f in fields)


def test_verdict_at_fault() -> None:
    assert Verdict.PROVIDER_FAULT.at_fault() is P
    assert Verdict.PROVIDER_TIMEOUT.at_fault() is P
    assert Verdict.CHALLENGER_FAULT.at_fault() is C
    assert Verdict.CHALLENGER_TIMEOUT.at_fault() is C
    assert Verdict.ABORTED.at_fault() is None


@pytest.mark.parametrize(
    ("n", "rounds"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (64, 6), (65, 7)]
)
def test_max_rounds_is_ceil_log2(n: int, rounds: int) -> None:
    assert max_rounds(n) == rounds


@pytest.mark.parametrize("n", [0, -1])
def test_max_rounds_refuses_empty_traces(n: int) -> None:
    with pytest.raises(GameError):
        max_rounds(n)


def test_game_module_is_pure() -> None:
    """No I/O, clock, database, Celery or randomness can enter the rules."""
    tree = ast.parse(Path(game.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {
        "__future__",
        "collections",
        "dataclasses",
        "enum",
        "fractions",
        "math",
        "types",
        "typing",
        "refute",
    }, imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"open", "print", "input"}


def test_dispute_state_rejects_inconsistent_fields() -> None:
    good = open_whole(8)
    for changes in (
        {"lo": 5, "hi": 5},
        {"hi": 9},
        {"lo": -1},
        {"pending": 3},
        {"phase": Phase.STEP_PROOF},
        {"provider_clock": -1.0},
        {"challenger_clock": float("nan")},
        {"verdict": Verdict.ABORTED},
        {"phase": Phase.RESOLVED, "pending": None},
        {"moves": 0},
        {"tile": 0},                       # a tile named while bisecting
        {"tiles": (2, 2)},                 # not one count per segment
        {"tiles": (0,) * 8},
    ):
        with pytest.raises(InvalidDisputeState):
            dataclasses.replace(good, **changes)
    tiled = open_tiled()
    for changes in ({"tile": 1}, {"phase": Phase.STEP_PROOF},  # no tile named in step_proof
                    {"tiles": (1,) * 8}):                      # tile phase of a whole segment
        with pytest.raises(InvalidDisputeState):
            dataclasses.replace(tiled, **changes)
    proving = apply(tiled, NameTile(actor=C, at=T0 + 1, step=3, tile=3))[0]
    with pytest.raises(InvalidDisputeState):
        dataclasses.replace(proving, tile=4)  # segment 3 has tiles 0..3


# --- opening -----------------------------------------------------------------------------------


def test_open_whole_trace_requests_the_middle_state() -> None:
    state, effects = apply(None, Open.whole_trace(actor=C, at=T0, n=8, clocks=CLOCKS))
    assert effects == [RequestReveal(4)]
    assert (state.lo, state.hi, state.pending, state.phase) == (0, 8, 4, Phase.REVEAL)
    assert state.turn is P
    assert state.provider_clock == state.challenger_clock == 3600.0
    assert (state.rounds, state.moves, state.verdict, state.reason) == (0, 1, None, None)
    assert state.last_move_at == state.turn_started == T0
    assert timeout_at(state) == T0 + 3600.0


@pytest.mark.parametrize("step", [1, 4, 8])
def test_open_single_step_goes_straight_to_the_step_proof(step: int) -> None:
    state, effects = apply(None, Open.single_step(actor=C, at=T0, n=8, step=step, clocks=CLOCKS))
    assert effects == [RequestStepProof(step)]
    assert (state.lo, state.hi, state.phase, state.pending) == (
        step - 1,
        step,
        Phase.STEP_PROOF,
        step,
    )
    assert state.turn is None
    assert timeout_at(state) == T0 + CLOCKS.proof_timeout


def test_open_whole_trace_of_one_segment_is_a_single_step() -> None:
    state, effects = apply(None, Open.whole_trace(actor=C, at=T0, n=1, clocks=CLOCKS))
    assert effects == [RequestStepProof(1)]
    assert state.phase is Phase.STEP_PROOF


def test_open_sub_range() -> None:
    state, effects = apply(None, Open(actor=C, at=T0, n=10, lo=2, hi=7, clocks=CLOCKS))
    assert effects == [RequestReveal(4)]
    assert (state.lo, state.hi) == (2, 7)


@pytest.mark.parametrize(
    ("n", "lo", "hi"), [(8, -1, 3), (8, 3, 3), (8, 4, 3), (8, 0, 9), (0, 0, 0), (8, 8, 9)]
)
def test_open_refuses_bad_ranges(n: int, lo: int, hi: int) -> None:
    refused(None, Open(actor=C, at=T0, n=n, lo=lo, hi=hi, clocks=CLOCKS), "open")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("which", ["provider", "challenger", "proof_timeout"])
def test_open_refuses_bad_clocks(bad: float, which: str) -> None:
    clocks = dataclasses.replace(CLOCKS, **{which: bad})
    refused(None, Open.whole_trace(actor=C, at=T0, n=8, clocks=clocks), which)


@pytest.mark.parametrize("actor", [P, S])
def test_only_the_challenger_opens(actor: Actor) -> None:
    refused(None, Open.whole_trace(actor=actor, at=T0, n=8, clocks=CLOCKS), "challenger")


@pytest.mark.parametrize("move_type", [Reveal, Answer, RangeOutcome, ProofOutcome, Tick])
def test_nothing_but_open_before_a_dispute(move_type: type[Move]) -> None:
    move = example_move(move_type, None, MOVER[move_type])
    refused(None, move, move_type.__name__, "before a dispute is open")


@pytest.mark.parametrize("at", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_timestamps_are_refused(at: float) -> None:
    refused(None, Open.whole_trace(actor=C, at=at, n=8, clocks=CLOCKS), "timestamp")
    state = open_whole()
    refused(state, reveal(state, at), "timestamp")
    refused(state, Tick(actor=S, at=at), "timestamp")


# --- the transition table --------------------------------------------------------------------


ILLEGAL_PAIRS = [
    (phase, move_type)
    for phase in ALL_PHASES
    for move_type in MOVE_TYPES
    if (phase, move_type) not in TRANSITIONS
]


@pytest.mark.parametrize(
    ("phase", "move_type"),
    ILLEGAL_PAIRS,
    ids=[f"{'none' if p is None else p.value}-{t.__name__}" for p, t in ILLEGAL_PAIRS],
)
def test_moves_outside_the_table_are_illegal(phase: Phase | None, move_type: type[Move]) -> None:
    state = state_in(phase)
    assert (None if state is None else state.phase) is phase
    reason = refused(state, example_move(move_type, state, MOVER[move_type]), move_type.__name__)
    if phase is Phase.RESOLVED:
        assert "resolved" in reason
    elif phase is not None:
        assert phase.value in reason


@pytest.mark.parametrize("key", list(TRANSITIONS), ids=lambda k: f"{k[0]}-{k[1].__name__}")
def test_every_table_entry_refuses_the_other_parties(key: tuple[Phase | None, type[Move]]) -> None:
    phase, move_type = key
    state = state_in(phase)
    rule_ = TRANSITIONS[key]
    assert rule_.actor is MOVER[move_type]
    for actor in Actor:
        if actor is not rule_.actor:
            refused(state, example_move(move_type, state, actor), rule_.actor.value, actor.value)


def test_table_covers_every_live_phase_with_a_tick_and_none_for_resolved() -> None:
    for phase in Phase:
        assert ((phase, Tick) in TRANSITIONS) is (phase is not Phase.RESOLVED)
    assert not [k for k in TRANSITIONS if k[0] is Phase.RESOLVED]


# --- reveal ----------------------------------------------------------------------------------


def test_reveal_in_range_asks_the_challenger_and_charges_the_provider() -> None:
    state = open_whole(8)
    new, effects = apply(state, reveal(state, T0 + 10))
    assert effects == [RequestAnswer(4)]
    assert (new.phase, new.pending, new.turn) == (Phase.ANSWER, 4, C)
    assert new.provider_clock == 3590.0
    assert new.challenger_clock == 3600.0
    assert new.turn_started == T0 + 10
    assert new.moves == 2
    assert new.rounds == 0
    assert timeout_at(new) == T0 + 10 + 3600.0


def test_reveal_out_of_range_asks_for_a_range_proof() -> None:
    state = open_whole(8)
    new, effects = apply(state, reveal(state, T0 + 10, in_range=False))
    assert effects == [RequestRangeProof(4)]
    assert (new.phase, new.pending, new.turn) == (Phase.RANGE_PROOF, 4, None)
    assert new.provider_clock == 3590.0
    assert timeout_at(new) == T0 + 10 + CLOCKS.proof_timeout


def test_non_matching_reveal_counts_as_no_reveal_and_the_clock_keeps_running() -> None:
    state = open_whole(8)
    refused(state, reveal(state, T0 + 100, ok=False), "does not match", "state 4")
    # The refused reveal changed nothing: a later good reveal pays for the whole wait.
    new, _ = apply(state, reveal(state, T0 + 250))
    assert new.provider_clock == 3600.0 - 250
    # And without a good reveal, the provider's clock runs out.
    assert apply(state, Tick(actor=S, at=T0 + 3600))[0].verdict is Verdict.PROVIDER_TIMEOUT


def test_reveal_of_another_state_is_refused() -> None:
    state = open_whole(8)
    for other in (0, 3, 5, 8):
        move = Reveal(actor=P, at=T0 + 1, state=other, matches_leaf=True, in_range=True)
        refused(state, move, "state 4 is pending", f"state {other}")


# --- answer ----------------------------------------------------------------------------------


def test_agree_moves_lo_up_and_disagree_moves_hi_down() -> None:
    state = open_whole(8)
    revealed, _ = apply(state, reveal(state, T0 + 1))
    agreed, effects = apply(revealed, answer(revealed, T0 + 31, Choice.AGREE))
    assert (agreed.lo, agreed.hi, agreed.pending, agreed.phase) == (4, 8, 6, Phase.REVEAL)
    assert effects == [RequestReveal(6)]
    assert agreed.challenger_clock == 3570.0
    assert agreed.provider_clock == 3599.0
    assert agreed.rounds == 1
    assert agreed.turn is P
    disagreed, effects = apply(revealed, answer(revealed, T0 + 2, Choice.DISAGREE))
    assert (disagreed.lo, disagreed.hi, disagreed.pending) == (0, 4, 2)
    assert effects == [RequestReveal(2)]


def test_last_answer_leads_to_the_step_proof() -> None:
    state = to_step_proof(8, [Choice.AGREE, Choice.DISAGREE, Choice.AGREE])
    assert (state.lo, state.hi, state.pending) == (5, 6, 6)
    assert state.rounds == 3 == max_rounds(8)
    state = open_whole(2)
    state, _ = apply(state, reveal(state, T0 + 1))
    state, effects = apply(state, answer(state, T0 + 2, Choice.DISAGREE))
    assert effects == [RequestStepProof(1)]
    assert (state.lo, state.hi, state.phase, state.turn) == (0, 1, Phase.STEP_PROOF, None)


def test_answer_about_another_state_is_refused() -> None:
    state = open_whole(8)
    state, _ = apply(state, reveal(state, T0 + 1))
    move = Answer(actor=C, at=T0 + 2, state=2, choice=Choice.AGREE)
    refused(state, move, "state 4 is pending", "state 2")


# --- range proof -----------------------------------------------------------------------------


def in_range_proof() -> DisputeState:
    state = open_whole(8)
    return apply(state, reveal(state, T0 + 1, in_range=False))[0]


def test_range_proof_over_the_bound_is_a_provider_fault() -> None:
    state = in_range_proof()
    new, effects = apply(state, range_outcome(state, T0 + 50, R + 1))
    assert new.verdict is Verdict.PROVIDER_FAULT
    assert new.phase is Phase.RESOLVED
    assert effects == [Resolved(Verdict.PROVIDER_FAULT, new.reason or "")]
    assert "range" in (new.reason or "")
    assert timeout_at(new) is None


def test_range_proof_within_the_bound_resumes_the_bisection() -> None:
    state = in_range_proof()
    new, effects = apply(state, range_outcome(state, T0 + 50, R))
    assert effects == [RequestAnswer(4)]
    assert (new.phase, new.turn, new.turn_started) == (Phase.ANSWER, C, T0 + 50)
    # Nobody's clock ran during the proof.
    assert (new.provider_clock, new.challenger_clock) == (3599.0, 3600.0)


def test_invalid_or_misdirected_range_proofs_are_refused() -> None:
    state = in_range_proof()
    refused(state, range_outcome(state, T0 + 5, R + 1, valid=False), "invalid")
    other = RangeOutcome(
        actor=S, at=T0 + 5, state=3, max_abs_units=Fraction(R + 1), bound=R, valid=True
    )
    refused(state, other, "state 4 is under proof", "state 3")
    negative = dataclasses.replace(other, state=4, max_abs_units=Fraction(-1))
    refused(state, negative, "non-negative")


# --- step proof ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maxdiff", "verdict"),
    [
        (Fraction(TOL) + Fraction(1, 1000), Verdict.PROVIDER_FAULT),
        (Fraction(10**9), Verdict.PROVIDER_FAULT),
        (Fraction(TOL), Verdict.CHALLENGER_FAULT),
        (Fraction(0), Verdict.CHALLENGER_FAULT),
    ],
)
def test_step_proof_verdict(maxdiff: Fraction, verdict: Verdict) -> None:
    state = to_step_proof(8, [Choice.DISAGREE, Choice.DISAGREE, Choice.DISAGREE])
    assert state.hi == 1
    new, effects = apply(state, proof(state, state.last_move_at + 7, maxdiff))
    assert new.verdict is verdict
    assert effects == [Resolved(verdict, new.reason or "")]
    assert "step 1" in (new.reason or "")
    assert (new.phase, new.pending, new.turn) == (Phase.RESOLVED, None, None)
    assert (new.lo, new.hi, new.rounds) == (state.lo, state.hi, state.rounds)
    assert new.provider_clock == state.provider_clock
    assert new.challenger_clock == state.challenger_clock


def test_invalid_proof_is_refused() -> None:
    state = open_step(8, 3)
    refused(state, proof(state, T0 + 1, 100, valid=False), "invalid", "step 3")


@pytest.mark.parametrize("other", [2, 4, 0, 9])
def test_proof_for_another_step_is_refused(other: int) -> None:
    state = open_step(8, 3)
    move = ProofOutcome(
        actor=S, at=T0 + 1, step=other, maxdiff_units=Fraction(100), tolerance=TOL, valid=True
    )
    refused(state, move, "step 3 is under proof", f"step {other}")


def test_negative_maxdiff_or_tolerance_is_refused() -> None:
    state = open_step(8, 3)
    move = ProofOutcome(
        actor=S, at=T0 + 1, step=3, maxdiff_units=Fraction(-1), tolerance=TOL, valid=True
    )
    refused(state, move, "non-negative")
    refused(state, dataclasses.replace(move, maxdiff_units=Fraction(0), tolerance=-1), "negative")
    inexact = dataclasses.replace(move, maxdiff_units=5.0)  # type: ignore[arg-type]
    refused(state, inexact, "Fraction")
    fractional_tolerance = dataclasses.replace(move, tolerance=4.5)  # type: ignore[arg-type]
    refused(state, dataclasses.replace(fractional_tolerance, maxdiff_units=Fraction(5)), "integer")


# --- tiles ----------------------------------------------------------------------------------


def test_a_tiled_step_waits_for_the_challenger_to_name_a_tile() -> None:
    state = open_tiled(step=3, tiles=4)
    assert state.turn is C and timeout_at(state) == T0 + CLOCKS.challenger
    named, effects = apply(state, NameTile(actor=C, at=T0 + 30, step=3, tile=2))
    assert effects == [RequestStepProof(3, 2)]
    assert named.phase is Phase.STEP_PROOF and named.tile == 2 and named.turn is None
    assert named.challenger_clock == CLOCKS.challenger - 30  # naming a tile is on C's clock
    done, effects = apply(named, proof(named, T0 + 40, TOL + 1))
    assert done.verdict is Verdict.PROVIDER_FAULT and done.tile == 2
    assert effects == [Resolved(Verdict.PROVIDER_FAULT, "step 3 tile 2: maxdiff 5 > tolerance 4")]


def test_bisection_ends_on_a_tile_only_where_the_segment_is_tiled() -> None:
    tiles = (1, 3, 1, 1, 5, 1, 1, 2)
    for step, count in enumerate(tiles, start=1):
        state, effects = apply(None, Open.whole_trace(actor=C, at=T0, n=8, clocks=CLOCKS,
                                                      tiles=tiles))
        t = T0
        while state.phase is Phase.REVEAL:  # agree below step, disagree from it on
            t += 1
            state, _ = apply(state, reveal(state, t))
            assert state.pending is not None
            choice = Choice.AGREE if state.pending < step else Choice.DISAGREE
            state, effects = apply(state, answer(state, t, choice))
        assert state.hi == step
        if count > 1:
            assert state.phase is Phase.TILE and effects == [RequestTile(step, count)]
        else:
            assert state.phase is Phase.STEP_PROOF and effects == [RequestStepProof(step)]


def test_bad_tiles_and_tile_moves_are_refused() -> None:
    refused(None, Open.whole_trace(actor=C, at=T0, n=8, clocks=CLOCKS, tiles=(2, 2)),
            "one count")
    refused(None, Open.whole_trace(actor=C, at=T0, n=2, clocks=CLOCKS, tiles=(1, 0)),
            "one count")
    state = open_tiled(step=3, tiles=4)
    refused(state, NameTile(actor=C, at=T0 + 1, step=4, tile=0), "segment 3", "not segment 4")
    for bad in (-1, 4, True):
        refused(state, NameTile(actor=C, at=T0 + 1, step=3, tile=bad), "tiles 0..3")
    refused(state, NameTile(actor=P, at=T0 + 1, step=3, tile=0), "challenger")
    refused(state, proof(state, T0 + 1, 0), "not a legal move in phase tile")
    named = apply(state, NameTile(actor=C, at=T0 + 1, step=3, tile=1))[0]
    wrong_tile = dataclasses.replace(proof(named, T0 + 2, 0), tile=0)
    refused(named, wrong_tile, "tile 1 of step 3 is under proof", "not tile 0")
    refused(named, dataclasses.replace(wrong_tile, tile=None), "not tile None")


def test_a_challenger_that_names_no_tile_times_out() -> None:
    state = open_tiled(step=3, tiles=4)
    early, effects = apply(state, Tick(actor=S, at=T0 + CLOCKS.challenger - 1))
    assert early is state and effects == []
    late, effects = apply(state, Tick(actor=S, at=T0 + CLOCKS.challenger))
    assert late.verdict is Verdict.CHALLENGER_TIMEOUT and late.challenger_clock == 0
    assert "name a tile of step 3" in (late.reason or "")


def test_tiles_survive_the_state_codec_and_old_states_load() -> None:
    from challenge.codec import state_from_json, state_to_json

    named = apply(open_tiled(step=3, tiles=4), NameTile(actor=C, at=T0 + 1, step=3, tile=2))[0]
    assert state_from_json(state_to_json(named)) == named
    plain = open_whole(8)
    stored = state_to_json(plain)
    del stored["tiles"], stored["tile"]  # written before tiles existed
    assert state_from_json(stored) == plain


# --- resolution ------------------------------------------------------------------------------


def resolved_states() -> list[DisputeState]:
    step = open_step(8, 3)
    out = [apply(step, proof(step, T0 + 1, 100))[0], apply(step, proof(step, T0 + 1, 0))[0]]
    out.append(apply(step, Tick(actor=S, at=T0 + 600))[0])
    reveal_phase = open_whole(8)
    out.append(apply(reveal_phase, Tick(actor=S, at=T0 + 3600))[0])
    ranged = in_range_proof()
    out.append(apply(ranged, range_outcome(ranged, T0 + 2, R + 5))[0])
    return out


@pytest.mark.parametrize("state", resolved_states(), ids=lambda s: str(s.verdict))
def test_every_move_after_resolution_is_illegal(state: DisputeState) -> None:
    assert state.resolved and timeout_at(state) is None
    for move_type in MOVE_TYPES:
        for actor in Actor:
            for at in (state.last_move_at, state.last_move_at + 10**6):
                move = dataclasses.replace(example_move(move_type, state, actor), at=at)
                refused(state, move, "resolved", move_type.__name__)


def test_no_double_resolution() -> None:
    state = open_step(8, 3)
    first, _ = apply(state, proof(state, T0 + 1, 100))
    refused(first, proof(state, T0 + 2, 0), "resolved")
    refused(first, Tick(actor=S, at=T0 + 10**6), "resolved")


# --- clocks and time -------------------------------------------------------------------------


def test_moves_older_than_the_last_are_refused_and_equal_times_are_fine() -> None:
    state = open_whole(8)
    refused(state, reveal(state, T0 - 0.001), "before the last move")
    refused(state, Tick(actor=S, at=T0 - 1), "before the last move")
    new, _ = apply(state, reveal(state, T0))
    assert new.provider_clock == 3600.0
    refused(new, answer(new, T0 - 1, Choice.AGREE), "before the last move")
    step = open_step(8, 3)
    refused(step, proof(step, T0 - 1, 0), "before the last move")


def test_clocks_accumulate_over_turns() -> None:
    state = open_whole(16)
    t = T0
    for spent_p, spent_c in ((100, 10), (200, 20), (300, 30)):
        t += spent_p
        state, _ = apply(state, reveal(state, t))
        t += spent_c
        state, _ = apply(state, answer(state, t, Choice.AGREE))
    assert state.provider_clock == 3600 - 600
    assert state.challenger_clock == 3600 - 60
    assert state.phase is Phase.REVEAL
    assert timeout_at(state) == t + 3000


def test_provider_timeout() -> None:
    clocks = TimeControl(provider=100.0, challenger=50.0, proof_timeout=10.0)
    state = open_whole(8, clocks=clocks)
    state, _ = apply(state, reveal(state, T0 + 60))  # 40 s left
    state, _ = apply(state, answer(state, T0 + 70, Choice.AGREE))  # 40 s left
    deadline = timeout_at(state)
    assert deadline == T0 + 70 + 40
    # Just before the deadline: an early tick changes nothing, a reveal is still in time.
    assert apply(state, Tick(actor=S, at=deadline - 0.5)) == (state, [])
    assert apply(state, reveal(state, deadline - 0.5))[0].provider_clock == 0.5
    # At the deadline: the reveal is late, the tick applies the timeout.
    refused(state, reveal(state, deadline), "deadline passed", "Tick")
    new, effects = apply(state, Tick(actor=S, at=deadline))
    assert new.verdict is Verdict.PROVIDER_TIMEOUT
    assert new.verdict.at_fault() is P
    assert effects == [Resolved(Verdict.PROVIDER_TIMEOUT, new.reason or "")]
    assert new.provider_clock == 0.0
    assert new.challenger_clock == 40.0
    late, _ = apply(state, Tick(actor=S, at=deadline + 1000))
    assert late.verdict is Verdict.PROVIDER_TIMEOUT


def test_challenger_timeout() -> None:
    clocks = TimeControl(provider=100.0, challenger=50.0, proof_timeout=10.0)
    state = open_whole(8, clocks=clocks)
    state, _ = apply(state, reveal(state, T0 + 5))
    assert timeout_at(state) == T0 + 55
    assert apply(state, Tick(actor=S, at=T0 + 54.9)) == (state, [])
    refused(state, answer(state, T0 + 55, Choice.DISAGREE), "deadline passed")
    new, effects = apply(state, Tick(actor=S, at=T0 + 55))
    assert new.verdict is Verdict.CHALLENGER_TIMEOUT
    assert new.verdict.at_fault() is C
    assert (new.challenger_clock, new.provider_clock) == (0.0, 95.0)
    assert effects == [Resolved(Verdict.CHALLENGER_TIMEOUT, new.reason or "")]


def test_missing_step_proof_aborts_with_nobody_at_fault() -> None:
    state = open_step(8, 3)
    assert apply(state, Tick(actor=S, at=T0 + 599)) == (state, [])
    refused(state, proof(state, T0 + 600, 100), "deadline passed")
    new, effects = apply(state, Tick(actor=S, at=T0 + 600))
    assert new.verdict is Verdict.ABORTED
    assert new.verdict.at_fault() is None
    assert effects == [Resolved(Verdict.ABORTED, new.reason or "")]
    # Nobody's clock ran while the service was proving.
    assert (new.provider_clock, new.challenger_clock) == (3600.0, 3600.0)


def test_missing_range_proof_aborts() -> None:
    state = in_range_proof()
    deadline = timeout_at(state)
    assert deadline == T0 + 1 + 600
    refused(state, range_outcome(state, deadline, R + 1), "deadline passed")
    assert apply(state, Tick(actor=S, at=deadline))[0].verdict is Verdict.ABORTED


def test_proof_phases_do_not_run_party_clocks() -> None:
    state = in_range_proof()
    new, _ = apply(state, range_outcome(state, T0 + 500, 0))
    assert new.challenger_clock == 3600.0
    assert timeout_at(new) == T0 + 500 + 3600.0


def test_apply_is_deterministic_and_leaves_its_input_alone() -> None:
    state = open_whole(8)
    copy = dataclasses.replace(state)
    first = apply(state, reveal(state, T0 + 3))
    second = apply(state, reveal(state, T0 + 3))
    assert first == second
    assert state == copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.lo = 3  # type: ignore[misc]


# --- disclosure (the trace was not uploaded) ----------------------------------------------------


@pytest.mark.parametrize("single", [None, 3])
def test_undisclosed_open_waits_for_the_provider_on_its_clock(single: int | None) -> None:
    state = open_undisclosed(8, single=single)
    assert (state.phase, state.pending, state.turn, state.rounds) == (
        Phase.DISCLOSE, None, P, 0)
    assert timeout_at(state) == T0 + CLOCKS.provider
    new, effects = apply(state, Disclose(actor=P, at=T0 + 30, matches_commitment=True))
    assert new.provider_clock == CLOCKS.provider - 30
    assert new.challenger_clock == CLOCKS.challenger
    assert new.moves == 2 and new.rounds == 0
    if single is None:  # the bisection starts as if the trace had been there at open
        assert (new.phase, new.pending, effects) == (Phase.REVEAL, 4, [RequestReveal(4)])
    else:  # a single step goes to its proof: both of its states are now available
        assert (new.phase, new.pending, effects) == (Phase.STEP_PROOF, 3, [RequestStepProof(3)])


def test_a_disclosure_that_breaks_the_commitment_counts_as_none() -> None:
    state = open_undisclosed(8)
    refused(state, Disclose(actor=P, at=T0 + 5, matches_commitment=False), "keeps running")
    later, _ = apply(state, Disclose(actor=P, at=T0 + 9, matches_commitment=True))
    assert later.provider_clock == CLOCKS.provider - 9  # the refused try stopped nothing


def test_a_provider_that_never_discloses_times_out() -> None:
    clocks = TimeControl(provider=20.0, challenger=50.0, proof_timeout=10.0)
    state = open_undisclosed(4, clocks=clocks)
    assert apply(state, Tick(actor=S, at=T0 + 19.9)) == (state, [])
    refused(state, Disclose(actor=P, at=T0 + 20, matches_commitment=True), "deadline passed")
    new, effects = apply(state, Tick(actor=S, at=T0 + 20))
    assert new.verdict is Verdict.PROVIDER_TIMEOUT and new.provider_clock == 0.0
    assert new.challenger_clock == 50.0
    assert effects == [Resolved(Verdict.PROVIDER_TIMEOUT, new.reason or "")]


# --- exhaustive small cases --------------------------------------------------------------------


def right(k: int, f: int | None) -> bool:
    """Whether the provider's state k equals the honest execution (wrong from f on)."""
    return f is None or k < f


def oracle_maxdiff(lo: int, hi: int, f: int | None, tile: int | None = None,
                   lie_tile: int | None = None) -> Fraction:
    """Simulated adjudication proof: over τ exactly when state hi is wrong and state lo right
    (and, on a tiled segment, the proven tile is the one holding the lie)."""
    lie_here = tile is None or tile == lie_tile
    return (Fraction(TOL + 1) if right(lo, f) and not right(hi, f) and lie_here
            else Fraction(TOL, 2))


@pytest.mark.parametrize("n", range(1, 65))
def test_honest_challenger_convicts_any_lie(n: int) -> None:
    for f in range(1, n + 1):
        state = open_whole(n)
        t = T0
        while state.phase is Phase.REVEAL:
            t += 1
            state, _ = apply(state, reveal(state, t))
            assert state.pending is not None
            choice = Choice.AGREE if right(state.pending, f) else Choice.DISAGREE
            state, _ = apply(state, answer(state, t, choice))
        assert state.rounds <= max_rounds(n)
        assert right(state.lo, f) and not right(state.hi, f)
        state, _ = apply(state, proof(state, t, oracle_maxdiff(state.lo, state.hi, f)))
        assert state.verdict is Verdict.PROVIDER_FAULT


@pytest.mark.parametrize("n", range(1, 17))
def test_honest_provider_survives_every_answer_sequence(n: int) -> None:
    for choices in itertools.product(Choice, repeat=max_rounds(n)):
        state = open_whole(n)
        t = T0
        used = iter(choices)
        while state.phase is Phase.REVEAL:
            t += 1
            state, _ = apply(state, reveal(state, t))
            state, _ = apply(state, answer(state, t, next(used)))
        state, _ = apply(state, proof(state, t, oracle_maxdiff(state.lo, state.hi, None)))
        assert state.verdict is Verdict.CHALLENGER_FAULT


# --- stateful property test --------------------------------------------------------------------


TIMED_OUT: dict[Verdict, Actor] = {
    Verdict.PROVIDER_TIMEOUT: P,
    Verdict.CHALLENGER_TIMEOUT: C,
    Verdict.ABORTED: S,
}


@dataclasses.dataclass(frozen=True)
class HonestRule:
    """An honest-actor rule as a named check over the machine, with its one-line rationale."""

    name: str
    rationale: str
    holds: Callable[[DisputeMachine], bool]


def _lo_right(m: DisputeMachine) -> bool:
    return not m.challenger_honest or right(m.state.lo, m.f)


def _hi_wrong(m: DisputeMachine) -> bool:
    return not (m.challenger_honest and m.f is not None) or not right(m.state.hi, m.f)


def _honest_provider_never_faulted(m: DisputeMachine) -> bool:
    return m.f is not None or m.state.verdict is not Verdict.PROVIDER_FAULT


def _honest_challenger_convicts(m: DisputeMachine) -> bool:
    verdict = m.state.verdict
    if not (m.challenger_honest and m.f is not None) or verdict is None:
        return True
    return verdict is Verdict.PROVIDER_FAULT or (
        verdict in TIMED_OUT and TIMED_OUT[verdict] is m.stalled
    )


def _only_stallers_time_out(m: DisputeMachine) -> bool:
    verdict = m.state.verdict
    return verdict not in TIMED_OUT or TIMED_OUT[verdict] is m.stalled


HONEST_RULES: list[HonestRule] = [
    HonestRule(
        "HC-LO-RIGHT",
        "an honest challenger agrees only with states equal to its own execution",
        _lo_right,
    ),
    HonestRule(
        "HC-HI-WRONG",
        "an honest challenger disputes only states that differ from its own execution",
        _hi_wrong,
    ),
    HonestRule(
        "HP-NEVER-FAULT",
        "an honest provider's committed states are right, so no proof can convict it",
        _honest_provider_never_faulted,
    ),
    HonestRule(
        "HC-CONVICTS",
        "an honest challenger keeps lo right and hi wrong, so the last step's proof convicts",
        _honest_challenger_convicts,
    ),
    HonestRule(
        "ONLY-STALLERS-TIME-OUT",
        "a party that never stalled cannot lose on time; only a late service aborts",
        _only_stallers_time_out,
    ),
]


class DisputeMachine(RuleBasedStateMachine):
    """Scripted provider, challenger and service playing one dispute, checked after every move.

    The provider's committed trace is right for states < f and wrong from f on (f = None: fully
    honest); some wrong states are out of range. The challenger is honest (answers by its own
    execution) or dishonest (random answers). One party may stall on one of its turns; the
    service's timer then ticks at or after the deadline.
    """

    state: DisputeState

    @initialize(data=st.data())
    def open_dispute(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, 64), label="n")
        self.n = n
        self.f: int | None = data.draw(st.none() | st.integers(1, n), label="f")
        wrong = [] if self.f is None else list(range(self.f, n + 1))
        self.out_of_range = data.draw(
            st.frozensets(st.sampled_from(wrong)) if wrong else st.just(frozenset[int]()),
            label="out_of_range",
        )
        # The orchestrator's quick range check may also flag right states: the proof decides.
        self.flagged = self.out_of_range | data.draw(
            st.frozensets(st.integers(0, n)), label="spurious_flags"
        )
        self.challenger_honest = data.draw(st.booleans(), label="challenger_honest")
        self.staller: Actor | None = data.draw(
            st.sampled_from([None, None, None, P, C, S]), label="staller"
        )
        self.stall_turn = data.draw(st.integers(0, 6), label="stall_turn")
        self.turns = {P: 0, C: 0, S: 0}
        self.stalled: Actor | None = None
        self.rng = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
        self.clocks = TimeControl(
            provider=data.draw(st.sampled_from([1.0, 60.0, 3600.0])),
            challenger=data.draw(st.sampled_from([1.0, 60.0, 3600.0])),
            proof_timeout=data.draw(st.sampled_from([0.5, 600.0])),
        )
        single = data.draw(st.sampled_from([False, False, False, True]), label="single_step")
        if self.challenger_honest and self.f is not None:
            step = self.f  # an honest challenger names the first wrong state's segment
        else:
            step = data.draw(st.integers(1, n), label="step")
        disclosed = data.draw(st.booleans(), label="trace_uploaded")
        # Some segments tiled (1-4 tiles each); the lie, if any, sits in one tile of each.
        self.tiles: tuple[int, ...] = data.draw(
            st.just(()) | st.lists(st.integers(1, 4), min_size=n, max_size=n).map(tuple),
            label="tiles")
        self.lie_tile = data.draw(st.integers(0, 3), label="lie_tile")
        move = (
            Open.single_step(actor=C, at=T0, n=n, step=step, clocks=self.clocks,
                             disclosed=disclosed, tiles=self.tiles)
            if single
            else Open.whole_trace(actor=C, at=T0, n=n, clocks=self.clocks, disclosed=disclosed,
                                  tiles=self.tiles)
        )
        self.state, effects = apply(None, move)
        self.check_effects(effects)
        # The bonds behind the game: the provider's stake and the challenger's bond are locked
        # at open and settled by the verdict, exactly as the orchestrator does.
        self.ledger = Ledger()
        self.ledger.deposit("prov", STAKE)
        self.ledger.lock_stake("res", "prov", STAKE)
        self.ledger.deposit("chal", BOND)
        self.ledger.post_bond("dsp", "chal", BOND, result_id="res")
        self.width0 = self.state.hi - self.state.lo
        self.last_width = self.width0
        self.last_rounds = 0

    # --- scripted actors ---------------------------------------------------------------------

    def check_effects(self, effects: list[Effect]) -> None:
        """Exactly one effect, matching the new phase."""
        s = self.state
        expected: dict[Phase, Effect] = {
            Phase.DISCLOSE: RequestDisclosure(),
            Phase.REVEAL: RequestReveal(s.pending or 0),
            Phase.ANSWER: RequestAnswer(s.pending or 0),
            Phase.RANGE_PROOF: RequestRangeProof(s.pending or 0),
            Phase.TILE: RequestTile(s.hi, s.tiles_of(s.hi)),
            Phase.STEP_PROOF: RequestStepProof(s.hi, s.tile),
            Phase.RESOLVED: Resolved(s.verdict or Verdict.ABORTED, s.reason or ""),
        }
        assert effects == [expected[s.phase]]

    def step_move(self) -> Move:
        """The next move of whoever is to move, following the script (stall or act)."""
        s = self.state
        mover = s.turn or S
        deadline = timeout_at(s)
        assert deadline is not None
        if mover is self.staller and self.turns[mover] == self.stall_turn:
            self.stalled = mover
            return Tick(actor=S, at=deadline + self.rng.choice([0.0, 0.25, 1e6]))
        self.turns[mover] += 1
        budget = deadline - s.turn_started
        at = s.turn_started + budget * self.rng.choice([0.0, 0.01, 0.3, 0.9])
        at = min(at, deadline)
        if at >= deadline:  # float rounding: act at the last representable moment instead
            at = s.turn_started
        if s.phase is Phase.DISCLOSE:  # the committed trace, as uploaded
            return Disclose(actor=P, at=at, matches_commitment=True)
        m = s.pending
        assert m is not None
        if s.phase is Phase.REVEAL:
            return Reveal(
                actor=P, at=at, state=m, matches_leaf=True, in_range=m not in self.flagged
            )
        if s.phase is Phase.ANSWER:
            if self.challenger_honest:
                choice = Choice.AGREE if right(m, self.f) else Choice.DISAGREE
            else:
                choice = self.rng.choice(list(Choice))
            return Answer(actor=C, at=at, state=m, choice=choice)
        if s.phase is Phase.TILE:  # an honest challenger names the tile holding the lie
            count = s.tiles_of(s.hi)
            lie = self.lie_tile % count
            tile = (lie if self.challenger_honest and not right(s.hi, self.f)
                    else self.rng.randrange(count))
            return NameTile(actor=C, at=at, step=s.hi, tile=tile)
        if s.phase is Phase.RANGE_PROOF:
            max_abs = R + 1 if m in self.out_of_range else self.rng.randint(0, R)
            return RangeOutcome(
                actor=S, at=at, state=m, max_abs_units=Fraction(max_abs), bound=R, valid=True
            )
        return ProofOutcome(
            actor=S,
            at=at,
            step=s.hi,
            maxdiff_units=oracle_maxdiff(s.lo, s.hi, self.f, s.tile,
                                         self.lie_tile % s.tiles_of(s.hi)),
            tolerance=TOL,
            valid=True,
            tile=s.tile,
        )

    def play(self) -> None:
        self.state, effects = apply(self.state, self.step_move())
        self.check_effects(effects)
        for effect in effects:
            if isinstance(effect, Resolved):
                self.ledger.settle("dsp", effect.verdict.value.upper(), network_id="net",
                                   challenger_share_bps=5000, provider_share_bps=5000)

    def expect_refused(self, move: Move) -> None:
        before = self.state
        with pytest.raises(IllegalMove):
            apply(before, move)
        assert self.state is before

    # --- rules -------------------------------------------------------------------------------

    @precondition(lambda self: not self.state.resolved)
    @rule()
    def next_move(self) -> None:
        self.play()

    @precondition(lambda self: self.state.phase is Phase.DISCLOSE)
    @rule()
    def provider_discloses_another_trace(self) -> None:
        """A trace that does not match the commitment is refused and stops no clock."""
        at = self.state.last_move_at
        self.expect_refused(Disclose(actor=P, at=at, matches_commitment=False))

    @precondition(lambda self: self.state.phase is Phase.REVEAL)
    @rule(data=st.data())
    def provider_reveals_something_else(self, data: st.DataObject) -> None:
        """A cheating provider can only reveal committed states: anything else is refused."""
        m = self.state.pending
        at = self.state.last_move_at
        self.expect_refused(Reveal(actor=P, at=at, state=m or 0, matches_leaf=False, in_range=True))
        other = data.draw(st.integers(0, self.n).filter(lambda k: k != m))
        self.expect_refused(Reveal(actor=P, at=at, state=other, matches_leaf=True, in_range=True))

    @precondition(lambda self: not self.state.resolved)
    @rule(fraction=st.floats(0, 0.999))
    def early_tick(self, fraction: float) -> None:
        s = self.state
        deadline = timeout_at(s)
        assert deadline is not None
        at = s.last_move_at + (deadline - s.last_move_at) * fraction
        if at < deadline:
            assert apply(s, Tick(actor=S, at=at)) == (s, [])

    @precondition(lambda self: not self.state.resolved)
    @rule(data=st.data())
    def wrong_party(self, data: st.DataObject) -> None:
        phase = self.state.phase
        move_type = data.draw(st.sampled_from([t for (p, t) in TRANSITIONS if p is phase]))
        rightful = TRANSITIONS[(phase, move_type)].actor
        intruder = data.draw(st.sampled_from([a for a in Actor if a is not rightful]))
        self.expect_refused(example_move(move_type, self.state, intruder))

    @precondition(lambda self: not self.state.resolved)
    @rule(data=st.data())
    def wrong_phase(self, data: st.DataObject) -> None:
        phase = self.state.phase
        move_type = data.draw(
            st.sampled_from([t for t in MOVE_TYPES if (phase, t) not in TRANSITIONS])
        )
        self.expect_refused(example_move(move_type, self.state, MOVER[move_type]))

    @precondition(lambda self: not self.state.resolved)
    @rule(data=st.data())
    def late_move(self, data: st.DataObject) -> None:
        """A move by the rightful party at or after the running deadline is refused (but the
        service's own Tick and Close, which are never late)."""
        phase = self.state.phase
        move_type = data.draw(
            st.sampled_from([t for (p, t) in TRANSITIONS if p is phase and t not in (Tick, Close)])
        )
        deadline = timeout_at(self.state)
        assert deadline is not None
        move = example_move(move_type, self.state, TRANSITIONS[(phase, move_type)].actor)
        late = deadline + data.draw(st.sampled_from([0.0, 1e-3, 1e6]))
        self.expect_refused(dataclasses.replace(move, at=late))

    @precondition(lambda self: not self.state.resolved)
    @rule(back=st.floats(1e-3, 1e3))
    def out_of_order(self, back: float) -> None:
        self.expect_refused(Tick(actor=S, at=self.state.last_move_at - back))

    @precondition(lambda self: self.state.resolved)
    @rule(data=st.data())
    def after_resolution(self, data: st.DataObject) -> None:
        move_type = data.draw(st.sampled_from(MOVE_TYPES))
        actor = data.draw(st.sampled_from(list(Actor)))
        move = example_move(move_type, self.state, actor)
        later = dataclasses.replace(move, at=move.at + data.draw(st.floats(0, 1e6)))
        self.expect_refused(later)

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def bounds_and_rounds(self) -> None:
        s = self.state
        assert 0 <= s.lo < s.hi <= s.n == self.n
        width = s.hi - s.lo
        if s.rounds > self.last_rounds:
            assert s.rounds == self.last_rounds + 1
            assert width < self.last_width, "hi - lo must strictly shrink each round"
        else:
            assert width == self.last_width
        self.last_width, self.last_rounds = width, s.rounds
        assert s.rounds <= max_rounds(self.width0) <= max_rounds(self.n)

    @invariant()
    def clocks_never_negative(self) -> None:
        assert self.state.provider_clock >= 0
        assert self.state.challenger_clock >= 0
        assert self.state.provider_clock <= self.clocks.provider
        assert self.state.challenger_clock <= self.clocks.challenger

    @invariant()
    def books_balance_and_follow_the_verdict(self) -> None:
        """The ledger balances after every move; once resolved, money follows the verdict."""
        self.ledger.check()
        assert sum(self.ledger.balances().values()) == 0
        chal = self.ledger.balance("available:chal")
        verdict = self.state.verdict
        if verdict is None:
            assert chal == 0  # the bond is locked while the game runs
        elif verdict.at_fault() is P:
            assert chal > BOND  # bond back plus a share of the slashed stake
        elif verdict.at_fault() is C:
            assert chal == 0 and self.ledger.balance("available:prov") > 0
        else:
            assert chal == BOND  # aborted: the bond is returned, nobody gains

    @invariant()
    def honest_actor_rules(self) -> None:
        broken = [r.name for r in HONEST_RULES if not r.holds(self)]
        assert not broken, f"{broken}: {self.state}"

    def teardown(self) -> None:
        """Finish the game by the script: it always resolves within the round bound."""
        if not hasattr(self, "state"):
            return
        for _ in range(4 * max_rounds(self.n) + 4):
            if self.state.resolved:
                break
            self.play()
            self.bounds_and_rounds()
            self.clocks_never_negative()
            self.honest_actor_rules()
            self.books_balance_and_follow_the_verdict()
        assert self.state.resolved
        assert self.state.verdict is not None
        if self.stalled is None:
            assert self.state.verdict in (Verdict.PROVIDER_FAULT, Verdict.CHALLENGER_FAULT)
            if self.challenger_honest and self.f is not None:
                assert self.state.verdict is Verdict.PROVIDER_FAULT
            if self.f is None:
                assert self.state.verdict is Verdict.CHALLENGER_FAULT


DisputeMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDisputeMachine = DisputeMachine.TestCase
