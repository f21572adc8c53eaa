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

from sqlalchemy import CursorResult, Engine, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from refute.errors import RefuteError
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model
from refute.trace import Trace
from verifier.blobs import BlobStore, LocalBlobStore
from verifier.db import make_engine, session_factory
from verifier.models import (
    Challenge,
    CheckOutcome,
    Network,
    RegisteredModel,
    Result,
    ResultStatus,
    SpotCheck,
)
from verifier.settings import ServiceSettings
from verifier.spotcheck import Finding, SegmentCheck, check_segment, sample_segments
from verifier.webhooks import enqueue

SERVICE_CHALLENGER = "service"


class NotFound(RefuteError):
    """The object does not exist (or belongs to another network)."""

    code = "not_found"


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


def run_spotcheck(ctx: ServiceContext, result_id: str, now: datetime) -> list[SegmentCheck]:
    """Check the sampled segments of a result not yet checked; file a challenge on a fault.

    Returns the checks recorded by *this* call (empty when every sampled check already was).
    """
    with ctx.sessions() as session:
        result = session.get(Result, result_id)
        if result is None:
            raise NotFound(f"result {result_id} does not exist")
        model = session.get(RegisteredModel, result.model_id)
        network = session.get(Network, result.network_id)
        assert model is not None and network is not None
        if result.trace_blob is None:
            return []
        prepared = ctx.prepared(model)
        picks = sample_segments(ctx.settings.spot_key_bytes(), result.id,
                                num_segments=prepared.segmentation.num_segments,
                                probability=network.spot_probability, count=network.spot_count)
        done = set(session.scalars(select(SpotCheck.segment).where(
            SpotCheck.result_id == result.id)))
        trace_key = result.trace_blob
    todo = [i for i in picks if i not in done]
    if not todo:
        return []
    trace = load_trace(ctx, trace_key)
    recorded = []
    for segment in todo:
        if ctx.settings.spotcheck_delay_s:
            time.sleep(ctx.settings.spotcheck_delay_s)
        check = check_segment(ctx.executor, prepared.segmentation, trace, segment)
        if _record_check(ctx, result_id, check, now):
            recorded.append(check)
    return recorded


def _record_check(ctx: ServiceContext, result_id: str, check: SegmentCheck, now: datetime) -> bool:
    """Write one check (and, for a fault, the service's challenge) in one transaction."""
    with ctx.sessions() as session:
        try:
            with session.begin():
                session.add(SpotCheck(
                    result_id=result_id, segment=check.segment,
                    outcome=CheckOutcome(check.finding.value),
                    maxdiff_units=float(check.maxdiff_units), tolerance=check.tolerance,
                    checked_at=now,
                ))
                if check.finding is Finding.FAULT:
                    result = session.get(Result, result_id)
                    assert result is not None
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
    """Finalize accepted results whose window closed with no open challenge; return how many."""
    open_challenge = exists().where(Challenge.result_id == Result.id,
                                    Challenge.status == "OPEN")
    due = (Result.status == ResultStatus.ACCEPTED, Result.challenge_deadline <= now,
           ~open_challenge)
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
