"""The dispute game over one result, as a pure state machine.

``apply(state, move) -> (new_state, effects)`` is the whole game: it reads nothing but its
arguments (no I/O, no database, no Celery, no clock), so the API, the workers and ``replay`` all
reach the same state from the same moves. Time enters only through the ``at`` timestamp every
move carries; the orchestrator stamps moves and turns timers into :class:`Tick` moves, using
:func:`timeout_at` to know when the running clock expires.

Every legal step is one entry of :data:`TRANSITIONS`, keyed by (phase, move type); anything else
is refused with :class:`IllegalMove`. ``docs/GAME.md`` is the written form of the table, with the
clock and verdict rules and the honest-actor rules. The verdict rule itself (which proven
number convicts whom) is :mod:`refute.verdict`, shared with the prover and ``replay``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from types import MappingProxyType
from typing import TypeAlias, TypeVar

from refute.errors import RefuteError, ServerFault
from refute.verdict import VerdictError, range_fault, step_fault

__all__ = [
    "TRANSITIONS",
    "Actor",
    "Answer",
    "Choice",
    "Close",
    "Disclose",
    "DisputeState",
    "Effect",
    "GameError",
    "IllegalMove",
    "InvalidDisputeState",
    "Move",
    "NameTile",
    "Open",
    "Phase",
    "ProofOutcome",
    "RangeOutcome",
    "RequestAnswer",
    "RequestDisclosure",
    "RequestRangeProof",
    "RequestReveal",
    "RequestStepProof",
    "RequestTile",
    "Resolved",
    "Reveal",
    "Rule",
    "Tick",
    "TimeControl",
    "Verdict",
    "apply",
    "max_rounds",
    "timeout_at",
]


# --- errors --------------------------------------------------------------------------------


class GameError(ServerFault):
    """A game helper was called with arguments outside its domain (e.g. ``max_rounds(0)``)."""

    code = "game_error"


class IllegalMove(RefuteError):
    """The move is refused; the dispute state is unchanged. ``reason`` says why in one line."""

    code = "illegal_move"


class InvalidDisputeState(ServerFault):
    """A :class:`DisputeState` was built with inconsistent fields (e.g. loaded from bad data)."""

    code = "invalid_dispute_state"


# --- enums ---------------------------------------------------------------------------------


class Actor(enum.StrEnum):
    """Who makes a move. The service is the orchestrator: proofs and timers."""

    PROVIDER = "provider"
    CHALLENGER = "challenger"
    SERVICE = "service"


class Phase(enum.Enum):
    """What the dispute waits for. There is no "not started" member: no dispute is ``None``."""

    DISCLOSE = "disclose"
    """The provider's committed states are not available to the service (its trace was not
    uploaded): the provider must disclose them (upload the trace) before the bisection starts;
    the provider's clock runs."""
    REVEAL = "reveal"
    """The provider must reveal state ``pending``; the provider's clock runs."""
    ANSWER = "answer"
    """The challenger must AGREE or DISAGREE with state ``pending``; its clock runs."""
    RANGE_PROOF = "range_proof"
    """State ``pending`` was revealed out of range; the service proves its max |v|."""
    TILE = "tile"
    """``hi == lo + 1`` and segment ``hi`` is tiled: the challenger must name the tile it
    disputes (DESIGN.md "The dispute game" step 4); its clock runs."""
    STEP_PROOF = "step_proof"
    """``hi == lo + 1``: the service proves segment ``hi`` (or its named tile) on
    (state lo, state hi)."""
    RESOLVED = "resolved"
    """The verdict is final; every further move is illegal."""


class Choice(enum.Enum):
    """The challenger's answer about a revealed state."""

    AGREE = "agree"
    """The state equals the challenger's own execution: the disagreement is after it."""
    DISAGREE = "disagree"
    """The state differs: the disagreement is at or before it."""


class Verdict(enum.Enum):
    """How a dispute ended."""

    PROVIDER_FAULT = "provider_fault"
    CHALLENGER_FAULT = "challenger_fault"
    PROVIDER_TIMEOUT = "provider_timeout"
    CHALLENGER_TIMEOUT = "challenger_timeout"
    ABORTED = "aborted"
    """The service missed a proof deadline: nobody is at fault, bonds are returned."""
    CLOSED = "closed"
    """The provider was convicted in another dispute of the same result: this one closes with
    nobody at fault here, and its bond is returned (the stake was already slashed)."""

    def at_fault(self) -> Actor | None:
        """The party that loses its bond or stake, or ``None`` when the dispute was aborted."""
        if self in (Verdict.PROVIDER_FAULT, Verdict.PROVIDER_TIMEOUT):
            return Actor.PROVIDER
        if self in (Verdict.CHALLENGER_FAULT, Verdict.CHALLENGER_TIMEOUT):
            return Actor.CHALLENGER
        return None


# --- moves ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TimeControl:
    """The clocks fixed when a dispute opens, in seconds."""

    provider: float
    """The provider's total thinking time over all its reveals."""
    challenger: float
    """The challenger's total thinking time over all its answers."""
    proof_timeout: float
    """How long the service has for each range or step proof before the dispute is aborted."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Open:
    """The challenger opens a dispute over states ``lo < hi`` of an ``n``-segment trace.

    The two forms of the protocol are :meth:`whole_trace` (0, n) and :meth:`single_step` (i-1, i).
    """

    actor: Actor
    at: float
    n: int
    lo: int
    hi: int
    clocks: TimeControl
    disclosed: bool = True
    """The provider's committed states are available to the service (the trace was uploaded).
    If not, the game starts in DISCLOSE, on the provider's clock."""
    tiles: tuple[int, ...] = ()
    """Tiles per segment (entry i-1 for segment i; 1: proven whole), from the manifest's
    tilings; empty when no segment is tiled. A dispute ending at a tiled segment asks the
    challenger to name a tile (phase TILE)."""

    @classmethod
    def whole_trace(
        cls, *, actor: Actor, at: float, n: int, clocks: TimeControl, disclosed: bool = True,
        tiles: tuple[int, ...] = (),
    ) -> Open:
        """Dispute the whole trace: lo = 0, hi = n."""
        return cls(actor=actor, at=at, n=n, lo=0, hi=n, clocks=clocks, disclosed=disclosed,
                   tiles=tiles)

    @classmethod
    def single_step(
        cls,
        *,
        actor: Actor,
        at: float,
        n: int,
        step: int,
        clocks: TimeControl,
        disclosed: bool = True,
        tiles: tuple[int, ...] = (),
    ) -> Open:
        """Dispute segment ``step`` directly: lo = step - 1, hi = step."""
        return cls(
            actor=actor, at=at, n=n, lo=step - 1, hi=step, clocks=clocks, disclosed=disclosed,
            tiles=tiles,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Disclose:
    """The provider made its committed states available (uploaded its trace).

    ``matches_commitment``: every disclosed state hashes to its committed leaf (the orchestrator
    checked the whole trace against the result's commitment).
    """

    actor: Actor
    at: float
    matches_commitment: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Reveal:
    """The provider reveals state ``state``, as checked by the orchestrator.

    ``matches_leaf``: the revealed tensors hash to the committed leaf. ``in_range``: every value
    is finite and within the model's declared range R.
    """

    actor: Actor
    at: float
    state: int
    matches_leaf: bool
    in_range: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Answer:
    """The challenger agrees or disagrees with the revealed state ``state``."""

    actor: Actor
    at: float
    state: int
    choice: Choice


@dataclass(frozen=True, kw_only=True, slots=True)
class NameTile:
    """The challenger names the tile of tiled segment ``step`` it disputes (0-based, in the
    manifest's tile order). An honest challenger names a tile where its own execution differs
    most from the revealed state ``step``."""

    actor: Actor
    at: float
    step: int
    tile: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RangeOutcome:
    """The verified outcome of the range proof of state ``state``.

    ``max_abs_units``: the proven max |v| over the state, in quantized units; ``bound``: R in the
    same units (:func:`refute.verdict.range_bound_units`); ``valid``: the proof verified and its
    hashed input reproduces the state's leaf. Judged by :func:`refute.verdict.range_fault`.
    """

    actor: Actor
    at: float
    state: int
    max_abs_units: Fraction
    bound: int
    valid: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class ProofOutcome:
    """The verified outcome of the adjudication proof of segment ``step``.

    ``maxdiff_units``: the proven max |f(state lo) - state hi|, in quantized units (over the
    named ``tile`` when the segment is tiled); ``tolerance``: the segment's τ; ``valid``: the
    proof verified and its hashed inputs reproduce both leaves. Judged by
    :func:`refute.verdict.step_fault`.
    """

    actor: Actor
    at: float
    step: int
    maxdiff_units: Fraction
    tolerance: int
    valid: bool
    tile: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Tick:
    """The orchestrator's timer: applies whatever deadline has passed at ``at`` (if any)."""

    actor: Actor
    at: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Close:
    """The service closes a running dispute because the provider was convicted in another
    dispute of the same result (``by`` names that dispute): verdict ``CLOSED``."""

    actor: Actor
    at: float
    by: str


Move: TypeAlias = (
    Open | Disclose | Reveal | Answer | NameTile | RangeOutcome | ProofOutcome | Tick | Close
)


# --- effects -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestDisclosure:
    """Ask the provider to disclose its committed states (its clock is running)."""


@dataclass(frozen=True, slots=True)
class RequestReveal:
    """Ask the provider to reveal ``state`` (its clock is running)."""

    state: int


@dataclass(frozen=True, slots=True)
class RequestAnswer:
    """Ask the challenger to answer about revealed ``state`` (its clock is running)."""

    state: int


@dataclass(frozen=True, slots=True)
class RequestTile:
    """Ask the challenger to name one of the ``tiles`` tiles of segment ``step`` (its clock is
    running)."""

    step: int
    tiles: int


@dataclass(frozen=True, slots=True)
class RequestStepProof:
    """Ask the prover for the adjudication proof of segment ``step``, of its ``tile`` when the
    segment is tiled (a proof deadline runs)."""

    step: int
    tile: int | None = None


@dataclass(frozen=True, slots=True)
class RequestRangeProof:
    """Ask the prover for the range proof of revealed ``state`` (a proof deadline runs)."""

    state: int


@dataclass(frozen=True, slots=True)
class Resolved:
    """The dispute is over; settle bonds by ``verdict.at_fault()``."""

    verdict: Verdict
    reason: str


Effect: TypeAlias = (
    RequestDisclosure
    | RequestReveal
    | RequestAnswer
    | RequestTile
    | RequestStepProof
    | RequestRangeProof
    | Resolved
)


# --- state ---------------------------------------------------------------------------------

_WAITING_FOR: Mapping[Phase, Actor | None] = MappingProxyType(
    {
        Phase.DISCLOSE: Actor.PROVIDER,
        Phase.REVEAL: Actor.PROVIDER,
        Phase.ANSWER: Actor.CHALLENGER,
        Phase.TILE: Actor.CHALLENGER,
        Phase.RANGE_PROOF: None,
        Phase.STEP_PROOF: None,
        Phase.RESOLVED: None,
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class DisputeState:
    """Everything the game knows about one dispute; built by :func:`apply`, never mutated.

    No field has a default: a state only exists once a dispute is open.
    """

    n: int
    """Number of segments of the trace (states 0..n)."""
    lo: int
    """The highest state the parties agree on."""
    hi: int
    """The lowest state the parties disagree on."""
    phase: Phase
    pending: int | None
    """The state awaited or under proof (m = (lo+hi)//2), the step ``hi`` in STEP_PROOF, or
    ``None`` in DISCLOSE and once resolved."""
    clocks: TimeControl
    """The time control fixed at open."""
    provider_clock: float
    """The provider's remaining time, as of ``turn_started``."""
    challenger_clock: float
    """The challenger's remaining time, as of ``turn_started``."""
    turn_started: float
    """When the current turn (or proof wait) began. Every applied move hands the turn over, so
    this is also the time of the last applied move (see :attr:`last_move_at`)."""
    rounds: int
    """Bisection rounds completed (answers applied)."""
    moves: int
    """Moves applied so far, the opening included (the history length)."""
    verdict: Verdict | None
    reason: str | None
    """Why the dispute resolved, in one line, or ``None`` while it runs."""
    tiles: tuple[int, ...]
    """Tiles per segment, fixed at open (:attr:`Open.tiles`); empty when none is tiled."""
    tile: int | None
    """The tile of segment ``hi`` the challenger named (STEP_PROOF and after), else ``None``."""

    def __post_init__(self) -> None:
        problem = _inconsistency(self)
        if problem is not None:
            raise InvalidDisputeState(problem)

    @property
    def turn(self) -> Actor | None:
        """The party whose clock is running, or ``None`` (proof phases, resolved)."""
        return _WAITING_FOR[self.phase]

    @property
    def last_move_at(self) -> float:
        """The timestamp of the last applied move; older moves are refused."""
        return self.turn_started

    def tiles_of(self, step: int) -> int:
        """How many tiles segment ``step`` is proven on (1: whole)."""
        return self.tiles[step - 1] if self.tiles else 1

    @property
    def resolved(self) -> bool:
        """Whether the verdict is final."""
        return self.phase is Phase.RESOLVED

    def remaining(self, actor: Actor) -> float:
        """``actor``'s remaining clock as of ``turn_started`` (the service has no clock)."""
        if actor is Actor.PROVIDER:
            return self.provider_clock
        if actor is Actor.CHALLENGER:
            return self.challenger_clock
        raise GameError("the service has no clock")


def _inconsistency(s: DisputeState) -> str | None:
    """Why ``s`` cannot be a state of the game, or ``None``."""
    if not (_is_int(s.n) and _is_int(s.lo) and _is_int(s.hi)):
        return "n, lo and hi must be integers"
    if not 0 <= s.lo < s.hi <= s.n:
        return f"need 0 <= lo < hi <= n, got lo={s.lo} hi={s.hi} n={s.n}"
    if not (_finite_nonneg(s.provider_clock) and _finite_nonneg(s.challenger_clock)):
        return "clocks must be finite and non-negative"
    if not math.isfinite(s.turn_started):
        return "turn_started must be finite"
    if s.rounds < 0 or s.moves < 1:
        return "rounds must be >= 0 and moves >= 1"
    if (s.phase is Phase.RESOLVED) != (s.verdict is not None):
        return "a verdict is set exactly when the phase is RESOLVED"
    if (s.verdict is None) != (s.reason is None):
        return "a reason is set exactly when a verdict is"
    problem = _tile_inconsistency(s)
    if problem is not None:
        return problem
    width = s.hi - s.lo
    if s.phase in (Phase.REVEAL, Phase.ANSWER, Phase.RANGE_PROOF):
        if width < 2 or s.pending != (s.lo + s.hi) // 2:
            return f"phase {s.phase.value} needs hi - lo > 1 and pending = (lo+hi)//2"
    elif s.phase in (Phase.TILE, Phase.STEP_PROOF):
        if width != 1 or s.pending != s.hi:
            return f"phase {s.phase.value} needs hi = lo + 1 and pending = hi"
    elif s.phase is Phase.DISCLOSE:
        if s.pending is not None or s.rounds != 0 or s.moves != 1:
            return "phase disclose comes right after the opening, with nothing pending"
    elif s.pending is not None:
        return "a resolved dispute has nothing pending"
    return None


def _tile_inconsistency(s: DisputeState) -> str | None:
    if s.tiles and (len(s.tiles) != s.n or not all(_is_int(k) and k >= 1 for k in s.tiles)):
        return "tiles must be empty or one count >= 1 per segment"
    tile = s.tile
    if tile is not None:
        if s.phase not in (Phase.STEP_PROOF, Phase.RESOLVED):
            return f"no tile is named in phase {s.phase.value}"
        if not (_is_int(tile) and 0 <= tile < s.tiles_of(s.hi)):
            return f"tile {tile} is not a tile of segment {s.hi}"
    if s.phase is Phase.TILE and s.tiles_of(s.hi) < 2:
        return f"phase tile needs a tiled segment {s.hi}"
    if s.phase is Phase.STEP_PROOF and (s.tile is None) != (s.tiles_of(s.hi) < 2):
        return f"phase step_proof needs a named tile exactly when segment {s.hi} is tiled"
    return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_nonneg(x: float) -> bool:
    return math.isfinite(x) and x >= 0


# --- public helpers ------------------------------------------------------------------------


def max_rounds(n: int) -> int:
    """ceil(log2 n): the most bisection rounds a dispute over ``n`` segments can take."""
    if not _is_int(n) or n < 1:
        raise GameError(f"a trace has at least one segment, got n={n!r}")
    return (n - 1).bit_length()


def timeout_at(state: DisputeState | None) -> float | None:
    """When the running clock (or proof deadline) expires, or ``None`` if nothing is running.

    A move stamped at or after this instant is refused; a :class:`Tick` at or after it applies
    the timeout.
    """
    if state is None:
        return None
    if state.phase in (Phase.DISCLOSE, Phase.REVEAL):
        return state.turn_started + state.provider_clock
    if state.phase in (Phase.ANSWER, Phase.TILE):
        return state.turn_started + state.challenger_clock
    if state.phase in (Phase.RANGE_PROOF, Phase.STEP_PROOF):
        return state.turn_started + state.clocks.proof_timeout
    return None


# --- the transition table ------------------------------------------------------------------

Transition: TypeAlias = tuple[DisputeState, list[Effect]]
_Handler: TypeAlias = Callable[[DisputeState | None, Move], Transition]
_M = TypeVar("_M", Open, Disclose, Reveal, Answer, NameTile, RangeOutcome, ProofOutcome, Tick,
             Close)


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of the transition table: who may make the move, and what it does."""

    actor: Actor
    handler: _Handler


def _in_game(move_type: type[_M], handler: Callable[[DisputeState, _M], Transition]) -> _Handler:
    """Adapt a handler of one move type in a running dispute to the table's common signature."""

    def run(state: DisputeState | None, move: Move) -> Transition:
        if state is None or not isinstance(move, move_type):  # pragma: no cover - table bug
            raise IllegalMove(f"internal: {type(move).__name__} routed to a {move_type.__name__}")
        return handler(state, move)

    return run


def _open(state: DisputeState | None, move: Move) -> Transition:
    if state is not None or not isinstance(move, Open):  # pragma: no cover - table bug
        raise IllegalMove("internal: open routed with a running dispute")
    if not all(_is_int(x) for x in (move.n, move.lo, move.hi)):
        raise IllegalMove("open: n, lo and hi must be integers")
    if move.n < 1:
        raise IllegalMove(f"open: a trace has at least one segment, got n={move.n}")
    if not 0 <= move.lo < move.hi <= move.n:
        raise IllegalMove(f"open: need 0 <= lo < hi <= n, got lo={move.lo} hi={move.hi} n={move.n}")
    c = move.clocks
    for name, value in (
        ("provider", c.provider),
        ("challenger", c.challenger),
        ("proof_timeout", c.proof_timeout),
    ):
        if not (math.isfinite(value) and value > 0):
            raise IllegalMove(f"open: the {name} time must be finite and positive, got {value}")
    if not isinstance(move.disclosed, bool):
        raise IllegalMove(f"open: disclosed must be a boolean, got {move.disclosed!r}")
    tiles = tuple(move.tiles)
    if tiles and (len(tiles) != move.n or not all(_is_int(k) and k >= 1 for k in tiles)):
        raise IllegalMove(f"open: tiles must be empty or one count >= 1 for each of the "
                          f"{move.n} segments")
    if not move.disclosed:
        waiting = DisputeState(
            n=move.n,
            lo=move.lo,
            hi=move.hi,
            phase=Phase.DISCLOSE,
            pending=None,
            clocks=c,
            provider_clock=float(c.provider),
            challenger_clock=float(c.challenger),
            turn_started=move.at,
            rounds=0,
            moves=1,
            verdict=None,
            reason=None,
            tiles=tiles,
            tile=None,
        )
        return waiting, [RequestDisclosure()]
    return _next_round(
        lo=move.lo,
        hi=move.hi,
        at=move.at,
        n=move.n,
        tiles=tiles,
        clocks=c,
        provider_clock=float(c.provider),
        challenger_clock=float(c.challenger),
        rounds=0,
        moves=1,
    )


def _next_round(
    *,
    lo: int,
    hi: int,
    at: float,
    n: int,
    tiles: tuple[int, ...],
    clocks: TimeControl,
    provider_clock: float,
    challenger_clock: float,
    rounds: int,
    moves: int,
) -> Transition:
    """Start the next bisection round on (lo, hi); when hi = lo + 1, the step proof, or the
    challenger's choice of a tile first if segment hi is tiled."""
    effect: Effect
    count = tiles[hi - 1] if tiles else 1
    if hi - lo > 1:
        m = (lo + hi) // 2
        phase, pending, effect = Phase.REVEAL, m, RequestReveal(m)
    elif count > 1:
        phase, pending, effect = Phase.TILE, hi, RequestTile(hi, count)
    else:
        phase, pending, effect = Phase.STEP_PROOF, hi, RequestStepProof(hi)
    state = DisputeState(
        n=n,
        lo=lo,
        hi=hi,
        phase=phase,
        pending=pending,
        clocks=clocks,
        provider_clock=provider_clock,
        challenger_clock=challenger_clock,
        turn_started=at,
        rounds=rounds,
        moves=moves,
        verdict=None,
        reason=None,
        tiles=tiles,
        tile=None,
    )
    return state, [effect]


def _pending(state: DisputeState) -> int:
    """The awaited state or step; every phase but RESOLVED has one (see ``_inconsistency``)."""
    if state.pending is None:  # pragma: no cover - excluded by DisputeState's own checks
        raise IllegalMove("internal: nothing is pending in a resolved dispute")
    return state.pending


def _disclose(state: DisputeState, move: Disclose) -> Transition:
    if move.matches_commitment is not True:
        raise IllegalMove(
            "disclose: the states do not match the committed leaves; it counts as no "
            "disclosure and the provider's clock keeps running"
        )
    spent = _charge(state, Actor.PROVIDER, move.at)
    return _next_round(
        lo=state.lo,
        hi=state.hi,
        at=move.at,
        n=state.n,
        tiles=state.tiles,
        clocks=state.clocks,
        provider_clock=spent.provider_clock,
        challenger_clock=spent.challenger_clock,
        rounds=0,
        moves=state.moves + 1,
    )


def _reveal(state: DisputeState, move: Reveal) -> Transition:
    m = _pending(state)
    if move.state != m:
        raise IllegalMove(f"reveal: state {m} is pending, not state {move.state}")
    if not move.matches_leaf:
        raise IllegalMove(
            f"reveal: state {m} does not match its committed leaf; it counts as no reveal and "
            "the provider's clock keeps running"
        )
    spent = _charge(state, Actor.PROVIDER, move.at)
    if not move.in_range:
        new = replace(spent, phase=Phase.RANGE_PROOF, turn_started=move.at, moves=state.moves + 1)
        return new, [RequestRangeProof(m)]
    new = replace(spent, phase=Phase.ANSWER, turn_started=move.at, moves=state.moves + 1)
    return new, [RequestAnswer(m)]


def _answer(state: DisputeState, move: Answer) -> Transition:
    m = _pending(state)
    if move.state != m:
        raise IllegalMove(f"answer: state {m} is pending, not state {move.state}")
    if not isinstance(move.choice, Choice):
        raise IllegalMove(f"answer: choice must be AGREE or DISAGREE, got {move.choice!r}")
    spent = _charge(state, Actor.CHALLENGER, move.at)
    lo, hi = (m, state.hi) if move.choice is Choice.AGREE else (state.lo, m)
    return _next_round(
        lo=lo,
        hi=hi,
        at=move.at,
        n=state.n,
        tiles=state.tiles,
        clocks=state.clocks,
        provider_clock=spent.provider_clock,
        challenger_clock=spent.challenger_clock,
        rounds=state.rounds + 1,
        moves=state.moves + 1,
    )


def _name_tile(state: DisputeState, move: NameTile) -> Transition:
    count = state.tiles_of(state.hi)
    if move.step != state.hi:
        raise IllegalMove(f"tile: segment {state.hi} is disputed, not segment {move.step}")
    if not (_is_int(move.tile) and 0 <= move.tile < count):
        raise IllegalMove(f"tile: segment {state.hi} has tiles 0..{count - 1}, not {move.tile!r}")
    spent = _charge(state, Actor.CHALLENGER, move.at)
    new = replace(spent, phase=Phase.STEP_PROOF, tile=move.tile, turn_started=move.at,
                  moves=state.moves + 1)
    return new, [RequestStepProof(state.hi, move.tile)]


def _range_outcome(state: DisputeState, move: RangeOutcome) -> Transition:
    m = _pending(state)
    if move.state != m:
        raise IllegalMove(f"range proof: state {m} is under proof, not state {move.state}")
    if not move.valid:
        raise IllegalMove(f"range proof: the proof for state {m} is invalid")
    try:
        convicted = range_fault(move.max_abs_units, move.bound)
    except VerdictError as exc:
        raise IllegalMove(f"range proof: {exc.reason}") from exc
    if convicted:
        return _resolve(
            state,
            move.at,
            Verdict.PROVIDER_FAULT,
            f"range proof: state {m} has max |v| = {move.max_abs_units} > R = {move.bound}",
        )
    new = replace(state, phase=Phase.ANSWER, turn_started=move.at, moves=state.moves + 1)
    return new, [RequestAnswer(m)]


def _proof_outcome(state: DisputeState, move: ProofOutcome) -> Transition:
    if move.step != state.hi:
        raise IllegalMove(f"step proof: step {state.hi} is under proof, not step {move.step}")
    if move.tile != state.tile:
        raise IllegalMove(f"step proof: tile {state.tile} of step {state.hi} is under proof, "
                          f"not tile {move.tile}")
    if not move.valid:
        raise IllegalMove(f"step proof: the proof for step {state.hi} is invalid")
    try:
        convicted = step_fault(move.maxdiff_units, move.tolerance)
    except VerdictError as exc:
        raise IllegalMove(f"step proof: {exc.reason}") from exc
    if convicted:
        verdict, rel = Verdict.PROVIDER_FAULT, ">"
    else:
        verdict, rel = Verdict.CHALLENGER_FAULT, "<="
    where = f"step {state.hi}" + (f" tile {state.tile}" if state.tile is not None else "")
    reason = f"{where}: maxdiff {move.maxdiff_units} {rel} tolerance {move.tolerance}"
    return _resolve(state, move.at, verdict, reason)


def _tick(state: DisputeState, move: Tick) -> Transition:
    deadline = timeout_at(state)
    if deadline is None or move.at < deadline:
        return state, []  # nothing expired: a stale or early timer changes nothing
    if state.phase is Phase.DISCLOSE:
        return _resolve(
            replace(state, provider_clock=0.0),
            move.at,
            Verdict.PROVIDER_TIMEOUT,
            "the provider's clock ran out waiting for the disclosure of its committed states",
        )
    if state.phase is Phase.REVEAL:
        timed_out = replace(state, provider_clock=0.0)
        return _resolve(
            timed_out,
            move.at,
            Verdict.PROVIDER_TIMEOUT,
            f"the provider's clock ran out waiting for the reveal of state {state.pending}",
        )
    if state.phase is Phase.ANSWER:
        timed_out = replace(state, challenger_clock=0.0)
        return _resolve(
            timed_out,
            move.at,
            Verdict.CHALLENGER_TIMEOUT,
            f"the challenger's clock ran out waiting for its answer about state {state.pending}",
        )
    if state.phase is Phase.TILE:
        return _resolve(
            replace(state, challenger_clock=0.0),
            move.at,
            Verdict.CHALLENGER_TIMEOUT,
            f"the challenger's clock ran out waiting for it to name a tile of step {state.hi}",
        )
    what = "range" if state.phase is Phase.RANGE_PROOF else "step"
    return _resolve(
        state,
        move.at,
        Verdict.ABORTED,
        f"the service missed the {what} proof deadline for {what} {state.pending}; "
        "bonds are returned",
    )


def _close(state: DisputeState, move: Close) -> Transition:
    if not move.by:
        raise IllegalMove("Close must name the dispute whose conviction closes this one")
    return _resolve(state, move.at, Verdict.CLOSED,
                    f"the provider was convicted in dispute {move.by} of the same result; "
                    "this dispute closes and its bond is returned")


def _charge(state: DisputeState, actor: Actor, at: float) -> DisputeState:
    """Deduct the time ``actor`` spent on its turn (the caller checked the deadline)."""
    spent = at - state.turn_started
    if actor is Actor.PROVIDER:
        return replace(state, provider_clock=max(0.0, state.provider_clock - spent))
    return replace(state, challenger_clock=max(0.0, state.challenger_clock - spent))


def _resolve(state: DisputeState, at: float, verdict: Verdict, reason: str) -> Transition:
    new = replace(
        state,
        phase=Phase.RESOLVED,
        pending=None,
        turn_started=at,
        moves=state.moves + 1,
        verdict=verdict,
        reason=reason,
    )
    return new, [Resolved(verdict, reason)]


TRANSITIONS: Mapping[tuple[Phase | None, type[Move]], Rule] = MappingProxyType(
    {
        (None, Open): Rule(Actor.CHALLENGER, _open),
        (Phase.DISCLOSE, Disclose): Rule(Actor.PROVIDER, _in_game(Disclose, _disclose)),
        (Phase.DISCLOSE, Tick): Rule(Actor.SERVICE, _in_game(Tick, _tick)),
        (Phase.REVEAL, Reveal): Rule(Actor.PROVIDER, _in_game(Reveal, _reveal)),
        (Phase.REVEAL, Tick): Rule(Actor.SERVICE, _in_game(Tick, _tick)),
        (Phase.ANSWER, Answer): Rule(Actor.CHALLENGER, _in_game(Answer, _answer)),
        (Phase.ANSWER, Tick): Rule(Actor.SERVICE, _in_game(Tick, _tick)),
        (Phase.TILE, NameTile): Rule(Actor.CHALLENGER, _in_game(NameTile, _name_tile)),
        (Phase.TILE, Tick): Rule(Actor.SERVICE, _in_game(Tick, _tick)),
        (Phase.RANGE_PROOF, RangeOutcome): Rule(
            Actor.SERVICE, _in_game(RangeOutcome, _range_outcome)
        ),
        (Phase.RANGE_PROOF, Tick): Rule(Actor.SERVICE, _in_game(Tick, _tick)),
        (Phase.STEP_PROOF, ProofOutcome): Rule(
            Actor.SERVICE, _in_game(ProofOutcome, _proof_outcome)
        ),
        (Phase.STEP_PROOF, Tick): Rule(Actor.SERVICE, _in_game(Tick, _tick)),
        # A conviction in another dispute of the result closes every running one.
        **{(phase, Close): Rule(Actor.SERVICE, _in_game(Close, _close))
           for phase in Phase if phase is not Phase.RESOLVED},
        # Phase.RESOLVED has no entry: once resolved, every move is illegal.
    }
)
"""(phase, move type) → who may move and what happens; ``None`` is "no dispute yet"."""


def apply(state: DisputeState | None, move: Move) -> Transition:
    """Apply ``move`` to ``state`` (``None`` before the dispute opens).

    Returns the new state and the effects the orchestrator must carry out, or raises
    :class:`IllegalMove` (the state is then unchanged). Checks, in order: the move is in the
    transition table for the current phase; it is made by the party the table names; its
    timestamp is finite and not older than the last applied move; for any move but a
    :class:`Tick` or a :class:`Close`, the running deadline has not passed; then the handler's
    own checks.
    """
    name = type(move).__name__
    if state is not None and state.phase is Phase.RESOLVED:
        verdict = state.verdict.value if state.verdict else "?"
        raise IllegalMove(f"{name} is not a legal move in phase resolved (verdict {verdict})")
    phase = None if state is None else state.phase
    rule = TRANSITIONS.get((phase, type(move)))
    if rule is None:
        where = "before a dispute is open" if phase is None else f"in phase {phase.value}"
        raise IllegalMove(f"{name} is not a legal move {where}")
    if move.actor != rule.actor:
        raise IllegalMove(f"{name} must be made by the {rule.actor.value}, not by the {move.actor}")
    if not (isinstance(move.at, int | float) and math.isfinite(move.at)):
        raise IllegalMove(f"{name} refused: its timestamp {move.at!r} is not a finite number")
    if state is not None:
        if move.at < state.last_move_at:
            raise IllegalMove(
                f"{name} refused: stamped {move.at}, before the last move at {state.last_move_at}"
            )
        deadline = timeout_at(state)
        # The service's own moves are never late: a Tick applies the deadline, and a Close
        # (another dispute convicted the provider) ends the dispute whatever its clocks say.
        if not isinstance(move, Tick | Close) and deadline is not None and move.at >= deadline:
            raise IllegalMove(
                f"{name} refused: the deadline passed at {deadline} (phase {state.phase.value}); "
                "a Tick applies the timeout"
            )
    return rule.handler(state, move)
