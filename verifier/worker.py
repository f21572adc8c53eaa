"""Celery workers: queues ``spotcheck`` (ONNX Runtime), ``prove`` (EZKL) and ``timers``.

Delivery is at least once and every task is idempotent (DESIGN.md "Spot-checks"): acks late,
rejected back to the queue when the worker dies, one message prefetched at a time, hard time
limits below the broker's visibility timeout. Each delivery is counted in the database before
the work starts; past ``max_deliveries`` the message is recorded as a dead letter and dropped,
so a poison message cannot crash workers forever and is never lost silently.

Run with ``refute worker --queues spotcheck`` (or ``celery -A verifier.worker worker``).

Importing this module reads no settings and connects nowhere: the Celery application is built
on first use by :func:`celery_app` (from :func:`refute.settings.get_settings`), which also
registers the tasks; ``verifier.worker.app`` is that application, built on first access.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import Celery
from celery.signals import setup_logging
from sqlalchemy.exc import IntegrityError

from challenge.records import DeadLetter, TaskDelivery
from refute.errors import RefuteError
from refute.logs import configure_logging
from refute.settings import Settings, get_settings
from verifier.service import ServiceContext, finalize_due, run_spotcheck

QUEUES = ("spotcheck", "prove", "timers")

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    """The Celery application configured for at-least-once, idempotent work, with the tasks
    registered (a client that only sends tasks may build one too)."""
    app = Celery("refute", broker=settings.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, int(settings.task_time_limit_s * 0.9)),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for messages of dead workers often enough to honour the visibility
            # timeout (kombu's default sweep is every 10 × 10 s), and never let a crashed
            # sweeper's lock block recovery for long.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": 60,
        },
        broker_connection_retry_on_startup=True,
        task_default_queue="spotcheck",
        task_routes={
            "refute.spotcheck": {"queue": "spotcheck"},
            "refute.prove": {"queue": "prove"},
            "refute.watch": {"queue": "spotcheck"},
            "refute.finalize": {"queue": "timers"},
            "refute.webhooks": {"queue": "timers"},
            "refute.disputes": {"queue": "timers"},
        },
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        beat_schedule={
            "finalize": {"task": "refute.finalize", "schedule": settings.finalize_every_s},
            "webhooks": {"task": "refute.webhooks", "schedule": settings.finalize_every_s},
            "disputes": {"task": "refute.disputes", "schedule": settings.finalize_every_s},
        },
    )
    for task, options in _TASKS:
        app.task(**options)(task)
    return app


@functools.cache
def celery_app() -> Celery:
    """This process's Celery application, from the process-wide settings (built once)."""
    setup_logging.connect(_setup_logging, weak=False)
    return make_celery(get_settings())


def __getattr__(name: str) -> Any:
    """``verifier.worker.app`` (what ``celery -A verifier.worker`` looks for), built on first
    access rather than at import."""
    if name == "app":
        return celery_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _setup_logging(loglevel: str | int | None = None, **_: Any) -> None:
    """Celery's ``setup_logging`` signal: the worker logs like the rest of the service (and
    Celery leaves the root logger alone because a receiver is connected)."""
    configure_logging(get_settings(), level=loglevel or None)


@functools.cache
def context() -> ServiceContext:
    """This worker process's stores (opened on first use, never at import)."""
    return ServiceContext.create(get_settings())


def admit_delivery(ctx: ServiceContext, task_id: str, name: str, args: list[Any]) -> bool:
    """Count this delivery; False (and a dead letter) once the cap is exceeded."""
    now = ctx.clock.now()
    with ctx.sessions() as session, session.begin():
        row = session.get(TaskDelivery, task_id, with_for_update=True)
        if row is None:
            try:
                with session.begin_nested():
                    session.add(TaskDelivery(task_id=task_id, task_name=name, deliveries=1,
                                             updated_at=now))
                return True
            except IntegrityError:
                row = session.get(TaskDelivery, task_id, with_for_update=True)
                assert row is not None
        deliveries = row.deliveries + 1  # the row is locked (FOR UPDATE on PostgreSQL)
        row.deliveries = deliveries
        row.updated_at = now
        if deliveries <= ctx.settings.max_deliveries:
            return True
    with ctx.sessions() as session:
        try:
            with session.begin():
                session.add(DeadLetter(task_name=name, task_id=task_id, args=args,
                                       deliveries=deliveries, created_at=now,
                                       error=f"delivered {deliveries} times without completing"))
        except IntegrityError:
            pass  # already dead-lettered by an earlier delivery
    return False


def spotcheck(self: Any, result_id: str) -> int:
    """Run the sampled spot-checks of a result; returns how many this delivery recorded."""
    from verifier.lifecycle import watch_faults

    ctx = context()
    if not admit_delivery(ctx, str(self.request.id), self.name, [result_id]):
        return 0
    try:
        checks = run_spotcheck(ctx, result_id, ctx.clock.now())
    except Exception:
        log.exception("spot-check of %s failed", result_id)
        raise
    watch_faults(ctx, result_id, ctx.clock.now())
    return len(checks)


def queue_spotcheck(result_id: str) -> None:
    """Queue the spot-check task of a result (Celery)."""
    celery_app().send_task("refute.spotcheck", args=[result_id])


def watch(self: Any, result_id: str) -> str | None:
    """The watcher checks a whole result and disputes it if its own output differs."""
    from challenge.orchestrator import watch as watch_result

    ctx = context()
    if not admit_delivery(ctx, str(self.request.id), self.name, [result_id]):
        return None
    try:
        return watch_result(ctx.disputes, result_id, ctx.clock.now())
    except RefuteError as exc:  # e.g. convicted meanwhile: nothing to do, and say so
        log.info("watcher: no dispute on %s: %s", result_id, exc.reason)
        return None


def prove(self: Any, dispute_id: str) -> bool:
    """Prove the step a dispute reached and apply the verdict (idempotent)."""
    from challenge.orchestrator import prove_pending

    ctx = context()
    if not admit_delivery(ctx, str(self.request.id), self.name, [dispute_id]):
        return False
    return prove_pending(ctx.disputes, dispute_id, ctx.clock.now()) is not None


def dispute_timers() -> int:
    """Carry out what the service owes but lost in a crash, then apply timeouts to disputes
    whose clock ran out (in that order: a party never times out because of the service)."""
    from challenge.orchestrator import resume_stalled, tick_due

    ctx = context()
    now = ctx.clock.now()
    resume_stalled(ctx.disputes, now)
    return tick_due(ctx.disputes, now)


def deliver_webhooks() -> int:
    """Attempt every due webhook delivery of the outbox."""
    import httpx

    from verifier.webhooks import deliver_due

    with httpx.Client() as client:
        ctx = context()
        return deliver_due(ctx.sessions, ctx.clock.now(), client=client,
                           allow_private=ctx.settings.webhooks_allow_private)


def finalize() -> int:
    """Sweep the checks results owe (queue lost ones again, challenge undisclosed states), then
    finalize every result whose window closed with its checks recorded and no open dispute."""
    from verifier.lifecycle import sweep

    ctx = context()
    now = ctx.clock.now()
    sweep(ctx, now, queue_spotcheck)
    return finalize_due(ctx, now)


#: Every task and its options (the queue each goes to is in ``task_routes``).
_TASKS: tuple[tuple[Any, dict[str, Any]], ...] = (
    (spotcheck, {"name": "refute.spotcheck", "bind": True}),
    (watch, {"name": "refute.watch", "bind": True}),
    (prove, {"name": "refute.prove", "bind": True}),
    (dispute_timers, {"name": "refute.disputes"}),
    (deliver_webhooks, {"name": "refute.webhooks"}),
    (finalize, {"name": "refute.finalize"}),
)
