"""HTTP statuses come from the error's class (``http_status``), never from its text; a server
fault is a 5xx whose request id is in the answer, its ``X-Request-ID`` header and the log."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from challenge.ledger import LedgerError
from challenge.messages import AuthError
from prover.errors import CircuitUnsupported, ProofRejected, ProverError, SrsError
from refute.errors import (
    BundleError,
    Conflict,
    ExecutionError,
    InputError,
    ModelRejected,
    NotFound,
    RefuteError,
    ServerFault,
    Unavailable,
)
from refute.settings import Settings
from verifier.api.app import ApiKeyRefused, create_app
from verifier.api.middleware import BodyTooLarge
from verifier.db import migrate
from verifier.registry import RegistrationBusy, RegistrationTimeout
from verifier.service import ServiceContext

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("refute", "circuits", "prover", "challenge", "verifier")


def _import_everything() -> None:
    """Import every module of the code base, so every error class is defined."""
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name.endswith("__main__") or ".migrations" in info.name:
                continue  # runs the CLI / needs Alembic's context
            importlib.import_module(info.name)


def _subclasses(cls: type[RefuteError]) -> Iterator[type[RefuteError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_class_has_an_http_status_and_server_faults_are_5xx() -> None:
    _import_everything()
    classes: set[type[RefuteError]] = {RefuteError, *_subclasses(RefuteError)}
    ours = [c for c in classes if c.__module__.split(".")[0] in PACKAGES]
    assert len(ours) > 30  # the walk found the hierarchy
    for cls in ours:
        status = cls.http_status
        assert isinstance(status, int) and 400 <= status <= 599, (cls, status)
        if issubclass(cls, ServerFault):
            assert status >= 500, cls
    # The service's own failures, whatever their family.
    for cls in (ServerFault, Unavailable, ExecutionError, ProverError, CircuitUnsupported,
                SrsError, ProofRejected, LedgerError):
        assert cls.http_status >= 500, cls
    assert Unavailable.http_status == 503
    # The caller's faults.
    expected: dict[type[RefuteError], int] = {
        InputError: 400, BundleError: 400, NotFound: 404, Conflict: 409, ModelRejected: 422,
        RegistrationTimeout: 422, AuthError: 403, ApiKeyRefused: 401, BodyTooLarge: 413,
        RegistrationBusy: 503}
    for cls, status in expected.items():
        assert cls.http_status == status, cls


def test_the_api_never_chooses_a_status_by_an_errors_text() -> None:
    matching = re.compile(r"\.reason\b[^\n]*(?:startswith|endswith|\bin\b|==)|"
                          r"\bin\s+(?:str\()?exc\b|\bin\s+\w+\.reason\b")
    for path in sorted((ROOT / "verifier" / "api").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not matching.search(line), f"{path.name}:{number}: {line.strip()}"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'api.db'}",
                        blob_dir=tmp_path / "blobs", redis_url="redis://127.0.0.1:1/0",
                        spot_key="cd" * 16)
    migrate(settings.database_url)
    context = ServiceContext.create(settings)
    with TestClient(create_app(context), raise_server_exceptions=False) as test_client:
        yield test_client
    context.engine.dispose()


def _key(client: TestClient) -> dict[str, str]:
    created = client.post("/v1/networks", json={"name": "acme"})
    assert created.status_code == 201, created.text
    return {"X-API-Key": created.json()["api_key"]}


def test_a_server_fault_is_a_5xx_with_the_request_id_in_body_header_and_log(
        client: TestClient, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    headers = _key(client)

    def broken(*_args: object, **_kwargs: object) -> object:
        raise ExecutionError("ONNX Runtime failed: out of threads")

    monkeypatch.setattr("verifier.api.app.list_results", broken)
    with caplog.at_level(logging.ERROR, logger="verifier.api.app"):
        answer = client.get("/v1/results", headers=headers)
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert error["code"] == "execution_error"
    rid = answer.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{16}", rid)
    assert error["reason"] == f"ONNX Runtime failed: out of threads (request id {rid})"
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == rid]
    assert len(logged) == 1 and rid in logged[0].getMessage()
    assert logged[0].exc_info is not None and isinstance(logged[0].exc_info[1], ExecutionError)

    # A client's sane X-Request-ID is kept (and logged); an unsafe one is replaced.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="verifier.api.app"):
        mine = client.get("/v1/results", headers={**headers, "X-Request-ID": "req-42.a"})
    assert mine.status_code == 500 and mine.headers["X-Request-ID"] == "req-42.a"
    assert mine.json()["error"]["reason"].endswith("(request id req-42.a)")
    assert [getattr(r, "request_id", None) for r in caplog.records] == ["req-42.a"]
    for unsafe in ("two words", "x" * 200, "-leading", "a\tb"):
        other = client.get("/v1/health", headers={"X-Request-ID": unsafe})
        assert re.fullmatch(r"[0-9a-f]{16}", other.headers["X-Request-ID"]), unsafe


def test_every_answer_has_a_request_id_and_caller_faults_keep_their_4xx(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    headers = _key(client)
    ids = set()
    for answer, status in (
            (client.get("/v1/health"), 200),
            (client.get("/v1/results"), 401),  # no API key
            (client.get("/v1/results", headers={"X-API-Key": "rk_" + "A" * 43}), 401),
            (client.get("/v1/results/res_nope", headers=headers), 404),
            (client.get("/v1/nowhere"), 404),
            (client.post("/v1/results", headers=headers, json={}), 422),
            (client.post("/v1/networks", content=b"[" * 100), 400)):
        assert answer.status_code == status, answer.text
        ids.add(answer.headers["X-Request-ID"])
        if status >= 400:
            assert "request id" not in answer.json()["error"]["reason"]
    assert len(ids) == 7  # one id per request

    def refused(*_args: object, **_kwargs: object) -> object:
        raise Conflict("nonce 7 was already used")

    monkeypatch.setattr("verifier.api.app.list_results", refused)
    answer = client.get("/v1/results", headers=headers)
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "conflict"


def test_an_unexpected_exception_is_a_500_with_the_same_request_id(
        client: TestClient, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    headers = _key(client)

    def crash(*_args: object, **_kwargs: object) -> object:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr("verifier.api.app.list_results", crash)
    with caplog.at_level(logging.ERROR, logger="refute.api"):
        answer = client.get("/v1/results", headers={**headers, "X-Request-ID": "trace-1"})
    assert answer.status_code == 500
    assert answer.json()["error"] == {"code": "internal_error",
                                      "reason": "unexpected server error (request id trace-1)"}
    assert answer.headers["X-Request-ID"] == "trace-1"
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-1"]
    assert logged and logged[0].exc_info is not None
    assert "boom" not in answer.text
