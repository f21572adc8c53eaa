"""Result lifecycle (issue 9, findings 3 and 4): the checks a result owes are written with its
acceptance, a lost task is swept and queued again, a result never finalizes with a sampled check
missing, and withholding the trace never avoids a check (the sampled states are disclosed on
request, or the step is challenged and the silent provider times out).

In process, over a real SQLite database, blob store, ONNX Runtime and the API; the real Celery
and Redis path with kills is the fault drill (tests/test_fault_drill.py).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from challenge.fakes import FakeTasks
from challenge.orchestrator import tick_due
from challenge.records import Dispute, Result, SpotCheck, WebhookDelivery
from prover.calibration import calibrate_model
from refute import zoo
from refute.disclosure import state_pieces, write_states
from refute.manifest import Manifest
from refute.provider import prepare_model, random_inputs
from refute.settings import Settings
from refute.trace import Trace
from tests.signing import signed_result
from verifier.api.app import create_app
from verifier.db import migrate
from verifier.lifecycle import sweep
from verifier.registry import store_model
from verifier.service import ServiceContext, finalize_due, run_spotcheck

ADMIN = "admin"


@dataclasses.dataclass
class Service:
    ctx: ServiceContext
    client: TestClient
    scheduled: list[str]
    tasks: FakeTasks
    model: dict[str, Any]
    manifest: Manifest


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("lifecycle")
    settings = Settings(database_url=f"sqlite:///{workdir / 'l.db'}",
                        blob_dir=workdir / "blobs", spot_key="ab" * 16,
                        redis_url="redis://127.0.0.1:1/0",
                        dispute_provider_clock_s=30.0)
    migrate(settings.database_url)
    tasks = FakeTasks()
    ctx = ServiceContext.create(settings, tasks=tasks)
    client = TestClient(create_app(ctx, admin_token=ADMIN),
                        raise_server_exceptions=False)
    model = zoo.mlp()
    prepared = prepare_model(model.onnx_bytes)
    manifest, _ = calibrate_model(prepared, [random_inputs(prepared.loaded, seed=s)
                                             for s in range(2)])
    yield Service(ctx, client, tasks.spotchecks, tasks, {}, manifest)
    ctx.engine.dispose()


def _network(service: Service, **policy: Any) -> tuple[str, dict[str, str]]:
    answer = service.client.post("/v1/networks", json={"name": "n", **policy},
                                 headers={"X-Admin-Token": ADMIN})
    assert answer.status_code == 201, answer.text
    network_id = answer.json()["id"]
    with service.ctx.sessions() as s, s.begin():  # registered as calibrated once, in process
        row = store_model(s, service.ctx.blobs, network_id=network_id,
                          data=zoo.mlp().onnx_bytes, manifest=service.manifest.to_json(),
                          manifest_sha256=service.manifest.sha256, now=datetime.now(UTC))
        s.flush()
        service.model = {"id": row.id, "model_sha256": row.model_sha256,
                         "manifest": row.manifest}
    return network_id, {"X-API-Key": answer.json()["api_key"]}


_nonce = iter(range(1, 10_000))


def _submit(service: Service, network_id: str, headers: dict[str, str], *,
            lie_at: int | None = None) -> tuple[str, Trace]:
    body, trace = signed_result(network_id, service.model, nonce=next(_nonce),
                                seed=next(_nonce))
    if lie_at is not None:  # commit to a lie: state lie_at off by far more than 2τ
        states = [list(s) for s in trace.states]
        states[lie_at][0] = states[lie_at][0] + 4.0
        trace = Trace.from_states(service.manifest, states)
        body, _ = signed_result(network_id, service.model, nonce=next(_nonce), trace=trace)
    answer = service.client.post("/v1/results", json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"], trace


def _row(service: Service, rid: str) -> Result:
    with service.ctx.sessions() as s:
        row = s.get(Result, rid)
        assert row is not None
        s.expunge(row)
        return row


def _later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_acceptance_writes_the_owed_checks_and_finalization_waits_for_them(
        service: Service) -> None:
    network_id, headers = _network(service, spot_probability=1.0, spot_count=3,
                                   challenge_window_s=60)
    rid, trace = _submit(service, network_id, headers)
    row = _row(service, rid)
    assert sorted(row.spot_segments) == [1, 2, 3] and row.spot_pending
    view = service.client.get(f"/v1/results/{rid}", headers=headers).json()
    assert view["owed_checks"] == [1, 2, 3]
    assert view["disclosure"]["states"] == [0, 1, 2, 3]
    with service.ctx.sessions() as s:  # the provider is asked for the states (durable outbox)
        assert s.scalars(select(WebhookDelivery)).first() is None  # no endpoint registered
    # The window closes before any check ran: the result must not finalize.
    assert finalize_due(service.ctx, _later(120)) == 0
    upload = service.client.put(f"/v1/results/{rid}/trace", headers=headers,
                                content=trace.write(Path(service.ctx.settings.blob_dir).parent
                                                    / f"{rid}.rtrace").read_bytes())
    assert upload.status_code == 200, upload.text
    assert service.scheduled[-1] == rid
    assert finalize_due(service.ctx, _later(120)) == 0
    assert len(run_spotcheck(service.ctx, rid, datetime.now(UTC))) == 3
    assert not _row(service, rid).spot_pending
    assert finalize_due(service.ctx, _later(120)) == 1
    assert _row(service, rid).status.value == "FINALIZED"


def test_a_broker_outage_at_upload_answers_200_and_the_sweep_queues_the_check(
        service: Service, tmp_path: Path) -> None:
    network_id, headers = _network(service, spot_probability=1.0, spot_count=1,
                                   challenge_window_s=60)
    rid, trace = _submit(service, network_id, headers)
    service.tasks.down = True
    try:
        upload = service.client.put(f"/v1/results/{rid}/trace", headers=headers,
                                    content=trace.write(tmp_path / "t.rtrace").read_bytes())
    finally:
        service.tasks.down = False
    assert upload.status_code == 200, upload.text  # committed, and said so (was: 500)
    assert rid not in service.scheduled and _row(service, rid).spot_queued_at is None
    queued: list[str] = []
    assert rid in sweep(service.ctx, datetime.now(UTC), queued.append).queued
    assert rid in queued
    queued.clear()
    sweep(service.ctx, datetime.now(UTC), queued.append)
    assert rid not in queued  # queued once per requeue period, not on every beat
    later = _later(service.ctx.settings.spotcheck_requeue_after_s + 1)
    sweep(service.ctx, later, queued.append)
    assert rid in queued  # the task was lost again (say, with Redis): queued again
    run_spotcheck(service.ctx, rid, datetime.now(UTC))
    queued.clear()
    sweep(service.ctx, _later(2 * service.ctx.settings.spotcheck_requeue_after_s + 2),
          queued.append)
    assert rid not in queued  # recorded: nothing owed any more


def test_an_honest_provider_discloses_only_the_sampled_states_and_finalizes(
        service: Service) -> None:
    network_id, headers = _network(service, spot_probability=1.0, spot_count=1,
                                   challenge_window_s=60)
    rid, trace = _submit(service, network_id, headers)
    wanted = service.client.get(f"/v1/results/{rid}", headers=headers).json()["disclosure"]
    assert len(wanted["states"]) == 2
    k0, k1 = wanted["states"]
    lying = [np.asarray(t) + 1.0 for t in trace.states[k1]]
    refused = service.client.put(f"/v1/results/{rid}/states", headers=headers,
                                 content=write_states(service.manifest,
                                                      {k0: trace.states[k0], k1: lying}))
    assert refused.status_code == 400 and "leaf" in refused.json()["error"]["reason"]
    assert _row(service, rid).spot_pending  # nothing written
    answer = service.client.put(f"/v1/results/{rid}/states", headers=headers,
                                content=write_states(service.manifest,
                                                     {k: trace.states[k] for k in (k0, k1)}))
    assert answer.status_code == 200, answer.text
    assert answer.json()["disclosure"] is None and service.scheduled[-1] == rid
    checks = run_spotcheck(service.ctx, rid, datetime.now(UTC))
    assert [c.finding.value for c in checks] == ["PASS"]
    assert finalize_due(service.ctx, _later(120)) >= 1
    assert _row(service, rid).status.value == "FINALIZED"


def test_states_disclosed_one_by_one_are_verified_as_they_arrive(service: Service) -> None:
    """The per-state route takes a state's canonical bytes (the bytes its leaf hashes); a lie,
    a forged header, a wrong length or a state that does not exist is refused with the reason
    and records nothing; the honest states, sent one at a time, settle the disclosure."""
    network_id, headers = _network(service, spot_probability=1.0, spot_count=1,
                                   challenge_window_s=60)
    rid, trace = _submit(service, network_id, headers)
    k0, k1 = service.client.get(f"/v1/results/{rid}",
                                headers=headers).json()["disclosure"]["states"]

    def put(k: int, body: bytes) -> Any:
        return service.client.put(f"/v1/results/{rid}/states/{k}", content=body,
                                  headers={**headers, "Content-Type": "application/octet-stream"})

    def canonical(state: Sequence[np.ndarray]) -> bytes:
        return b"".join(bytes(piece) for piece in state_pieces(state))

    honest = canonical(trace.states[k1])
    lying = canonical([np.asarray(t) + 1.0 for t in trace.states[k1]])
    shape = trace.states[k1][0].shape
    forged = bytearray(honest)  # the same values under another header: another leaf
    forged[8:16] = struct.pack("<Q", shape[0] + 1)
    for k, body, status, reason in [
            (k1, lying, 400, "leaf"), (k1, bytes(forged), 400, "leaf"),
            (k1, honest[:-4], 400, "bytes in its canonical layout"),
            (k1, honest + b"\0" * 4, 413, "limited to"),
            (len(trace.states), honest, 400, "does not exist")]:
        answer = put(k, body)
        assert answer.status_code == status, answer.text
        assert reason in answer.json()["error"]["reason"]
    assert _row(service, rid).spot_pending  # nothing written
    assert put(k0, canonical(trace.states[k0])).status_code == 200
    assert service.client.get(f"/v1/results/{rid}",
                              headers=headers).json()["disclosure"]["states"] == [k1]
    answer = put(k1, honest)
    assert answer.status_code == 200, answer.text
    assert answer.json()["disclosure"] is None and service.scheduled[-1] == rid
    assert put(k1, honest).status_code == 200  # idempotent
    checks = run_spotcheck(service.ctx, rid, datetime.now(UTC))
    assert [c.finding.value for c in checks] == ["PASS"]
    assert finalize_due(service.ctx, _later(120)) >= 1
    assert _row(service, rid).status.value == "FINALIZED"


def test_a_lying_provider_that_discloses_its_states_is_caught(service: Service) -> None:
    network_id, headers = _network(service, spot_probability=1.0, spot_count=3,
                                   challenge_window_s=60)
    rid, trace = _submit(service, network_id, headers, lie_at=2)
    answer = service.client.put(f"/v1/results/{rid}/states", headers=headers,
                                content=write_states(service.manifest,
                                                     dict(enumerate(trace.states))))
    assert answer.status_code == 200, answer.text
    checks = run_spotcheck(service.ctx, rid, datetime.now(UTC))
    assert {c.segment: c.finding.value for c in checks}[2] == "FAULT"
    assert _row(service, rid).status.value == "DISPUTED"
    assert finalize_due(service.ctx, _later(120)) == 0
    # The worker died between recording the fault and opening its dispute: the sweep opens it.
    recovered = sweep(service.ctx, _later(service.ctx.settings.dispute_resume_after_s + 1),
                      lambda _r: None).recovered
    with service.ctx.sessions() as s:
        steps = {(d.lo, d.hi) for d in s.scalars(select(Dispute).where(
            Dispute.result_id == rid, Dispute.challenger == "service"))}
        assert {d for d in recovered if s.get(Dispute, d).result_id == rid}  # type: ignore[union-attr]
    assert (1, 2) in steps


def test_withholding_the_trace_gets_the_step_challenged_and_the_provider_times_out(
        service: Service) -> None:
    network_id, headers = _network(service, spot_probability=1.0, spot_count=1,
                                   challenge_window_s=60, disclosure_window_s=10)
    rid, _trace = _submit(service, network_id, headers, lie_at=1)
    step = _row(service, rid).spot_segments[0]
    assert run_spotcheck(service.ctx, rid, datetime.now(UTC)) == []  # nothing to check yet
    assert sweep(service.ctx, _later(5), lambda _r: None).challenged == []  # not yet due
    report = sweep(service.ctx, _later(11), lambda _r: None)
    assert len(report.challenged) == 1
    with service.ctx.sessions() as s:
        dispute = s.get(Dispute, report.challenged[0])
        assert dispute is not None
        assert (dispute.challenger, dispute.lo, dispute.hi) == ("service", step - 1, step)
        assert dispute.state["phase"] == "disclose"
    assert sweep(service.ctx, _later(12), lambda _r: None).challenged == []  # once
    assert finalize_due(service.ctx, _later(120)) == 0
    assert tick_due(service.ctx.disputes, _later(11 + 31)) >= 1  # the provider's 30 s clock ran out
    assert _row(service, rid).status.value == "PROVIDER_FAULT"
    with service.ctx.sessions() as s:
        verdict = s.scalars(select(Dispute.verdict).where(Dispute.result_id == rid)).one()
        assert verdict == "PROVIDER_TIMEOUT"
        assert s.scalars(select(SpotCheck).where(SpotCheck.result_id == rid)).first() is None


def test_states_disclosed_after_the_window_move_the_dispute_on(service: Service) -> None:
    """The drill's finding: an honest provider kept from the API past its disclosure window is
    challenged at the step; the states it then discloses (not a whole trace) satisfy the
    dispute's DISCLOSE phase on its clock, and the step goes to its proof."""
    network_id, headers = _network(service, spot_probability=1.0, spot_count=1,
                                   challenge_window_s=60, disclosure_window_s=10)
    rid, trace = _submit(service, network_id, headers)
    [dispute_id] = sweep(service.ctx, _later(11), lambda _r: None).challenged
    wanted = service.client.get(f"/v1/results/{rid}", headers=headers).json()["disclosure"]
    assert wanted is None  # challenged: the dispute asks now, on the provider's clock
    with service.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None
        lo, hi = dispute.lo, dispute.hi
    answer = service.client.put(f"/v1/results/{rid}/states", headers=headers,
                                content=write_states(service.manifest,
                                                     {k: trace.states[k] for k in (lo, hi)}))
    assert answer.status_code == 200, answer.text
    with service.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.state["phase"] == "step_proof"
        assert dispute.proof_requeued_at is not None  # queued (schedule_proof of the app)
    assert tick_due(service.ctx.disputes, _later(11 + 31)) >= 0
    assert _row(service, rid).status.value == "DISPUTED"  # no timeout: it disclosed in time


def test_a_proof_never_queued_is_queued_at_the_next_beat(service: Service) -> None:
    """The drill's finding: Redis was down when a dispute reached its proof; the proof must be
    queued as soon as the broker is back, not after the visibility timeout (by which time the
    dispute had aborted and the liar finalized)."""
    from challenge.orchestrator import open_dispute, resume_stalled

    network_id, headers = _network(service, spot_probability=0.0, challenge_window_s=60)
    rid, trace = _submit(service, network_id, headers, lie_at=2)
    assert service.client.put(f"/v1/results/{rid}/trace", headers=headers,
                              content=trace.write(Path(service.ctx.settings.blob_dir).parent
                                                  / f"{rid}.rtrace").read_bytes()
                              ).status_code == 200
    service.tasks.down = True  # Redis is down when the dispute reaches its proof
    dispute_id = open_dispute(service.ctx.disputes, rid, challenger="service", lo=1, hi=2,
                              bond=1, now=datetime.now(UTC))
    service.tasks.down = False
    with service.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.state["phase"] == "step_proof"
        assert dispute.proof_requeued_at is None  # committed, never queued
    queued = service.tasks.proofs
    queued.clear()
    grace = service.ctx.settings.dispute_resume_after_s
    assert dispute_id in resume_stalled(service.ctx.disputes, _later(grace + 1))
    assert queued == [dispute_id]
    queued.clear()
    resume_stalled(service.ctx.disputes, _later(grace + 2))
    assert queued == []  # queued now: the broker's redelivery takes over


def test_an_aborted_dispute_of_a_spot_check_fault_never_finalizes_the_result(
        service: Service) -> None:
    """A dispute the service opened on its own spot-check fault aborts (its proof never came):
    the fault stays on record, and the result is held, never finalized."""
    network_id, headers = _network(service, spot_probability=1.0, spot_count=3,
                                   challenge_window_s=60)
    rid, trace = _submit(service, network_id, headers, lie_at=2)
    assert service.client.put(f"/v1/results/{rid}/trace", headers=headers,
                              content=trace.write(Path(service.ctx.settings.blob_dir).parent
                                                  / f"{rid}.rtrace").read_bytes()
                              ).status_code == 200
    run_spotcheck(service.ctx, rid, datetime.now(UTC))
    from verifier.lifecycle import watch_faults

    disputes = watch_faults(service.ctx, rid, datetime.now(UTC))
    assert disputes
    timeout = service.ctx.settings.dispute_proof_timeout_s
    tick_due(service.ctx.disputes, _later(timeout + 1))
    with service.ctx.sessions() as s:
        verdicts = set(s.scalars(select(Dispute.verdict).where(Dispute.result_id == rid)))
    assert verdicts == {"ABORTED"}
    assert _row(service, rid).status.value == "DISPUTED"
    finalize_due(service.ctx, _later(timeout + 120))
    assert _row(service, rid).status.value == "DISPUTED"
