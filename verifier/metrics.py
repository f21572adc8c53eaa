"""The business metrics of ``GET /metrics``, derived at scrape time from the database and Redis.

The API and the Celery workers are separate processes (and the API runs several replicas): a
counter a worker increments would never reach the API's ``/metrics``, and would restart from 0
with the worker. Everything worth watching is already written to the database before it is
acted on (results, spot-checks, disputes, proofs, webhook deliveries), and the queues live in
Redis. So :class:`ServiceMetrics` reads them when Prometheus scrapes: a handful of aggregate
queries (``GROUP BY`` on indexed columns, ``WHERE`` on the indexed ``status``/``spot_pending``
of the few open rows) and one Redis pipeline of ``LLEN``/``HLEN``. The numbers are the same from
every API replica and survive every restart; a dashboard takes ``max`` over instances.

Bounded: the families are computed at most once per ``ttl_s`` (5 s) whatever the scrape rate,
one scrape at a time; PostgreSQL cancels a statement past ``statement_timeout_ms``; Redis gives
up after ``redis_timeout_s``. A source that fails is reported as ``refute_metrics_source_up
{source} 0`` and its families are left out (a scrape never fails because of it).

Counters here (``…_total``) count rows that are never deleted, so they only grow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, case, func, select, text
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import ColumnElement

from challenge.events import verdict_name
from challenge.game import Phase, Verdict
from challenge.outbox import STATUSES
from challenge.records import (
    CheckOutcome,
    DeadLetter,
    Dispute,
    Result,
    ResultStatus,
    SharedProof,
    SpotCheck,
    WebhookDelivery,
)
from verifier.worker import QUEUES

log = logging.getLogger(__name__)

#: Kombu's Redis transport keeps a queue's messages of priority p > 0 in list ``queue␆␖p``.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
#: Kombu's hash of delivered, not yet acknowledged messages (acks late: tasks running now).
_UNACKED_KEY = "unacked"

#: Upper bounds of the proof-time histogram (s): a small MLP step takes ~10 s, a tile minutes.
PROOF_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Upper bounds of the proof-memory histogram (bytes): 128 MiB to 32 GiB.
PROOF_BYTES_BUCKETS = tuple(float(2**k) for k in range(27, 36))

#: A column or an expression on one, as the queries below take it.
_Column = ColumnElement[Any] | InstrumentedAttribute[Any]


@dataclass(frozen=True)
class _Histogram:
    """One histogram of one proof kind, as Prometheus wants it: cumulative bucket counts
    (``+Inf`` last), count and sum."""

    buckets: list[tuple[str, float]]
    total: float


class ServiceMetrics(Collector):
    """A prometheus_client collector of the service's business metrics (see the module).

    ``redis_url`` ``None`` leaves the queue families out (no broker to ask)."""

    def __init__(self, engine: Engine, redis_url: str | None, *, ttl_s: float = 5.0,
                 statement_timeout_ms: int = 2000, redis_timeout_s: float = 1.0) -> None:
        self.engine = engine
        self.redis_url = redis_url
        self.ttl_s = ttl_s
        self.statement_timeout_ms = statement_timeout_ms
        self.redis_timeout_s = redis_timeout_s
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._cached_at = -float("inf")

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering the collector must not query the database."""
        return ()

    def collect(self) -> Iterable[Metric]:
        """The families, computed again when the cached ones are older than ``ttl_s``."""
        with self._lock:
            if time.monotonic() - self._cached_at >= self.ttl_s:
                started = time.monotonic()
                up = GaugeMetricFamily(
                    "refute_metrics_source_up",
                    "1 when the metrics could read this source at the last refresh",
                    labels=["source"])
                families = [up, *self._database(up), *self._broker(up)]
                took = GaugeMetricFamily(
                    "refute_metrics_collect_seconds",
                    "How long computing these metrics took at the last refresh")
                took.add_metric([], time.monotonic() - started)
                self._cached, self._cached_at = [*families, took], time.monotonic()
            return list(self._cached)

    # --- database ---------------------------------------------------------------------------

    def _database(self, up: GaugeMetricFamily) -> list[Metric]:
        try:
            with self.engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    # SET takes no bind parameters; the value is an int.
                    connection.execute(text(
                        f"SET LOCAL statement_timeout = {int(self.statement_timeout_ms)}"))
                families = database_families(connection)
        except Exception as exc:  # the database is down or slow: say so, never fail a scrape
            log.warning("metrics: the database did not answer (%s)", type(exc).__name__)
            up.add_metric(["database"], 0)
            return []
        up.add_metric(["database"], 1)
        return families

    # --- broker -----------------------------------------------------------------------------

    def _broker(self, up: GaugeMetricFamily) -> list[Metric]:
        if self.redis_url is None:
            return []
        try:
            depth, unacked = queue_depths(self.redis_url, timeout_s=self.redis_timeout_s)
        except Exception as exc:  # Redis is down or slow
            log.warning("metrics: the broker did not answer (%s)", type(exc).__name__)
            up.add_metric(["broker"], 0)
            return []
        waiting = GaugeMetricFamily(
            "refute_queue_depth", "Tasks waiting in a Celery queue (not yet taken by a worker)",
            labels=["queue"])
        for queue, count in depth.items():
            waiting.add_metric([queue], count)
        taken = GaugeMetricFamily(
            "refute_queue_unacked",
            "Tasks delivered to workers and not yet acknowledged (running, acks late)")
        taken.add_metric([], unacked)
        up.add_metric(["broker"], 1)
        return [waiting, taken]


def queue_depths(redis_url: str, *, timeout_s: float = 1.0) -> tuple[dict[str, int], int]:
    """(messages waiting per queue of :data:`QUEUES`, over all its priority lists; messages
    delivered and not yet acknowledged), read in one Redis round trip."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s)
    try:
        pipe = client.pipeline(transaction=False)
        for queue in QUEUES:
            pipe.llen(queue)
            for step in _PRIORITY_STEPS:
                pipe.llen(f"{queue}{_PRIORITY_SEPARATOR}{step}")
        pipe.hlen(_UNACKED_KEY)
        answers = [int(n) for n in pipe.execute()]
    finally:
        client.close()
    per_queue = 1 + len(_PRIORITY_STEPS)
    depth = {queue: sum(answers[i * per_queue:(i + 1) * per_queue])
             for i, queue in enumerate(QUEUES)}
    return depth, answers[-1]


def database_families(connection: Connection) -> list[Metric]:
    """Every family derived from the database, read on ``connection`` (one snapshot per
    query; each is an aggregate)."""
    return [*_results(connection), *_spotchecks(connection), *_disputes(connection),
            *_proofs(connection), *_webhooks(connection), *_dead_letters(connection)]


def _counts(connection: Connection, column: _Column, *where: ColumnElement[bool]) -> dict[str, int]:
    """Rows per value of ``column`` (a ``GROUP BY``), keyed by the value's text."""
    rows = connection.execute(select(column, func.count()).where(*where).group_by(column))
    return {str(getattr(value, "value", value)): int(n) for value, n in rows}


def _labelled(family: CounterMetricFamily | GaugeMetricFamily, known: Sequence[str],
              counts: dict[str, int]) -> CounterMetricFamily | GaugeMetricFamily:
    """``family`` with one sample per known label value (0 when absent) and per other value
    found."""
    for value in [*known, *sorted(set(counts) - set(known))]:
        family.add_metric([value], counts.get(value, 0))
    return family


def _results(connection: Connection) -> list[Metric]:
    by_status = _counts(connection, Result.status)
    accepted = CounterMetricFamily("refute_results_accepted_total",
                                   "Results accepted (every stored result was accepted)")
    accepted.add_metric([], sum(by_status.values()))
    status = GaugeMetricFamily("refute_results", "Results by their current status",
                               labels=["status"])
    return [accepted, _labelled(status, [s.value for s in ResultStatus], by_status)]


def _spotchecks(connection: Connection) -> list[Metric]:
    by_outcome = _counts(connection, SpotCheck.outcome)
    # Sampled = recorded + still owed. Only results still owing checks (spot_pending, indexed)
    # are read for the owed ones: a closed result's sampled segments all have their row.
    owing = Result.spot_pending.is_(True)
    sampled_owing = connection.execute(
        select(func.coalesce(func.sum(func.json_array_length(Result.spot_segments)), 0))
        .where(owing)).scalar_one()
    recorded_owing = connection.execute(
        select(func.count()).select_from(SpotCheck).join(Result, Result.id == SpotCheck.result_id)
        .where(owing)).scalar_one()
    owed = max(0, int(sampled_owing) - int(recorded_owing))
    sampled = CounterMetricFamily(
        "refute_spotchecks_sampled_total",
        "Segments sampled for a spot-check when their result was accepted")
    sampled.add_metric([], sum(by_outcome.values()) + owed)
    checks = CounterMetricFamily(
        "refute_spotchecks_total",
        "Spot-checks recorded, by outcome (PASS, FAULT: beyond tolerance, INVALID: states do not "
        "match their leaves)", labels=["outcome"])
    pending = GaugeMetricFamily("refute_spotchecks_pending",
                                "Sampled spot-checks not recorded yet")
    pending.add_metric([], owed)
    return [sampled, _labelled(checks, [o.value for o in CheckOutcome], by_outcome), pending]


def _disputes(connection: Connection) -> list[Metric]:
    opened = CounterMetricFamily("refute_disputes_opened_total", "Disputes opened")
    opened.add_metric([], connection.execute(
        select(func.count()).select_from(Dispute)).scalar_one())
    open_phase = Dispute.state["phase"].as_string()
    by_phase = _counts(connection, open_phase, Dispute.status == "OPEN")
    phases = [p.value for p in Phase if p is not Phase.RESOLVED]
    running = GaugeMetricFamily("refute_disputes_open", "Open disputes by the phase they are in",
                                labels=["phase"])
    by_verdict = _counts(connection, Dispute.verdict, Dispute.status == "RESOLVED")
    resolved = CounterMetricFamily("refute_disputes_resolved_total",
                                   "Disputes resolved, by verdict", labels=["verdict"])
    verdicts = [verdict_name(v) for v in Verdict]
    return [opened, _labelled(running, phases, by_phase),
            _labelled(resolved, verdicts, by_verdict)]


def _histogram_columns(value: _Column, bounds: Sequence[float]) -> list[ColumnElement[Any]]:
    """Aggregates giving a histogram of ``value`` in one row: a count per upper bound, then
    the count and the sum of the non-null values."""
    per_bound: list[ColumnElement[Any]] = [
        func.coalesce(func.sum(case((value <= bound, 1), else_=0)), 0) for bound in bounds]
    return [*per_bound, func.count(value), func.coalesce(func.sum(value), 0)]


def _histogram(row: Sequence[float], bounds: Sequence[float]) -> _Histogram:
    counts, total, sum_value = row[:len(bounds)], row[len(bounds)], row[len(bounds) + 1]
    buckets = [(repr(float(b)), float(n)) for b, n in zip(bounds, counts, strict=True)]
    return _Histogram([*buckets, ("+Inf", float(total))], float(sum_value))


def _proofs(connection: Connection) -> list[Metric]:
    seconds = _histogram_columns(SharedProof.prove_seconds, PROOF_SECONDS_BUCKETS)
    peak = _histogram_columns(SharedProof.peak_bytes, PROOF_BYTES_BUCKETS)
    rows = connection.execute(
        select(SharedProof.kind, func.count(), *seconds, *peak)
        .where(SharedProof.done_at.is_not(None)).group_by(SharedProof.kind)).all()
    proving = _counts(connection, SharedProof.kind, SharedProof.done_at.is_(None))
    made = CounterMetricFamily("refute_proofs_total", "Proofs made (step or range)",
                               labels=["kind"])
    running = GaugeMetricFamily("refute_proofs_in_progress", "Proofs claimed and being made",
                                labels=["kind"])
    time_family = HistogramMetricFamily(
        "refute_proof_seconds", "Wall-clock time of each proof (EZKL's proving process)",
        labels=["kind"])
    memory_family = HistogramMetricFamily(
        "refute_proof_peak_bytes", "Peak resident memory of each proof's proving process",
        labels=["kind"])
    done: dict[str, int] = {}
    n_seconds = len(seconds)
    for row in rows:
        kind, count, values = str(row[0]), int(row[1]), [float(v) for v in row[2:]]
        done[kind] = count
        for family, part, bounds in (
                (time_family, values[:n_seconds], PROOF_SECONDS_BUCKETS),
                (memory_family, values[n_seconds:], PROOF_BYTES_BUCKETS)):
            histogram = _histogram(part, bounds)
            family.add_metric([kind], histogram.buckets, histogram.total)
    kinds = ["step", "range"]
    return [_labelled(made, kinds, done), _labelled(running, kinds, proving), time_family,
            memory_family]


def _webhooks(connection: Connection) -> list[Metric]:
    deliveries = GaugeMetricFamily(
        "refute_webhook_deliveries",
        "Webhook deliveries in the outbox by status (PENDING: to be sent or retried)",
        labels=["status"])
    attempts = CounterMetricFamily("refute_webhook_attempts_total",
                                   "Attempts to deliver webhooks (each POST sent)")
    attempts.add_metric([], connection.execute(
        select(func.coalesce(func.sum(WebhookDelivery.attempts), 0))).scalar_one())
    return [_labelled(deliveries, sorted(STATUSES), _counts(connection, WebhookDelivery.status)),
            attempts]


def _dead_letters(connection: Connection) -> list[Metric]:
    dead = CounterMetricFamily("refute_dead_letters_total",
                               "Tasks that exhausted their deliveries (kept for operators)")
    dead.add_metric([], connection.execute(
        select(func.count()).select_from(DeadLetter)).scalar_one())
    return [dead]
