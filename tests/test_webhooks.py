"""The webhook outbox against a real database (SQLite file, PostgreSQL) and a real HTTP receiver."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from challenge.outbox import EVENTS, WebhookError, _insert_once, canonical_json, enqueue
from challenge.records import Network, WebhookDelivery, WebhookEndpoint
from tests.servers import free_port, postgres_server
from verifier.db import make_engine, migrate, session_factory
from verifier.webhooks import (
    backoff,
    deliver_due,
    list_deliveries,
    register_endpoint,
    sign,
    validate_url,
    verify_signature,
)

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def utc(moment: datetime) -> datetime:
    """Compare datetimes read back from SQLite (naive, UTC) with aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- a real receiver -----------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Records every POST; answers ``status`` (after ``fail_next`` 500s), optionally hanging."""

    port: int = 0
    status: int = 200
    fail_next: int = 0
    hang: bool = False
    delay_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, request: Received) -> int:
        with self.lock:
            self.requests.append(request)
            if self.fail_next > 0:
                self.fail_next -= 1
                return 500
            return self.status


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.answer(Received(self.path, dict(self.headers.items()), body))
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            if receiver.hang:
                receiver.release.wait(10)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client gave up (timeouts): nothing to report


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    server = _Server(("127.0.0.1", 0), _handler(state))
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as http:
        yield http


# --- databases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


_DB_COUNTER = iter(range(10**6))


def _fresh_postgres(server_url: str) -> str:
    name = f"wh_{next(_DB_COUNTER)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@dataclass
class Db:
    kind: str
    engine: Engine
    sessions: sessionmaker[Session]


def _open(url: str, kind: str) -> Db:
    migrate(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as session:
        for net in ("net_a", "net_b"):
            session.add(Network(id=net, name=net, created_at=T0))
        session.commit()
    return Db(kind, engine, sessions)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Db]:
    db = _open(f"sqlite:///{tmp_path / 'refute.db'}", "sqlite")
    yield db
    db.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        opened = _open(f"sqlite:///{tmp_path / 'refute.db'}", "sqlite")
    else:
        server_url: str = request.getfixturevalue("postgres_url")
        opened = _open(_fresh_postgres(server_url), "postgresql")
    yield opened
    opened.engine.dispose()


def _endpoint(db: Db, url: str, events: list[str], network: str = "net_a") -> tuple[str, str]:
    with db.sessions() as session:
        endpoint, secret = register_endpoint(session, network, url, events, allow_loopback=True,
                                             now=T0)
        session.commit()
        return endpoint.id, secret


def _enqueue(db: Db, event: str, event_id: str, payload: dict[str, object], *,
             network: str = "net_a", now: datetime = T0) -> int:
    with db.sessions() as session:
        added = enqueue(session, network, event, event_id, payload, now)
        session.commit()
        return added


def _deliveries(db: Db) -> list[WebhookDelivery]:
    with db.sessions() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


# --- registration ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://example.com/hook", "http or https"),
    ("example.com/hook", "http or https"),
    ("http://", "no host"),
    ("http:///path", "no host"),
    ("https://user:pw@example.com/", "credentials"),
    ("http://example.com:99999/", "malformed"),
    ("http://exa mple.com/", "whitespace"),
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://127.5.6.7/", "loopback"),
    ("http://localhost/", "loopback"),
    ("http://api.localhost./", "loopback"),
    ("http://[::1]:8000/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.10/", "private"),
    ("http://169.254.169.254/latest/meta-data", "private"),
    ("http://[fd00::1]/", "private"),
    ("http://0.0.0.0/", "private"),
])
def test_bad_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(WebhookError) as caught:
        validate_url(url)
    assert reason in caught.value.reason
    assert "\n" not in caught.value.reason
    assert caught.value.code == "webhook_error"


def test_loopback_is_allowed_only_on_request() -> None:
    assert validate_url("http://127.0.0.1:8080/x", allow_loopback=True)
    assert validate_url("http://localhost/x", allow_loopback=True)
    assert validate_url("http://10.0.0.1/x", allow_loopback=True)
    assert validate_url("https://hooks.example.com/refute?x=1")
    assert validate_url("http://93.184.216.34:8443/")
    with pytest.raises(WebhookError, match="http or https"):
        validate_url("file:///etc/passwd", allow_loopback=True)


def test_register_endpoint(sqlite_db: Db) -> None:
    with sqlite_db.sessions() as session:
        endpoint, secret = register_endpoint(
            session, "net_a", "https://hooks.example.com/x",
            ["result.finalized", "dispute.verdict", "result.finalized"], now=T0)
        session.commit()
        other, other_secret = register_endpoint(session, "net_a", "https://hooks.example.com/y",
                                                sorted(EVENTS), now=T0)
        session.commit()
    assert secret == endpoint.secret and len(secret) >= 40 and secret != other_secret
    assert endpoint.id != other.id
    assert endpoint.events == ["dispute.verdict", "result.finalized"]
    with sqlite_db.sessions() as session:
        stored = session.get(WebhookEndpoint, endpoint.id)
        assert stored is not None and stored.network_id == "net_a"
        for events, reason in [([], "must not be empty"), (["result.finalized", "nope"], "nope"),
                               ("result.finalized", "not a string")]:
            with pytest.raises(WebhookError, match=reason):
                register_endpoint(session, "net_a", "https://hooks.example.com/", events)
        with pytest.raises(WebhookError, match="does not exist"):
            register_endpoint(session, "net_zzz", "https://hooks.example.com/", ["dispute.verdict"])
        with pytest.raises(WebhookError, match="loopback"):
            register_endpoint(session, "net_a", "http://127.0.0.1/", ["dispute.verdict"])
        assert len(session.scalars(select(WebhookEndpoint)).all()) == 2


# --- enqueue -------------------------------------------------------------------------------


def test_subscription_filtering_idempotence_and_atomicity(db: Db) -> None:
    all_events, _ = _endpoint(db, "https://a.example.com/all", sorted(EVENTS))
    verdicts, _ = _endpoint(db, "https://a.example.com/verdicts", ["dispute.verdict"])
    other_net, _ = _endpoint(db, "https://b.example.com/all", sorted(EVENTS), network="net_b")

    assert _enqueue(db, "result.finalized", "evt_1", {"result": "res_1"}) == 1
    assert _enqueue(db, "result.finalized", "evt_1", {"result": "res_1"}) == 0  # idempotent
    assert _enqueue(db, "dispute.verdict", "evt_2", {"verdict": "PROVIDER_FAULT"}) == 2
    assert _enqueue(db, "dispute.verdict", "evt_2", {"verdict": "PROVIDER_FAULT"}) == 0
    rows = _deliveries(db)
    assert sorted((r.endpoint_id, r.event_id) for r in rows) == sorted(
        [(all_events, "evt_1"), (all_events, "evt_2"), (verdicts, "evt_2")])
    assert all(r.status == "PENDING" and r.attempts == 0 and utc(r.next_attempt_at) == T0
               for r in rows)
    assert other_net not in {r.endpoint_id for r in rows}

    # Outbox: the deliveries live and die with the caller's transaction.
    with db.sessions() as session:
        assert enqueue(session, "net_a", "result.disputed", "evt_3", {"x": 1}, T0) == 1
        session.rollback()
    assert len(_deliveries(db)) == 3

    with db.sessions() as session:
        with pytest.raises(WebhookError, match="unknown webhook event"):
            enqueue(session, "net_a", "result.deleted", "evt_4", {}, T0)
        with pytest.raises(WebhookError, match="event id"):
            enqueue(session, "net_a", "result.disputed", "x" * 81, {}, T0)
        with pytest.raises(WebhookError, match="JSON"):
            enqueue(session, "net_a", "result.disputed", "evt_5", {"x": float("nan")}, T0)
        with pytest.raises(WebhookError, match="JSON"):
            enqueue(session, "net_a", "result.disputed", "evt_5", {"x": object()}, T0)
    # A network with no endpoint: nothing to do.
    assert _enqueue(db, "result.finalized", "evt_9", {}, network="net_zzz") == 0


def test_concurrent_enqueue_of_one_event_is_one_row(db: Db) -> None:
    """A second transaction racing on the same event adds nothing, and does not fail.

    The rest of the loser's transaction (its own state change) commits normally.
    """
    endpoint, _ = _endpoint(db, "https://a.example.com/all", sorted(EVENTS))
    first = db.sessions()
    assert enqueue(first, "net_a", "result.finalized", "evt_race", {"n": 1}, T0) == 1
    first.flush()
    outcome: dict[str, object] = {}

    def second() -> None:
        with db.sessions() as session:
            session.add(Network(id="net_c", name="c", created_at=T0))  # its own state change
            session.flush()
            try:
                outcome["added"] = enqueue(session, "net_a", "result.finalized", "evt_race",
                                           {"n": 2}, T0)
                session.commit()
            except Exception as exc:
                outcome["error"] = exc

    if db.kind == "postgresql":
        # The second insert waits on the first's unique-index entry, then skips once it commits.
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        first.commit()
        thread.join(20)
    else:
        # SQLite has one writer at a time: the second transaction runs after the first.
        first.commit()
        second()
    first.close()
    assert outcome == {"added": 0}
    rows = _deliveries(db)
    assert [(r.endpoint_id, r.payload) for r in rows] == [(endpoint, {"n": 1})]
    with db.sessions() as session:
        assert session.get(Network, "net_c") is not None


def test_insert_once_skips_an_existing_event(db: Db) -> None:
    """Each insert path (ON CONFLICT on SQLite/PostgreSQL, the SAVEPOINT fallback) skips dupes."""
    endpoint, _ = _endpoint(db, "https://a.example.com/all", sorted(EVENTS))
    paths = [db.kind] + (["generic"] if db.kind == "postgresql" else [])
    for n, path in enumerate(paths):
        row: dict[str, Any] = {
            "endpoint_id": endpoint, "event_id": f"evt_{n}", "event": "result.finalized",
            "payload": {"n": n}, "status": "PENDING", "attempts": 0, "next_attempt_at": T0,
            "last_error": None, "delivered_at": None}
        with db.sessions() as session:
            session.add(Network(id=f"net_x{n}", name="x", created_at=T0))
            session.flush()
            assert _insert_once(session, path, row) is True
            assert _insert_once(session, path, dict(row, payload={"n": -1})) is False
            session.commit()  # the transaction survived the skipped duplicate
            assert session.get(Network, f"net_x{n}") is not None
    assert [(r.event_id, r.payload) for r in _deliveries(db)] == [
        (f"evt_{n}", {"n": n}) for n in range(len(paths))]


# --- signatures ----------------------------------------------------------------------------


def test_sign_matches_the_documented_construction() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("s3cret", 1700000000, body) == expected
    assert canonical_json({"b": [1, 2], "a": "é"}) == '{"a":"é","b":[1,2]}'.encode()


def test_delivery_is_signed_and_verifiable(db: Db, receiver: Receiver,
                                           client: httpx.Client) -> None:
    endpoint, secret = _endpoint(db, receiver.url("/hook"), ["result.finalized"])
    _endpoint(db, receiver.url("/other"), ["dispute.verdict"])  # not subscribed
    payload: dict[str, object] = {"result_id": "res_1", "status": "FINALIZED",
                                  "leaves": ["0x" + "ab" * 32], "nested": {"z": 1, "a": "ü"}}
    assert _enqueue(db, "result.finalized", "evt_fin_1", payload) == 1

    now = T0 + timedelta(seconds=5)
    assert deliver_due(db.sessions, now, client=client, allow_private=True) == 1
    assert len(receiver.requests) == 1
    got = receiver.requests[0]
    assert got.path == "/hook"
    assert got.body == canonical_json(payload)
    assert json.loads(got.body) == payload
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["x-refute-event"] == "result.finalized"
    assert headers["x-refute-delivery"] == "evt_fin_1"
    assert headers["x-refute-timestamp"] == str(int(now.timestamp()))
    assert headers["x-refute-signature"] == "v1=" + sign(secret, int(now.timestamp()), got.body)

    assert verify_signature(secret, got.headers, got.body, now)
    assert verify_signature(secret, got.headers, got.body, now + timedelta(seconds=300))
    assert not verify_signature(secret, got.headers, got.body, now + timedelta(seconds=301))
    assert not verify_signature(secret, got.headers, got.body, now - timedelta(seconds=301))
    assert verify_signature(secret, got.headers, got.body, now + timedelta(seconds=50),
                            tolerance_s=60)
    assert not verify_signature(secret, got.headers, got.body + b" ", now)
    assert not verify_signature(secret, got.headers, got.body.replace(b"res_1", b"res_2"), now)
    assert not verify_signature("whsec_other", got.headers, got.body, now)
    forged_time = dict(got.headers, **{"X-Refute-Timestamp": str(int(now.timestamp()) + 1)})
    assert not verify_signature(secret, forged_time, got.body, now)
    forged_sig = dict(got.headers, **{"X-Refute-Signature": "v1=" + "0" * 64})
    assert not verify_signature(secret, forged_sig, got.body, now)
    rotated = dict(got.headers, **{"X-Refute-Signature": "v1=" + "0" * 64 + ", "
                                   + headers["x-refute-signature"]})
    assert verify_signature(secret, rotated, got.body, now)
    for missing in ("X-Refute-Timestamp", "X-Refute-Signature"):
        assert not verify_signature(secret, {k: v for k, v in got.headers.items()
                                             if k.lower() != missing.lower()}, got.body, now)
    assert not verify_signature(secret, dict(got.headers, **{"X-Refute-Timestamp": "-5"}),
                                got.body, now)

    [row] = _deliveries(db)
    assert row.endpoint_id == endpoint and row.status == "DELIVERED" and row.attempts == 1
    assert row.delivered_at is not None and utc(row.delivered_at) == now
    assert row.last_error is None
    # Nothing is due any more, now or later.
    assert deliver_due(db.sessions, now + timedelta(days=1), client=client,
                       allow_private=True) == 0
    assert len(receiver.requests) == 1


# --- retries -------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_deterministic() -> None:
    for attempts in range(1, 20):
        base = min(2**attempts, 3600)
        delay = backoff(attempts, 42).total_seconds()
        assert base <= delay < base * 1.25
        assert backoff(attempts, 42) == backoff(attempts, 42)
    assert len({backoff(3, i) for i in range(20)}) > 1  # jitter spreads deliveries


def test_retries_back_off_then_fail(db: Db, receiver: Receiver, client: httpx.Client) -> None:
    receiver.status = 500
    _endpoint(db, receiver.url(), ["result.disputed"])
    _enqueue(db, "result.disputed", "evt_d", {"result_id": "res_1"})
    now = T0
    for attempt in range(1, 5):
        assert deliver_due(db.sessions, now, client=client, allow_private=True, max_attempts=4) == 1
        [row] = _deliveries(db)
        assert row.attempts == attempt and row.last_error == "HTTP 500"
        if attempt == 4:
            assert row.status == "FAILED"
            break
        assert row.status == "PENDING"
        due = utc(row.next_attempt_at)
        assert due == now + backoff(attempt, row.id)
        assert now + timedelta(seconds=2**attempt) <= due < now + timedelta(
            seconds=1.25 * 2**attempt)
        # Not before it is due.
        assert deliver_due(db.sessions, now, client=client, allow_private=True, max_attempts=4) == 0
        assert deliver_due(db.sessions, due - timedelta(milliseconds=1), client=client,
                           allow_private=True, max_attempts=4) == 0
        now = due
    assert deliver_due(db.sessions, now + timedelta(days=30), client=client, allow_private=True,
                       max_attempts=4) == 0
    assert len(receiver.requests) == 4
    assert {r.headers["X-Refute-Delivery"] for r in receiver.requests} == {"evt_d"}
    assert len({r.headers["X-Refute-Timestamp"] for r in receiver.requests}) == 4


def test_fails_n_times_then_delivered(sqlite_db: Db, receiver: Receiver,
                                      client: httpx.Client) -> None:
    receiver.fail_next = 2
    _endpoint(sqlite_db, receiver.url(), ["result.finalized"])
    _enqueue(sqlite_db, "result.finalized", "evt_f", {"k": "v"})
    now = T0
    for _ in range(3):
        assert deliver_due(sqlite_db.sessions, now, client=client, allow_private=True) == 1
        now += timedelta(hours=2)
    [row] = _deliveries(sqlite_db)
    assert row.status == "DELIVERED" and row.attempts == 3
    assert row.delivered_at is not None and utc(row.delivered_at) == T0 + timedelta(hours=4)
    assert len(receiver.requests) == 3
    assert len({r.body for r in receiver.requests}) == 1


def test_timeouts_and_refused_connections_are_failed_attempts(
        sqlite_db: Db, receiver: Receiver, client: httpx.Client) -> None:
    receiver.hang = True
    _endpoint(sqlite_db, receiver.url("/slow"), ["result.finalized"])
    _endpoint(sqlite_db, f"http://127.0.0.1:{free_port()}/closed", ["result.finalized"])
    _enqueue(sqlite_db, "result.finalized", "evt_t", {"k": "v"})
    started = time.monotonic()
    assert deliver_due(sqlite_db.sessions, T0, client=client, allow_private=True,
                       timeout_s=0.3) == 2
    assert time.monotonic() - started < 5
    errors = sorted(r.last_error or "" for r in _deliveries(sqlite_db))
    assert errors[0].startswith("ConnectError: ")
    assert errors[1].startswith("ReadTimeout: ")
    assert all("\n" not in e for e in errors)
    assert all(r.status == "PENDING" and r.attempts == 1 for r in _deliveries(sqlite_db))


def test_batch_limits_one_call(sqlite_db: Db, receiver: Receiver, client: httpx.Client) -> None:
    _endpoint(sqlite_db, receiver.url(), ["result.finalized"])
    for i in range(5):
        _enqueue(sqlite_db, "result.finalized", f"evt_{i}", {"i": i})
    assert deliver_due(sqlite_db.sessions, T0, client=client, allow_private=True, batch=3) == 3
    assert deliver_due(sqlite_db.sessions, T0, client=client, allow_private=True, batch=3) == 2
    assert deliver_due(sqlite_db.sessions, T0, client=client, allow_private=True, batch=3) == 0
    # Oldest first.
    assert [r.headers["X-Refute-Delivery"] for r in receiver.requests] == [
        f"evt_{i}" for i in range(5)]
    with pytest.raises(WebhookError):
        deliver_due(sqlite_db.sessions, T0, client=client, allow_private=True, batch=0)


# --- isolation -----------------------------------------------------------------------------


def test_deliveries_are_listed_per_network(db: Db, receiver: Receiver,
                                           client: httpx.Client) -> None:
    _endpoint(db, receiver.url("/a"), sorted(EVENTS))
    _endpoint(db, receiver.url("/b"), sorted(EVENTS), network="net_b")
    for i in range(3):
        _enqueue(db, "result.finalized", f"evt_a{i}", {"i": i})
    _enqueue(db, "result.finalized", "evt_b0", {"secret": "of b"}, network="net_b")
    receiver.fail_next = 0
    with db.sessions() as session:
        first = session.scalars(select(WebhookDelivery).where(
            WebhookDelivery.event_id == "evt_a0")).one()
        first.next_attempt_at = T0 - timedelta(minutes=1)  # due first
        session.commit()
    assert deliver_due(db.sessions, T0, client=client, allow_private=True, batch=1) == 1

    with db.sessions() as session:
        mine = list_deliveries(session, "net_a")
        assert [d.event_id for d in mine] == ["evt_a2", "evt_a1", "evt_a0"]  # newest first
        assert [d.event_id for d in list_deliveries(session, "net_a", status="DELIVERED")] == [
            "evt_a0"]
        assert len(list_deliveries(session, "net_a", status="PENDING")) == 2
        assert list_deliveries(session, "net_a", status="FAILED") == []
        assert len(list_deliveries(session, "net_a", limit=2)) == 2
        assert [d.event_id for d in list_deliveries(session, "net_b")] == ["evt_b0"]
        assert list_deliveries(session, "net_zzz") == []
        with pytest.raises(WebhookError, match="status"):
            list_deliveries(session, "net_a", status="LOST")
        with pytest.raises(WebhookError, match="limit"):
            list_deliveries(session, "net_a", limit=0)


# --- several workers (PostgreSQL) ----------------------------------------------------------


def test_concurrent_workers_attempt_each_delivery_once_per_round(
        postgres_url: str, receiver: Receiver) -> None:
    db = _open(_fresh_postgres(postgres_url), "postgresql")
    try:
        _endpoint(db, receiver.url("/one"), sorted(EVENTS))
        _endpoint(db, receiver.url("/two"), ["result.finalized"])
        for i in range(20):
            _enqueue(db, "result.finalized", f"evt_{i}", {"i": i})
        total = 40
        receiver.delay_s = 0.01  # keep both workers busy at the same time

        def round_(now: datetime) -> list[int]:
            barrier = threading.Barrier(2)
            counts: list[int] = []
            errors: list[BaseException] = []

            def work() -> None:
                try:
                    with httpx.Client() as http:
                        barrier.wait()
                        counts.append(deliver_due(db.sessions, now, client=http,
                                                  allow_private=True, batch=1000))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=work) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert errors == []
            return counts

        receiver.status = 500
        counts = round_(T0)
        assert sum(counts) == total and all(c > 0 for c in counts), counts
        seen = Counter((r.path, r.headers["X-Refute-Delivery"]) for r in receiver.requests)
        assert len(seen) == total and set(seen.values()) == {1}
        assert {(r.status, r.attempts) for r in _deliveries(db)} == {("PENDING", 1)}

        receiver.status = 200
        receiver.requests.clear()
        counts = round_(T0 + timedelta(hours=2))
        assert sum(counts) == total and all(c > 0 for c in counts), counts
        seen = Counter((r.path, r.headers["X-Refute-Delivery"]) for r in receiver.requests)
        assert len(seen) == total and set(seen.values()) == {1}
        assert {(r.status, r.attempts) for r in _deliveries(db)} == {("DELIVERED", 2)}
    finally:
        db.engine.dispose()


# --- targets resolved and checked at delivery time -----------------------------------------


class FixedResolver:
    """A resolver with fixed answers, counting its calls (the system's is used elsewhere)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        return self.answers[host]


@pytest.mark.parametrize(("addresses", "kind"), [
    (["127.0.0.1"], "loopback"),
    (["93.184.216.34", "127.0.0.1"], "loopback"),  # one bad address refuses the name
    (["::1"], "loopback"),
    (["::ffff:10.0.0.7"], "private"),
    (["192.168.0.2"], "private"),
    (["169.254.169.254"], "link-local"),
    (["224.0.0.1"], "multicast"),
    (["0.0.0.0"], "unspecified"),
])
def test_a_name_resolving_to_a_non_public_address_is_refused_and_recorded(
        sqlite_db: Db, receiver: Receiver, client: httpx.Client, addresses: list[str],
        kind: str) -> None:
    resolver = FixedResolver({"hooks.example.test": addresses})
    url = f"http://hooks.example.test:{receiver.port}/hook"
    with sqlite_db.sessions() as session:  # a name passes registration: it is not resolved there
        register_endpoint(session, "net_a", url, ["result.finalized"], now=T0)
        session.commit()
    _enqueue(sqlite_db, "result.finalized", "evt_rebound", {"k": "v"})
    assert deliver_due(sqlite_db.sessions, T0, client=client, allow_private=False,
                       resolve=resolver) == 1
    [row] = _deliveries(sqlite_db)
    assert row.status == "PENDING" and row.attempts == 1
    assert row.last_error is not None and row.last_error.startswith("refused target: ")
    assert f"{kind} address" in row.last_error and "hooks.example.test" in row.last_error
    assert receiver.requests == []  # nothing reached the loopback listener
    assert resolver.calls == [("hooks.example.test", receiver.port)]


def test_localhost_through_the_system_resolver_is_refused_at_delivery(
        sqlite_db: Db, receiver: Receiver, client: httpx.Client) -> None:
    """An endpoint registered while private targets were allowed is refused once they are
    not: the name is resolved by the operating system at the attempt."""
    _endpoint(sqlite_db, f"http://localhost:{receiver.port}/hook", ["result.finalized"])
    _enqueue(sqlite_db, "result.finalized", "evt_local", {"k": "v"})
    assert deliver_due(sqlite_db.sessions, T0, client=client, allow_private=False) == 1
    [row] = _deliveries(sqlite_db)
    assert row.last_error is not None and "loopback address" in row.last_error
    assert receiver.requests == []
    # The same delivery, with private targets allowed, reaches the listener.
    assert deliver_due(sqlite_db.sessions, T0 + timedelta(hours=1), client=client,
                       allow_private=True) == 1
    assert len(receiver.requests) == 1
    assert _deliveries(sqlite_db)[0].status == "DELIVERED"


def test_delivery_connects_to_the_checked_address_with_the_original_host(
        sqlite_db: Db, receiver: Receiver, client: httpx.Client) -> None:
    """The name is resolved once per attempt and the connection goes to that address (no second
    lookup a rebinding DNS server could answer differently); Host keeps the name. An address
    that refuses the connection is followed by the next one."""
    resolver = FixedResolver({"hooks.example.test": ["::1", "127.0.0.1"]})
    if _listening("::1", receiver.port):
        resolver.answers["hooks.example.test"] = ["127.0.0.2", "127.0.0.1"]
    url = f"http://hooks.example.test:{receiver.port}/hook?x=1"
    _endpoint(sqlite_db, url, ["result.finalized"])
    _enqueue(sqlite_db, "result.finalized", "evt_pinned", {"k": "v"})
    assert deliver_due(sqlite_db.sessions, T0, client=client, allow_private=True,
                       resolve=resolver) == 1
    [got] = receiver.requests
    assert got.path == "/hook?x=1"
    assert {k.lower(): v for k, v in got.headers.items()}["host"] == (
        f"hooks.example.test:{receiver.port}")
    assert resolver.calls == [("hooks.example.test", receiver.port)]
    assert _deliveries(sqlite_db)[0].status == "DELIVERED"


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def test_resolve_target_pins_addresses_and_keeps_the_tls_name() -> None:
    from verifier.webhooks import refused_address, resolve_target

    resolver = FixedResolver({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1::1"]})
    first, second = resolve_target("https://hooks.example.com/in?a=b", allow_private=False,
                                   resolve=resolver)
    assert first.url == "https://93.184.216.34/in?a=b"
    assert second.url == "https://[2606:2800:220:1::1]/in?a=b"
    assert first.host_header == "hooks.example.com" and first.server_name == "hooks.example.com"
    literal = resolve_target("http://93.184.216.34:8080/x", allow_private=False,
                             resolve=resolver)
    assert [t.url for t in literal] == ["http://93.184.216.34:8080/x"]
    assert literal[0].server_name is None
    assert len(resolver.calls) == 1  # literals are not resolved
    with pytest.raises(WebhookError, match="cannot resolve"):
        resolve_target("http://nowhere.example.test/", allow_private=False, resolve=resolver)
    assert refused_address("93.184.216.34") is None
    assert refused_address("fe80::1%eth0") == "link-local address fe80::1"
