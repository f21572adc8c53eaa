"""Orchestration of disputes: load, apply one move with the pure game engine, persist, act.

Every step is one database transaction that writes the new game state, the transcript events
and the ledger entries together, *before* anything is acted on; the effects the engine returns
are then carried out (reveals served from the uploaded trace, answers computed by the service's
own watcher, proofs queued). A crash between the two resumes from the database: the pending
effect is recomputed from the stored phase (:func:`resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from challenge import events
from challenge.books import load_ledger, save_ledger
from challenge.codec import state_from_json, state_to_json
from challenge.context import DisputeContext, ProofKind
from challenge.game import (
    Actor,
    Answer,
    Choice,
    Close,
    Disclose,
    DisputeState,
    Effect,
    IllegalMove,
    Move,
    NameTile,
    Open,
    Phase,
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
    timeout_at,
)
from challenge.outbox import enqueue
from challenge.records import (
    WHOLE_SEGMENT,
    Challenge,
    DisclosedState,
    Dispute,
    Network,
    RegisteredModel,
    Result,
    ResultStatus,
    SharedProof,
    SignedMessage,
    TranscriptEvent,
    new_id,
)
from challenge.replay import write_bundle
from challenge.result_lifecycle import ResultEvent, advance
from challenge.transcript import FORMAT as TRANSCRIPT_FORMAT
from challenge.transcript import SigningKey, Transcript, sign_head
from prover.adapter import ProofMade
from refute.commitment import TraceCommitment
from refute.disclosure import write_states
from refute.errors import Conflict, NotFound, RefuteError
from refute.manifest import Manifest
from refute.merkle import merkle_root
from refute.tiling import segment_tiling, tile_counts, worst_tile
from refute.trace import Trace, leaf_of_state
from refute.verdict import agrees, state_tolerance, within_range

SERVICE = "service"

log = logging.getLogger(__name__)
#: Shares of a slashed stake / bond that go to the winner (basis points).
CHALLENGER_SHARE_BPS = 5000
PROVIDER_SHARE_BPS = 5000


class DisputeError(RefuteError):
    """A dispute cannot be opened or moved (wrong result status, closed window…)."""

    code = "dispute_error"


class DisputeNotFound(NotFound, DisputeError):
    """The dispute, or the result to dispute, does not exist."""

    code = "not_found"


# --- persistence helpers ----------------------------------------------------------------------


def load_transcript(session: Session, result_id: str) -> Transcript:
    """A result's transcript, verified while loading."""
    rows = session.scalars(select(TranscriptEvent).where(TranscriptEvent.result_id == result_id)
                           .order_by(TranscriptEvent.seq)).all()
    events = [r.event for r in rows]
    head = events[-1]["hash"] if events else "0x" + "00" * 32
    return Transcript.from_json({"format": TRANSCRIPT_FORMAT, "events": events, "head": head,
                                 "length": len(events), "signatures": [],
                                 "aggregate_signature": None})


def record(session: Session, transcript: Transcript, result_id: str, *, kind: str, at: float,
           body: dict[str, Any]) -> None:
    """Append an event to the transcript and stage its row."""
    if transcript.events:  # ``at`` was read before the result's lock; never before the last
        at = max(at, transcript.events[-1].at)
    event = transcript.append(kind, at, body)
    session.add(TranscriptEvent(result_id=result_id, seq=event.seq, event=event.to_json()))


def _ensure_submission(session: Session, transcript: Transcript, result: Result) -> None:
    """Record the result's submission as event 0, naming the model's manifest by its sha256
    (the manifest a dispute bundle carries is checked against it by ``refute replay``)."""
    if len(transcript) == 0:
        model = session.get(RegisteredModel, result.model_id)
        if model is None:
            raise DisputeError(f"result {result.id}: model {result.model_id} is not registered")
        record(session, transcript, result.id, kind="submission",
               at=result.accepted_at.timestamp(), body={
            "result_id": result.id, "provider": result.provider, "model_id": result.model_id,
            "manifest_sha256": Manifest.from_json(model.manifest).sha256,
            "trace_root": result.trace_root, "leaves": list(result.leaves),
            "stake": result.stake, "signature": result.signature})


# --- opening and moving -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SignedClaim:
    """A party's verified signed message behind a challenge or a move (replay protection)."""

    digest: str
    """The EIP-712 digest (hex): identifies the message, so a retry is recognised."""
    signer: str
    nonce: int
    kind: str
    """``challenge`` or ``move``."""


def _earlier(session: Session, signed: SignedClaim | None) -> str | None:
    """The dispute an identical earlier message was applied to (a retry), or ``None`` for a new
    message; a different message under a used ``(signer, nonce)`` is refused."""
    if signed is None:
        return None
    seen = session.get(SignedMessage, signed.digest)
    if seen is not None:
        return seen.dispute_id
    clash = session.scalars(select(SignedMessage.digest).where(
        SignedMessage.signer == signed.signer, SignedMessage.nonce == str(signed.nonce))).first()
    if clash is not None:
        raise Conflict(f"nonce {signed.nonce} of {signed.signer} was already used for another "
                       "message")
    return None


def _remember(session: Session, signed: SignedClaim | None, dispute_id: str,
              now: datetime) -> None:
    if signed is not None:
        session.add(SignedMessage(digest=signed.digest, signer=signed.signer,
                                  nonce=str(signed.nonce), kind=signed.kind,
                                  dispute_id=dispute_id, created_at=now))


@contextlib.contextmanager
def _one_writer() -> Iterator[None]:
    """Turn a lost race on a unique key (two requests applying the same message at once) into
    a clear refusal instead of a server error; the loser's transaction changed nothing."""
    try:
        yield
    except IntegrityError as exc:
        raise Conflict("a concurrent request changed this dispute first; read it and retry"
                       ) from exc


def configured_clocks(ctx: DisputeContext) -> TimeControl:
    """The time control new disputes get, from the service's settings."""
    return ctx.config.clocks


def open_dispute(
    ctx: DisputeContext,
    result_id: str,
    *,
    challenger: str,
    lo: int,
    hi: int,
    bond: int,
    now: datetime,
    clocks: TimeControl | None = None,
    signed: SignedClaim | None = None,
    owed_check: bool = False,
) -> str:
    """Open a dispute over states (lo, hi] of a result; returns its id (idempotent).

    ``clocks`` default to the service's settings (``REFUTE_DISPUTE_*``); ``signed`` is the
    challenger's signed message, recorded once (a retry returns the same dispute). A challenge
    is accepted only before the result's stored deadline, whatever the timers are doing, and
    with at least the network's minimum bond; ``owed_check`` marks the service's own dispute of
    a sampled spot-check the result still owes (a fault it found, or states never disclosed),
    which the window does not bound: such a result cannot finalize before it is settled."""
    if clocks is None:
        clocks = configured_clocks(ctx)
    with _one_writer(), ctx.sessions() as session, session.begin():
        retry = _earlier(session, signed)
        if retry is not None:
            return retry
        result = session.get(Result, result_id, with_for_update=True)
        if result is None:
            raise DisputeNotFound(f"result {result_id} does not exist")
        existing = session.scalars(select(Dispute).where(
            Dispute.result_id == result_id, Dispute.challenger == challenger,
            Dispute.lo == lo, Dispute.hi == hi)).first()
        if existing is not None:
            _remember(session, signed, existing.id, now)
            return existing.id
        if result.status not in (ResultStatus.ACCEPTED, ResultStatus.DISPUTED):
            raise DisputeError(f"result {result_id} is {result.status.value}: it cannot be "
                               "challenged any more")
        if not owed_check and now.timestamp() > _timestamp(result.challenge_deadline):
            raise DisputeError(f"the challenge window of result {result_id} closed at "
                               f"{_as_utc(result.challenge_deadline).isoformat()}")
        network = session.get(Network, result.network_id)
        assert network is not None
        if challenger != SERVICE and bond < int(network.min_bond):
            raise DisputeError(f"the bond {bond} is below this network's minimum bond "
                               f"{network.min_bond}")
        n = len(result.leaves) - 1
        disclosed = result.trace_blob is not None
        model = session.get(RegisteredModel, result.model_id)
        assert model is not None
        prepared = ctx.prepared(model)
        opening = Open(actor=Actor.CHALLENGER, at=now.timestamp(), n=n, lo=lo, hi=hi,
                       clocks=clocks, disclosed=disclosed,
                       tiles=tile_counts(prepared.manifest.circuits,
                                         prepared.segmentation.segments))
        state, effects = apply(None, opening)
        dispute_id = new_id("dsp")
        ledger = load_ledger(session, result_id)
        known = len(ledger.entries())
        stake = int(result.stake)
        if stake > 0 and ledger.stake(result_id) is None:
            ledger.deposit(result.provider, stake)
            ledger.lock_stake(result_id, result.provider, stake)
        ledger.deposit(challenger, bond)
        ledger.post_bond(dispute_id, challenger, bond, result_id=result_id)
        save_ledger(session, result_id, ledger, known)
        transcript = load_transcript(session, result_id)
        _ensure_submission(session, transcript, result)
        kind, body = events.encode(opening, dispute_id=dispute_id, phase=state.phase,
                                   extra={"challenger": challenger, "bond": str(bond)})
        record(session, transcript, result_id, kind=kind, at=now.timestamp(), body=body)
        session.add(Dispute(id=dispute_id, result_id=result_id, challenger=challenger, lo=lo,
                            hi=hi, bond=str(bond), state=state_to_json(state), status="OPEN",
                            timeout_at=timeout_at(state), opened_at=now))
        _remember(session, signed, dispute_id, now)
        advance(session, result, ResultEvent.DISPUTE_OPENED, now, announce={
            "result_id": result_id, "dispute_id": dispute_id, "lo": lo, "hi": hi,
            "filed_by": challenger})
        if not disclosed:  # the provider must upload its committed trace within its clock
            enqueue(session, result.network_id, "dispute.disclosure_requested",
                    f"disclose:{dispute_id}",
                    {"result_id": result_id, "dispute_id": dispute_id,
                     "deadline": timeout_at(state),
                     "how": f"PUT /v1/results/{result_id}/trace"}, now)
    drive(ctx, dispute_id, effects, now)
    return dispute_id


def move(ctx: DisputeContext, dispute_id: str, game_move: Move, now: datetime,
         detail: dict[str, Any] | None = None, *,
         signed: SignedClaim | None = None) -> tuple[DisputeState, list[Effect]]:
    """Apply one move in one transaction (state, transcript, ledger on resolution).

    ``signed`` is the party's signed message behind the move: a retry of an applied message
    returns the current state and applies nothing; a reused nonce is refused."""
    with _one_writer(), ctx.sessions() as session, session.begin():
        result_id = session.scalar(select(Dispute.result_id).where(Dispute.id == dispute_id))
        if result_id is None:
            raise DisputeNotFound(f"dispute {dispute_id} does not exist")
        # The result's row first (as open_dispute and _resolve take it): one writer at a time
        # appends to the result's transcript and journal, and locks are taken in one order.
        session.get(Result, result_id, with_for_update=True)
        dispute = session.get(Dispute, dispute_id, with_for_update=True)
        assert dispute is not None
        state = state_from_json(dispute.state)
        if dispute.status != "OPEN" and not state.resolved:  # closed by another conviction
            raise DisputeError(f"dispute {dispute_id} was closed ({dispute.verdict}): the "
                               "result's provider was convicted in another dispute")
        retry = _earlier(session, signed)
        if retry is not None:
            if retry != dispute_id:
                raise Conflict("this signed message was already applied to another dispute")
            return state, []
        new_state, effects = apply(state, game_move)
        _remember(session, signed, dispute_id, now)
        if new_state == state and not effects:
            return state, []  # an early tick: nothing happened
        transcript = load_transcript(session, dispute.result_id)
        kind, body = events.encode(game_move, dispute_id=dispute_id, phase=new_state.phase,
                                   extra=detail)
        record(session, transcript, dispute.result_id, kind=kind,
               at=max(game_move.at, now.timestamp()), body=body)
        dispute.state = state_to_json(new_state)
        dispute.timeout_at = timeout_at(new_state)
        for effect in effects:
            if isinstance(effect, Resolved):
                _resolve(session, transcript, dispute, effect, now)
    return new_state, effects


def _resolve(session: Session, transcript: Transcript, dispute: Dispute, effect: Resolved,
             now: datetime) -> None:
    """Settle a resolved dispute: its bond (and the stake, on a conviction) in the result's
    journal, the result's lifecycle, and — on a conviction — every other running dispute of the
    result, closed by the game's :class:`~challenge.game.Close` move."""
    result = session.get(Result, dispute.result_id, with_for_update=True)
    assert result is not None
    verdict = events.verdict_name(effect.verdict)
    ledger = load_ledger(session, result.id)
    known = len(ledger.entries())
    if effect.verdict is not Verdict.CLOSED:  # a closed dispute's bond is returned below
        ledger.settle(dispute.id, verdict, network_id=result.network_id,
                      challenger_share_bps=CHALLENGER_SHARE_BPS,
                      provider_share_bps=PROVIDER_SHARE_BPS)
    dispute.status = "RESOLVED"
    dispute.verdict = verdict
    dispute.resolved_at = now
    dispute.timeout_at = None
    settled = effect.verdict is not Verdict.ABORTED
    unsettled_fault = False
    for filed in session.scalars(select(Challenge).where(
            Challenge.result_id == dispute.result_id, Challenge.lo == dispute.lo,
            Challenge.hi == dispute.hi, Challenge.status == "OPEN")):
        if settled:
            filed.status = "RESOLVED"  # the spot-check's record of this fault
        else:  # the service's own proof never came: its fault finding stands, unsettled
            unsettled_fault = True
            log.error("dispute %s of result %s was aborted (no proof in time): its spot-check "
                      "fault at step %s stays open and holds the result", dispute.id,
                      result.id, dispute.hi)
    if effect.verdict.at_fault() is Actor.PROVIDER:
        advance(session, result, ResultEvent.PROVIDER_CONVICTED, now)
        ledger.close_others(result.id)
        save_ledger(session, result.id, ledger, known)
        _record_verdict(session, transcript, dispute, effect, result=result, now=now)
        for other in session.scalars(select(Dispute).where(
                Dispute.result_id == result.id, Dispute.status == "OPEN",
                Dispute.id != dispute.id).with_for_update()):
            _close(session, transcript, other, by=dispute.id, now=now)
        return
    save_ledger(session, result.id, ledger, known)
    # The challenger's claim was wrong, not the result proven right: the result stays open
    # to every other challenger until its window closes (DESIGN.md "Result lifecycle").
    # A recorded spot-check fault whose dispute was aborted keeps the result DISPUTED: the
    # service found it faulty and never finalizes it unsettled.
    still_open = session.scalars(select(Dispute.id).where(
        Dispute.result_id == result.id, Dispute.status == "OPEN",
        Dispute.id != dispute.id)).first()
    if (still_open is None and not unsettled_fault
            and result.status is ResultStatus.DISPUTED):
        advance(session, result, ResultEvent.DISPUTES_SETTLED, now)
    _record_verdict(session, transcript, dispute, effect, result=result, now=now)


def _close(session: Session, transcript: Transcript, dispute: Dispute, *, by: str,
           now: datetime) -> None:
    """Close a running dispute by the game's Close move (its bond was returned by the
    conviction's ``close_others``), and record it like any other move and verdict."""
    closing = Close(actor=Actor.SERVICE, at=now.timestamp(), by=by)
    state, effects = apply(state_from_json(dispute.state), closing)
    kind, body = events.encode(closing, dispute_id=dispute.id, phase=state.phase)
    record(session, transcript, dispute.result_id, kind=kind, at=now.timestamp(), body=body)
    dispute.state = state_to_json(state)
    dispute.status = "RESOLVED"
    dispute.verdict = events.verdict_name(Verdict.CLOSED)
    dispute.resolved_at = now
    dispute.timeout_at = None
    result = session.get(Result, dispute.result_id)
    assert result is not None
    for effect in effects:
        if isinstance(effect, Resolved):
            _record_verdict(session, transcript, dispute, effect, result=result, now=now)


def _record_verdict(session: Session, transcript: Transcript, dispute: Dispute,
                    effect: Resolved, *, result: Result, now: datetime) -> None:
    verdict = events.verdict_name(effect.verdict)
    kind, body = events.encode_verdict(effect.verdict, dispute_id=dispute.id,
                                       reason=effect.reason, result_status=result.status.value)
    record(session, transcript, result.id, kind=kind, at=now.timestamp(), body=body)
    enqueue(session, result.network_id, "dispute.verdict", f"verdict:{dispute.id}",
            {"dispute_id": dispute.id, "result_id": result.id, "verdict": verdict,
             "result_status": result.status.value}, now)


# --- carrying out effects ---------------------------------------------------------------------


@dataclasses.dataclass
class _Loaded:
    result: Result
    model: RegisteredModel
    dispute: Dispute
    trace: Trace | None
    disclosed: dict[int, tuple[np.ndarray, ...]] = dataclasses.field(default_factory=dict)
    """States disclosed on request (``PUT …/states``), each verified against its leaf when it
    arrived; used when no trace was uploaded."""
    disclosed_at: float | None = None
    """When the latest of them arrived (unix seconds)."""
    own_states: list[list[np.ndarray]] | None = None
    """The watcher's own execution of the job, once computed (see :func:`_own_leaf`)."""

    def state(self, k: int) -> tuple[np.ndarray, ...] | None:
        """Committed state k as the service holds it (uploaded trace, else disclosure)."""
        if self.trace is not None:
            return self.trace.states[k]
        return self.disclosed.get(k)

    def holds(self, states: Iterable[int]) -> bool:
        """Whether the service holds every one of ``states``."""
        return self.trace is not None or all(k in self.disclosed for k in states)

    def commitment(self, scale: int) -> TraceCommitment:
        """The result's signed commitment (its leaves), which a proof is bound to."""
        if self.trace is not None:
            return self.trace.commitment
        leaves = tuple(bytes.fromhex(leaf.removeprefix("0x")) for leaf in self.result.leaves)
        return TraceCommitment(scale=scale, leaves=leaves, root=merkle_root(leaves))


def _load(ctx: DisputeContext, dispute_id: str, reuse: _Loaded | None = None) -> _Loaded:
    """The dispute's rows, read afresh; the trace or the disclosed states (immutable once
    stored) and the watcher's execution are taken from ``reuse`` when it has them, not read or
    computed again."""
    with ctx.sessions() as session:
        dispute = session.get(Dispute, dispute_id)
        if dispute is None:
            raise DisputeNotFound(f"dispute {dispute_id} does not exist")
        result = session.get(Result, dispute.result_id)
        assert result is not None
        model = session.get(RegisteredModel, result.model_id)
        assert model is not None
        rows = [] if result.trace_blob else list(session.execute(
            select(DisclosedState.state, DisclosedState.blob, DisclosedState.disclosed_at)
            .where(DisclosedState.result_id == result.id)).all())
    if reuse is not None and reuse.trace is not None:
        return _Loaded(result, model, dispute, reuse.trace, own_states=reuse.own_states)
    if result.trace_blob:
        return _Loaded(result, model, dispute, ctx.states.trace(result.trace_blob))
    disclosed_at = max((_timestamp(r.disclosed_at) for r in rows), default=None)
    if reuse is not None and set(reuse.disclosed) == {r.state for r in rows}:
        return _Loaded(result, model, dispute, None, reuse.disclosed, disclosed_at,
                       reuse.own_states)
    states = ctx.held_states(ctx.prepared(model).manifest, result, {r.state for r in rows},
                         {r.state: r.blob for r in rows}) if rows else {}
    return _Loaded(result, model, dispute, None, states, disclosed_at)


def _needed(state: DisputeState) -> range:
    """The states a dispute may need from the provider: every state of its range."""
    return range(state.lo, state.hi + 1)


def drive(ctx: DisputeContext, dispute_id: str, effects: Sequence[Effect], now: datetime) -> None:
    """Carry out effects until the dispute waits on someone outside the service.

    What the service does on a party's behalf is stamped with the moment the party had done it,
    never with the service's own (possibly crash-delayed) time: a reveal served from the uploaded
    trace and the watcher's answer at the start of their turn, a disclosure at the upload. So a
    slow or restarted service can never run a party's clock out. Another process may carry out
    the same effect concurrently (crash recovery, :func:`resume_stalled`): the engine then
    refuses the second copy, and this one stops quietly.
    """
    pending = list(effects)
    loaded: _Loaded | None = None
    while pending:
        effect = pending.pop(0)
        loaded = _load(ctx, dispute_id, reuse=loaded)
        state = state_from_json(loaded.dispute.state)
        game_move: Move
        detail: dict[str, Any]
        if isinstance(effect, RequestDisclosure):
            uploaded = loaded.result.trace_uploaded_at
            if loaded.trace is not None and uploaded is not None:
                at = _timestamp(uploaded)
                detail = {"trace_blob": loaded.result.trace_blob}
            elif loaded.disclosed_at is not None and loaded.holds(_needed(state)):
                at = loaded.disclosed_at  # the states this dispute needs, disclosed one by one
                detail = {"disclosed_states": sorted(loaded.disclosed)}
            else:
                continue  # requested by webhook at open; the upload routes call disclose()
            game_move = Disclose(actor=Actor.PROVIDER, at=max(state.turn_started, at),
                                 matches_commitment=True)
        elif isinstance(effect, RequestReveal):
            if not loaded.holds([effect.state]):  # excluded by the game: DISCLOSE comes first
                raise DisputeError(f"dispute {dispute_id}: state {effect.state} is due but the "
                                   "service does not hold it")
            game_move = _serve_reveal(loaded, effect.state, state.turn_started,
                                      ctx.prepared(loaded.model).manifest)
            detail = {"state": effect.state}
        elif isinstance(effect, RequestAnswer) and loaded.dispute.challenger == SERVICE:
            choice = _watcher_answer(ctx, loaded, effect.state)
            game_move = Answer(actor=Actor.CHALLENGER, at=state.turn_started,
                               state=effect.state, choice=choice)
            detail = {"state": effect.state, "choice": choice.value}
        elif isinstance(effect, RequestTile) and loaded.dispute.challenger == SERVICE:
            tile = _watcher_tile(ctx, loaded, effect.step)
            game_move = NameTile(actor=Actor.CHALLENGER, at=state.turn_started,
                                 step=effect.step, tile=tile)
            detail = {"step": effect.step, "tile": tile}
        elif isinstance(effect, RequestStepProof | RequestRangeProof):
            queue_proof(ctx, dispute_id, now)
            continue
        else:
            continue  # the challenger's answer: it comes through the API
        try:
            pending += move(ctx, dispute_id, game_move, now, detail)[1]
        except IllegalMove:
            if _load(ctx, dispute_id, reuse=loaded).dispute.state != loaded.dispute.state:
                return  # carried out concurrently by another process
            raise


def _as_utc(moment: datetime) -> datetime:
    """A stored time as an aware UTC datetime (SQLite returns naive UTC datetimes)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _timestamp(moment: datetime) -> float:
    """Unix seconds of a stored time."""
    return _as_utc(moment).timestamp()


def disclose(ctx: DisputeContext, result_id: str, now: datetime) -> list[str]:
    """The provider's trace was uploaded, or some of its states were disclosed (and checked
    against its commitment): move every open dispute of the result that waits for them out of
    DISCLOSE (a dispute whose states are not all held yet keeps waiting). Returns the ids of the
    disputes that were waiting (idempotent)."""
    with ctx.sessions() as session:
        waiting = [d.id for d in session.scalars(select(Dispute).where(
            Dispute.result_id == result_id, Dispute.status == "OPEN"))
            if d.state.get("phase") == Phase.DISCLOSE.value]
    for dispute_id in waiting:
        resume(ctx, dispute_id, now)
    return waiting


def _serve_reveal(loaded: _Loaded, k: int, at: float, manifest: Manifest) -> Reveal:
    """Reveal state k from the provider's uploaded trace or its disclosure (both committed: a
    disclosed state was checked against its leaf on arrival)."""
    state = loaded.state(k)
    assert state is not None
    matches = loaded.trace is None or (
        "0x" + loaded.trace.commitment.leaves[k].hex() == loaded.result.leaves[k])
    in_range = within_range(state, manifest.range)
    return Reveal(actor=Actor.PROVIDER, at=at, state=k, matches_leaf=matches,
                  in_range=in_range)


def _execute(ctx: DisputeContext, model: RegisteredModel,
             trace: Trace | None) -> list[list[np.ndarray]]:
    """The watcher's own execution of the job: every state, from the trace's state 0 (input)."""
    if trace is None:
        raise DisputeError("the watcher needs the job's input, and the trace was not uploaded")
    prepared = ctx.prepared(model)
    inputs = {spec.name: t for spec, t in zip(prepared.manifest.states[0], trace.states[0],
                                               strict=True)}
    return ctx.states.execute(prepared, inputs)


def _leaf(ctx: DisputeContext, model: RegisteredModel, k: int,
          state: Sequence[np.ndarray]) -> str:
    return "0x" + leaf_of_state(ctx.prepared(model).manifest, k, state).hex()


def _agrees(ctx: DisputeContext, model: RegisteredModel, k: int, own: Sequence[np.ndarray], *,
            committed: Sequence[np.ndarray] | None, leaf: str) -> bool:
    """Whether committed state k agrees with the service's own execution: the same leaf, or
    every value within τ_k (:func:`refute.verdict.agrees`: a provider's optimized run differs
    from the deterministic one by float rounding)."""
    if _leaf(ctx, model, k, own) == leaf:
        return True
    manifest = ctx.prepared(model).manifest
    return committed is not None and agrees(
        own, committed, scale=manifest.scale,
        tolerance=state_tolerance(manifest.tolerances, k))


def _watcher_answer(ctx: DisputeContext, loaded: _Loaded, k: int) -> Choice:
    """The service's honest answer: does state k agree with its own execution of the model
    (:func:`_agrees`)? The job is executed once per drive (kept on ``loaded``)."""
    if loaded.own_states is None:
        loaded.own_states = _execute(ctx, loaded.model, loaded.trace)
    agree = _agrees(ctx, loaded.model, k, loaded.own_states[k], committed=loaded.state(k),
                    leaf=loaded.result.leaves[k])
    return Choice.AGREE if agree else Choice.DISAGREE


def _watcher_tile(ctx: DisputeContext, loaded: _Loaded, step: int) -> int:
    """The service's honest choice of a tile of tiled segment ``step``: the tile where the
    committed state differs most from its own execution (:func:`refute.tiling.worst_tile`)."""
    prepared = ctx.prepared(loaded.model)
    segment = prepared.segmentation.segments[step - 1]
    tiling = segment_tiling(prepared.manifest.circuits, segment)
    committed = loaded.state(step)
    if tiling is None or committed is None:
        raise DisputeError(f"step {step} has no tiling, or its state is not held")
    if loaded.own_states is None:
        loaded.own_states = _execute(ctx, loaded.model, loaded.trace)
    return worst_tile(tiling, loaded.own_states[step], committed).index


def revealed_state(ctx: DisputeContext, dispute_id: str, k: int) -> bytes:
    """State ``k`` of a dispute as a ``refute.states/2`` bundle, for a challenger to compare
    with its own execution before it answers (a leaf alone cannot tell an honest optimized run
    from a lie). Only the states the dispute has put on the table are served: its bounds lo
    and hi and the pending state; and only once the service holds it."""
    loaded = _load(ctx, dispute_id)
    state = state_from_json(loaded.dispute.state)
    shown = {state.lo, state.hi} | ({state.pending} if state.pending is not None else set())
    if k not in shown:
        raise Conflict(f"state {k} is not revealed in dispute {dispute_id}: its states are "
                       f"{sorted(shown)}")
    tensors = loaded.state(k)
    if tensors is None:
        raise Conflict(f"state {k} is not held yet: the provider has not disclosed it")
    return write_states(ctx.prepared(loaded.model).manifest, {k: tensors})


def watch(ctx: DisputeContext, result_id: str, now: datetime) -> str | None:
    """The watcher checks a whole result itself: it executes the model on the job's input and,
    when its output disagrees with the committed one (:func:`_agrees`: beyond τ_N unless the
    leaves are equal), opens a whole-trace dispute and plays the
    bisection with its own execution (rule HC-OPEN). Returns the dispute's id, or ``None`` when
    the output agrees. Idempotent (one watcher dispute per result)."""
    with ctx.sessions() as session:
        result = session.get(Result, result_id)
        if result is None:
            raise DisputeNotFound(f"result {result_id} does not exist")
        if result.trace_blob is None:
            raise DisputeError(f"result {result_id}: the watcher needs the job's input, and the "
                               "trace (state 0) was not uploaded")
        model = session.get(RegisteredModel, result.model_id)
        assert model is not None
    n = len(result.leaves) - 1
    trace = ctx.states.trace(result.trace_blob)
    output = _execute(ctx, model, trace)[n]
    if _agrees(ctx, model, n, output, committed=trace.states[n], leaf=result.leaves[n]):
        return None
    return open_dispute(ctx, result_id, challenger=SERVICE, lo=0, hi=n,
                        bond=ctx.config.watcher_bond, now=now)


# --- proving ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """What one shared proof establishes: step ``index`` (its ``tile``, when it is tiled) or
    the range of state ``index``."""

    kind: ProofKind
    index: int
    tile: int | None = None

    @property
    def key_tile(self) -> int:
        """``SharedProof.tile``."""
        return WHOLE_SEGMENT if self.tile is None else self.tile

    def waited_by(self, state: DisputeState) -> bool:
        """Whether a dispute in ``state`` waits for exactly this proof."""
        if self.kind is ProofKind.STEP:
            return (state.phase is Phase.STEP_PROOF and state.hi == self.index
                    and state.tile == self.tile)
        return state.phase is Phase.RANGE_PROOF and state.pending == self.index


def prove_pending(ctx: DisputeContext, dispute_id: str, now: datetime) -> DisputeState | None:
    """Prove what a dispute waits for — the step, or the range of a revealed state — and apply
    the outcome (idempotent: does nothing unless a proof is due).

    One proof per disputed step (or revealed state) of a result, shared by every dispute that
    reaches it (DESIGN.md "Bonds"): the first task claims it, proves it, stores its outcome and
    applies it to every dispute of the result waiting for it; a task that finds the proof being
    made by another returns at once (the prover applies it to this dispute too), and a dispute
    that arrives later reuses the stored outcome. Flooding a result with cheap disputes costs
    their bonds, not the prover's time."""
    loaded = _load(ctx, dispute_id)
    state = state_from_json(loaded.dispute.state)
    if loaded.dispute.status != "OPEN":
        return None  # resolved, or closed by another dispute's conviction: nothing to prove
    if state.phase is Phase.RANGE_PROOF:
        if state.pending is None or not loaded.holds([state.pending]):
            raise DisputeError("the state to range-check was not revealed")
        kind, index = ProofKind.RANGE, state.pending
    elif state.phase is Phase.STEP_PROOF:
        if not loaded.holds([state.hi - 1, state.hi]):
            raise DisputeError("the step's states were not revealed (no trace uploaded)")
        kind, index = ProofKind.STEP, state.hi
    else:
        return None
    target = _Target(kind, index, state.tile)
    detail = _shared_proof(ctx, loaded, target, now)
    if detail is None:
        return None  # being proven by another task, which applies it here too
    return _apply_shared(ctx, loaded.result.id, target, detail, now=now, asked_by=dispute_id)



def _prove(ctx: DisputeContext, loaded: _Loaded, target: _Target) -> ProofMade:
    """Make the proof (step ``index`` or one tile of it, or the range of state ``index``),
    verified by the prover port (and on chain when the context has one); keep its artifacts in
    the blob store and return it with its transcript detail (what the proof established, the
    circuit and the proof) and what it cost."""
    prepared = ctx.prepared(loaded.model)
    index = target.index
    needed = (index - 1, index) if target.kind is ProofKind.STEP else (index,)
    states = {k: held for k in needed if (held := loaded.state(k)) is not None}
    assert len(states) == len(needed)  # checked by prove_pending
    made = ctx.prover.prove(prepared, target.kind, index, states,
                            loaded.commitment(prepared.manifest.scale), tile=target.tile)
    for data in made.files:
        ctx.blobs.put(data)
    detail = dict(made.detail)
    if ctx.chain is not None:
        vk, settings, srs = (ctx.blobs.get(str(detail[f"{what}_sha256"]))
                             for what in ("vk", "settings", "srs"))
        detail["chain"] = ctx.chain.verify(vk, settings, srs, detail["proof"])
    return dataclasses.replace(made, detail=detail, files=())


def _shared_proof(ctx: DisputeContext, loaded: _Loaded, target: _Target,
                  now: datetime) -> dict[str, Any] | None:
    """The stored detail of the result's one proof of ``target``, or this task's new proof
    (claimed before proving); ``None`` while another live task is proving it. A claim older
    than the task time limit belongs to a dead task and is taken over."""
    kind, index = target.kind, target.index
    key = (loaded.result.id, kind, index, target.key_tile)
    with _one_writer(), ctx.sessions() as session, session.begin():
        row = session.get(SharedProof, key, with_for_update=True)
        if row is not None and row.outcome is not None:
            return dict(row.outcome)
        if row is None:
            try:
                with session.begin_nested():
                    session.add(SharedProof(result_id=key[0], kind=kind, index=index,
                                            tile=target.key_tile, claimed_at=now))
            except IntegrityError:
                return None  # claimed by a concurrent task, which applies it here too
        elif now.timestamp() - _timestamp(row.claimed_at) > ctx.config.claim_expiry_s:
            row.claimed_at = now
        else:
            return None
    try:
        made = _prove(ctx, loaded, target)
    except BaseException:
        with ctx.sessions() as session, session.begin():  # let the next task prove it at once
            session.execute(delete(SharedProof).where(
                SharedProof.result_id == key[0], SharedProof.kind == kind,
                SharedProof.index == index, SharedProof.tile == target.key_tile,
                SharedProof.outcome.is_(None)))
        raise
    with ctx.sessions() as session, session.begin():
        row = session.get(SharedProof, key, with_for_update=True)
        if row is not None and row.outcome is not None:
            return dict(row.outcome)  # a taken-over claim finished meanwhile: one outcome
        if row is None:
            row = SharedProof(result_id=key[0], kind=kind, index=index, tile=target.key_tile,
                              claimed_at=now)
            session.add(row)
        row.outcome, row.done_at = made.detail, now
        row.prove_seconds, row.peak_bytes = made.seconds, made.peak_bytes
    return made.detail


def _apply_shared(ctx: DisputeContext, result_id: str, target: _Target,
                  detail: dict[str, Any], *, now: datetime,
                  asked_by: str) -> DisputeState | None:
    """Apply a proof's outcome to every open dispute of the result waiting for exactly that
    proof; returns the new state of ``asked_by`` (None if it was not waiting any more)."""
    with ctx.sessions() as session:
        waiting = [(d.id, state_from_json(d.state)) for d in session.scalars(
            select(Dispute).where(Dispute.result_id == result_id, Dispute.status == "OPEN"))]
    mine: DisputeState | None = None
    for dispute_id, state in waiting:
        if not target.waited_by(state):
            continue
        game_move = events.outcome_move(target.kind, detail, at=now.timestamp(), n=state.n)
        try:
            new_state, effects = move(ctx, dispute_id, game_move, now, detail)
        except (IllegalMove, DisputeError):
            continue  # moved or closed concurrently
        drive(ctx, dispute_id, effects, now)
        if dispute_id == asked_by:
            mine = new_state
    return mine


def resume_stalled(ctx: DisputeContext, now: datetime) -> list[str]:
    """Crash recovery for every open dispute: carry out again what the service owes but lost
    between a committed move and its effect (a reveal from the uploaded trace, a disclosure
    already uploaded, the watcher's answer, a proof that was never queued or whose task was
    lost). Runs on the timers beat before timeouts are applied, so a party can never time out
    because of the service. Returns the ids it acted on."""
    grace = ctx.config.resume_after_s
    # Past the broker's own redelivery of a lost task, and the time that task may run.
    requeue_every = ctx.config.requeue_every_s
    t = now.timestamp()
    owed: list[str] = []
    proofs: list[str] = []
    with ctx.sessions() as session:
        rows = session.execute(select(Dispute, Result.trace_blob).join(
            Result, Result.id == Dispute.result_id).where(Dispute.status == "OPEN")).all()
        for dispute, trace_blob in rows:
            state = state_from_json(dispute.state)
            deadline = timeout_at(state)
            late = t - state.turn_started >= grace or (deadline is not None and t >= deadline)
            service_owes = (
                (state.phase in (Phase.DISCLOSE, Phase.REVEAL)
                 and _holds(session, dispute.result_id, trace_blob, state))
                or (state.phase is Phase.ANSWER and dispute.challenger == SERVICE))
            if service_owes:
                if late:
                    owed.append(dispute.id)
            elif state.phase in (Phase.STEP_PROOF, Phase.RANGE_PROOF):
                # Never queued (the broker was down when it was due): at once; queued: only
                # once the broker's own redelivery of a lost task would have run it.
                since = dispute.proof_requeued_at
                if (t - state.turn_started >= grace if since is None
                        else t - since >= requeue_every):
                    proofs.append(dispute.id)
    for dispute_id in owed:
        try:
            resume(ctx, dispute_id, now)
        except RefuteError as exc:  # one broken dispute must not stop the others' recovery
            log.warning("recovery: dispute %s: %s", dispute_id, exc.reason)
    for dispute_id in proofs:
        queue_proof(ctx, dispute_id, now)
    return owed + proofs


def _holds(session: Session, result_id: str, trace_blob: str | None,
           state: DisputeState) -> bool:
    """Whether the service holds what a dispute in DISCLOSE or REVEAL waits for from the
    provider: the uploaded trace, or the disclosed states it needs."""
    if trace_blob is not None:
        return True
    needed = set(_needed(state)) if state.phase is Phase.DISCLOSE else {state.pending}
    held = set(session.scalars(select(DisclosedState.state).where(
        DisclosedState.result_id == result_id)))
    return needed <= held


def queue_proof(ctx: DisputeContext, dispute_id: str, now: datetime) -> bool:
    """Queue the proof a dispute waits for, and note when it was queued. A broker outage is
    logged, not raised: the move that made the proof due is committed, and the timers' recovery
    (:func:`resume_stalled`) queues a proof that was never queued at its next beat."""
    try:
        ctx.tasks.schedule_proof(dispute_id)
    except Exception:
        log.exception("cannot queue the proof of dispute %s: recovery will", dispute_id)
        return False
    with ctx.sessions() as session, session.begin():
        session.execute(update(Dispute).where(Dispute.id == dispute_id)
                        .values(proof_requeued_at=now.timestamp()))
    return True


def tick_due(ctx: DisputeContext, now: datetime) -> int:
    """Apply timeouts to every open dispute whose clock ran out; returns how many moved."""
    with ctx.sessions() as session:
        due = session.scalars(select(Dispute.id).where(
            Dispute.status == "OPEN", Dispute.timeout_at <= now.timestamp())).all()
    moved = 0
    for dispute_id in due:
        try:
            move(ctx, dispute_id, Tick(actor=Actor.SERVICE, at=now.timestamp()), now)
        except (DisputeError, IllegalMove):  # closed meanwhile by a conviction in another dispute
            continue
        moved += 1
    return moved


# --- export -----------------------------------------------------------------------------------


def service_signing_key(ctx: DisputeContext) -> SigningKey:
    """The service's BLS key: from ``REFUTE_BLS_SEED`` (hex), else a development seed kept
    beside the blob store (generated once; not for production)."""
    if ctx.config.bls_seed:
        return SigningKey.generate(bytes.fromhex(ctx.config.bls_seed))
    path = ctx.config.dev_seed_path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
    return SigningKey.generate(bytes.fromhex(path.read_text().strip()))


def export_dispute(ctx: DisputeContext, dispute_id: str, path: Path) -> Path:
    """Write the dispute's bundle for ``refute replay`` (transcript head signed by the service).

    It holds the states the dispute revealed or proved on and, under ``artifacts/<sha256>``,
    every settings file, verifying key and SRS that a proof event of the dispute names by hash
    (taken from the blob store where the prover kept them, else from the circuit cache)."""
    loaded = _load(ctx, dispute_id)
    with ctx.sessions() as session:
        transcript = load_transcript(session, loaded.result.id)
    key = service_signing_key(ctx)
    transcript.attach_signature(key.public_key, sign_head(transcript, key))
    prepared = ctx.prepared(loaded.model)
    manifest = prepared.manifest
    wanted: set[int] = set()
    files: dict[str, bytes] = {}
    graphs: dict[int, bytes] = {}
    for event in transcript.events:
        body = event.body
        if body.get("dispute_id") != dispute_id:
            continue
        wanted |= events.states_of(event.kind, body)
        target = events.proof_target(event.kind, body)
        if target is None:
            continue
        kind, index = ProofKind(target[0]), target[1]
        if body.get("tile") is not None:  # replay cuts the tile's slices with the graph
            graphs[index] = prepared.segmentation.segments[index - 1].onnx_bytes
        digests = {str(body[f]) for f in ("settings_sha256", "vk_sha256", "srs_sha256")
                   if body.get(f)}
        for digest in sorted(d for d in digests if ctx.blobs.exists(d)):
            files[f"artifacts/{digest}"] = ctx.blobs.get(digest)
        if any(not ctx.blobs.exists(d) for d in digests):  # from the prover's circuit cache
            # a step's tile, or the chunk of a chunked state's range
            part = body.get("tile" if kind is ProofKind.STEP else "chunk")
            for data in ctx.prover.artifacts(prepared, kind, index,
                                             tile=part if isinstance(part, int) else None):
                digest = hashlib.sha256(data).hexdigest()
                if digest in digests:
                    files[f"artifacts/{digest}"] = data
    states = {k: held for k in sorted(wanted) if (held := loaded.state(k)) is not None}
    return write_bundle(path, transcript=transcript.to_json(), manifest=manifest,
                        dispute_id=dispute_id, states=states, circuit_files=files,
                        segment_graphs=graphs)


def resume(ctx: DisputeContext, dispute_id: str, now: datetime) -> None:
    """Carry out a dispute's pending effect again from its stored phase (after a crash between
    a committed move and its effects, or a lost task). Idempotent."""
    loaded = _load(ctx, dispute_id)
    state = state_from_json(loaded.dispute.state)
    effects: list[Effect] = []
    if loaded.dispute.status != "OPEN":
        pass  # resolved, or closed by another dispute's conviction
    elif state.phase is Phase.DISCLOSE:
        effects = [RequestDisclosure()]
    elif state.phase is Phase.REVEAL and state.pending is not None:
        effects = [RequestReveal(state=state.pending)]
    elif state.phase is Phase.ANSWER and state.pending is not None:
        effects = [RequestAnswer(state=state.pending)]
    elif state.phase is Phase.TILE:
        effects = [RequestTile(step=state.hi, tiles=state.tiles_of(state.hi))]
    elif state.phase is Phase.STEP_PROOF:
        effects = [RequestStepProof(step=state.hi, tile=state.tile)]
    elif state.phase is Phase.RANGE_PROOF and state.pending is not None:
        effects = [RequestRangeProof(state=state.pending)]
    drive(ctx, dispute_id, effects, now)
