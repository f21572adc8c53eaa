"""Malformed input gets a 4xx with the error schema and the API stays up (issue 9).

The attacks that killed or bloated the real server are replayed against a real ``refute serve``
process started on a fresh home (default settings, no ``refute db upgrade`` beforehand).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import select
import socket
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto
from sqlalchemy import select as sql_select

from challenge.blobs import LocalBlobStore
from challenge.fakes import FakeTasks
from challenge.messages import AuthError, Domain, verify_signed
from challenge.messages import Result as SignedResult
from challenge.records import Network, RegisteredModel, Result, ResultStatus
from refute.errors import BundleError
from refute.loading import TensorSpec
from refute.manifest import Manifest, SegmentEntry, canonical_json
from refute.safejson import MAX_DEPTH, json_depth, nesting_depth
from refute.settings import Settings
from refute.trace import Trace
from tests.api_server import Server, start_server
from verifier.accounts import create_network
from verifier.api.app import MAX_SMALL_BODY_BYTES, create_app
from verifier.db import make_engine, migrate, session_factory
from verifier.results import attach_trace
from verifier.service import ServiceContext

#: A valid EIP-55 address and the same address with one letter's case flipped.
GOOD = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
TYPO = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"


# --- a real server on a fresh home ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("home"))
    try:
        yield running
    finally:
        running.stop()


def assert_error(response: httpx.Response, status: int) -> str:
    """The answer has ``status`` and exactly the documented error body; returns its reason."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "reason"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    reason = body["error"]["reason"]
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert "Traceback" not in reason
    return reason


# --- finding 1: deep JSON ------------------------------------------------------------------


@pytest.mark.slow
def test_deeply_nested_json_is_refused_and_the_server_lives(server: Server) -> None:
    """The 200 KB body of 100,000 nested arrays that segfaulted the API: now a 400."""
    for content_type in ("application/json", None, "application/merge-patch+json"):
        headers = {"Content-Type": content_type} if content_type else {}
        answer = httpx.post(f"{server.url}/v1/networks", content=b"[" * 100_000,
                            headers=headers, timeout=30)
        assert "nests 100000 levels" in assert_error(answer, 400)
        assert server.alive()
    # A model registration (a large-body route) gets the same check once its key is well-formed.
    answer = httpx.post(f"{server.url}/v1/models", content=b"{\"a\":" * 50_000,
                        headers={"X-API-Key": "rk_" + "A" * 43}, timeout=30)
    assert_error(answer, 400)
    assert server.alive()


# --- finding 9: limits on the bytes actually read ------------------------------------------


def _send_chunked(port: int, path: str, total: int, headers: dict[str, str],
                  chunk: int = 2**20) -> tuple[int, bytes, int]:
    """POST ``total`` bytes with chunked transfer encoding (no Content-Length), stopping as
    soon as the server answers; returns (status, body, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(30)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                 f"{head}\r\n".encode())
    piece = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"
    sent = 0
    answer = b""
    try:
        for _ in range(total // chunk):
            readable, _w, _x = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(piece)
            sent += chunk
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: read its answer below
    deadline = time.monotonic() + 30
    while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    sock.close()
    status = int(head_bytes.split(b" ")[1]) if head_bytes else 0
    return status, body, sent


@pytest.mark.slow
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_chunked_bodies_are_cut_off_at_the_limit(server: Server, content_type: str) -> None:
    """80 MiB chunked to an unauthenticated route: 413 after about the limit, memory flat."""
    before = server.rss_kib()
    status, body, sent = _send_chunked(server.port, "/v1/networks", 80 * 2**20,
                                       {"Content-Type": content_type})
    grown_mib = (server.rss_kib() - before) / 1024
    assert status == 413, body[:300]
    error = json.loads(body)
    assert error["error"]["code"] == "body_too_large"
    # The server stopped reading near the limit (socket buffers let a few MiB more through).
    assert sent < 40 * 2**20, sent
    assert grown_mib < 20, f"RSS grew by {grown_mib:.1f} MiB for an 80 MiB body"
    assert server.alive()


@pytest.mark.slow
def test_large_bodies_need_a_key_before_they_are_read(server: Server) -> None:
    """Model registration takes large bodies, but not from a caller without a key."""
    status, body, sent = _send_chunked(server.port, "/v1/models", 80 * 2**20,
                                       {"Content-Type": "application/json"})
    assert status == 401, body[:300]
    assert sent < 40 * 2**20
    assert server.alive()


def test_declared_lengths_over_the_limit_are_refused_unread() -> None:
    with _app_client() as client:
        answer = client.post("/v1/networks", content=b"{}",
                             headers={"Content-Length": str(MAX_SMALL_BODY_BYTES + 1),
                                      "Content-Type": "application/json"})
        assert_error(answer, 413)
        answer = client.post("/v1/networks", content=b"x" * (MAX_SMALL_BODY_BYTES + 10),
                             headers={"Content-Type": "text/plain"})
        assert_error(answer, 413)


# --- finding 7: every malformed input is a 4xx with the error schema ------------------------


def _result_body(**changes: Any) -> dict[str, Any]:
    word = "0x" + "11" * 32
    body: dict[str, Any] = {
        "model_id": "mod_x", "provider": GOOD,
        "message": {"network": word, "model": word, "input": word, "output": word,
                    "traceRoot": word, "stake": 1, "nonce": 1, "deadline": 2**40},
        "domain": {"name": "refute", "version": "1", "chainId": 31337,
                   "verifyingContract": "0x" + "00" * 20},
        "signature": "0x" + "ab" * 65, "leaves": [word, word]}
    body.update(changes)
    return body


@pytest.mark.slow
def test_malformed_inputs_are_4xx_with_the_error_schema(server: Server) -> None:
    key = httpx.post(f"{server.url}/v1/networks", json={"name": "h"}, timeout=30)
    assert key.status_code == 201, key.text  # the fresh home's database was created by serve
    headers = {"X-API-Key": key.json()["api_key"]}
    url = server.url
    # Addresses with a wrong EIP-55 checksum: a clear 422, never a 500.
    reason = assert_error(httpx.post(f"{url}/v1/results", headers=headers,
                                     json=_result_body(provider=TYPO)), 422)
    assert "provider" in reason and "EIP-55" in reason
    domain = {"name": "refute", "version": "1", "chainId": 31337, "verifyingContract": TYPO}
    assert "EIP-55" in assert_error(httpx.post(f"{url}/v1/results", headers=headers,
                                               json=_result_body(domain=domain)), 422)
    word = "0x" + "22" * 32
    challenge = {"challenger": TYPO, "message": {"network": word, "result": word, "lo": 0,
                                                 "hi": 1, "bond": 1, "nonce": 1,
                                                 "deadline": 2**40},
                 "domain": {"chainId": 31337, "verifyingContract": "0x" + "00" * 20},
                 "signature": "0x" + "ab" * 65}
    reason = assert_error(httpx.post(f"{url}/v1/results/res_x/challenges", json=challenge), 422)
    assert "challenger" in reason and "EIP-55" in reason
    move = {"player": TYPO, "message": {"network": word, "dispute": word, "round": 0, "kind": 1,
                                        "payload": word, "nonce": 1, "deadline": 2**40},
            "domain": {"chainId": 31337, "verifyingContract": "0x" + "00" * 20},
            "signature": "0x" + "ab" * 65}
    assert "player" in assert_error(httpx.post(f"{url}/v1/disputes/dsp_x/moves", json=move), 422)
    # Lowercase and correctly checksummed addresses pass validation (then: no such object).
    for address in (GOOD, GOOD.lower()):
        assert_error(httpx.post(f"{url}/v1/results/res_x/challenges",
                                json={**challenge, "challenger": address}), 404)
    # Non-hex leaves.
    assert "leaves" in assert_error(httpx.post(
        f"{url}/v1/results", headers=headers,
        json=_result_body(leaves=["0x" + "zz" * 32, "0x" + "11" * 32])), 422)
    # Unknown routes, wrong methods, path and query validation, bad JSON.
    assert_error(httpx.get(f"{url}/nowhere"), 404)
    assert_error(httpx.get(f"{url}/v1/results/res_x/nothing"), 404)
    wrong = httpx.delete(f"{url}/v1/networks")
    assert_error(wrong, 405)
    assert wrong.headers["allow"] == "POST"
    assert_error(httpx.get(f"{url}/v1/results", headers=headers, params={"limit": "x"}), 422)
    assert_error(httpx.get(f"{url}/v1/results", headers=headers, params={"limit": 0}), 422)
    assert_error(httpx.post(f"{url}/v1/networks", content=b"{\"name\":",
                            headers={"Content-Type": "application/json"}), 422)
    assert_error(httpx.post(f"{url}/v1/networks", content="{\"name\": NaN}",
                            headers={"Content-Type": "application/json"}), 422)
    assert_error(httpx.get(f"{url}/v1/results"), 401)
    assert_error(httpx.post(f"{url}/v1/models", json={}), 401)
    assert_error(httpx.put(f"{url}/v1/results/res_x/trace", headers=headers,
                           content=b"PK\x03\x04junk"), 404)
    assert server.alive()


def test_verify_signed_refuses_a_bad_checksum_with_an_auth_error() -> None:
    claim = SignedResult(network=b"\x01" * 32, model=b"\x02" * 32, input=b"\x03" * 32,
                         output=b"\x04" * 32, trace_root=b"\x05" * 32, stake=1, nonce=1,
                         deadline=2_000_000_000)
    domain = Domain(chain_id=31337)
    with pytest.raises(AuthError, match="EIP-55"):  # a 4xx in the API, never a 500
        verify_signed(claim, domain, b"\x01" * 65, expected_signer=TYPO, now=1_900_000_000,
                      expected_domain=domain)


def test_unexpected_failures_are_500_with_an_error_id_and_a_logged_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A database without its schema fails every query: the answer is the error schema with an
    error id, and that id is logged with the traceback; the body has no traceback."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}",
                        blob_dir=tmp_path / "blobs", redis_url="redis://127.0.0.1:1/0",
                        spot_key="cd" * 16)
    app = create_app(ServiceContext.create(settings, tasks=FakeTasks()))
    with caplog.at_level(logging.ERROR, logger="refute.api"), \
            TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/v1/networks", json={"name": "x"})
    reason = assert_error(answer, 500)
    assert answer.json()["error"]["code"] == "internal_error"
    error_id = reason.rsplit("request id ", 1)[1].rstrip(")")
    assert len(error_id) == 16 and answer.headers["X-Request-ID"] == error_id
    assert "no such table" not in reason and "sqlite" not in reason.lower()
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert type(logged[0].exc_info[1]).__name__ == "OperationalError"


def test_the_openapi_document_declares_the_error_schema_everywhere() -> None:
    with _app_client() as client:
        document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("4XX", "5XX"):
                assert status in responses, (method, path, status)
            for status, answer in responses.items():
                if status.startswith(("4", "5")) and status != "503":
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody"), (method, path, status, ref)
    links = document["paths"]["/v1/networks"]["post"]["responses"]["201"]["links"]
    assert links["ListResults"]["parameters"] == {"header.x-api-key": "$response.body#/api_key"}


def _app_client() -> TestClient:
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="refute-hardening-"))
    settings = Settings(database_url=f"sqlite:///{workdir / 'api.db'}",
                        blob_dir=workdir / "blobs", redis_url="redis://127.0.0.1:1/0",
                        spot_key="cd" * 16)
    migrate(settings.database_url)
    app = create_app(ServiceContext.create(settings, tasks=FakeTasks()))
    return TestClient(app, raise_server_exceptions=False)


# --- manifests from outside ----------------------------------------------------------------


def _manifest(width: int = 4) -> Manifest:
    x = TensorSpec("x", TensorProto.FLOAT, (1, width))
    y = TensorSpec("y", TensorProto.FLOAT, (1, width))
    return Manifest(model_sha256="ab" * 32, opset=13, num_nodes=1, cuts=(0, 1),
                    segments=(SegmentEntry(1, 0, 1, "cd" * 32, ("Relu",)),),
                    states=((x,), (y,)), scale=7)


@pytest.mark.parametrize("change", [
    lambda d: d["cuts"].__setitem__(1, float("inf")),
    lambda d: d["cuts"].__setitem__(1, float("nan")),
    lambda d: d["cuts"].__setitem__(1, 1.0),
    lambda d: d["cuts"].__setitem__(1, True),
    lambda d: d.__setitem__("range", float("inf")),
    lambda d: d.__setitem__("range", "12"),
    lambda d: d["model"].__setitem__("nodes", float("-inf")),
    lambda d: d["model"]["pins"].__setitem__("dims", {"n": float("nan")}),
    lambda d: d["states"][0][0]["shape"].__setitem__(1, float("inf")),
    lambda d: d["segments"][0].__setitem__("end", 10**40),
    lambda d: d.__setitem__("tolerances", [float("inf")]),
])
def test_manifest_numbers_must_be_finite_integers(change: Any) -> None:
    data = _manifest().to_json()
    assert Manifest.from_json(json.loads(json.dumps(data))) == _manifest()
    change(data)
    with pytest.raises(BundleError, match="malformed manifest"):
        Manifest.from_json(data)


def test_a_bundle_whose_manifest_holds_infinity_is_a_bundle_error() -> None:
    text = canonical_json(_manifest().to_json()).decode().replace('"cuts":[0,1]',
                                                                 '"cuts":[0,Infinity]')
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.json", text)
        archive.writestr("trace.json", "{}")
    with pytest.raises(BundleError, match="Infinity"):
        Trace.read(buffer.getvalue())
    deep = io.BytesIO()
    with zipfile.ZipFile(deep, "w") as archive:
        archive.writestr("manifest.json", b"[" * 100_000)
        archive.writestr("trace.json", "{}")
    with pytest.raises(BundleError, match="nests 100000 levels"):
        Trace.read(deep.getvalue())


# --- cheap checks before hashing -----------------------------------------------------------


def _big_bundle(width: int) -> tuple[bytes, Manifest]:
    """A structurally valid bundle of two float32 states of ``width`` values each, written with
    made-up leaves (checking them would hash every state)."""
    from refute.commitment import TraceCommitment

    manifest = _manifest(width)
    states = ((np.zeros((1, width), np.float32),), (np.ones((1, width), np.float32),))
    trace = Trace(manifest, states,
                  TraceCommitment.from_leaves(manifest.scale, [b"\1" * 32, b"\2" * 32]))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.json", canonical_json(manifest.to_json()))
        archive.writestr("trace.json", canonical_json(trace.to_json()))
        for k, state in enumerate(states):
            archive.writestr(f"states/{k}/0.f32", state[0].astype("<f4").tobytes())
    return buffer.getvalue(), manifest


def test_a_large_trace_under_another_manifest_is_refused_before_hashing(tmp_path: Path) -> None:
    data, manifest = _big_bundle(4 * 2**20)  # two 16 MiB states
    assert len(data) > 32 * 2**20
    other = "ef" * 32
    started = time.perf_counter()
    with pytest.raises(BundleError, match="another manifest"):
        Trace.read(data, expect_manifest_sha256=other)
    assert time.perf_counter() - started < 1.0
    started = time.perf_counter()
    with pytest.raises(BundleError, match="leaves differ"):
        Trace.read(data, expect_manifest_sha256=manifest.sha256, expect_leaves=[b"\0" * 32] * 2)
    assert time.perf_counter() - started < 1.0

    # The service's upload path uses both checks: a real database row, a real blob store.
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    now = datetime.now(UTC)
    with sessions() as session:
        network, _token = create_network(session, name="n", spot_probability=0.0,
                                         spot_count=0, challenge_window_s=60, now=now)
        model = RegisteredModel(id="mod_1", network_id=network.id, model_sha256="ab" * 32,
                                manifest_sha256=other, manifest=manifest.to_json(),
                                model_blob="00" * 32, created_at=now)
        word = "0x" + "00" * 32
        result = Result(id="res_1", network_id=network.id, model_id="mod_1", message_hash="1",
                        provider=GOOD, nonce="1", deadline=1, stake="1", input_hash=word,
                        output_hash=word, trace_root=word, leaves=[word, word],
                        signature="0x", status=ResultStatus.ACCEPTED, accepted_at=now,
                        challenge_deadline=now)
        session.add_all([model, result])
        session.commit()
        started = time.perf_counter()
        with pytest.raises(BundleError, match="another manifest"):
            attach_trace(session, LocalBlobStore(tmp_path / "blobs"), result, data, now)
        assert time.perf_counter() - started < 1.0
        assert session.scalars(sql_select(Network)).first() is not None
    engine.dispose()


# --- a fresh home --------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_on_a_fresh_home_creates_the_schema_first(server: Server) -> None:
    """`refute serve` with HOME=tmp and default settings: database routes answer, not 500."""
    assert (server.home / ".cache" / "refute" / "refute.db").is_file()
    created = httpx.post(f"{server.url}/v1/networks", json={"name": "fresh"}, timeout=30)
    assert created.status_code == 201, created.text
    listed = httpx.get(f"{server.url}/v1/results",
                       headers={"X-API-Key": created.json()["api_key"]}, timeout=30)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"items": [], "next_cursor": None}
    assert_error(httpx.get(f"{server.url}/v1/results", headers={"X-API-Key": "rk_nope"}), 401)


# --- what schemathesis found ---------------------------------------------------------------


def test_wrong_methods_name_every_allowed_method() -> None:
    """Starlette's 405 named only the first route on the path (``Allow: POST`` on /v1/results,
    which also serves GET)."""
    with _app_client() as client:
        answer = client.request("OPTIONS", "/v1/results")
        assert "allowed: GET, POST" in assert_error(answer, 405)
        assert answer.headers["allow"] == "GET, POST"
        assert client.delete("/v1/networks").headers["allow"] == "POST"


def test_request_bodies_are_strict() -> None:
    """A boolean or a float where the schema says integer is refused, not coerced."""
    with _app_client() as client:
        for bad in ({"spot_count": False}, {"challenge_window_s": 60.0}, {"name": 7}):
            answer = client.post("/v1/networks", json={"name": "n", **bad})
            assert_error(answer, 422)
        assert client.post("/v1/networks", json={"name": "n", "spot_probability": 1}
                           ).status_code == 201
        document = client.get("/openapi.json").json()
    events = document["components"]["schemas"]["WebhookCreate"]["properties"]["events"]
    assert "result.finalized" in events["items"]["enum"]


# --- the depth check itself ----------------------------------------------------------------


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    text = '[]{}"\\ab,: \né'
    roll = rng.random()
    if depth > 12 or roll < 0.3:
        return rng.choice([1, None, True, "".join(rng.choice(text)
                                                  for _ in range(rng.randint(0, 8)))])
    if roll < 0.65:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"".join(rng.choice(text) for _ in range(rng.randint(0, 5))):
            _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def test_json_depth_is_exact_on_json_with_brackets_and_escapes_in_strings() -> None:
    """Whatever the window, the scan finds the parser's depth (strings with brackets, quotes
    and backslashes ignored exactly as the parser does)."""
    rng = random.Random(20261203)
    for _ in range(500):
        value = _random_json(rng)
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        window = rng.choice([1, 2, 3, 5, 16, 2**20])
        assert json_depth(text, limit=0, window=window) == _depth(value) == nesting_depth(text)
    assert json_depth(b'"\\\\"[[', limit=0, window=2) == 2  # an escaped backslash ends no string
    assert json_depth(b'"\\"[["', limit=0, window=3) == 0  # an escaped quote ends no string


@pytest.mark.slow
def test_json_depth_of_a_60_mib_body_takes_about_a_second() -> None:
    """The regex-based check took 21 s on a 60 MiB registration body; the API must not."""
    model = json.dumps({"onnx_base64": base64.b64encode(b"\x07" * 45 * 2**20).decode()}).encode()
    started = time.perf_counter()
    assert json_depth(model, limit=MAX_DEPTH) == 1
    assert time.perf_counter() - started < 1.0
    for body in (b'"' + b"[" * (60 * 2**20) + b'"', b"[" * (60 * 2**20)):
        started = time.perf_counter()
        depth = json_depth(body, limit=MAX_DEPTH)
        assert depth in (0, 60 * 2**20)
        assert time.perf_counter() - started < 8.0


@pytest.mark.slow
def test_a_large_registration_body_is_depth_checked_quickly(server: Server) -> None:
    """A 60 MiB registration body (one long base64 string) is checked in about a second (the
    regex-based check took 21 s of the event loop), then refused for its unknown key."""
    body = json.dumps({"onnx_base64": base64.b64encode(b"\x07" * 45 * 2**20).decode()})
    started = time.perf_counter()
    answer = httpx.post(f"{server.url}/v1/models", content=body.encode(), timeout=120,
                        headers={"X-API-Key": "rk_" + "A" * 43,
                                 "Content-Type": "application/json"})
    assert_error(answer, 401)
    assert time.perf_counter() - started < 10.0
    assert server.alive()


def test_error_reasons_are_one_bounded_line() -> None:
    """A reason that echoes the caller's input (an id of 5,000 characters) stays short."""
    with _app_client() as client:
        key = client.post("/v1/networks", json={"name": "n"}).json()["api_key"]
        answer = client.get("/v1/results/" + "x" * 5000, headers={"X-API-Key": key})
    reason = assert_error(answer, 404)
    assert len(reason) <= 500 and reason.endswith("…")
