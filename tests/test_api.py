"""The HTTP API: every route and its error paths, against a real SQLite database and blob store.

Spot-check scheduling is captured here (the real Celery path is tests/test_workers.py).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from fastapi.testclient import TestClient

from challenge.fakes import FakeTasks
from refute import zoo
from refute.settings import Settings
from tests.conftest import SHARED_MODELS
from tests.hostile_models import HOSTILE
from tests.servers import postgres_server, redis_server
from tests.signing import signed_result as _signed
from verifier.api.app import create_app, model_body_bytes
from verifier.db import migrate
from verifier.service import ServiceContext

pytestmark = [pytest.mark.slow]

ADMIN = "admin-secret"
OTHER = Account.from_key(b"\x02" * 32)


@dataclasses.dataclass
class Api:
    client: TestClient
    scheduled: list[str]
    workdir: Path
    settings: Settings


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    workdir = tmp_path_factory.mktemp("api")
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{workdir / 'api.db'}"
        else:
            url = stack.enter_context(postgres_server())
        settings = Settings(database_url=url, blob_dir=workdir / "blobs",
                            spot_key="ab" * 16, redis_url="redis://127.0.0.1:1/0")
        migrate(settings.database_url)
        tasks = FakeTasks()
        context = ServiceContext.create(settings, tasks=tasks)
        app = create_app(context, admin_token=ADMIN)
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Api(client, tasks.spotchecks, workdir, settings)
        context.engine.dispose()


def _network(api: Api, name: str = "acme") -> tuple[str, dict[str, str]]:
    answer = api.client.post("/v1/networks", json={"name": name, "spot_probability": 1.0},
                             headers={"X-Admin-Token": ADMIN})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    return body["id"], {"X-API-Key": body["api_key"]}


@pytest.fixture(scope="module")
def registered(api: Api) -> tuple[str, dict[str, str], dict[str, Any]]:
    network_id, headers = _network(api)
    model = zoo.mlp()
    answer = api.client.post("/v1/models", headers=headers, json={
        "onnx_base64": base64.b64encode(model.onnx_bytes).decode(), "calibration_samples": 2})
    assert answer.status_code == 201, answer.text
    return network_id, headers, answer.json()


def _error(answer: Any, status: int) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"} and body["error"]["reason"]
    return str(body["error"]["reason"])


def test_health_metrics_and_openapi(api: Api) -> None:
    assert api.client.get("/v1/health").json()["status"] == "ok"
    ready = api.client.get("/v1/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "ok"
    assert "refute_http_requests_total" in api.client.get("/metrics").text
    spec = api.client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            if path.startswith("/v1/") and path not in ("/v1/health", "/v1/ready"):
                assert "422" in op["responses"] or method == "get", (path, method)
                assert op.get("description") or op.get("summary"), (path, method)


def test_ready_with_a_real_broker(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis:
        settings = Settings(database_url=f"sqlite:///{tmp_path / 'r.db'}",
                            blob_dir=tmp_path / "b", redis_url=redis.url, spot_key="ab" * 16)
        migrate(settings.database_url)
        app = create_app(ServiceContext.create(settings, tasks=FakeTasks()))
        with TestClient(app) as client:
            assert client.get("/v1/ready").json() == {
                "status": "ok", "checks": {"database": "ok", "schema": "ok", "broker": "ok",
                                           "blobs": "ok", "spot_key": "ok"}}


def test_network_creation_and_keys(api: Api) -> None:
    assert "admin token" in _error(api.client.post("/v1/networks", json={"name": "x"}), 403)
    _error(api.client.post("/v1/networks", json={"name": ""},
                           headers={"X-Admin-Token": ADMIN}), 422)
    _network_id, headers = _network(api, "keys")
    second = api.client.post("/v1/networks/me/keys", headers=headers)
    assert second.status_code == 201
    assert second.json()["api_key"] != headers["X-API-Key"]
    for bad in ({}, {"X-API-Key": "nope"}, {"X-API-Key": "rk_" + "A" * 43}):
        _error(api.client.get("/v1/results", headers=bad), 401)


def test_model_registration_refusals(api: Api) -> None:
    _network_id, headers = _network(api, "models")
    assert "base64" in _error(api.client.post(
        "/v1/models", headers=headers, json={"onnx_base64": "!!!!"}), 400)
    case_id, builder, _expected, _kwargs = next(h for h in HOSTILE if h[0] == "unknown_op")
    reason = _error(api.client.post("/v1/models", headers=headers, json={
        "onnx_base64": base64.b64encode(builder()).decode()}), 422)
    assert "allowlist" in reason, case_id
    limit = model_body_bytes(api.settings)
    big = api.client.post("/v1/models", headers={**headers,
                          "Content-Length": str(limit + 1)}, content=b"{}")
    _error(big, 413)


def test_registration_as_a_streamed_file(
        api: Api, registered: tuple[str, dict[str, str], dict[str, Any]]) -> None:
    """POST /v1/model-files: the model as a multipart file part (spooled to disk, never held
    whole), options as JSON: the same model as the JSON route, stored as a blob."""
    _network_id, headers = _network(api, "files")
    model = zoo.mlp()
    answer = api.client.post("/v1/model-files", headers=headers,
                             files={"model": ("mlp.onnx", model.onnx_bytes)},
                             data={"options": json.dumps({"calibration_samples": 2})})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["model_sha256"] == registered[2]["model_sha256"]
    assert body["manifest"]["states"] == registered[2]["manifest"]["states"]
    assert body["report"]["segments"]
    key = hashlib.sha256(model.onnx_bytes).hexdigest()
    assert (api.settings.blob_dir / key[:2] / key[2:]).read_bytes() == model.onnx_bytes
    assert not list(api.settings.blob_dir.glob(".incoming.*"))  # nothing left half-written


def test_file_registration_refusals_name_the_part_and_store_nothing(api: Api) -> None:
    _network_id, headers = _network(api, "file-refusals")
    model = zoo.mlp().onnx_bytes
    blobs = sorted(p.name for p in api.settings.blob_dir.rglob("*"))

    def post(files: dict[str, Any] | None, data: dict[str, str] | None = None) -> Any:
        return api.client.post("/v1/model-files", headers=headers, files=files, data=data)

    assert "'model' part is missing" in _error(post(None, {"options": "{}"}), 400)
    assert "'model' file is empty" in _error(post({"model": ("m.onnx", b"")}), 400)
    assert "unknown part 'weights'" in _error(post({"weights": ("w", model)}), 400)
    assert "Too many files" in _error(
        post({"model": ("m.onnx", model), "weights": ("w", b"1")}), 400)
    assert "options: cuts" in _error(
        post({"model": ("m.onnx", model)}, {"options": json.dumps({"cuts": "x"})}), 400)
    assert "options: colour" in _error(
        post({"model": ("m.onnx", model)}, {"options": json.dumps({"colour": 1})}), 400)
    assert "options" in _error(post({"model": ("m.onnx", model)}, {"options": "{"}), 400)
    case_id, builder, _expected, _kwargs = next(h for h in HOSTILE if h[0] == "unknown_op")
    assert "allowlist" in _error(post({"model": ("m.onnx", builder())}), 422), case_id
    too_big = api.settings.max_model_bytes + 1
    with api.client.stream("POST", "/v1/model-files", headers=headers,
                           files={"model": ("big.onnx", io.BytesIO(b"\0" * too_big))}) as big:
        big.read()
        assert "over the limit" in _error(big, 422)
    assert sorted(p.name for p in api.settings.blob_dir.rglob("*")) == blobs


def test_registration_pins_from_the_sample_input_and_reports_each_segment(api: Api) -> None:
    """A real export (symbolic batch, a shape sub-graph) registers from its sample input; the
    answer carries the report. A sample that does not fit the model is a 4xx that names it."""
    _network_id, headers = _network(api, "report")
    folder = SHARED_MODELS / "1l_lppool"
    body = {"onnx_base64": base64.b64encode((folder / "network.onnx").read_bytes()).decode(),
            "calibration_samples": 1,
            "sample_input": json.loads((folder / "input.json").read_text())}
    answer = api.client.post("/v1/models", headers=headers, json=body)
    assert answer.status_code == 201, answer.text
    report = answer.json()["report"]
    assert report["pins"] == ["batch_size=1 (input[0], input file)"]
    assert report["registrable"] and report["refusals"] == []
    [segment] = report["segments"]
    assert segment["input_elements"] == segment["output_elements"] == 12
    assert {"Pow", "AveragePool", "Sign"} <= set(segment["ops"])
    assert segment["logrows"] >= 10 and segment["fits_budget"]
    assert 0 < segment["estimated_peak_bytes"] < api.settings.proving_budget_bytes
    assert answer.json()["manifest"]["model"]["pins"]["shapes"] == {"input": [1, 3, 2, 2]}
    misfit = {**body, "sample_input": {"input_data": [[1.0] * 13]}}
    assert "13 values" in _error(api.client.post("/v1/models", headers=headers, json=misfit),
                                 422)


def test_submit_is_optimistic_idempotent_and_guarded(
    api: Api, registered: tuple[str, dict[str, str], dict[str, Any]]
) -> None:
    network_id, headers, model = registered
    body, _trace = _signed(network_id, model, nonce=1)
    first = api.client.post("/v1/results", headers=headers, json=body)
    assert first.status_code == 202, first.text
    accepted = first.json()
    assert accepted["status"] == "ACCEPTED" and accepted["challenge_deadline"]
    again = api.client.post("/v1/results", headers=headers, json=body)
    assert again.status_code == 200 and again.json()["id"] == accepted["id"]
    # The new result's answer (built without reading it back) is what reading it shows.
    assert accepted["owed_checks"] and accepted["disclosure"]["states"]  # sampled (p = 1)
    assert accepted == again.json()
    assert accepted == api.client.get(f"/v1/results/{accepted['id']}", headers=headers).json()
    replay, _ = _signed(network_id, model, nonce=1, seed=5)
    assert "already used" in _error(api.client.post("/v1/results", headers=headers,
                                                    json=replay), 409)
    expired, _ = _signed(network_id, model, nonce=2, deadline=int(time.time()) - 5)
    _error(api.client.post("/v1/results", headers=headers, json=expired), 403)
    foreign_chain, _ = _signed(network_id, model, nonce=3, chain_id=1)
    assert "domain" in _error(api.client.post("/v1/results", headers=headers,
                                              json=foreign_chain), 403)
    resigned, _ = _signed(network_id, model, nonce=4, key=OTHER)
    _error(api.client.post("/v1/results", headers=headers, json=resigned), 403)
    bad_leaves, _ = _signed(network_id, model, nonce=5)
    bad_leaves["leaves"][1] = "0x" + "99" * 32
    assert "trace root" in _error(api.client.post("/v1/results", headers=headers,
                                                  json=bad_leaves), 400)
    # Another network sees nothing of this one and cannot submit against its model.
    other_id, other_headers = _network(api, "other")
    _error(api.client.get(f"/v1/results/{accepted['id']}", headers=other_headers), 404)
    _error(api.client.get(f"/v1/models/{model['id']}", headers=other_headers), 404)
    theirs, _ = _signed(other_id, model, nonce=6)
    _error(api.client.post("/v1/results", headers=other_headers, json=theirs), 404)
    assert api.client.get("/v1/results", headers=other_headers).json()["items"] == []


def test_a_batch_accepts_or_refuses_each_result_on_its_own(
    api: Api, registered: tuple[str, dict[str, str], dict[str, Any]]
) -> None:
    network_id, headers, model = registered
    good = [_signed(network_id, model, nonce=500 + n, seed=n)[0] for n in range(3)]
    alone, _ = _signed(network_id, model, nonce=510)
    assert api.client.post("/v1/results", headers=headers, json=alone).status_code == 202
    expired, _ = _signed(network_id, model, nonce=511, deadline=int(time.time()) - 5)
    replay, _ = _signed(network_id, model, nonce=500, seed=7)  # the nonce of good[0]
    bad_leaves, _ = _signed(network_id, model, nonce=512)
    bad_leaves["leaves"][1] = "0x" + "99" * 32
    batch = [good[0], expired, good[1], alone, replay, bad_leaves, good[2], good[1]]
    answer = api.client.post("/v1/result-batches", headers=headers, json={"results": batch})
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert [i["status"] for i in out["items"]] == [202, 403, 202, 200, 409, 400, 202, 200]
    assert [i["index"] for i in out["items"]] == list(range(len(batch)))
    assert (out["accepted"], out["refused"]) == (5, 3)
    assert "already used" in out["items"][4]["error"]["reason"]
    assert "trace root" in out["items"][5]["error"]["reason"]
    assert out["items"][7]["id"] == out["items"][2]["id"]  # the same message: one result
    for item in out["items"]:
        if item["error"] is None:  # each accepted one is stored, the refused ones are not
            got = api.client.get(f"/v1/results/{item['id']}", headers=headers).json()
            assert got["status"] == "ACCEPTED" and got["challenge_deadline"]
    listed = {r["id"] for r in api.client.get("/v1/results", headers=headers,
                                              params={"limit": 200}).json()["items"]}
    assert {i["id"] for i in out["items"] if i["id"]} <= listed
    # The batch itself is checked whole: empty, too long, malformed, or without a key.
    _error(api.client.post("/v1/result-batches", headers=headers, json={"results": []}), 422)
    _error(api.client.post("/v1/result-batches", headers=headers,
                           json={"results": [good[0]] * 501}), 422)
    _error(api.client.post("/v1/result-batches", headers=headers,
                           json={"results": [{"model_id": "x"}]}), 422)
    _error(api.client.post("/v1/result-batches", json={"results": [good[0]]}), 401)


def test_trace_upload_and_listing(
    api: Api, registered: tuple[str, dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    network_id, headers, model = registered
    ids = []
    for n in range(3):
        body, trace = _signed(network_id, model, nonce=100 + n, seed=n)
        answer = api.client.post("/v1/results", headers=headers, json=body)
        assert answer.status_code == 202
        ids.append(answer.json()["id"])
        bundle = trace.write(tmp_path / f"t{n}.rtrace").read_bytes()
        uploaded = api.client.put(f"/v1/results/{ids[-1]}/trace", headers=headers,
                                  content=bundle)
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()["trace_uploaded"] is True
    assert api.scheduled[-3:] == ids
    _body, wrong = _signed(network_id, model, nonce=999, seed=42)
    reason = _error(api.client.put(f"/v1/results/{ids[0]}/trace", headers=headers,
                                   content=wrong.write(tmp_path / "w.rtrace").read_bytes()), 400)
    assert "leaves differ" in reason
    _error(api.client.put(f"/v1/results/{ids[0]}/trace", headers=headers, content=b"junk"), 400)
    _error(api.client.put(f"/v1/results/{ids[0]}/trace", headers=headers, content=b""), 400)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/results", headers=headers, params=params).json()
        seen += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    filtered = api.client.get("/v1/results", headers=headers,
                              params={"status": "ACCEPTED", "model_id": model["id"]}).json()
    assert all(r["status"] == "ACCEPTED" for r in filtered["items"])
    _error(api.client.get("/v1/results", headers=headers, params={"status": "NOPE"}), 400)
    _error(api.client.get("/v1/results", headers=headers, params={"cursor": "res_x"}), 400)
