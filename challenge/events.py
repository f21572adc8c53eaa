"""The one codec between the game's moves and a dispute's transcript events.

The orchestrator writes a dispute's events with :func:`encode` (and :func:`encode_verdict`);
``replay`` reads them back into moves with :func:`decode` and runs them through the game again
(DESIGN.md "Transcript and replay"; STYLE.md: one encoding for each thing that crosses a
boundary, used by the writer and the reader alike).

The events of a dispute (``refute.transcript/1``; every body also holds ``dispute_id``):

=============  ============  ===================================================================
move           kind          body
=============  ============  ===================================================================
Open           challenge     ``challenger``, ``bond``, ``lo``, ``hi``, ``n``, ``disclosed``,
                             ``clocks`` {``provider``, ``challenger``, ``proof_timeout``}
                             (+ ``tiles``: tiles per segment, when a segment is tiled)
Disclose       disclose      ``actor``, ``phase``, ``move_at`` (+ ``trace_blob`` or
                             ``disclosed_states``: what was disclosed)
Reveal         reveal        ``actor``, ``phase``, ``move_at``, ``state``
Answer         answer        ``actor``, ``phase``, ``move_at``, ``state``, ``choice``
NameTile       tile          ``actor``, ``phase``, ``move_at``, ``step``, ``tile``
Tick           timeout       ``actor``, ``phase``, ``move_at``
RangeOutcome   rangeoutcome  ``actor``, ``phase``, ``move_at``, ``state``, ``max_abs_units``,
                             ``bound`` (+ the proof: ``circuit``, ``vk_sha256``, ``proof``,
                             ``settings_sha256``, ``srs_sha256``)
ProofOutcome   proofoutcome  ``actor``, ``phase``, ``move_at``, ``step``, ``maxdiff_units``,
                             ``tolerance`` (+ ``tile`` for a tile's proof; + the proof)
Close          close         ``actor``, ``phase``, ``move_at``, ``by``
(Resolved)     verdict       ``verdict`` (upper case), ``reason``, ``result_status``
=============  ============  ===================================================================

``phase`` is the phase the move led to; ``move_at`` the move's own time (the event's ``at`` is
when it was recorded, never earlier); an opening's time is its event's. ``actor`` is fixed by
the kind (the game's transition table names who makes each move). Exact numbers are strings
``"a"`` or ``"a/b"`` (``str(Fraction)``), integers are JSON integers.

What a body leaves out, the reader re-derives: whether a revealed state matches its leaf and is
within range (from the states it holds: :class:`RevealFacts`); that a disclosure matched the
commitment and a proof was valid (the game refuses any other, so no other is ever recorded;
``replay`` verifies every proof again itself).

A proof is made once per (kind, index) of a result and its *detail* — the numbers of the body
plus the proof — is stored and applied to every dispute waiting for it: :func:`outcome_move`
reads a detail into the move, :func:`outcome_detail` writes a move's numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from math import isfinite
from types import MappingProxyType
from typing import Any, NamedTuple

from challenge.game import (
    Actor,
    Answer,
    Choice,
    Close,
    Disclose,
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
)
from refute.errors import RefuteError

__all__ = [
    "CLOCK_KEYS",
    "DISPUTE_KINDS",
    "KIND_OF",
    "MAX_INDEX",
    "MOVE_KINDS",
    "PROOF_KINDS",
    "VERDICT_NAMES",
    "Decoded",
    "EventError",
    "RevealFacts",
    "decode",
    "decode_verdict",
    "encode",
    "encode_verdict",
    "outcome_detail",
    "outcome_move",
    "proof_target",
    "states_of",
    "verdict_name",
]

KIND_OF: Mapping[type[Move], str] = MappingProxyType({
    Open: "challenge",
    Disclose: "disclose",
    Reveal: "reveal",
    Answer: "answer",
    NameTile: "tile",
    Tick: "timeout",
    RangeOutcome: "rangeoutcome",
    ProofOutcome: "proofoutcome",
    Close: "close",
})
"""The event kind each move is recorded as."""
MOVE_KINDS = frozenset(KIND_OF.values())
#: Every kind a dispute's own events may have: its moves and its verdict.
DISPUTE_KINDS = MOVE_KINDS | {"verdict"}
#: The proof a proof event records, by the prover's kind (``ProofKind``): step or range.
PROOF_KINDS: Mapping[str, str] = MappingProxyType({"step": "proofoutcome",
                                                    "range": "rangeoutcome"})
VERDICT_NAMES = frozenset(v.value.upper() for v in Verdict)
"""How verdicts are recorded (``PROVIDER_FAULT``, …): the game's, in upper case."""
CLOCK_KEYS = frozenset({"provider", "challenger", "proof_timeout"})
#: The highest state or step a proof detail may name when the trace length is not known.
MAX_INDEX = 1 << 20
#: Largest τ or R (in units) a body may hold.
MAX_THRESHOLD = 1 << 255

_ACTOR: Mapping[str, Actor] = MappingProxyType({
    "challenge": Actor.CHALLENGER, "disclose": Actor.PROVIDER, "reveal": Actor.PROVIDER,
    "answer": Actor.CHALLENGER, "tile": Actor.CHALLENGER, "timeout": Actor.SERVICE,
    "rangeoutcome": Actor.SERVICE, "proofoutcome": Actor.SERVICE, "close": Actor.SERVICE})
_FRACTION = re.compile(r"(0|[1-9][0-9]{0,77})(/[1-9][0-9]{0,77})?")


class EventError(RefuteError):
    """An event cannot be encoded or decoded; ``field`` is the path inside its body
    (``"clocks.provider"``), or ``""`` for the body (or the kind) itself."""

    code = "event_error"

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(reason)
        self.field = field


class RevealFacts(NamedTuple):
    """What a reader re-derives about a revealed state from the states it holds."""

    matches_leaf: bool
    """The state hashes to its committed leaf."""
    in_range: bool
    """Every value is finite and within R (:func:`refute.verdict.within_range`)."""


class Decoded(NamedTuple):
    """A decoded move and the phase its event records it led to (``None`` for the opening,
    whose event records none); a reader checks that phase against the game's."""

    move: Move
    phase: Phase | None


# --- writing --------------------------------------------------------------------------------


def encode(move: Move, *, dispute_id: str, phase: Phase,
           extra: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The event ``(kind, body)`` recording ``move`` in dispute ``dispute_id``.

    ``phase``: the phase the move led to (not recorded for an opening). ``extra``: what the
    body holds besides the move (an opening's ``challenger`` and ``bond``, what a disclosure
    disclosed, a proof's circuit and proof); it may repeat the move's own fields, never
    contradict them. Raises :class:`EventError` for a move the game never applies (a
    disclosure or reveal that does not match the commitment, an invalid proof).
    """
    kind = KIND_OF.get(type(move))
    if kind is None:
        raise EventError(f"{type(move).__name__} is not a move of the game")
    own = _fields(move)
    if isinstance(move, Open):
        missing = [k for k in ("challenger", "bond") if k not in (extra or {})]
        if missing:
            raise EventError(f"an opening records its {' and '.join(missing)}", missing[0])
        header: dict[str, Any] = {"dispute_id": dispute_id}
    else:
        header = {"dispute_id": dispute_id, "actor": move.actor.value, "phase": phase.value,
                  "move_at": move.at}
    own = {**header, **own}
    for key, value in (extra or {}).items():
        if key in own and own[key] != value:
            raise EventError(f"{key} is {value!r} beside the move, {own[key]!r} in it", key)
    return kind, {**(extra or {}), **own}


def _fields(move: Move) -> dict[str, Any]:
    """The move's own fields as its event body records them."""
    if isinstance(move, Open):
        c = move.clocks
        tiles = {"tiles": list(move.tiles)} if move.tiles else {}  # untiled bodies as before
        return {"lo": move.lo, "hi": move.hi, "n": move.n, "disclosed": move.disclosed,
                "clocks": {"provider": c.provider, "challenger": c.challenger,
                           "proof_timeout": c.proof_timeout}, **tiles}
    if isinstance(move, Disclose):
        if move.matches_commitment is not True:
            raise EventError("a disclosure that does not match the commitment is never "
                             "recorded (the game refuses it)")
        return {}
    if isinstance(move, Reveal):
        if move.matches_leaf is not True:
            raise EventError("a reveal that does not match its leaf is never recorded (the "
                             "game refuses it)")
        return {"state": move.state}
    if isinstance(move, Answer):
        return {"state": move.state, "choice": move.choice.value}
    if isinstance(move, NameTile):
        return {"step": move.step, "tile": move.tile}
    if isinstance(move, RangeOutcome | ProofOutcome):
        return outcome_detail(move)
    if isinstance(move, Close):
        return {"by": move.by}
    return {}  # Tick


def outcome_detail(move: RangeOutcome | ProofOutcome) -> dict[str, Any]:
    """The numbers a proof's detail (and its event body) records: ``state``,
    ``max_abs_units``, ``bound`` of a range proof; ``step``, ``maxdiff_units``, ``tolerance``
    (and ``tile``, for a tile's proof) of a step proof. Only a valid proof is recorded."""
    if move.valid is not True:
        raise EventError("an invalid proof is never recorded (the game refuses it)")
    if isinstance(move, RangeOutcome):
        return {"state": move.state, "max_abs_units": str(Fraction(move.max_abs_units)),
                "bound": move.bound}
    tile = {"tile": move.tile} if move.tile is not None else {}
    return {"step": move.step, "maxdiff_units": str(Fraction(move.maxdiff_units)),
            "tolerance": move.tolerance, **tile}


def verdict_name(verdict: Verdict) -> str:
    """How a verdict is recorded (in the ``verdict`` event, the ledger and the dispute row)."""
    return verdict.value.upper()


def encode_verdict(verdict: Verdict, *, dispute_id: str, reason: str,
                   result_status: str) -> tuple[str, dict[str, Any]]:
    """The ``verdict`` event closing a dispute (``result_status``: the result's status after
    it)."""
    return "verdict", {"dispute_id": dispute_id, "verdict": verdict_name(verdict),
                       "reason": reason, "result_status": result_status}


# --- reading --------------------------------------------------------------------------------


def decode(kind: str, body: Mapping[str, Any], *, at: float, n: int,
           facts: Callable[[int], RevealFacts] | None = None) -> Decoded:
    """The move an event records, validated field by field.

    ``at``: the event's own time (an opening's, and any move's whose body has no
    ``move_at``); ``n``: the number of segments of the committed trace (states and steps are
    checked against it); ``facts``: what the reader knows about each revealed state (needed
    to decode a ``reveal``). Raises :class:`EventError` naming the field, never anything else.
    """
    if not isinstance(body, Mapping):
        raise EventError(f"the body must be an object, not {type(body).__name__}")
    actor = _ACTOR.get(kind)
    if actor is None:
        raise EventError(f"unknown event kind {_shorten(kind)} in a dispute")
    if kind == "challenge":
        return Decoded(_open(body, at, n), None)
    recorded = _str(body, "actor")
    if recorded != actor.value:
        raise EventError(f"actor is not {actor.value}", "actor")
    name = _str(body, "phase")
    if name not in {p.value for p in Phase}:
        raise EventError(f"phase must be one of {sorted(p.value for p in Phase)}, not "
                         f"{_shorten(name)}", "phase")
    phase = Phase(name)
    move_at = _time(body.get("move_at", at), "move_at")
    move: Move
    if kind == "disclose":
        move = Disclose(actor=actor, at=move_at, matches_commitment=True)
    elif kind == "reveal":
        k = _int(body, "state", 0, n)
        if facts is None:
            raise EventError("a reveal is decoded with the facts about its state", "state")
        known = facts(k)
        move = Reveal(actor=actor, at=move_at, state=k, matches_leaf=known.matches_leaf,
                      in_range=known.in_range)
    elif kind == "answer":
        choice = _str(body, "choice")
        if choice not in {c.value for c in Choice}:
            raise EventError(f"choice must be agree or disagree, not {_shorten(choice)}",
                             "choice")
        move = Answer(actor=actor, at=move_at, state=_int(body, "state", 0, n),
                      choice=Choice(choice))
    elif kind == "tile":
        move = NameTile(actor=actor, at=move_at, step=_int(body, "step", 1, n),
                        tile=_int(body, "tile", 0, MAX_INDEX))
    elif kind == "timeout":
        move = Tick(actor=actor, at=move_at)
    elif kind == "close":
        by = _str(body, "by")
        if not by:
            raise EventError("by must name the dispute whose conviction closed this one", "by")
        move = Close(actor=actor, at=move_at, by=by)
    else:
        move = outcome_move("step" if kind == "proofoutcome" else "range", body, at=move_at,
                            n=n)
    return Decoded(move, phase)


def _open(body: Mapping[str, Any], at: float, n: int) -> Open:
    clocks = _field(body, "clocks")
    if not isinstance(clocks, Mapping) or set(clocks) != CLOCK_KEYS:
        raise EventError(f"clocks must have exactly the keys {sorted(CLOCK_KEYS)}", "clocks")
    control = TimeControl(**{k: _time(clocks[k], f"clocks.{k}") for k in sorted(CLOCK_KEYS)})
    disclosed = body.get("disclosed", True)
    if type(disclosed) is not bool:
        raise EventError("disclosed must be true or false", "disclosed")
    count = _int(body, "n", 1, n)
    if count != n:
        raise EventError(f"n is {count}, but the commitment has {n} segments", "n")
    tiles = body.get("tiles", [])
    if (not isinstance(tiles, list) or (tiles and len(tiles) != n)
            or not all(type(k) is int and 1 <= k <= MAX_INDEX for k in tiles)):
        raise EventError(f"tiles must list one tile count (>= 1) per segment, {n} in all",
                         "tiles")
    return Open(actor=Actor.CHALLENGER, at=_time(at, "at"), n=count, lo=_int(body, "lo", 0, n),
                hi=_int(body, "hi", 0, n), clocks=control, disclosed=disclosed,
                tiles=tuple(tiles))


def outcome_move(kind: str, detail: Mapping[str, Any], *, at: float,
                 n: int | None = None) -> RangeOutcome | ProofOutcome:
    """The move applying a proof's ``detail`` (``kind``: ``"step"`` or ``"range"``, the
    prover's ``ProofKind``) at time ``at``: a valid outcome with the numbers the detail records.
    ``n`` bounds the step or state (:data:`MAX_INDEX` when not given)."""
    if not isinstance(detail, Mapping):
        raise EventError(f"a proof's detail must be an object, not {type(detail).__name__}")
    top = MAX_INDEX if n is None else n
    if kind == "range":
        return RangeOutcome(actor=Actor.SERVICE, at=at, state=_int(detail, "state", 0, top),
                            max_abs_units=_fraction(detail, "max_abs_units"),
                            bound=_int(detail, "bound", 0, MAX_THRESHOLD), valid=True)
    if kind == "step":
        tile = None if detail.get("tile") is None else _int(detail, "tile", 0, MAX_INDEX)
        return ProofOutcome(actor=Actor.SERVICE, at=at, step=_int(detail, "step", 1, top),
                            maxdiff_units=_fraction(detail, "maxdiff_units"),
                            tolerance=_int(detail, "tolerance", 0, MAX_THRESHOLD), valid=True,
                            tile=tile)
    raise EventError(f"a proof is of a step or a range, not {_shorten(kind)}")


def proof_target(kind: str, body: Mapping[str, Any],
                 n: int | None = None) -> tuple[str, int] | None:
    """``("step", i)`` or ``("range", k)`` for a proof event (what its circuit proves), else
    ``None``."""
    top = MAX_INDEX if n is None else n
    if kind == "proofoutcome":
        return "step", _int(body, "step", 1, top)
    if kind == "rangeoutcome":
        return "range", _int(body, "state", 0, top)
    return None


def states_of(kind: str, body: Mapping[str, Any], n: int | None = None) -> frozenset[int]:
    """The committed states an event uses, which a dispute's bundle must carry: the revealed
    state, the state of a range proof, states i-1 and i of a step proof."""
    top = MAX_INDEX if n is None else n
    if kind in ("reveal", "rangeoutcome"):
        return frozenset({_int(body, "state", 0, top)})
    if kind == "proofoutcome":
        step = _int(body, "step", 1, top)
        return frozenset({step - 1, step})
    return frozenset()


def decode_verdict(body: Mapping[str, Any]) -> Verdict:
    """The verdict a ``verdict`` event records."""
    name = _str(body, "verdict")
    if name not in VERDICT_NAMES:
        raise EventError(f"verdict must be one of {sorted(VERDICT_NAMES)}, not "
                         f"{_shorten(name)}", "verdict")
    return Verdict(name.lower())


# --- strict readers of untrusted values -----------------------------------------------------


def _field(body: Mapping[str, Any], key: str) -> Any:
    if key not in body:
        raise EventError(f"missing field {key!r}")
    return body[key]


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = _field(body, key)
    if type(value) is not int or not lo <= value <= hi:
        raise EventError(f"{key} must be an integer in [{lo}, {hi}], not {_shorten(value)}", key)
    return value


def _str(body: Mapping[str, Any], key: str) -> str:
    value = _field(body, key)
    if type(value) is not str:
        raise EventError(f"{key} must be a string, not {type(value).__name__}", key)
    return value


def _time(value: object, field: str) -> float:
    seconds = float(value) if type(value) is float or (
        type(value) is int and abs(value) < 1 << 53) else None
    if seconds is None or not isfinite(seconds) or seconds < 0:
        raise EventError(f"not a finite, non-negative number of seconds: {_shorten(value)}",
                         field)
    return seconds


def _fraction(body: Mapping[str, Any], key: str) -> Fraction:
    value = _field(body, key)
    if type(value) is not str or not _FRACTION.fullmatch(value):
        raise EventError(f"{key} must be a non-negative fraction 'a' or 'a/b', not "
                         f"{_shorten(value)}", key)
    return Fraction(value)


def _shorten(value: object) -> str:
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."
