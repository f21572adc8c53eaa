"""Service operations shared by the API, the workers and the CLI (thin routes, work lives here).

Every function takes explicit time (``now``) and a :class:`ServiceContext`, writes its state
change before acting on it, and is idempotent: re-running it after a crash or a redelivery
changes nothing twice.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import CursorResult, Engine, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from challenge.outbox import enqueue
from challenge.records import (
    Challenge,
    CheckOutcome,
    DisclosedState,
    Dispute,
    RegisteredModel,
    Result,
    ResultStatus,
    SpotCheck,
)
from refute.disclosure import read_states
from refute.errors import NotFound
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model
from refute.trace import Trace
from verifier.blobs import BlobStore, LocalBlobStore
from verifier.db import make_engine, session_factory
from verifier.settings import ServiceSettings
from verifier.spotcheck import Finding, SegmentCheck, check_states

SERVICE_CHALLENGER = "service"



@dataclass
class ServiceContext:
    """Stores and caches one process works with."""

    settings: ServiceSettings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    executor: DeterministicExecutor

    @classmethod
    def create(cls, settings: ServiceSettings) -> ServiceContext:
        """Open the stores named by ``settings`` (the database must be migrated already)."""
        engine = make_engine(settings.database_url)
        return cls(settings, engine, session_factory(engine), LocalBlobStore(settings.blob_dir),
                   DeterministicExecutor())

    @functools.cached_property
    def _prepared(self) -> dict[str, PreparedModel]:
        return {}

    def prepared(self, model: RegisteredModel) -> PreparedModel:
        """The model prepared exactly as its manifest says (cached per process)."""
        cached = self._prepared.get(model.id)
        if cached is None:
            manifest = Manifest.from_json(model.manifest)
            pins = manifest.pins
            prepared = prepare_model(self.blobs.get(model.model_blob), dims=pins.get("dims"),
                                     shapes=pins.get("shapes"), cuts=manifest.cuts,
                                     scale=manifest.scale)
            manifest.check_segmentation(prepared.segmentation)
            cached = dataclasses.replace(prepared, manifest=manifest)
            self._prepared[model.id] = cached
        return cached


def new_id(prefix: str) -> str:
    """A fresh random identifier such as ``res_4f1c…``."""
    return f"{prefix}_{secrets.token_hex(12)}"


def load_trace(ctx: ServiceContext, key: str) -> Trace:
    """Read a stored trace bundle. It was fully verified at upload and the blob store checks
    its sha256 on read, so its states are not re-hashed here."""
    return Trace.read(ctx.blobs.get(key), workers=1, rehash=False)


def held_states(ctx: ServiceContext, manifest: Manifest, result: Result, needed: set[int],
                disclosed: dict[int, str]) -> dict[int, tuple[np.ndarray, ...]]:
    """The provider's committed states in ``needed`` that the service holds: from the uploaded
    trace (all of them), else from the disclosures (``disclosed`` maps state → bundle blob).
    Both were verified against the result's leaves when they arrived."""
    if result.trace_blob is not None:
        trace = load_trace(ctx, result.trace_blob)
        return {k: trace.states[k] for k in needed}
    found: dict[int, tuple[np.ndarray, ...]] = {}
    for blob in sorted({disclosed[k] for k in needed if k in disclosed}):
        states = read_states(manifest, ctx.blobs.get(blob), result.leaves)
        found.update({k: v for k, v in states.items() if k in needed})
    return found


def run_spotcheck(ctx: ServiceContext, result_id: str, now: datetime) -> list[SegmentCheck]:
    """Check the result's sampled segments (decided at acceptance) not yet recorded, from the
    states the service holds; file a challenge on a fault. A segment whose states were neither
    uploaded nor disclosed yet is left owed: the timers ask for them and challenge that step
    when they do not come (:func:`verifier.lifecycle.sweep`).

    Returns the checks recorded by *this* call (empty when every sampled check already was).
    """
    with ctx.sessions() as session:
        result = session.get(Result, result_id)
        if result is None:
            raise NotFound(f"result {result_id} does not exist")
        model = session.get(RegisteredModel, result.model_id)
        assert model is not None
        todo = owed_segments(session, result)
        disclosed = dict(session.execute(select(DisclosedState.state, DisclosedState.blob)
                                         .where(DisclosedState.result_id == result_id)).all())
        session.expunge(result)
    if not todo:
        _settle_owed(ctx, result_id)  # a crash between the last record and this flag
        return []
    prepared = ctx.prepared(model)
    needed = {k for i in todo for k in (i - 1, i)}
    states = held_states(ctx, prepared.manifest, result, needed, disclosed)
    recorded = []
    for segment in todo:
        if segment - 1 not in states or segment not in states:
            continue
        if ctx.settings.spotcheck_delay_s:
            time.sleep(ctx.settings.spotcheck_delay_s)
        check = check_states(ctx.executor, prepared.segmentation, prepared.manifest, segment,
                             before=states[segment - 1], after=states[segment])
        if _record_check(ctx, result_id, check, now):
            recorded.append(check)
    return recorded


def owed_segments(session: Session, result: Result) -> list[int]:
    """The result's sampled segments whose check is not recorded yet (none once
    ``spot_pending`` is cleared, which the last record does: no query then)."""
    if not result.spot_segments or not result.spot_pending:
        return []
    done = set(session.scalars(select(SpotCheck.segment).where(
        SpotCheck.result_id == result.id)))
    return [int(i) for i in result.spot_segments if int(i) not in done]


def _settle_owed(ctx: ServiceContext, result_id: str) -> None:
    with ctx.sessions() as session, session.begin():
        result = session.get(Result, result_id, with_for_update=True)
        if result is not None and result.spot_pending and not owed_segments(session, result):
            result.spot_pending = False
            result.disclosure_deadline = None


def _record_check(ctx: ServiceContext, result_id: str, check: SegmentCheck, now: datetime) -> bool:
    """Write one check (and, for a fault, the service's challenge) in one transaction; the
    result's row is locked first, so the transaction that records the last owed check is the
    one that sees them all and clears ``spot_pending``."""
    with ctx.sessions() as session:
        try:
            with session.begin():
                result = session.get(Result, result_id, with_for_update=True)
                assert result is not None
                session.add(SpotCheck(
                    result_id=result_id, segment=check.segment,
                    outcome=CheckOutcome(check.finding.value),
                    maxdiff_units=float(check.maxdiff_units), tolerance=check.tolerance,
                    checked_at=now,
                ))
                session.flush()
                if not owed_segments(session, result):
                    result.spot_pending = False
                    result.disclosure_deadline = None
                if check.finding is Finding.FAULT:
                    challenge_id = new_id("chl")
                    session.add(Challenge(
                        id=challenge_id, result_id=result_id, filed_by=SERVICE_CHALLENGER,
                        lo=check.segment - 1, hi=check.segment,
                        reason=(f"spot-check: segment {check.segment} differs by "
                                f"{check.maxdiff_units} units > 2·τ={2 * check.tolerance}"),
                        status="OPEN", created_at=now,
                    ))
                    session.flush()
                    disputed = session.execute(update(Result).where(
                        Result.id == result_id, Result.status == ResultStatus.ACCEPTED
                    ).values(status=ResultStatus.DISPUTED))
                    if cast("CursorResult[Any]", disputed).rowcount:
                        enqueue(session, result.network_id, "result.disputed",
                                f"disputed:{result_id}",
                                {"result_id": result_id, "challenge_id": challenge_id,
                                 "step": check.segment, "filed_by": SERVICE_CHALLENGER}, now)
        except IntegrityError:
            return False  # recorded by an earlier delivery: exactly once
    return True


def finalize_due(ctx: ServiceContext, now: datetime) -> int:
    """Finalize accepted results whose window closed, whose sampled checks are all recorded and
    that have no open challenge or dispute (DESIGN.md "Result lifecycle"); return how many."""
    open_challenge = exists().where(Challenge.result_id == Result.id,
                                    Challenge.status == "OPEN")
    open_dispute = exists().where(Dispute.result_id == Result.id, Dispute.status == "OPEN")
    due = (Result.status == ResultStatus.ACCEPTED, Result.challenge_deadline <= now,
           Result.spot_pending.is_(False), ~open_challenge, ~open_dispute)
    with ctx.sessions() as session, session.begin():
        rows = session.execute(select(Result.id, Result.network_id).where(*due)).all()
        if not rows:
            return 0
        ids = [r.id for r in rows]
        session.execute(
            update(Result).where(Result.id.in_(ids), *due)
            .values(status=ResultStatus.FINALIZED, finalized_at=now)
            .execution_options(synchronize_session=False)
        )
        finalized = session.execute(select(Result.id, Result.network_id).where(
            Result.id.in_(ids), Result.status == ResultStatus.FINALIZED,
            Result.finalized_at == now)).all()
        for row in finalized:
            enqueue(session, row.network_id, "result.finalized", f"finalized:{row.id}",
                    {"result_id": row.id, "finalized_at": now.isoformat()}, now)
        return len(finalized)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)
