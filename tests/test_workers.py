"""Spot-checks on real Celery worker processes and a real redis-server.

Scenario: a calibrated model, N results with uploaded traces (one perturbed at one state);
every result is sampled (p=1, k=all segments); the worker is killed with SIGKILL mid-task and
restarted, Redis is restarted mid-run; in the end every sampled check is recorded exactly once,
the cheat is challenged by the service at the right steps, honest results finalize and the
disputed one does not.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from challenge.records import (
    Challenge,
    DeadLetter,
    Network,
    RegisteredModel,
    Result,
    ResultStatus,
    SpotCheck,
    new_id,
)
from prover.calibration import calibrate_model
from refute import zoo
from refute.provider import prepare_model, random_inputs, run_trace
from refute.settings import Settings
from refute.trace import Trace
from tests.servers import RedisServer, redis_server
from verifier.db import migrate
from verifier.service import ServiceContext
from verifier.worker import make_celery

pytestmark = [pytest.mark.slow]

N_RESULTS = 6
CHEAT = 3  # index of the result whose trace lies at state 2


@dataclasses.dataclass
class Stack:
    settings: Settings
    ctx: ServiceContext
    redis: RedisServer
    env: dict[str, str]
    workdir: Path


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with redis_server(tmp_path / "redis") as redis:
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'refute.db'}", redis_url=redis.url,
            blob_dir=tmp_path / "blobs", spot_key="5eed" * 8, spotcheck_delay_s=0.7,
            visibility_timeout_s=6, task_time_limit_s=5, finalize_every_s=1.0,
        )
        migrate(settings.database_url)
        env = {**os.environ,
               "REFUTE_DATABASE_URL": settings.database_url, "REFUTE_REDIS_URL": redis.url,
               "REFUTE_BLOB_DIR": str(settings.blob_dir), "REFUTE_SPOT_KEY": settings.spot_key,
               "REFUTE_SPOTCHECK_DELAY_S": "0.7", "REFUTE_VISIBILITY_TIMEOUT_S": "6",
               "REFUTE_TASK_TIME_LIMIT_S": "5", "REFUTE_FINALIZE_EVERY_S": "1"}
        yield Stack(settings, ServiceContext.create(settings), redis, env, tmp_path)


def _start_worker(stack: Stack, queues: str, *, beat: bool = False) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "verifier", "worker", "--queues", queues, "--loglevel",
            "WARNING"]
    if beat:
        args.append("--beat")
    log = (stack.workdir / "worker.log").open("ab")
    return subprocess.Popen(args, env=stack.env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=stack.workdir)


def _kill(worker: subprocess.Popen[bytes]) -> None:
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill(worker)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _seed(stack: Stack, *, window: timedelta) -> tuple[list[str], int]:
    """A calibrated model and N results with traces; returns result ids and segment count."""
    model = zoo.mlp()
    prepared = prepare_model(model.onnx_bytes)
    manifest, _ = calibrate_model(prepared, [random_inputs(prepared.loaded, seed=s)
                                             for s in range(3)])
    prepared = dataclasses.replace(prepared, manifest=manifest)
    n = manifest.num_segments
    now = stack.ctx.clock.now()
    ids = []
    with stack.ctx.sessions() as s, s.begin():
        s.add(Network(id="net_a", name="A", spot_probability=1.0, spot_count=n,
                      challenge_window_s=int(window.total_seconds()), created_at=now))
        s.add(RegisteredModel(id="mdl_a", network_id="net_a", model_sha256=manifest.model_sha256,
                              manifest_sha256=manifest.sha256, manifest=manifest.to_json(),
                              model_blob=stack.ctx.blobs.put(model.onnx_bytes), created_at=now))
        for r in range(N_RESULTS):
            trace = run_trace(prepared, model.sample_input(r))
            if r == CHEAT:
                states = [list(x) for x in trace.states]
                states[2][0] = states[2][0] + 0.75
                trace = Trace.from_states(manifest, states)
            path = trace.write(stack.workdir / f"r{r}.rtrace")
            rid = new_id("res")
            ids.append(rid)
            s.add(Result(
                id=rid, network_id="net_a", model_id="mdl_a", message_hash=f"{r:064x}",
                provider="0x" + "ab" * 20, nonce=str(r), deadline=0, stake="100",
                input_hash="0x" + "00" * 32, output_hash="0x" + "00" * 32,
                trace_root="0x" + trace.commitment.root.hex(),
                leaves=["0x" + leaf.hex() for leaf in trace.commitment.leaves],
                signature="0x" + "00" * 65, status=ResultStatus.ACCEPTED, accepted_at=now,
                challenge_deadline=now + window,
                trace_blob=stack.ctx.blobs.put(path.read_bytes()),
                # What acceptance writes for a network that samples every segment.
                spot_segments=list(range(1, n + 1)), spot_pending=True,
            ))
    return ids, n


def _count(stack: Stack, model: type[SpotCheck] | type[Challenge] | type[DeadLetter]) -> int:
    with stack.ctx.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_kill_restart_and_redis_restart_lose_nothing(stack: Stack) -> None:
    ids, n = _seed(stack, window=timedelta(seconds=20))
    client = make_celery(stack.settings)
    for rid in ids:
        client.send_task("refute.spotcheck", args=[rid])
    expected = N_RESULTS * n

    worker = _start_worker(stack, "spotcheck")
    try:
        _wait(lambda: _count(stack, SpotCheck) >= 2, 120, "the first checks")
        _kill(worker)  # SIGKILL mid-run: the task in flight is neither acked nor recorded twice
        done_at_kill = _count(stack, SpotCheck)
        assert done_at_kill < expected
        stack.redis.stop()  # Redis restarts with its append-only file: nothing queued is lost
        stack.redis.start()
        worker = _start_worker(stack, "spotcheck,timers", beat=True)
        _wait(lambda: _count(stack, SpotCheck) == expected, 240, "every sampled check")
        time.sleep(3)  # redeliveries that arrive late must not add rows
        assert _count(stack, SpotCheck) == expected
        assert _count(stack, DeadLetter) == 0
        with stack.ctx.sessions() as s:
            pairs = s.execute(select(SpotCheck.result_id, SpotCheck.segment)).all()
            assert len(set(pairs)) == expected
            challenges = s.scalars(select(Challenge)).all()
            assert {(c.result_id, c.lo, c.hi) for c in challenges} == {
                (ids[CHEAT], 1, 2), (ids[CHEAT], 2, 3)
            }
            assert all(c.filed_by == "service" for c in challenges)
        # Windows close: honest results finalize (scheduler in the restarted worker), the
        # disputed one never does.
        def finalized() -> bool:
            with stack.ctx.sessions() as s:
                rows = s.scalars(select(Result)).all()
                return all(r.status is ResultStatus.FINALIZED for r in rows if r.id != ids[CHEAT])

        _wait(finalized, 90, "honest results to finalize")
        with stack.ctx.sessions() as s:
            cheat = s.get(Result, ids[CHEAT])
            assert cheat is not None and cheat.status is ResultStatus.DISPUTED
    finally:
        _stop(worker)


def test_redelivery_cap_writes_a_dead_letter(tmp_path: Path) -> None:
    """A message delivered more often than the cap (a worker that keeps dying on it) is recorded
    as a dead letter once and not run again."""
    from verifier.worker import admit_delivery

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'dl.db'}",
                        blob_dir=tmp_path / "b", max_deliveries=3)
    migrate(settings.database_url)
    ctx = ServiceContext.create(settings)
    outcomes = [admit_delivery(ctx, "task-1", "refute.spotcheck", ["res_x"]) for _ in range(5)]
    assert outcomes == [True, True, True, False, False]
    with ctx.sessions() as s:
        letters = s.scalars(select(DeadLetter)).all()
        assert len(letters) == 1 and letters[0].args == ["res_x"]
        assert letters[0].deliveries == 4
    assert admit_delivery(ctx, "task-2", "refute.spotcheck", ["res_y"])
