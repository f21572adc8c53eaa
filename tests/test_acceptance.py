"""Result acceptance under concurrency: a batch that loses a race on PostgreSQL is accepted
result by result, and each message and nonce is still taken once."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from challenge.messages import Domain
from challenge.records import ApiKey, Network, Result
from refute.errors import Conflict, RefuteError
from tests.dispute_world import make_world
from tests.servers import postgres_server
from tests.signing import signed_result
from verifier.api.app import create_app
from verifier.api.schemas import ResultSubmit
from verifier.auth import new_api_key
from verifier.results import Outcome, submit_results

pytestmark = [pytest.mark.slow]

DOMAIN = Domain(chain_id=31337)


def test_a_batch_that_loses_a_race_is_accepted_result_by_result(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="verifier.results")
    with postgres_server() as url:
        world = make_world(tmp_path, network_id="net-race", model_id="mod-race", ezkl=False,
                           database_url=url)
        manifest = world.prepared.manifest
        model = {"id": world.model_id, "model_sha256": manifest.model_sha256,
                 "manifest": manifest.to_json()}
        first, trace = signed_result(world.network_id, model, nonce=1)

        def body(nonce: int, *, other: bool = False) -> ResultSubmit:
            """A signed result with ``nonce``; ``other``: another message (deadline) with it."""
            deadline = int(time.time()) + (900 if other else 600)
            signed, _ = signed_result(world.network_id, model, nonce=nonce, trace=trace,
                                      deadline=deadline)
            return ResultSubmit.model_validate(signed)

        ours = [ResultSubmit.model_validate(first), body(2), body(3)]
        theirs = [ResultSubmit.model_validate(first), body(2, other=True), body(4)]
        now = datetime.now(UTC)
        sessions = world.ctx.sessions
        outcome: dict[str, list[Outcome]] = {}

        def submit(batch: list[ResultSubmit], session: Any, key: str) -> None:
            network = session.get(Network, world.network_id)
            outcome[key] = submit_results(session, network, batch, domain=DOMAIN, now=now,
                                          spot_key=b"\xab" * 16)

        with sessions() as a:
            submit(ours, a, "ours")  # inserted, not committed: its unique keys are held
            with sessions() as b:
                def race() -> None:
                    submit(theirs, b, "theirs")
                    b.commit()

                racing = threading.Thread(target=race)
                racing.start()
                time.sleep(1.5)
                assert racing.is_alive()  # waiting on our uncommitted message and nonce
                a.commit()
                racing.join(timeout=60)
                assert not racing.is_alive()
        assert "checking it again" in caplog.text  # their batch lost the race and was retried
        mine = [o for o in outcome["ours"] if not isinstance(o, RefuteError)]
        assert [created for _, created in mine] == [True, True, True]
        theirs_out = outcome["theirs"]
        same = theirs_out[0]
        assert not isinstance(same, RefuteError)
        assert same[0].id == mine[0][0].id and same[1] is False  # the same message: one result
        assert isinstance(theirs_out[1], Conflict)  # nonce 2 was taken by our message
        assert "already used" in theirs_out[1].reason
        fresh = theirs_out[2]
        assert not isinstance(fresh, RefuteError) and fresh[1] is True
        with sessions() as s:
            nonces = sorted(int(n) for n in s.scalars(
                Result.__table__.select().with_only_columns(Result.nonce)))
        assert nonces == [1, 2, 3, 4]
        world.ctx.engine.dispose()


def test_concurrent_writers_on_sqlite_wait_their_turn(tmp_path: Path) -> None:
    """Four clients submitting at once to one SQLite database: every result is accepted. (A
    request reads its network, then writes; begun deferred, the write was refused at once with
    "database is locked" whenever another request wrote meanwhile: a 500.)"""
    world = make_world(tmp_path, network_id="net-lock", model_id="mod-lock", ezkl=False)
    token, key_hash = new_api_key()
    with world.ctx.sessions() as s, s.begin():
        s.add(ApiKey(network_id=world.network_id, key_hash=key_hash,
                     created_at=datetime.now(UTC)))
    manifest = world.prepared.manifest
    model = {"id": world.model_id, "model_sha256": manifest.model_sha256,
             "manifest": manifest.to_json()}
    _, trace = signed_result(world.network_id, model, nonce=0)
    bodies = [signed_result(world.network_id, model, nonce=n, trace=trace)[0]
              for n in range(1, 49)]
    app = create_app(world.ctx)
    statuses: list[int] = []

    def client(part: list[dict[str, Any]]) -> None:
        with TestClient(app, raise_server_exceptions=False) as http:
            for body in part[:8]:
                statuses.append(http.post("/v1/results", json=body,
                                          headers={"X-API-Key": token}).status_code)
            answer = http.post("/v1/result-batches", json={"results": part[8:]},
                               headers={"X-API-Key": token})
            statuses.append(answer.status_code)
            statuses.extend(item["status"] for item in answer.json().get("items", []))

    threads = [threading.Thread(target=client, args=(bodies[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(set(statuses)) == [200, 202], statuses  # 200: each batch's own status
    with world.ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == 48
    world.ctx.engine.dispose()
