"""Registration is isolated per request: bounded in time and memory, a dead child fails only its
own request, and admission is bounded (issue 9, finding 5).

Everything goes through the real API (FastAPI's TestClient over ``create_app``) with the real
spawned registration children; the bounds are set small through the settings.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from challenge.fakes import FakeTasks
from refute.errors import ModelRejected, UnprovableModel
from refute.settings import Settings
from tests.hostile_models import (
    matmul_chain,
    overflowing_model,
    padded_state_hog,
    unprovable_conv,
    valid_model_bytes,
)
from verifier.api.app import create_app
from verifier.db import migrate
from verifier.registry import RegistrationBusy, RegistrationLimits, _Gate, build_registration
from verifier.service import ServiceContext

ADMIN = "admin-secret"


@dataclass
class Api:
    client: TestClient
    settings: Settings


@contextmanager
def _api(tmp_path: Path, **limits: Any) -> Iterator[Api]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'api.db'}",
                        blob_dir=tmp_path / "blobs", spot_key="ab" * 16,
                        redis_url="redis://127.0.0.1:1/0", **limits)
    migrate(settings.database_url)
    context = ServiceContext.create(settings, tasks=FakeTasks())
    with ExitStack() as stack:
        stack.callback(context.engine.dispose)
        app = create_app(context, admin_token=ADMIN)
        client = stack.enter_context(TestClient(app, raise_server_exceptions=False))
        yield Api(client, settings)


def _network(api: Api, name: str) -> dict[str, str]:
    answer = api.client.post("/v1/networks", json={"name": name},
                             headers={"X-Admin-Token": ADMIN})
    assert answer.status_code == 201, answer.text
    return {"X-API-Key": answer.json()["api_key"]}


def _register(api: Api, headers: dict[str, str], data: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = api.client.post("/v1/models", headers=headers, json={
        "onnx_base64": base64.b64encode(data).decode(), "calibration_samples": 1})
    return answer, time.monotonic() - started


class _InThread:
    """A registration running in a thread (the TestClient is called from several at once)."""

    def __init__(self, api: Api, headers: dict[str, str], data: bytes) -> None:
        self.result: tuple[httpx.Response, float] | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(api, headers, data), daemon=True)
        self._thread.start()

    def _run(self, api: Api, headers: dict[str, str], data: bytes) -> None:
        self.result = _register(api, headers, data)
        self.finished_at = time.monotonic()

    def join(self, timeout: float) -> tuple[httpx.Response, float]:
        self._thread.join(timeout)
        assert self.result is not None, "the registration did not answer in time"
        return self.result


def _error(answer: httpx.Response, status: int, code: str) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    reason = body["error"]["reason"]
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert "Traceback" not in answer.text
    return reason


def _registration_children() -> list[int]:
    """Pids of this process's spawned children (the registration processes)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _wait_for_child(deadline_s: float, before: set[int]) -> int:
    """The first spawned child of this process not in ``before`` (other tests' pools)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        children = [pid for pid in _registration_children() if pid not in before]
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("no registration child appeared")


def _new_children(before: set[int]) -> set[int]:
    return set(_registration_children()) - before


@pytest.mark.slow
def test_slow_model_is_stopped_while_another_network_registers(tmp_path: Path) -> None:
    """The 4,096-MatMul model runs into the time bound; a small model of another network,
    submitted while it runs, registers meanwhile (it does not wait for the slow one)."""
    timeout_s = 20.0
    with _api(tmp_path, registration_timeout_s=timeout_s, registrations_concurrent=2,
              registration_memory_mb=16384) as api:
        before = set(_registration_children())
        hostile = _InThread(api, _network(api, "hostile"), matmul_chain())
        _wait_for_child(10.0, before)
        honest, honest_s = _register(api, _network(api, "honest"), valid_model_bytes())
        honest_done = time.monotonic()
        slow, slow_s = hostile.join(timeout_s + 30.0)
    print(f"small model registered in {honest_s:.1f} s; slow model answered after {slow_s:.1f} s")
    assert honest.status_code == 201, honest.text
    assert honest.json()["manifest"]["model"]["sha256"]
    assert honest_s < timeout_s, f"the small model took {honest_s:.1f} s"
    assert honest_done < hostile.finished_at, "the small model waited for the slow one"
    reason = _error(slow, 422, "registration_timeout")
    assert "20 s" in reason
    assert timeout_s <= slow_s < timeout_s + 15.0, f"stopped after {slow_s:.1f} s"
    assert _new_children(before) == set()


@pytest.mark.slow
def test_killed_child_fails_its_request_only(tmp_path: Path) -> None:
    """A registration whose child is SIGKILLed (as the OOM killer would) answers a clear error;
    meanwhile the same network's second registration is refused as busy (503, Retry-After); the
    next registration after the kill succeeds."""
    with _api(tmp_path, registration_timeout_s=60.0, registration_memory_mb=16384,
              registrations_concurrent=1,
              registrations_queued=0) as api:
        headers = _network(api, "victim")
        before = set(_registration_children())
        running = _InThread(api, headers, matmul_chain())
        child = _wait_for_child(10.0, before)
        busy, _ = _register(api, headers, valid_model_bytes())
        reason = _error(busy, 503, "registration_busy")
        assert "running" in reason
        assert int(busy.headers["Retry-After"]) >= 1
        other, _ = _register(api, _network(api, "other"), valid_model_bytes())
        _error(other, 503, "registration_busy")
        os.kill(child, signal.SIGKILL)
        killed, killed_s = running.join(30.0)
        reason = _error(killed, 422, "registration_crashed")
        assert "SIGKILL" in reason
        assert killed_s < 30.0
        after, _ = _register(api, headers, valid_model_bytes())
    assert after.status_code == 201, after.text
    assert _new_children(before) == set()


@pytest.mark.slow
def test_memory_hog_is_refused_by_the_memory_bound(tmp_path: Path) -> None:
    before = set(_registration_children())
    with _api(tmp_path, registration_timeout_s=120.0, registration_memory_mb=1200) as api:
        answer, seconds = _register(api, _network(api, "hog"), padded_state_hog())
    reason = _error(answer, 422, "registration_memory")
    assert "1200 MB" in reason
    assert seconds < 120.0
    assert _new_children(before) == set()


def test_admission_is_bounded() -> None:
    """One slot, one queue place, one registration per network: a second network waits for the
    slot, a third is refused at once (Retry-After), and the waiter runs when the slot frees."""
    gate = _Gate(RegistrationLimits(timeout_s=10.0, concurrent=1, queued=1, per_network=1))
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def first() -> None:
        with gate.slot("a"):
            order.append("a")
            holding.set()
            release.wait(10.0)

    def second() -> None:
        with gate.slot("b"):
            order.append("b")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert holding.wait(5.0)
    threads[1].start()
    end = time.monotonic() + 5.0
    while gate._waiting == 0 and time.monotonic() < end:
        time.sleep(0.01)
    assert gate._waiting == 1
    with pytest.raises(RegistrationBusy) as busy, gate.slot("c"):
        pass
    assert busy.value.retry_after_s >= 1 and "waiting" in busy.value.reason
    with pytest.raises(RegistrationBusy) as same, gate.slot("a"):
        pass
    assert "already has 1" in same.value.reason
    release.set()
    for thread in threads:
        thread.join(5.0)
    assert order == ["a", "b"]
    with gate.slot("c"):
        assert gate._running == {"c": 1}
    assert gate._running == {}


@pytest.mark.slow
def test_overflowing_model_is_refused_not_crashed() -> None:
    """Finite weights, but Exp(1e9 · x) is infinite on ordinary inputs: refused with a reason
    (was: an OverflowError inside calibration)."""
    with pytest.raises(ModelRejected) as info:
        build_registration(overflowing_model(), {"calibration_samples": 1})
    assert "infinite" in info.value.reason and "\n" not in info.value.reason


@pytest.mark.slow
def test_conv_without_strides_registers_with_explicit_strides() -> None:
    """EZKL 23 cannot build a Conv without ``strides`` (this model used to be refused with
    "missing required params: stride"); the canonical model writes ONNX's default out."""
    built = build_registration(unprovable_conv(), {"calibration_samples": 1})
    [segment] = built["report"]["segments"]
    assert segment["reason"] is None and segment["logrows"] > 0
    assert built["manifest"]["tolerances"][0] >= 1


@pytest.mark.slow
def test_segment_over_the_proving_budget_is_refused_with_its_estimate() -> None:
    """DESIGN, registration step 4: a segment that cannot be proven within the proving budget is
    refused at registration, as a rejected model (422), never discovered in a dispute."""
    with pytest.raises(UnprovableModel) as info:
        build_registration(unprovable_conv(), {"calibration_samples": 1,
                                               "proving_budget_bytes": 2**20})
    assert info.value.reason.startswith("segment 1 cannot be proven: its circuit (logrows ")
    assert "over the proving budget of 0.0 GiB" in info.value.reason
    # The refusal says what tiling could do: under a 1 MiB budget, no circuit at all.
    assert info.value.reason.endswith("; it cannot be tiled within the budget either: no "
                                      "circuit of 2^10 rows is estimated to fit it")
    assert "\n" not in info.value.reason
