"""``GET /v1/ready`` names what is missing; ``refute serve`` and ``refute worker`` work on a
fresh home (they create or upgrade the schema on start)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from refute.settings import Settings, get_settings
from tests.api_server import start_server
from tests.servers import redis_server
from verifier.api.app import create_app
from verifier.api.readiness import database_checks
from verifier.db import make_engine, migrate
from verifier.service import ServiceContext

NO_BROKER = "redis://127.0.0.1:1/0"


def _ready(settings: Settings) -> httpx.Response:
    context = ServiceContext.create(settings)
    try:
        with TestClient(create_app(context), raise_server_exceptions=False) as client:
            answer: httpx.Response = client.get("/v1/ready")  # no API key: readiness is open
            return answer
    finally:
        context.engine.dispose()


def test_a_database_without_the_schema_is_not_ready_and_says_what_to_run(
        tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'fresh.db'}",
                        blob_dir=tmp_path / "blobs", redis_url=NO_BROKER)
    answer = _ready(settings)
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert "refute db upgrade" in body["checks"]["schema"]
    assert body["checks"]["broker"].startswith("unreachable")
    assert body["checks"]["blobs"] == "ok"
    assert "127.0.0.1" not in answer.text and str(tmp_path) not in answer.text


def test_an_old_schema_is_not_ready(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url, "0001")
    engine = make_engine(url)
    try:
        checks = database_checks(engine)
        assert checks["database"] == "ok"
        assert checks["schema"].startswith("at revision 0001, not at ")
        assert checks["schema"].endswith("run `refute db upgrade`")
        with engine.begin() as connection:  # a release newer than this one migrated it
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        assert "newer release" in database_checks(engine)["schema"]
    finally:
        engine.dispose()


def test_migrated_with_a_broker_and_writable_blobs_is_ready(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis:
        settings = Settings(database_url=f"sqlite:///{tmp_path / 'r.db'}",
                            blob_dir=tmp_path / "missing" / "blobs", redis_url=redis.url,
                            spot_key="ab" * 16)
        migrate(settings.database_url)
        answer = _ready(settings)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ok", "checks": {
        "database": "ok", "schema": "ok", "broker": "ok", "blobs": "ok", "spot_key": "ok"}}


def test_a_blob_folder_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a folder")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}",
                        blob_dir=tmp_path / "file" / "blobs", redis_url=NO_BROKER)
    migrate(settings.database_url)
    checks = _ready(settings).json()["checks"]
    assert checks["schema"] == "ok"
    assert checks["blobs"].startswith("not writable (") and "REFUTE_BLOB_DIR" in checks["blobs"]


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """REFUTE_* pointing into ``tmp_path``; the worker's Celery loop and logging set-up are
    replaced (the command's own start-up is what is tested)."""
    for name in ("REFUTE_DATABASE_URL", "REFUTE_BLOB_DIR", "REFUTE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REFUTE_BLOB_DIR", str(tmp_path / "blobs"))
    monkeypatch.setattr("refute.logs.configure_logging", lambda *_a, **_k: None)
    started: list[list[str]] = []

    class FakeCelery:
        def worker_main(self, argv: list[str]) -> None:
            started.append(argv)

    monkeypatch.setattr("verifier.worker.celery_app", FakeCelery)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()
    assert len(started) <= 1


def test_worker_creates_the_schema_on_start(environment: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from verifier.main import app

    url = f"sqlite:///{environment / 'home' / 'w.db'}"  # its folder does not exist yet
    monkeypatch.setenv("REFUTE_DATABASE_URL", url)
    result = CliRunner().invoke(app, ["worker", "--queues", "spotcheck"])
    assert result.exit_code == 0, result.output
    engine = make_engine(url)
    try:
        assert database_checks(engine) == {"database": "ok", "schema": "ok"}
    finally:
        engine.dispose()


def test_worker_refuses_in_one_line_when_the_database_cannot_be_migrated(
        environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from verifier.main import app

    (environment / "file").write_bytes(b"")
    monkeypatch.setenv("REFUTE_DATABASE_URL", f"sqlite:///{environment / 'file' / 'x.db'}")
    result = CliRunner().invoke(app, ["worker", "--queues", "spotcheck"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(" ".join(lines)) < 500 and "Traceback" not in result.output
    assert "refute db upgrade" in result.output


def test_serve_on_a_fresh_home_migrates_and_reports_readiness(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(home, env={"REFUTE_REDIS_URL": NO_BROKER})
    try:
        answer = httpx.get(f"{server.url}/v1/ready", timeout=30)
        assert answer.status_code == 503, answer.text  # the broker and the secret are missing
        checks = answer.json()["checks"]
        assert checks.pop("spot_key").startswith("REFUTE_SPOT_KEY is not set")
        assert checks == {"database": "ok", "schema": "ok",
                          "broker": "unreachable (ConnectionError)", "blobs": "ok"}
        assert answer.headers["X-Request-ID"]
        assert (home / ".cache" / "refute" / "refute.db").exists()
    finally:
        server.stop()


def test_serve_with_two_workers_sums_their_http_metrics(tmp_path: Path) -> None:
    """`refute serve --workers 2`: two worker processes share the port, and /metrics (whichever
    worker answers it) counts the requests every worker served."""
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(home, env={"REFUTE_REDIS_URL": NO_BROKER}, workers=2)
    try:
        assert len(server.worker_pids()) == 2
        before = _health_count(server.url)
        for _ in range(40):  # a new connection each: the kernel hands them to either worker
            assert httpx.get(f"{server.url}/v1/health", timeout=10).status_code == 200
        for _ in range(3):  # every scrape, from either worker, sees all 40
            assert _health_count(server.url) == before + 40
    finally:
        server.stop()
    assert not server.worker_pids()  # stopping the server stopped its workers


def _health_count(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.search(r'^refute_http_requests_total\{route="health",status="200"\} (\S+)$',
                      metrics, re.MULTILINE)
    assert found is not None, metrics[-2000:]
    return float(found.group(1))
