"""The move ↔ transcript-event codec (``challenge/events.py``): the pinned on-disk bodies, round
trips of every move (through canonical JSON, as a transcript stores them), proof details, and
untrusted bodies refused with the field named, never a crash."""

from __future__ import annotations

import contextlib
import json
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from challenge.events import (
    DISPUTE_KINDS,
    KIND_OF,
    PROOF_KINDS,
    VERDICT_NAMES,
    Decoded,
    EventError,
    RevealFacts,
    decode,
    decode_verdict,
    encode,
    encode_verdict,
    outcome_detail,
    outcome_move,
    proof_target,
    states_of,
    verdict_name,
)
from challenge.game import (
    Actor,
    Answer,
    Choice,
    Close,
    Disclose,
    DisputeState,
    Move,
    NameTile,
    Open,
    Phase,
    ProofOutcome,
    RangeOutcome,
    Reveal,
    Tick,
    TimeControl,
    Verdict,
    apply,
)
from challenge.transcript import Transcript, parse_events
from refute.errors import RefuteError
from refute.manifest import canonical_json

N = 8
T0 = 1_700_000_000.0
CLOCKS = TimeControl(provider=3600.0, challenger=1800.0, proof_timeout=600.0)
P, C, S = Actor.PROVIDER, Actor.CHALLENGER, Actor.SERVICE
OPENING = {"challenger": "0xabc", "bond": "10"}


def stored(body: dict[str, Any]) -> dict[str, Any]:
    """The body as a transcript stores and reads it (canonical JSON)."""
    loaded: dict[str, Any] = json.loads(canonical_json(body))
    return loaded


def no_facts(k: int) -> RevealFacts:
    raise AssertionError(f"state {k} was not revealed")


# --- the on-disk format, pinned ---------------------------------------------------------------


def test_the_bodies_are_the_ones_the_orchestrator_always_wrote() -> None:
    """Exactly the kinds and bodies of ``refute.transcript/1`` events (existing bundles)."""
    head = {"dispute_id": "dsp_1"}
    cases: list[tuple[Move, Phase, dict[str, Any], str, dict[str, Any]]] = [
        (Open(actor=C, at=T0, n=N, lo=0, hi=N, clocks=CLOCKS, disclosed=False), Phase.DISCLOSE,
         OPENING, "challenge",
         {**head, "challenger": "0xabc", "lo": 0, "hi": N, "n": N, "bond": "10",
          "disclosed": False,
          "clocks": {"provider": 3600.0, "challenger": 1800.0, "proof_timeout": 600.0}}),
        (Disclose(actor=P, at=T0 + 1, matches_commitment=True), Phase.REVEAL,
         {"trace_blob": "ab" * 32}, "disclose",
         {**head, "actor": "provider", "phase": "reveal", "move_at": T0 + 1,
          "trace_blob": "ab" * 32}),
        (Reveal(actor=P, at=T0 + 2, state=4, matches_leaf=True, in_range=True), Phase.ANSWER,
         {"state": 4}, "reveal",
         {**head, "actor": "provider", "phase": "answer", "move_at": T0 + 2, "state": 4}),
        (Answer(actor=C, at=T0 + 3, state=4, choice=Choice.DISAGREE), Phase.REVEAL,
         {"state": 4, "choice": "disagree"}, "answer",
         {**head, "actor": "challenger", "phase": "reveal", "move_at": T0 + 3, "state": 4,
          "choice": "disagree"}),
        (Tick(actor=S, at=T0 + 4), Phase.RESOLVED, {}, "timeout",
         {**head, "actor": "service", "phase": "resolved", "move_at": T0 + 4}),
        (RangeOutcome(actor=S, at=T0 + 5, state=2, max_abs_units=Fraction(1025, 2), bound=512,
                      valid=True), Phase.RESOLVED,
         {"state": 2, "max_abs_units": "1025/2", "bound": 512, "proof": {"p": 1}},
         "rangeoutcome",
         {**head, "actor": "service", "phase": "resolved", "move_at": T0 + 5, "state": 2,
          "max_abs_units": "1025/2", "bound": 512, "proof": {"p": 1}}),
        (ProofOutcome(actor=S, at=T0 + 6, step=3, maxdiff_units=Fraction(7), tolerance=4,
                      valid=True), Phase.RESOLVED,
         {"step": 3, "maxdiff_units": "7", "tolerance": 4, "circuit": "c"}, "proofoutcome",
         {**head, "actor": "service", "phase": "resolved", "move_at": T0 + 6, "step": 3,
          "maxdiff_units": "7", "tolerance": 4, "circuit": "c"}),
        (Close(actor=S, at=T0 + 7, by="dsp_0"), Phase.RESOLVED, {}, "close",
         {**head, "actor": "service", "phase": "resolved", "move_at": T0 + 7, "by": "dsp_0"}),
        (NameTile(actor=C, at=T0 + 8, step=3, tile=5), Phase.STEP_PROOF, {}, "tile",
         {**head, "actor": "challenger", "phase": "step_proof", "move_at": T0 + 8, "step": 3,
          "tile": 5}),
        (ProofOutcome(actor=S, at=T0 + 9, step=3, maxdiff_units=Fraction(7), tolerance=4,
                      valid=True, tile=5), Phase.RESOLVED, {}, "proofoutcome",
         {**head, "actor": "service", "phase": "resolved", "move_at": T0 + 9, "step": 3,
          "maxdiff_units": "7", "tolerance": 4, "tile": 5}),
    ]
    for move, phase, extra, kind, body in cases:
        assert encode(move, dispute_id="dsp_1", phase=phase, extra=extra) == (kind, body)
    assert {kind for *_, kind, _ in cases} == set(KIND_OF.values())
    assert encode_verdict(Verdict.PROVIDER_FAULT, dispute_id="dsp_1", reason="why",
                          result_status="PROVIDER_FAULT") == (
        "verdict", {**head, "verdict": "PROVIDER_FAULT", "reason": "why",
                    "result_status": "PROVIDER_FAULT"})
    assert sorted(DISPUTE_KINDS) == ["answer", "challenge", "close", "disclose",
                                     "proofoutcome", "rangeoutcome", "reveal", "tile",
                                     "timeout", "verdict"]
    assert dict(PROOF_KINDS) == {"step": "proofoutcome", "range": "rangeoutcome"}


# --- round trips ------------------------------------------------------------------------------

times = st.floats(min_value=0, max_value=2.0**40, allow_nan=False, allow_infinity=False)
states = st.integers(min_value=0, max_value=N)
steps = st.integers(min_value=1, max_value=N)
exact = st.fractions(min_value=0, max_value=2**64, max_denominator=2**30)
thresholds = st.integers(min_value=0, max_value=2**64)
phases = st.sampled_from(list(Phase))
clocks = st.builds(TimeControl, provider=times, challenger=times, proof_timeout=times)
ids = st.from_regex(r"dsp_[a-z0-9]{1,12}", fullmatch=True)

recordable_moves: st.SearchStrategy[Move] = st.one_of(
    st.builds(lambda at, lo, hi, c, d, t: Open(actor=C, at=at, n=N, lo=lo, hi=hi, clocks=c,
                                                disclosed=d, tiles=t),
              times, states, states, clocks, st.booleans(),
              st.just(()) | st.lists(st.integers(1, 64), min_size=N, max_size=N).map(tuple)),
    st.builds(lambda at: Disclose(actor=P, at=at, matches_commitment=True), times),
    st.builds(lambda at, k, r: Reveal(actor=P, at=at, state=k, matches_leaf=True, in_range=r),
              times, states, st.booleans()),
    st.builds(lambda at, k, c: Answer(actor=C, at=at, state=k, choice=c),
              times, states, st.sampled_from(list(Choice))),
    st.builds(lambda at: Tick(actor=S, at=at), times),
    st.builds(lambda at, k, v, b: RangeOutcome(actor=S, at=at, state=k, max_abs_units=v,
                                                bound=b, valid=True),
              times, states, exact, thresholds),
    st.builds(lambda at, i, v, t, tile: ProofOutcome(actor=S, at=at, step=i, maxdiff_units=v,
                                                      tolerance=t, valid=True, tile=tile),
              times, steps, exact, thresholds, st.none() | st.integers(0, 64)),
    st.builds(lambda at, i, tile: NameTile(actor=C, at=at, step=i, tile=tile),
              times, steps, st.integers(0, 64)),
    st.builds(lambda at, by: Close(actor=S, at=at, by=by), times, ids),
)


@given(recordable_moves, phases, ids, st.floats(min_value=0, max_value=2.0**40))
def test_every_recordable_move_round_trips(move: Move, phase: Phase, dispute_id: str,
                                           event_at: float) -> None:
    extra = OPENING if isinstance(move, Open) else {}
    kind, body = encode(move, dispute_id=dispute_id, phase=phase, extra=extra)
    assert kind == KIND_OF[type(move)] and body["dispute_id"] == dispute_id

    def facts(k: int) -> RevealFacts:
        assert isinstance(move, Reveal) and k == move.state
        return RevealFacts(matches_leaf=move.matches_leaf, in_range=move.in_range)

    at = move.at if isinstance(move, Open) else event_at  # an opening's time is its event's
    decoded = decode(kind, stored(body), at=at, n=N, facts=facts)
    assert decoded == Decoded(move, None if isinstance(move, Open) else phase)


@given(recordable_moves, phases)
def test_extra_fields_pass_through_and_never_contradict_the_move(move: Move,
                                                                 phase: Phase) -> None:
    extra = {**OPENING, "proof": {"instances": [["00"]]}, "settings_sha256": "ab" * 32}
    _kind, body = encode(move, dispute_id="dsp_1", phase=phase, extra=extra)
    assert all(body[k] == v for k, v in extra.items())
    own = encode(move, dispute_id="dsp_1", phase=phase, extra=OPENING)[1]
    for key in set(own) - set(OPENING):
        assert encode(move, dispute_id="dsp_1", phase=phase,
                      extra={**OPENING, key: own[key]})[1] == own  # repeating is fine
        with pytest.raises(EventError, match=key) as info:
            encode(move, dispute_id="dsp_1", phase=phase,
                   extra={**OPENING, key: ["something else"]})
        assert info.value.field == key


@given(st.sampled_from(["step", "range"]), states, exact, thresholds, times)
def test_a_proof_detail_round_trips(kind: str, index: int, value: Fraction, threshold: int,
                                    at: float) -> None:
    move: RangeOutcome | ProofOutcome
    if kind == "step":
        move = ProofOutcome(actor=S, at=at, step=max(index, 1), maxdiff_units=value,
                            tolerance=threshold, valid=True)
    else:
        move = RangeOutcome(actor=S, at=at, state=index, max_abs_units=value, bound=threshold,
                            valid=True)
    detail = {**outcome_detail(move), "proof": {}, "circuit": "c"}
    assert outcome_move(kind, stored(detail), at=at) == move
    assert outcome_move(kind, stored(detail), at=at, n=N) == move
    event = PROOF_KINDS[kind]
    assert proof_target(event, detail) == (kind, max(index, 1) if kind == "step" else index)
    _, body = encode(move, dispute_id="dsp_1", phase=Phase.RESOLVED, extra=detail)
    assert decode(event, stored(body), at=0.0, n=N, facts=no_facts).move == move


def test_what_states_an_event_uses() -> None:
    assert states_of("reveal", {"state": 3}, N) == {3}
    assert states_of("rangeoutcome", {"state": 0}, N) == {0}
    assert states_of("proofoutcome", {"step": 1}, N) == {0, 1}
    for kind in ("challenge", "answer", "timeout", "disclose", "close", "verdict"):
        assert states_of(kind, {"state": 3}, N) == frozenset()
    assert proof_target("reveal", {"state": 3}) is None
    with pytest.raises(EventError) as info:
        states_of("proofoutcome", {"step": 0}, N)
    assert info.value.field == "step"


@pytest.mark.parametrize("verdict", list(Verdict))
def test_verdicts_round_trip(verdict: Verdict) -> None:
    kind, body = encode_verdict(verdict, dispute_id="d", reason="r", result_status="ACCEPTED")
    assert kind == "verdict" and body["verdict"] == verdict_name(verdict)
    assert verdict_name(verdict) in VERDICT_NAMES
    assert decode_verdict(stored(body)) is verdict
    with pytest.raises(EventError, match="verdict must be one of"):
        decode_verdict({**body, "verdict": verdict.value})  # lower case is not how it is recorded


# --- a whole dispute, written and read back ---------------------------------------------------


def test_a_dispute_written_with_the_codec_replays_to_the_same_state() -> None:
    """Play a dispute, record every move as the orchestrator does, store the transcript, read
    it back with the codec and run the game again: the same states, move by move."""
    revealed: dict[int, RevealFacts] = {}
    transcript = Transcript()
    state: DisputeState | None = None
    plan: list[Move] = [
        Open(actor=C, at=T0, n=N, lo=0, hi=N, clocks=CLOCKS, disclosed=False),
        Disclose(actor=P, at=T0 + 10, matches_commitment=True),
        Reveal(actor=P, at=T0 + 11, state=4, matches_leaf=True, in_range=True),
        Answer(actor=C, at=T0 + 12, state=4, choice=Choice.AGREE),
        Reveal(actor=P, at=T0 + 13, state=6, matches_leaf=True, in_range=False),
        RangeOutcome(actor=S, at=T0 + 14, state=6, max_abs_units=Fraction(255, 2), bound=128,
                     valid=True),
        Answer(actor=C, at=T0 + 15, state=6, choice=Choice.DISAGREE),
        Reveal(actor=P, at=T0 + 16, state=5, matches_leaf=True, in_range=True),
        Answer(actor=C, at=T0 + 17, state=5, choice=Choice.AGREE),
        ProofOutcome(actor=S, at=T0 + 18, step=6, maxdiff_units=Fraction(9, 2), tolerance=4,
                     valid=True),
    ]
    history: list[DisputeState] = []
    for move in plan:
        state, _effects = apply(state, move)
        history.append(state)
        extra = OPENING if isinstance(move, Open) else {}
        if isinstance(move, Reveal):
            revealed[move.state] = RevealFacts(move.matches_leaf, move.in_range)
        kind, body = encode(move, dispute_id="dsp_1", phase=state.phase, extra=extra)
        transcript.append(kind, move.at + 0.5 * (not isinstance(move, Open)), body)
    assert state is not None and state.verdict is not None
    kind, body = encode_verdict(state.verdict, dispute_id="dsp_1", reason=state.reason or "",
                                result_status="PROVIDER_FAULT")
    transcript.append(kind, T0 + 20, body)

    events = parse_events(json.loads(canonical_json(transcript.to_json()))["events"])
    replayed: DisputeState | None = None
    for event, expected in zip(events[:-1], history, strict=True):
        decoded = decode(event.kind, event.body, at=event.at, n=N, facts=revealed.__getitem__)
        replayed, _ = apply(replayed, decoded.move)
        assert replayed == expected
        assert decoded.phase in (None, replayed.phase)
    assert decode_verdict(events[-1].body) is Verdict.PROVIDER_FAULT


# --- untrusted bodies -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)


@settings(max_examples=300)
@given(recordable_moves, st.data())
def test_an_edited_body_is_refused_with_its_field_or_decodes(move: Move,
                                                             data: st.DataObject) -> None:
    """Drop a field or replace one with any JSON value: decoding gives a move or an EventError
    naming a field, never another exception."""
    kind, body = encode(move, dispute_id="dsp_1", phase=Phase.ANSWER,
                        extra=OPENING if isinstance(move, Open) else {})
    edited = stored(body)
    key = data.draw(st.sampled_from(sorted(edited)))
    if data.draw(st.booleans()):
        del edited[key]
    else:
        edited[key] = data.draw(json_values)
    facts = RevealFacts(matches_leaf=True, in_range=True)
    try:
        decoded = decode(kind, edited, at=T0, n=N, facts=lambda _k: facts)
    except EventError as exc:
        assert isinstance(exc, RefuteError) and "\n" not in exc.reason
        assert exc.field in ("", *edited, *(f"clocks.{k}" for k in ("provider", "challenger",
                                                                     "proof_timeout")))
    else:
        assert type(decoded.move) is type(move)


@given(st.text(max_size=16), st.dictionaries(st.text(max_size=10), json_values, max_size=6),
       st.floats(allow_nan=True, allow_infinity=True))
def test_any_kind_and_body_decode_or_raise_an_event_error(kind: str, body: dict[str, Any],
                                                          at: float) -> None:
    for k in (kind, *sorted(KIND_OF.values())):
        with contextlib.suppress(EventError):
            decode(k, body, at=at, n=N, facts=lambda _k: RevealFacts(True, True))
    for proof in ("step", "range", kind):
        with contextlib.suppress(EventError):
            outcome_move(proof, body, at=0.0)


@pytest.mark.parametrize(
    ("kind", "body", "field", "fragment"),
    [
        ("reveal", {"actor": "challenger", "phase": "answer", "state": 1}, "actor",
         "actor is not provider"),
        ("answer", {"actor": "challenger", "phase": "won", "state": 1, "choice": "agree"},
         "phase", "phase must be one of"),
        ("answer", {"actor": "challenger", "phase": "reveal", "state": 1, "choice": "maybe"},
         "choice", "agree or disagree"),
        ("reveal", {"actor": "provider", "phase": "answer", "state": N + 1}, "state",
         f"[0, {N}]"),
        ("timeout", {"actor": "service", "phase": "resolved", "move_at": -1}, "move_at",
         "non-negative"),
        ("proofoutcome", {"actor": "service", "phase": "resolved", "step": 1,
                          "maxdiff_units": "-1", "tolerance": 3}, "maxdiff_units", "fraction"),
        ("proofoutcome", {"actor": "service", "phase": "resolved", "step": 1,
                          "maxdiff_units": 1.5, "tolerance": 3}, "maxdiff_units", "fraction"),
        ("rangeoutcome", {"actor": "service", "phase": "resolved", "state": 1,
                          "max_abs_units": "1", "bound": True}, "bound", "integer"),
        ("challenge", {"lo": 0, "hi": N, "n": N - 1, "clocks": {
            "provider": 1, "challenger": 1, "proof_timeout": 1}}, "n", "the commitment has"),
        ("challenge", {"lo": 0, "hi": N, "n": N, "clocks": {"provider": 1, "challenger": 1}},
         "clocks", "exactly the keys"),
        ("challenge", {"lo": 0, "hi": N, "n": N, "disclosed": "yes", "clocks": {
            "provider": 1, "challenger": 1, "proof_timeout": 1}}, "disclosed", "true or false"),
        ("challenge", {"lo": 0, "hi": N, "n": N, "tiles": [2] * (N - 1), "clocks": {
            "provider": 1, "challenger": 1, "proof_timeout": 1}}, "tiles", "one tile count"),
        ("challenge", {"lo": 0, "hi": N, "n": N, "tiles": [0] * N, "clocks": {
            "provider": 1, "challenger": 1, "proof_timeout": 1}}, "tiles", "one tile count"),
        ("tile", {"actor": "challenger", "phase": "step_proof", "step": 0, "tile": 1}, "step",
         f"[1, {N}]"),
        ("tile", {"actor": "challenger", "phase": "step_proof", "step": 1, "tile": -1}, "tile",
         r"\[0,"),
        ("close", {"actor": "service", "phase": "resolved", "by": ""}, "by", "name the dispute"),
        ("verdict", {"verdict": "PROVIDER_FAULT"}, "", "unknown event kind"),
        ("answer", {"phase": "reveal"}, "", "missing field 'actor'"),
    ],
)
def test_malformed_bodies_name_their_field(kind: str, body: dict[str, Any], field: str,
                                           fragment: str) -> None:
    with pytest.raises(EventError, match=fragment) as info:
        decode(kind, body, at=T0, n=N, facts=lambda _k: RevealFacts(True, True))
    assert info.value.field == field


def test_moves_the_game_never_applies_are_never_encoded() -> None:
    for move in (Disclose(actor=P, at=T0, matches_commitment=False),
                 Reveal(actor=P, at=T0, state=1, matches_leaf=False, in_range=True),
                 RangeOutcome(actor=S, at=T0, state=1, max_abs_units=Fraction(1), bound=1,
                              valid=False),
                 ProofOutcome(actor=S, at=T0, step=1, maxdiff_units=Fraction(1), tolerance=1,
                              valid=False)):
        with pytest.raises(EventError, match="never recorded"):
            encode(move, dispute_id="d", phase=Phase.ANSWER)
    with pytest.raises(EventError, match="challenger and bond"):
        encode(Open(actor=C, at=T0, n=N, lo=0, hi=N, clocks=CLOCKS), dispute_id="d",
               phase=Phase.REVEAL)


def test_a_reveal_needs_the_readers_facts() -> None:
    body = {"actor": "provider", "phase": "answer", "state": 2}
    with pytest.raises(EventError, match="facts"):
        decode("reveal", body, at=T0, n=N)
    seen: list[int] = []

    def facts(k: int) -> RevealFacts:
        seen.append(k)
        return RevealFacts(matches_leaf=False, in_range=False)

    move = decode("reveal", body, at=T0, n=N, facts=facts).move
    assert isinstance(move, Reveal) and (move.matches_leaf, move.in_range, move.at) == (
        False, False, T0)  # no move_at: the event's own time
    assert seen == [2]
