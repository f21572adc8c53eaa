"""Service operations shared by the API, the workers and the CLI (thin routes, work lives here).

Every function takes explicit time (``now``) and a :class:`ServiceContext`, writes its state
change before acting on it, and is idempotent: re-running it after a crash or a redelivery
changes nothing twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from urllib.parse import urlsplit

from celery import Celery
from sqlalchemy import Engine, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from challenge.blobs import BlobStore, LocalBlobStore
from challenge.context import (
    Chain,
    Clock,
    DisputeConfig,
    DisputeContext,
    Prover,
    StoredStates,
    SystemClock,
    TaskQueue,
)
from challenge.game import TimeControl
from challenge.records import (
    Challenge,
    CheckOutcome,
    DisclosedState,
    Dispute,
    RegisteredModel,
    Result,
    ResultStatus,
    SpotCheck,
    new_id,
)
from challenge.result_lifecycle import ResultEvent, advance
from prover.adapter import EzklProofs
from prover.chain import RpcChain
from prover.config import make_prover
from prover.evm import ANVIL_DEV_KEY
from refute.errors import Misconfigured, NotFound
from refute.executor import DeterministicExecutor
from refute.provider import PreparedModel
from refute.settings import Settings
from verifier.db import make_engine, session_factory
from verifier.queue import CeleryTasks
from verifier.spotcheck import Finding, SegmentCheck, check_states

SERVICE_CHALLENGER = "service"



@dataclass
class ServiceContext:
    """Stores, caches and adapters one process works with: the composition root's product.

    ``disputes`` is the dispute logic's context (:class:`~challenge.context.DisputeContext`),
    holding the same database and blob store and the ports' adapters; ``tasks`` sends the
    service's background work (a :class:`~verifier.queue.CeleryTasks` unless a test plugs in a
    fake)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    executor: DeterministicExecutor
    disputes: DisputeContext
    tasks: ServiceTasks

    @classmethod
    def create(cls, settings: Settings, *, prover: Prover | None = None,
               tasks: ServiceTasks | None = None, clock: Clock | None = None,
               chain: Chain | None = None) -> ServiceContext:
        """Open the stores named by ``settings`` (the database must be migrated already) and
        plug in the real adapters: EZKL, Celery, the system clock, and a chain when
        ``REFUTE_CHAIN_RPC_URL`` is set; a test passes fakes instead."""
        engine = make_engine(settings.database_url)
        sessions = session_factory(engine)
        blobs = LocalBlobStore(settings.blob_dir)
        executor = DeterministicExecutor()
        queue = tasks if tasks is not None else CeleryTasks(lambda: _celery_app(settings))
        if chain is None and settings.chain_rpc_url:
            chain = chain_from(settings)
        disputes = DisputeContext(
            sessions=sessions, blobs=blobs, states=StoredStates(blobs, executor),
            prover=prover if prover is not None else EzklProofs(lambda: make_prover(settings)),
            tasks=queue, clock=clock if clock is not None else SystemClock(),
            config=dispute_config(settings), chain=chain)
        return cls(settings, engine, sessions, blobs, executor, disputes, queue)

    def prepared(self, model: RegisteredModel) -> PreparedModel:
        """The model prepared exactly as its manifest says (cached per process)."""
        return self.disputes.prepared(model)

    @property
    def clock(self) -> Clock:
        """The service's clock (the dispute logic's): every "now" of the API and the workers."""
        return self.disputes.clock


class ServiceTasks(TaskQueue, Protocol):
    """The service's background work: the dispute logic's proofs, and its own tasks."""

    def schedule_spotcheck(self, result_id: str) -> None:
        """Have a result's owed spot-checks run."""
        ...

    def schedule_watch(self, result_id: str) -> None:
        """Have the watcher check a whole result."""
        ...


def chain_from(settings: Settings) -> RpcChain:
    """The chain of ``REFUTE_CHAIN_RPC_URL``, sending from ``REFUTE_CHAIN_KEY`` (anvil's public
    development key only for a chain on a loopback address, never for a real one)."""
    key = settings.chain_key
    if not key:
        host = urlsplit(settings.chain_rpc_url).hostname or ""
        if host not in {"localhost", "127.0.0.1", "::1"}:
            raise Misconfigured("REFUTE_CHAIN_KEY is not set: the verification transactions on "
                                "REFUTE_CHAIN_RPC_URL need a funded key (only a local anvil can "
                                "use the development key)")
        key = ANVIL_DEV_KEY
    return RpcChain(settings.chain_rpc_url, settings.blob_dir.parent / "chain", key)


def dispute_config(settings: Settings) -> DisputeConfig:
    """The dispute policy of ``settings``."""
    return DisputeConfig(
        clocks=TimeControl(provider=settings.dispute_provider_clock_s,
                           challenger=settings.dispute_challenger_clock_s,
                           proof_timeout=settings.dispute_proof_timeout_s),
        resume_after_s=settings.dispute_resume_after_s,
        claim_expiry_s=float(settings.task_time_limit_s),
        # Past the broker's own redelivery of a lost task, and the time that task may run.
        requeue_every_s=float(settings.visibility_timeout_s + settings.task_time_limit_s),
        watcher_bond=settings.watcher_bond,
        bls_seed=settings.bls_seed,
        dev_seed_path=settings.blob_dir.parent / "bls-dev.seed",
    )


def _celery_app(settings: Settings) -> Celery:
    """A Celery app configured by ``settings`` (routes, broker), for sending tasks."""
    from verifier.worker import make_celery

    return make_celery(settings)


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
    states = ctx.disputes.held_states(prepared.manifest, result, needed, disclosed)
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
                    if result.status in (ResultStatus.ACCEPTED, ResultStatus.DISPUTED):
                        advance(session, result, ResultEvent.DISPUTE_OPENED, now, announce={
                            "result_id": result_id, "challenge_id": challenge_id,
                            "step": check.segment, "filed_by": SERVICE_CHALLENGER})
        except IntegrityError:
            return False  # recorded by an earlier delivery: exactly once
    return True


def finalize_due(ctx: ServiceContext, now: datetime) -> int:
    """Finalize accepted results whose window closed, whose sampled checks are all recorded and
    that have no open challenge or dispute (DESIGN.md "Result lifecycle"), each in its own
    transaction with its row locked (the lifecycle releases its stake); return how many."""
    open_challenge = exists().where(Challenge.result_id == Result.id,
                                    Challenge.status == "OPEN")
    open_dispute = exists().where(Dispute.result_id == Result.id, Dispute.status == "OPEN")
    due = (Result.status == ResultStatus.ACCEPTED, Result.challenge_deadline <= now,
           Result.spot_pending.is_(False), ~open_challenge, ~open_dispute)
    with ctx.sessions() as session:
        ids = session.scalars(select(Result.id).where(*due)).all()
    finalized = 0
    for result_id in ids:
        with ctx.sessions() as session, session.begin():
            result = session.get(Result, result_id, with_for_update=True)
            still_due = session.scalar(select(Result.id).where(Result.id == result_id, *due))
            if result is None or still_due is None:
                continue  # disputed or finalized meanwhile
            advance(session, result, ResultEvent.WINDOW_CLOSED, now, announce={
                "result_id": result_id, "finalized_at": now.isoformat()})
            finalized += 1
    return finalized

