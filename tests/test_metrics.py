"""The service's metrics (verifier/metrics.py): every family computed from rows inserted in a
real database (SQLite and PostgreSQL) and queue depths read from a real redis-server; the
migration that records proof costs; Flower started against a real redis-server."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import inspect
from sqlalchemy.orm import Session

from challenge.records import (
    CheckOutcome,
    DeadLetter,
    Dispute,
    Network,
    RegisteredModel,
    Result,
    ResultStatus,
    SharedProof,
    SpotCheck,
    WebhookDelivery,
    WebhookEndpoint,
)
from tests import test_persistence
from tests.servers import free_port, redis_server, stop_process
from verifier.db import make_engine, migrate, session_factory
from verifier.metrics import ServiceMetrics
from verifier.stack import flower_command

#: The fixture of a fresh database on SQLite, then on a real PostgreSQL.
database_url = test_persistence.database_url

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GIB = 2**30

#: Every family ``/metrics`` derives from the database and the broker.
FAMILIES = {
    "refute_results_accepted", "refute_results", "refute_spotchecks_sampled",
    "refute_spotchecks", "refute_spotchecks_pending", "refute_disputes_opened",
    "refute_disputes_open", "refute_disputes_resolved", "refute_proofs",
    "refute_proofs_in_progress", "refute_proof_seconds", "refute_proof_peak_bytes",
    "refute_webhook_deliveries", "refute_webhook_attempts", "refute_dead_letters",
    "refute_queue_depth", "refute_queue_unacked", "refute_metrics_source_up",
    "refute_metrics_collect_seconds",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str) -> tuple[set[str], Samples]:
    """(family names, every sample keyed by (name, labels)) of an exposition text."""
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in names, f"family {family.name} exposed twice"
        names.add(family.name)
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value."""
    return samples[name, frozenset(labels.items())]


def _result(s: Session, n: int, status: ResultStatus, segments: list[int],
            pending: bool) -> str:
    rid = f"res_{n}"
    s.add(Result(
        id=rid, network_id="net_a", model_id="mdl_a", message_hash=f"{n:064x}",
        provider="0x" + "11" * 20, nonce=str(n), deadline=0, stake="10",
        input_hash="0x" + "00" * 32, output_hash="0x" + "00" * 32, trace_root="0x" + "22" * 32,
        leaves=["0x" + "33" * 32] * 4, signature="0x" + "44" * 65, status=status,
        accepted_at=NOW, challenge_deadline=NOW + timedelta(hours=1), spot_segments=segments,
        spot_pending=pending))
    return rid


def _check(s: Session, rid: str, segment: int, outcome: CheckOutcome) -> None:
    s.add(SpotCheck(result_id=rid, segment=segment, outcome=outcome, maxdiff_units=1.0,
                    tolerance=3, checked_at=NOW))


def _dispute(s: Session, n: int, rid: str, *, phase: str, verdict: str | None = None) -> None:
    s.add(Dispute(id=f"dsp_{n}", result_id=rid, challenger="0x" + "55" * 20, lo=0, hi=n,
                  bond="1", state={"phase": phase}, status="OPEN" if verdict is None
                  else "RESOLVED", verdict=verdict, opened_at=NOW))


def _proof(s: Session, rid: str, kind: str, index: int, *, seconds: float | None = None,
           peak: int | None = None, done: bool = True) -> None:
    s.add(SharedProof(result_id=rid, kind=kind, index=index, claimed_at=NOW,
                      outcome={"ok": True} if done else None, done_at=NOW if done else None,
                      prove_seconds=seconds, peak_bytes=peak))


def _delivery(s: Session, n: int, status: str, attempts: int) -> None:
    s.add(WebhookDelivery(endpoint_id="whk_a", event_id=f"evt_{n}", event="result.finalized",
                          payload={}, status=status, attempts=attempts, next_attempt_at=NOW))


def _populate(url: str) -> None:
    """Rows of every kind the metrics count (the expected values are in the test)."""
    migrate(url)
    engine = make_engine(url)
    with session_factory(engine)() as s:
        s.add(Network(id="net_a", name="A", created_at=NOW))
        s.add(RegisteredModel(id="mdl_a", network_id="net_a", model_sha256="a" * 64,
                              manifest_sha256="b" * 64, manifest={}, model_blob="c" * 64,
                              created_at=NOW))
        s.add(WebhookEndpoint(id="whk_a", network_id="net_a", url="https://example.invalid/h",
                              secret="s", events=["result.finalized"], created_at=NOW))
        s.flush()
        owing = _result(s, 1, ResultStatus.ACCEPTED, [1, 2, 3], pending=True)
        final = _result(s, 2, ResultStatus.FINALIZED, [2], pending=False)
        faulty = _result(s, 3, ResultStatus.PROVIDER_FAULT, [1, 2], pending=False)
        disputed = _result(s, 4, ResultStatus.DISPUTED, [], pending=False)
        s.flush()
        _check(s, owing, 1, CheckOutcome.PASS)  # two of its three still owed
        _check(s, final, 2, CheckOutcome.PASS)
        _check(s, faulty, 1, CheckOutcome.FAULT)
        _check(s, faulty, 2, CheckOutcome.INVALID)
        _dispute(s, 1, disputed, phase="reveal")
        _dispute(s, 2, disputed, phase="step_proof")
        _dispute(s, 3, faulty, phase="resolved", verdict="PROVIDER_FAULT")
        _dispute(s, 4, faulty, phase="resolved", verdict="CLOSED")
        _proof(s, faulty, "step", 1, seconds=12.5, peak=GIB)
        _proof(s, faulty, "step", 2, seconds=400.0, peak=3 * GIB)
        _proof(s, faulty, "range", 1)  # a fake prover measures nothing
        _proof(s, disputed, "step", 2, done=False)  # being proven
        _delivery(s, 1, "DELIVERED", 1)
        _delivery(s, 2, "PENDING", 2)
        _delivery(s, 3, "FAILED", 5)
        s.add(DeadLetter(task_name="refute.spotcheck", task_id="t1", args=[], deliveries=6,
                         error="boom", created_at=NOW))
        s.commit()
    engine.dispose()


def test_every_family_from_the_database_and_the_broker(database_url: str,
                                                       tmp_path: Path) -> None:
    _populate(database_url)
    engine = make_engine(database_url)
    with redis_server(tmp_path / "redis") as server:
        broker = redis.Redis.from_url(server.url)
        broker.lpush("spotcheck", "a", "b", "c")
        broker.lpush("prove\x06\x169", "urgent")  # a priority list of the prove queue
        broker.hset("unacked", mapping={"tag1": "m", "tag2": "m"})
        broker.close()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServiceMetrics(engine, server.url, ttl_s=0))
        started = time.monotonic()
        names, m = scrape(generate_latest(registry).decode())
        took = time.monotonic() - started
    engine.dispose()
    assert names == FAMILIES
    assert took < 2.0
    assert value(m, "refute_metrics_source_up", source="database") == 1
    assert value(m, "refute_metrics_source_up", source="broker") == 1
    assert value(m, "refute_results_accepted_total") == 4
    for status in ("ACCEPTED", "DISPUTED", "FINALIZED", "PROVIDER_FAULT"):
        assert value(m, "refute_results", status=status) == 1
    assert value(m, "refute_spotchecks_sampled_total") == 6  # 4 recorded + 2 owed
    assert value(m, "refute_spotchecks_pending") == 2
    assert value(m, "refute_spotchecks_total", outcome="PASS") == 2
    assert value(m, "refute_spotchecks_total", outcome="FAULT") == 1
    assert value(m, "refute_spotchecks_total", outcome="INVALID") == 1
    assert value(m, "refute_disputes_opened_total") == 4
    assert value(m, "refute_disputes_open", phase="reveal") == 1
    assert value(m, "refute_disputes_open", phase="step_proof") == 1
    assert value(m, "refute_disputes_open", phase="answer") == 0
    assert value(m, "refute_disputes_resolved_total", verdict="PROVIDER_FAULT") == 1
    assert value(m, "refute_disputes_resolved_total", verdict="CLOSED") == 1
    assert value(m, "refute_disputes_resolved_total", verdict="ABORTED") == 0
    assert value(m, "refute_proofs_total", kind="step") == 2
    assert value(m, "refute_proofs_total", kind="range") == 1
    assert value(m, "refute_proofs_in_progress", kind="step") == 1
    assert value(m, "refute_proof_seconds_count", kind="step") == 2
    assert value(m, "refute_proof_seconds_sum", kind="step") == 412.5
    assert value(m, "refute_proof_seconds_bucket", kind="step", le="5.0") == 0
    assert value(m, "refute_proof_seconds_bucket", kind="step", le="15.0") == 1
    assert value(m, "refute_proof_seconds_bucket", kind="step", le="300.0") == 1
    assert value(m, "refute_proof_seconds_bucket", kind="step", le="600.0") == 2
    assert value(m, "refute_proof_seconds_bucket", kind="step", le="+Inf") == 2
    assert value(m, "refute_proof_seconds_count", kind="range") == 0  # not measured
    assert value(m, "refute_proof_peak_bytes_bucket", kind="step", le=f"{GIB:.1f}") == 1
    assert value(m, "refute_proof_peak_bytes_bucket", kind="step", le=f"{4 * GIB:.1f}") == 2
    assert value(m, "refute_proof_peak_bytes_sum", kind="step") == 4 * GIB
    assert value(m, "refute_webhook_deliveries", status="DELIVERED") == 1
    assert value(m, "refute_webhook_deliveries", status="PENDING") == 1
    assert value(m, "refute_webhook_deliveries", status="FAILED") == 1
    assert value(m, "refute_webhook_attempts_total") == 8
    assert value(m, "refute_dead_letters_total") == 1
    assert value(m, "refute_queue_depth", queue="spotcheck") == 3
    assert value(m, "refute_queue_depth", queue="prove") == 1
    assert value(m, "refute_queue_depth", queue="timers") == 0
    assert value(m, "refute_queue_unacked") == 2


def test_a_missing_source_is_reported_and_refreshes_are_bounded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'refute.db'}"
    _populate(url)
    engine = make_engine(url)
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    collector = ServiceMetrics(engine, down, ttl_s=60)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    names, m = scrape(generate_latest(registry).decode())
    assert value(m, "refute_metrics_source_up", source="broker") == 0
    assert "refute_queue_depth" not in names and "refute_results" in names
    # Within the TTL a scrape reuses the last refresh: no query at all.
    with session_factory(engine)() as s:
        s.add(DeadLetter(task_name="x", task_id="t2", args=[], deliveries=6, error="e",
                         created_at=NOW))
        s.commit()
    assert value(scrape(generate_latest(registry).decode())[1], "refute_dead_letters_total") == 1
    collector.ttl_s = 0
    assert value(scrape(generate_latest(registry).decode())[1], "refute_dead_letters_total") == 2
    engine.dispose()
    # A database that cannot be opened: reported, and the scrape still answers.
    broken = make_engine(f"sqlite:///{tmp_path / 'missing' / 'no.db'}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceMetrics(broken, None, ttl_s=0))
    names, m = scrape(generate_latest(registry).decode())
    assert value(m, "refute_metrics_source_up", source="database") == 0
    assert names == {"refute_metrics_source_up", "refute_metrics_collect_seconds"}


def test_migration_0008_records_proof_costs_and_reverts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'refute.db'}"
    migrate(url, "0007")
    migrate(url)
    engine = make_engine(url)
    columns = {c["name"] for c in inspect(engine).get_columns("shared_proofs")}
    assert {"prove_seconds", "peak_bytes"} <= columns
    indexes = {i["name"] for i in inspect(engine).get_indexes("spot_checks")}
    assert "ix_spot_checks_outcome" in indexes
    engine.dispose()
    from alembic import command

    from verifier.db import alembic_config

    command.downgrade(alembic_config(url), "0007")
    engine = make_engine(url)
    columns = {c["name"] for c in inspect(engine).get_columns("shared_proofs")}
    assert not {"prove_seconds", "peak_bytes"} & columns
    engine.dispose()


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.status, answer.read().decode(errors="replace")


@pytest.mark.slow
def test_flower_serves_against_a_real_broker(tmp_path: Path) -> None:
    port = free_port()
    with redis_server(tmp_path / "redis") as server:
        log = (tmp_path / "flower.log").open("wb")
        env = {**os.environ, "REFUTE_REDIS_URL": server.url}
        flower = subprocess.Popen(flower_command(port), env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    status, body = _get(f"http://127.0.0.1:{port}/healthcheck")
                    break
                except OSError:
                    if flower.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError((tmp_path / "flower.log").read_text()[-800:]) from None
                    time.sleep(0.2)
            assert (status, body) == (200, "OK")
            status, page = _get(f"http://127.0.0.1:{port}/")
            assert status == 200 and "Flower" in page
        finally:
            stop_process(flower)
            log.close()
    assert flower.returncode is not None
