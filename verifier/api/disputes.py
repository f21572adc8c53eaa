"""Dispute routes of the API: challenges (signed, bonded), dispute state, moves, transcripts.

Whistleblowers are not networks: these routes authenticate by EIP-712 signatures (the
challenger's key), not by API keys. Anyone can read a dispute and a result's transcript.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.codec import state_from_json
from challenge.game import Actor, Answer, Choice, DisputeState, NameTile, Phase
from challenge.messages import (
    MOVE_AGREE,
    MOVE_DISAGREE,
    MOVE_TILE,
    AuthError,
    Domain,
    network_word,
    verify_signed,
)
from challenge.messages import Challenge as SignedChallenge
from challenge.messages import Move as SignedMove
from challenge.orchestrator import (
    SignedClaim,
    drive,
    load_transcript,
    move,
    open_dispute,
    revealed_state,
    service_signing_key,
)
from challenge.records import Dispute, Result, ResultStatus, SignedMessage
from refute.errors import Conflict, NotFound
from verifier.api.app import NetworkDep, SessionDep
from verifier.api.schemas import (
    HEX32,
    Address,
    ClocksOut,
    DomainIn,
    LedgerEntryOut,
    ProofRecord,
    TimelineEntry,
    TranscriptCheck,
)
from verifier.explorer import record
from verifier.results import owned_result
from verifier.service import ServiceContext


class ChallengeMessage(BaseModel):
    """The EIP-712 ``Challenge`` message."""

    model_config = ConfigDict(extra="forbid", strict=True)
    network: str = Field(pattern=HEX32)
    result: str = Field(pattern=HEX32)
    lo: int = Field(ge=0, lt=2**32)
    hi: int = Field(ge=1, lt=2**32)
    bond: int = Field(ge=1, lt=2**256)
    nonce: int = Field(ge=0, lt=2**256)
    deadline: int = Field(ge=0, lt=2**64)


class ChallengeOpen(BaseModel):
    """A signed challenge against a result."""

    model_config = ConfigDict(extra="forbid", strict=True)
    challenger: Address
    message: ChallengeMessage
    domain: DomainIn
    signature: str = Field(pattern=r"^(0x)?[0-9a-fA-F]{130}$")


class MoveMessage(BaseModel):
    """The EIP-712 ``Move`` message: kind 1 = AGREE, 2 = DISAGREE with the revealed state,
    3 = the tile named (its index in ``payload``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    network: str = Field(pattern=HEX32)
    dispute: str = Field(pattern=HEX32)
    round: int = Field(ge=0, lt=2**32)
    kind: int = Field(ge=0, le=255)
    payload: str = Field(pattern=HEX32)
    nonce: int = Field(ge=0, lt=2**256)
    deadline: int = Field(ge=0, lt=2**64)


class MoveSubmit(BaseModel):
    """A party's signed move."""

    model_config = ConfigDict(extra="forbid", strict=True)
    player: Address
    message: MoveMessage
    domain: DomainIn
    signature: str = Field(pattern=r"^(0x)?[0-9a-fA-F]{130}$")


class DisputeOut(BaseModel):
    """A dispute as anyone may see it."""

    id: str
    result_id: str
    challenger: str
    status: str
    verdict: str | None
    phase: str
    lo: int
    hi: int
    pending: int | None
    rounds: int
    timeout_at: float | None
    opened_at: datetime
    pending_leaf: str | None = None
    tiles: int | None = None
    """In phase ``tile``: how many tiles segment ``hi`` has (name one, 0-based)."""
    tile: int | None = None
    """The tile of segment ``hi`` the challenger named (once named)."""


class WatchQueued(BaseModel):
    """The watcher's check of a whole result is queued."""

    result_id: str
    queued: bool


class PublicResult(BaseModel):
    """A result's public commitment."""

    id: str
    network_id: str
    model_id: str
    provider: str
    status: str
    trace_root: str
    leaves: list[str]
    challenge_deadline: datetime


class DisputeRecord(BaseModel):
    """Everything public about a dispute, for the explorer: the dispute, its result's
    commitment, the bisection move by move, the proofs and their on-chain checks, the clocks,
    the result's bonds journal and its transcript checked by the service."""

    dispute: DisputeOut
    result: PublicResult
    bond: str = Field(description="the challenger's bond (uint256, decimal)")
    reason: str | None = Field(default=None, description="why the dispute resolved")
    clocks: ClocksOut
    timeline: list[TimelineEntry]
    proofs: list[ProofRecord]
    ledger: list[LedgerEntryOut]
    transcript: TranscriptCheck


def _public_result(result: Result) -> PublicResult:
    return PublicResult(id=result.id, network_id=result.network_id, model_id=result.model_id,
                        provider=result.provider, status=result.status.value,
                        trace_root=result.trace_root, leaves=list(result.leaves),
                        challenge_deadline=result.challenge_deadline)


def _loaded(s: Session, dispute_id: str) -> tuple[Dispute, Result, DisputeState]:
    """The dispute (404 when there is none), its result and its game state."""
    dispute = s.get(Dispute, dispute_id)
    if dispute is None:
        raise NotFound(f"dispute {dispute_id} not found")
    result = s.get(Result, dispute.result_id)
    assert result is not None
    return dispute, result, state_from_json(dispute.state)


def _word(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("0x"))


def _domain(body: DomainIn) -> Domain:
    return Domain(chain_id=body.chainId, verifying_contract=body.verifyingContract,
                  name=body.name, version=body.version)


def _dispute_out(s: Session, dispute: Dispute) -> DisputeOut:
    state = state_from_json(dispute.state)
    result = s.get(Result, dispute.result_id)
    pending_leaf = None
    if result is not None and state.pending is not None:
        pending_leaf = result.leaves[state.pending]
    return DisputeOut(id=dispute.id, result_id=dispute.result_id, challenger=dispute.challenger,
                      status=dispute.status, verdict=dispute.verdict,
                      phase=state.phase.value if dispute.status == "OPEN" or state.resolved
                      else "closed",
                      lo=state.lo, hi=state.hi, pending=state.pending, rounds=state.rounds,
                      timeout_at=dispute.timeout_at, opened_at=dispute.opened_at,
                      pending_leaf=pending_leaf,
                      tiles=state.tiles_of(state.hi) if state.phase is Phase.TILE else None,
                      tile=state.tile)


def router(ctx: ServiceContext, errors: dict[int | str, Any]) -> APIRouter:
    """The dispute routes over ``ctx`` (proofs and the watcher's checks go to its tasks)."""
    api = APIRouter(tags=["disputes"])
    expected = Domain(chain_id=ctx.settings.chain_id)

    @api.post("/v1/results/{result_id}/watch", status_code=202, response_model=WatchQueued,
              responses=errors)
    def watch_result(result_id: str, net: NetworkDep, s: SessionDep) -> WatchQueued:
        """Ask the service's watcher to check a whole result of this network itself: it executes
        the model on the job's input and, if its output differs from the committed one, opens a
        whole-trace dispute and plays the bisection (needs the uploaded trace)."""
        result = owned_result(s, net, result_id)
        if result.trace_blob is None:
            raise Conflict(f"result {result_id}: upload its trace first (the watcher needs the "
                           "job's input)")
        if result.status not in (ResultStatus.ACCEPTED, ResultStatus.DISPUTED):
            raise Conflict(f"result {result_id} is {result.status.value}: nothing to watch")
        ctx.tasks.schedule_watch(result_id)
        return WatchQueued(result_id=result_id, queued=True)

    @api.post("/v1/results/{result_id}/challenges", status_code=201, response_model=DisputeOut,
              responses=errors)
    def challenge(result_id: str, body: ChallengeOpen, s: SessionDep) -> DisputeOut:
        """Open a bonded dispute over states (lo, hi] of a result, signed by the challenger."""
        result = s.get(Result, result_id)
        if result is None:
            raise NotFound(f"result {result_id} not found")
        m = body.message
        claim = SignedChallenge(network=_word(m.network), result=_word(m.result), lo=m.lo,
                                hi=m.hi, bond=m.bond, nonce=m.nonce, deadline=m.deadline)
        now = ctx.clock.now()
        signer, digest = verify_signed(claim, _domain(body.domain), body.signature,
                                       expected_signer=body.challenger,
                                       now=int(now.timestamp()), expected_domain=expected)
        if claim.network != network_word(result.network_id) or claim.result != network_word(
                result_id):
            raise AuthError("the signed challenge names another network or result")
        if not 0 <= m.lo < m.hi <= len(result.leaves) - 1:
            raise AuthError(f"lo and hi must satisfy 0 <= lo < hi <= {len(result.leaves) - 1}")
        s.rollback()
        signed = SignedClaim(digest=digest.hex(), signer=signer, nonce=m.nonce,
                             kind="challenge")
        dispute_id = open_dispute(ctx.disputes, result_id, challenger=signer, lo=m.lo, hi=m.hi,
                                  bond=m.bond, now=now,
                                  signed=signed)
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None
        return _dispute_out(s, dispute)

    @api.get("/v1/public/results/{result_id}", response_model=PublicResult, responses=errors)
    def public_result(result_id: str, s: SessionDep) -> PublicResult:
        """What anyone needs to check or challenge a result: its commitment and ids."""
        result = s.get(Result, result_id)
        if result is None:
            raise NotFound(f"result {result_id} not found")
        return _public_result(result)

    @api.get("/v1/disputes/{dispute_id}", response_model=DisputeOut, responses=errors)
    def get_dispute(dispute_id: str, s: SessionDep) -> DisputeOut:
        """A dispute's state, phase, pending state and clocks."""
        dispute = s.get(Dispute, dispute_id)
        if dispute is None:
            raise NotFound(f"dispute {dispute_id} not found")
        return _dispute_out(s, dispute)

    @api.get("/v1/disputes", response_model=list[DisputeOut], responses=errors)
    def network_disputes(net: NetworkDep, s: SessionDep,
                         limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[DisputeOut]:
        """The disputes over the calling network's results, newest first."""
        rows = s.scalars(select(Dispute).join(Result, Result.id == Dispute.result_id)
                         .where(Result.network_id == net.id)
                         .order_by(Dispute.opened_at.desc(), Dispute.id).limit(limit)).all()
        return [_dispute_out(s, d) for d in rows]

    @functools.cache
    def checker() -> record.TranscriptChecker:
        return record.TranscriptChecker(service_signing_key(ctx.disputes))

    @api.get("/v1/disputes/{dispute_id}/record", response_model=DisputeRecord,
             responses=errors)
    def dispute_record(dispute_id: str, s: SessionDep) -> DisputeRecord:
        """Everything public about a dispute (the explorer's page): the bisection as a
        timeline (each move: who, when, the state revealed and its leaf, the interval after
        it), the clocks, the proofs (step, tile, maxdiff against τ, verifying key, on-chain
        transaction when recorded), the verdict, the result's bonds journal, and the result's
        transcript checked as ``refute replay`` does: hash chain recomputed, head signed with
        the service's BLS key and the signature verified."""
        dispute, result, state = _loaded(s, dispute_id)
        rows = record.transcript_rows(s, result.id)
        events = record.dispute_events(rows, dispute_id)
        return DisputeRecord(
            dispute=_dispute_out(s, dispute), result=_public_result(result), bond=dispute.bond,
            reason=state.reason, clocks=record.clocks(state, dispute.timeout_at),
            timeline=record.timeline(events, result.leaves), proofs=record.proofs(events),
            ledger=record.ledger_entries(s, result.id, dispute_id),
            transcript=checker().check(rows))

    @api.get("/v1/disputes/{dispute_id}/states/{k}", response_class=Response, responses=errors)
    def dispute_state(dispute_id: str, k: int) -> Response:
        """State k of the dispute (its bounds lo, hi or the pending state) as a
        ``refute.states/2`` bundle, for the challenger to compare with its own execution; 409
        for a state the dispute has not revealed or the service does not hold yet."""
        data = revealed_state(ctx.disputes, dispute_id, k)
        return Response(content=data, media_type="application/zip")

    @api.post("/v1/disputes/{dispute_id}/moves", response_model=DisputeOut, responses=errors)
    def submit_move(dispute_id: str, body: MoveSubmit, s: SessionDep) -> DisputeOut:
        """The challenger's signed move (round-bound): AGREE/DISAGREE on the revealed state
        (``kind`` 1/2, ``payload`` its leaf), or, in phase ``tile``, the tile of segment
        ``hi`` it disputes (``kind`` 3, ``payload`` the tile index as a 32-byte big-endian
        number)."""
        dispute, result, state = _loaded(s, dispute_id)
        m = body.message
        signed = SignedMove(network=_word(m.network), dispute=_word(m.dispute), round=m.round,
                            kind=m.kind, payload=_word(m.payload), nonce=m.nonce,
                            deadline=m.deadline)
        now = ctx.clock.now()
        signer, digest = verify_signed(signed, _domain(body.domain), body.signature,
                                       expected_signer=body.player,
                                       now=int(now.timestamp()), expected_domain=expected)
        if signer.lower() != dispute.challenger.lower():
            raise AuthError("only the dispute's challenger may answer")
        if signed.network != network_word(result.network_id) or signed.dispute != network_word(
                dispute_id):
            raise AuthError("the signed move names another network or dispute")
        claim = SignedClaim(digest=digest.hex(), signer=signer, nonce=m.nonce, kind="move")
        if s.get(SignedMessage, claim.digest) is not None:
            return _dispute_out(s, dispute)  # a retry of an applied move: applied once
        if m.kind == MOVE_TILE:
            return _name_tile(s, dispute, state, signed, claim=claim, signature=body.signature,
                              now=now)
        if state.phase is not Phase.ANSWER or state.pending is None:
            raise AuthError(f"the dispute is not waiting for an answer (phase "
                            f"{state.phase.value})")
        if m.round != state.rounds or "0x" + signed.payload.hex() != result.leaves[state.pending]:
            raise AuthError("the move is for another round or another revealed state")
        if m.kind not in (MOVE_AGREE, MOVE_DISAGREE):
            raise AuthError("kind must be 1 (AGREE), 2 (DISAGREE) or 3 (TILE)")
        choice = Choice.AGREE if m.kind == MOVE_AGREE else Choice.DISAGREE
        s.rollback()
        answer = Answer(actor=Actor.CHALLENGER, at=now.timestamp(), state=state.pending,
                        choice=choice)
        _state, effects = move(ctx.disputes, dispute_id, answer, now,
                               {"state": state.pending, "choice": choice.value,
                                "signature": body.signature}, signed=claim)
        drive(ctx.disputes, dispute_id, effects, now)
        s.expire_all()
        fresh = s.get(Dispute, dispute_id)
        assert fresh is not None
        return _dispute_out(s, fresh)

    def _name_tile(s: Session, dispute: Dispute, state: DisputeState, signed: SignedMove, *,
                   claim: SignedClaim, signature: str, now: datetime) -> DisputeOut:
        """Apply the challenger's signed choice of a tile (phase ``tile``)."""
        if state.phase is not Phase.TILE:
            raise AuthError(f"the dispute is not waiting for a tile (phase {state.phase.value})")
        tile = int.from_bytes(signed.payload, "big")
        if signed.round != state.rounds or not 0 <= tile < state.tiles_of(state.hi):
            raise AuthError(f"the move is for another round, or names no tile of segment "
                            f"{state.hi} (tiles 0..{state.tiles_of(state.hi) - 1})")
        s.rollback()
        named = NameTile(actor=Actor.CHALLENGER, at=now.timestamp(), step=state.hi, tile=tile)
        _state, effects = move(ctx.disputes, dispute.id, named, now,
                               {"step": state.hi, "tile": tile, "signature": signature},
                               signed=claim)
        drive(ctx.disputes, dispute.id, effects, now)
        s.expire_all()
        fresh = s.get(Dispute, dispute.id)
        assert fresh is not None
        return _dispute_out(s, fresh)

    @api.get("/v1/results/{result_id}/transcript", responses=errors)
    def transcript(result_id: str, s: SessionDep) -> dict[str, Any]:
        """The result's hash-chained transcript (``refute.transcript/1``)."""
        if s.get(Result, result_id) is None:
            raise NotFound(f"result {result_id} not found")
        return load_transcript(s, result_id).to_json()

    return api
