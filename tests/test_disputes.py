"""The dispute matrix in one process, on the ports' fakes (:mod:`challenge.fakes`): the watcher
bisects a cheating trace and the step's proof convicts it; a dishonest challenger loses against an
honest provider; each party times out; a crash resumes; a conviction closes the other disputes.
The ledger balances and the transcript verifies after every move. The fake prover measures what
a proof would establish by re-executing the step, so these run in seconds; the tests that replay
an exported dispute (which verifies the proofs themselves) run on real EZKL proofs (``ezkl``)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from fastapi.testclient import TestClient
from sqlalchemy import select

from challenge import orchestrator
from challenge.books import all_books, load_ledger
from challenge.fakes import FakeProver
from challenge.game import Actor, Answer, Choice, RequestReveal, TimeControl
from challenge.orchestrator import load_transcript, open_dispute, prove_pending
from challenge.records import Dispute, Network, Result, ResultStatus
from challenge.replay import archive_bytes, replay
from challenge.whistleblower import Whistleblower
from prover.adapter import EzklProofs
from refute import zoo
from refute.errors import RefuteError
from refute.trace import Trace
from tests.dispute_world import World, add_result, make_world
from verifier.accounts import add_api_key
from verifier.api.app import create_app


@pytest.fixture(scope="module")
def fake_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The service with the fake prover: every dispute of the matrix in milliseconds."""
    return make_world(tmp_path_factory.mktemp("disputes"), network_id="net_d",
                      model_id="mdl_d", ezkl=False)


@pytest.fixture(scope="module")
def ezkl_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The service with the EZKL prover (calibrated circuits, real proofs)."""
    return make_world(tmp_path_factory.mktemp("disputes-ezkl"), network_id="net_d",
                      model_id="mdl_d", ezkl=True)


@pytest.fixture
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """The fake world, or the EZKL one for a test marked ``ezkl`` (or parametrized with
    ``BOTH_PROVERS``); its task queue is empty."""
    ezkl = getattr(request, "param", None) == "ezkl" or (
        not hasattr(request, "param") and request.node.get_closest_marker("ezkl") is not None)
    chosen: World = request.getfixturevalue("ezkl_world" if ezkl else "fake_world")
    chosen.tasks.clear()
    yield chosen
    chosen.tasks.clear()


#: Run a test on the fakes, and again on real EZKL proofs (slow), replaying its bundle there.
BOTH_PROVERS = pytest.mark.parametrize(
    "world", ["fake", pytest.param("ezkl", marks=[pytest.mark.slow, pytest.mark.ezkl])],
    indirect=True)


def _real_proofs(world: World) -> bool:
    """Whether ``world`` proves with EZKL (its bundles replay; the fakes' proofs do not)."""
    return isinstance(world.disputes.prover, EzklProofs)


def _proving_at_once(world: World) -> None:
    """Proofs run as soon as they are queued (a worker picks them up at once)."""
    world.tasks.inline["proofs"] = lambda d: _prove_now(world, d)


def _result(world: World, *, lie_at: int | None, upload: bool = True, seed: int = 0,
            out_of_range_at: int | None = None, rounded: bool = False) -> str:
    return add_result(world, seed=seed, lie_at=lie_at, out_of_range_at=out_of_range_at,
                      upload=upload, rounded=rounded)


@pytest.fixture(autouse=True)
def books_checked_after_every_move(world: World, monkeypatch: pytest.MonkeyPatch
                                   ) -> Iterator[list[str]]:
    """Every move the orchestrator applies (API, watcher, prover, timers) is followed by a check
    that the bonds ledger balances; the test fails on the first move that unbalances it."""
    applied: list[str] = []
    original = orchestrator.move

    def checked(*args: Any, **kwargs: Any) -> Any:
        outcome = original(*args, **kwargs)
        with world.ctx.sessions() as s:
            for books in all_books(s).values():
                books.check()
        applied.append(type(args[2]).__name__)
        return outcome

    monkeypatch.setattr(orchestrator, "move", checked)
    yield applied


def _status(world: World, rid: str) -> ResultStatus:
    with world.ctx.sessions() as s:
        row = s.get(Result, rid)
        assert row is not None
        return row.status


def _books_and_chain(world: World, rid: str) -> list[str]:
    with world.ctx.sessions() as s:
        load_ledger(s, rid).check()
        transcript = load_transcript(s, rid)
    transcript.verify_chain()
    return [e.kind for e in transcript.events]


@pytest.mark.parametrize("rounded", [False, True], ids=["deterministic", "optimized"])
@pytest.mark.parametrize("lie_at", [1, 2, 3])  # first, middle and last segment of 3
def test_watcher_bisects_and_convicts_a_cheat(world: World, lie_at: int, rounded: bool) -> None:
    """Also when the provider's honest states are not the watcher's bit for bit (an optimized
    run): the watcher agrees with states within τ of its own, and the lie still convicts."""
    rid = _result(world, lie_at=lie_at, rounded=rounded)
    queued = world.tasks.proofs
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=10,
                              now=datetime.now(UTC))
    assert queued == [dispute_id]  # bisection finished, the step awaits its proof
    state = prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    assert state is not None and state.hi == lie_at and state.verdict is not None
    assert state.verdict.value == "provider_fault"
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    kinds = _books_and_chain(world, rid)
    assert kinds[:2] == ["submission", "challenge"] and kinds[-2:] == ["proofoutcome", "verdict"]
    assert prove_pending(world.disputes, dispute_id, datetime.now(UTC)) is None  # exactly once
    with world.ctx.sessions() as s:
        ledger = load_ledger(s, rid)
        assert ledger.balance("treasury:net_d") > 0


def test_honest_provider_beats_a_dishonest_challenger(world: World) -> None:
    rid = _result(world, lie_at=None, seed=3)
    queued = world.tasks.proofs
    dispute_id = open_dispute(world.disputes, rid, challenger="0x" + "cc" * 20, lo=1, hi=2,
                              bond=50, now=datetime.now(UTC))
    assert queued == [dispute_id]
    state = prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "challenger_fault"
    assert _status(world, rid) is ResultStatus.ACCEPTED  # open to other challengers
    assert _books_and_chain(world, rid)[-1] == "verdict"


def test_provider_that_never_discloses_its_trace_times_out(world: World) -> None:
    rid = _result(world, lie_at=None, upload=False, seed=4)
    start = datetime.now(UTC)
    clocks = TimeControl(provider=5.0, challenger=5.0, proof_timeout=60.0)
    dispute_id = open_dispute(world.disputes, rid, challenger="0x" + "dd" * 20, lo=0, hi=3, bond=5,
                              now=start, clocks=clocks)
    with world.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.state["phase"] == "disclose"
    assert orchestrator.tick_due(world.disputes, start + timedelta(seconds=2)) == 0
    assert orchestrator.tick_due(world.disputes, start + timedelta(seconds=6)) == 1
    with world.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.verdict == "PROVIDER_TIMEOUT"
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    assert _books_and_chain(world, rid)[-2:] == ["timeout", "verdict"]


def _service_key(world: World) -> str:
    """The service's BLS public key, which an auditor trusts explicitly."""
    return "0x" + orchestrator.service_signing_key(world.disputes).public_key.hex()


def _prove_now(world: World, dispute_id: str) -> None:
    prove_pending(world.disputes, dispute_id, datetime.now(UTC))


def _api_whistleblower(world: World, key: bytes) -> tuple[Whistleblower, TestClient]:
    _proving_at_once(world)
    app = create_app(world.ctx)
    client = TestClient(app, raise_server_exceptions=True)
    account = Account.from_key(key)
    return Whistleblower("http://testserver", account.key, account.address,
                         client=client), client


def test_whistleblower_through_the_api_convicts_a_cheat(world: World) -> None:
    rid = _result(world, lie_at=2, seed=5)
    blower, client = _api_whistleblower(world, b"\x21" * 32)
    log: list[str] = []
    final = blower.challenge(rid, world.prepared, zoo.mlp().sample_input(5), bond=20,
                             report=log.append)
    assert final["verdict"] == "PROVIDER_FAULT" and final["hi"] == 2
    assert any("DISAGREE" in line for line in log)
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    bundle = client.get(f"/v1/results/{rid}/transcript").json()
    assert bundle["length"] == len(bundle["events"]) and bundle["events"][-1]["kind"] == "verdict"
    # Another key cannot move in someone else's dispute.
    other, _ = _api_whistleblower(world, b"\x22" * 32)
    dispute = {"id": final["id"], "rounds": 0, "pending_leaf": "0x" + "00" * 32}
    with pytest.raises(RefuteError, match="HTTP 40"):
        other._answer("net_d", dispute, agree=True)


def test_whistleblower_agrees_with_an_optimized_run_and_convicts_its_lie(world: World) -> None:
    """The provider's states differ from the whistleblower's execution by float rounding (no
    leaf past the input matches): the whistleblower fetches each revealed state, checks it
    against its leaf, agrees with states within τ and convicts the lie at state 2 only."""
    rid = _result(world, lie_at=2, seed=9, rounded=True)
    blower, client = _api_whistleblower(world, b"\x25" * 32)
    log: list[str] = []
    final = blower.challenge(rid, world.prepared, zoo.mlp().sample_input(9), bond=20,
                             report=log.append)
    assert final["verdict"] == "PROVIDER_FAULT" and final["hi"] == 2, log
    assert any("state 1 is within τ of my execution → AGREE" in line for line in log), log
    assert any("state 2 differs beyond τ" in line for line in log), log
    # Only the states the dispute put on the table are served; a missing dispute is 404.
    refused = client.get(f"/v1/disputes/{final['id']}/states/3")
    assert refused.status_code == 409 and "not revealed" in refused.json()["error"]["reason"]
    assert client.get("/v1/disputes/dsp_nope/states/1").status_code == 404
    served = client.get(f"/v1/disputes/{final['id']}/states/1")
    assert served.status_code == 200 and served.headers["content-type"] == "application/zip"


def test_the_watcher_leaves_an_honest_optimized_run_alone(world: World) -> None:
    """Its output is not the watcher's bit for bit, but within τ: no dispute. A lie in the
    same kind of run is disputed and convicted."""
    _proving_at_once(world)
    honest = _result(world, lie_at=None, seed=19, rounded=True)
    assert orchestrator.watch(world.disputes, honest, datetime.now(UTC)) is None
    cheat = _result(world, lie_at=3, seed=21, rounded=True)
    assert orchestrator.watch(world.disputes, cheat, datetime.now(UTC)) is not None
    assert _status(world, cheat) is ResultStatus.PROVIDER_FAULT


def test_dishonest_whistleblower_loses_to_an_honest_provider(world: World) -> None:
    rid = _result(world, lie_at=None, seed=6)
    blower, _ = _api_whistleblower(world, b"\x23" * 32)
    wrong_input = zoo.mlp().sample_input(7)  # its "own execution" disagrees everywhere
    final = blower.challenge(rid, world.prepared, wrong_input, bond=30)
    assert final["verdict"] == "CHALLENGER_FAULT"
    assert _status(world, rid) is ResultStatus.ACCEPTED  # open to other challengers
    _books_and_chain(world, rid)


@pytest.mark.slow
@pytest.mark.ezkl
def test_exported_dispute_replays_and_tampering_is_pinpointed(world: World, tmp_path: Path) -> None:
    rid = _result(world, lie_at=3, seed=8)
    _proving_at_once(world)
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=10,
                              now=datetime.now(UTC))
    bundle = orchestrator.export_dispute(world.disputes, dispute_id, tmp_path / "d.rdispute")
    key = _service_key(world)
    report = replay(bundle, [key])
    assert report.ok, report.lines
    assert [name for name, _ok, _d in report.lines] == [
        "bundle", "transcript", "signature", "manifest", "artifacts", "leaves", "moves",
        "proof", "binding", "verdict"]
    # Tamper: one revealed state's bytes, then one transcript event (in the canonical encoding,
    # so that only the edit itself is what replay finds).
    def rewrite(edit: Callable[[str, bytes], bytes], name: str) -> Path:
        out = tmp_path / name
        with zipfile.ZipFile(bundle) as a:
            members = {info.filename: edit(info.filename, a.read(info))
                       for info in a.infolist()}
        out.write_bytes(archive_bytes(members))
        return out

    def flip_state(member: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if member == "states/2/0.f32" else data

    def forge_answer(member: str, data: bytes) -> bytes:
        if member != "transcript.json":
            return data
        doc = json.loads(data)
        for event in doc["events"]:
            if event["kind"] == "answer":
                event["body"]["choice"] = "agree" if event["body"]["choice"] == "disagree" \
                    else "disagree"
                break
        return json.dumps(doc).encode()

    broken = replay(rewrite(flip_state, "state.rdispute"), [key])
    assert [n for n, ok, _ in broken.lines if not ok][:1] == ["leaves"]
    forged = replay(rewrite(forge_answer, "answer.rdispute"), [key])
    failed = {n: d for n, ok, d in forged.lines if not ok}
    assert "transcript" in failed and "altered" in failed["transcript"]
    assert "moves" in failed  # the forged answer also breaks the game replay


def test_two_disputes_that_time_out_at_one_beat_convict_once_and_close_the_other(
        world: World) -> None:
    """Found by the fault drill (no traces): a silent liar is challenged at two steps at once,
    and both disclosure clocks run out before the timers' next beat. The first timeout
    convicts; the other dispute, past its own deadline too, is closed by the conviction (a
    Close is the service's own move, never late) instead of the whole beat failing forever."""
    rid = _result(world, lie_at=2, upload=False, seed=50)
    start = datetime.now(UTC)
    clocks = TimeControl(provider=5.0, challenger=5.0, proof_timeout=60.0)
    first = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=1, bond=3,
                         now=start, clocks=clocks, owed_check=True)
    second = open_dispute(world.disputes, rid, challenger="service", lo=2, hi=3, bond=3,
                          now=start, clocks=clocks, owed_check=True)
    assert orchestrator.tick_due(world.disputes, start + timedelta(seconds=30)) == 1
    with world.ctx.sessions() as s:
        verdicts = sorted(str(s.scalar(select(Dispute.verdict).where(Dispute.id == d)))
                          for d in (first, second))
    assert verdicts == ["CLOSED", "PROVIDER_TIMEOUT"]
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    events = _books_and_chain(world, rid)
    assert events.count("close") == 1 and events.count("verdict") == 2
    with world.ctx.sessions() as s:
        ledger = load_ledger(s, rid)
    kinds = [str(e.kind) for e in ledger.entries()]
    assert (kinds.count("SETTLEMENT"), kinds.count("BOND_RETURNED")) == (1, 1)  # slashed once
    stake = ledger.stake(rid)
    assert stake is not None and stake.status.value == "SLASHED"


def test_challenger_that_stops_answering_times_out(world: World) -> None:
    """A whistleblower who opens a dispute and then never answers loses its bond."""
    rid = _result(world, lie_at=None, seed=9)
    start = datetime.now(UTC)
    clocks = TimeControl(provider=60.0, challenger=5.0, proof_timeout=60.0)
    dispute_id = open_dispute(world.disputes, rid, challenger="0x" + "ee" * 20, lo=0, hi=3, bond=7,
                              now=start, clocks=clocks)
    with world.ctx.sessions() as s:  # the trace was uploaded: state 1 revealed at once
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.state["phase"] == "answer"
        load_ledger(s, rid).check()
    assert orchestrator.tick_due(world.disputes, start + timedelta(seconds=6)) == 1
    with world.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.verdict == "CHALLENGER_TIMEOUT"
        ledger = load_ledger(s, rid)
        ledger.check()
        assert ledger.balance("available:0x" + "ee" * 20) == 0  # the bond is gone
    assert _status(world, rid) is ResultStatus.ACCEPTED  # open to other challengers


def test_a_crash_after_a_committed_move_resumes_to_the_same_verdict(world: World) -> None:
    """Queueing the proof fails right after the dispute reached its step (the broker is gone):
    the committed move stands and nothing is raised to the caller; resuming from the database
    proves it and reaches the verdict, exactly once."""
    rid = _result(world, lie_at=2, seed=10)
    world.tasks.down = True  # the broker is gone before the proof is queued
    open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=3,
                 now=datetime.now(UTC))
    world.tasks.down = False
    with world.ctx.sessions() as s:
        dispute = s.scalars(select(Dispute).where(Dispute.result_id == rid)).one()
        assert dispute.state["phase"] == "step_proof" and dispute.status == "OPEN"
        assert dispute.proof_requeued_at is None  # never queued: recovery's next beat will
        dispute_id = dispute.id
    queued = world.tasks.proofs
    orchestrator.resume(world.disputes, dispute_id, datetime.now(UTC))
    assert queued == [dispute_id]
    state = prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "provider_fault" and state.hi == 2
    orchestrator.resume(world.disputes, dispute_id, datetime.now(UTC))
    assert queued == [dispute_id]  # nothing pending any more
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    _books_and_chain(world, rid)


def test_revealed_state_outside_the_range_is_convicted_by_the_range_circuit(world: World) -> None:
    rid = _result(world, lie_at=None, seed=11, out_of_range_at=1)
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=4,
                              now=datetime.now(UTC))
    with world.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.state["phase"] == "range_proof"
    state = prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "provider_fault"
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    assert "rangeoutcome" in _books_and_chain(world, rid)


def _network_key(world: World) -> str:
    with world.ctx.sessions() as s, s.begin():
        return add_api_key(s, "net_d", datetime.now(UTC))


@BOTH_PROVERS
@pytest.mark.parametrize("single_step", [False, True])
def test_a_trace_uploaded_during_the_dispute_is_disclosed_and_the_cheat_convicted(
        world: World, single_step: bool, books_checked_after_every_move: list[str]) -> None:
    """The provider had not uploaded its trace: the dispute waits (DISCLOSE, provider's clock)
    until it does; a trace that breaks the commitment is refused and changes nothing; the real
    one continues the game to a proof that convicts the lie."""
    rid = _result(world, lie_at=2, upload=False, seed=12 + single_step)
    queued = world.tasks.proofs
    lo, hi = (1, 2) if single_step else (0, 3)
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=lo, hi=hi, bond=6,
                              now=datetime.now(UTC))
    assert queued == []
    _proving_at_once(world)
    client = TestClient(create_app(world.ctx), raise_server_exceptions=True)
    headers = {"x-api-key": _network_key(world), "content-type": "application/zip"}
    other = world.workdir / f"{_result(world, lie_at=None, seed=14)}.rtrace"
    refused = client.put(f"/v1/results/{rid}/trace", content=other.read_bytes(),
                         headers=headers)
    assert refused.status_code == 400 and "commitment" in refused.json()["error"]["reason"]
    view = client.get(f"/v1/disputes/{dispute_id}").json()
    assert view["phase"] == "disclose" and view["status"] == "OPEN"
    uploaded = client.put(f"/v1/results/{rid}/trace",
                          content=(world.workdir / f"{rid}.rtrace").read_bytes(),
                          headers=headers)
    assert uploaded.status_code == 200, uploaded.text
    view = client.get(f"/v1/disputes/{dispute_id}").json()
    assert (view["status"], view["verdict"], view["hi"]) == ("RESOLVED", "PROVIDER_FAULT", 2)
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    kinds = _books_and_chain(world, rid)
    assert kinds[kinds.index("challenge") + 1] == "disclose" and kinds[-1] == "verdict"
    assert books_checked_after_every_move[0] == "Disclose"
    assert books_checked_after_every_move[-1] == "ProofOutcome"
    if not _real_proofs(world):
        return
    report = replay(orchestrator.export_dispute(world.disputes, dispute_id,
                                                world.workdir / f"{dispute_id}.rdispute"),
                    [_service_key(world)])
    assert report.ok, report.lines


def test_the_watcher_checks_a_whole_result_on_request(world: World) -> None:
    """A network asks the watcher to check results: it executes the job itself, leaves an
    honest result alone, and bisects a cheat to the lying step, which a proof convicts."""
    watched: list[str | None] = []

    def run_watch(rid: str) -> None:
        watched.append(orchestrator.watch(world.disputes, rid, datetime.now(UTC)))

    _proving_at_once(world)
    world.tasks.inline["watches"] = run_watch
    client = TestClient(create_app(world.ctx))
    headers = {"x-api-key": _network_key(world)}
    honest, cheat = _result(world, lie_at=None, seed=15), _result(world, lie_at=3, seed=16)
    hidden = _result(world, lie_at=None, seed=17, upload=False)
    assert client.post(f"/v1/results/{honest}/watch", headers=headers).status_code == 202
    assert watched == [None] and _status(world, honest) is ResultStatus.ACCEPTED
    refused = client.post(f"/v1/results/{hidden}/watch", headers=headers)
    assert refused.status_code == 409 and "upload its trace" in refused.json()["error"]["reason"]
    assert client.post(f"/v1/results/{cheat}/watch").status_code == 401  # networks only
    assert client.post(f"/v1/results/{cheat}/watch", headers=headers).status_code == 202
    assert watched[-1] is not None
    with world.ctx.sessions() as s:
        dispute = s.get(Dispute, watched[-1])
        assert dispute is not None and dispute.challenger == "service"
        assert (dispute.verdict, dispute.state["hi"]) == ("PROVIDER_FAULT", 3)
    assert _status(world, cheat) is ResultStatus.PROVIDER_FAULT
    refused = client.post(f"/v1/results/{cheat}/watch", headers=headers)
    assert refused.status_code == 409 and "PROVIDER_FAULT" in refused.json()["error"]["reason"]


def test_signed_challenges_and_moves_are_applied_once_and_nonces_cannot_be_reused(
        world: World) -> None:
    """A retried message (same signature) is answered again but applied once; a different
    message under a used nonce is refused with 409 and changes nothing."""
    rid = _result(world, lie_at=None, seed=18)
    blower, client = _api_whistleblower(world, b"\x24" * 32)
    opening = blower.challenge_body("net_d", rid, lo=0, hi=3, bond=9, nonce=77)
    first = client.post(f"/v1/results/{rid}/challenges", json=opening)
    again = client.post(f"/v1/results/{rid}/challenges", json=opening)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    other = blower.challenge_body("net_d", rid, lo=1, hi=3, bond=9, nonce=77)
    clash = client.post(f"/v1/results/{rid}/challenges", json=other)
    assert clash.status_code == 409 and "nonce 77" in clash.json()["error"]["reason"]
    dispute = first.json()
    assert dispute["phase"] == "answer" and dispute["rounds"] == 0
    answer = blower.move_body("net_d", dispute, agree=True, nonce=78)
    moved = client.post(f"/v1/disputes/{dispute['id']}/moves", json=answer)
    assert moved.status_code == 200 and moved.json()["rounds"] == 1
    retried = client.post(f"/v1/disputes/{dispute['id']}/moves", json=answer)
    assert retried.status_code == 200 and retried.json()["rounds"] == 1  # applied once
    reused = blower.move_body("net_d", retried.json(), agree=False, nonce=78)
    refused = client.post(f"/v1/disputes/{dispute['id']}/moves", json=reused)
    assert refused.status_code == 409 and "nonce 78" in refused.json()["error"]["reason"]
    assert client.get(f"/v1/disputes/{dispute['id']}").json()["rounds"] == 1
    with world.ctx.sessions() as s:
        assert len(s.scalars(select(Dispute).where(Dispute.result_id == rid)).all()) == 1
    assert [e for e in _books_and_chain(world, rid) if e in ("challenge", "answer")] == [
        "challenge", "answer"]


def test_a_conviction_closes_the_other_disputes_and_returns_their_bonds(world: World) -> None:
    """Two disputes on one cheating result: the first conviction settles the stake once; the
    other dispute closes with its bond returned and can no longer move or be proven."""
    rid = _result(world, lie_at=2, seed=19)
    queued = world.tasks.proofs
    second_challenger = "0x" + "ab" * 20
    first = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=8,
                         now=datetime.now(UTC))
    second = open_dispute(world.disputes, rid, challenger=second_challenger, lo=0, hi=3, bond=40,
                          now=datetime.now(UTC))
    assert queued == [first]  # the second waits for its challenger's answer
    state = prove_pending(world.disputes, first, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "provider_fault"
    with world.ctx.sessions() as s:
        other = s.get(Dispute, second)
        assert other is not None and (other.status, other.verdict) == ("RESOLVED", "CLOSED")
        ledger = load_ledger(s, rid)
        ledger.check()
        assert ledger.balance("available:" + second_challenger) == 40  # the bond came back
    client = TestClient(create_app(world.ctx))
    view = client.get(f"/v1/disputes/{second}").json()
    assert (view["phase"], view["verdict"]) == ("resolved", "CLOSED")  # by the game's Close
    with pytest.raises(RefuteError, match="verdict closed"):
        orchestrator.move(world.disputes, second, Answer(actor=Actor.CHALLENGER,
                                                    at=datetime.now(UTC).timestamp(), state=1,
                                                    choice=Choice.DISAGREE), datetime.now(UTC))
    assert prove_pending(world.disputes, second, datetime.now(UTC)) is None
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    events = _books_and_chain(world, rid)
    assert events.count("verdict") == 2 and events.count("close") == 1  # one each
    with world.ctx.sessions() as s:
        transcript = load_transcript(s, rid)
    closed = next(e for e in transcript.events if e.kind == "close")
    assert (closed.body["dispute_id"], closed.body["by"]) == (second, first)
    # The closed dispute's bundle replays (no proof of its own); a Close naming a dispute that
    # convicted nobody does not.
    bundle = orchestrator.export_dispute(world.disputes, second, world.workdir / "closed.rdispute")
    report = replay(bundle, [_service_key(world)])
    assert report.ok, report.lines
    with zipfile.ZipFile(bundle) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    doc = json.loads(members["transcript.json"])
    for event in doc["events"]:
        if event["kind"] == "close":
            event["body"]["by"] = second
    members["transcript.json"] = json.dumps(doc).encode()
    forged = world.workdir / "forged-close.rdispute"
    forged.write_bytes(archive_bytes(members))
    failed = {n: d for n, ok, d in replay(forged, [_service_key(world)]).lines if not ok}
    assert "convicted" in failed["moves"]


def test_recovery_carries_out_what_a_crash_lost_and_never_times_out_the_provider(
        world: World) -> None:
    """A crash right after a committed answer (the reveal it calls for was never served), then
    an outage longer than the provider's whole clock: the timers' recovery serves the reveal
    as of the moment it was due, before applying timeouts, so the honest provider is not
    charged for the service's outage. A proof that was never queued is queued again, once, after
    the broker would have redelivered and run a lost task."""
    rid = _result(world, lie_at=None, seed=20)
    start = datetime.now(UTC)
    clocks = TimeControl(provider=5.0, challenger=1000.0, proof_timeout=5000.0)
    dispute_id = open_dispute(world.disputes, rid, challenger="0x" + "ef" * 20, lo=0, hi=3, bond=2,
                              now=start, clocks=clocks)
    answered = start + timedelta(seconds=1)
    state, effects = orchestrator.move(world.disputes, dispute_id, Answer(
        actor=Actor.CHALLENGER, at=answered.timestamp(), state=1, choice=Choice.AGREE), answered)
    assert (state.phase.value, state.pending, effects) == ("reveal", 2, [RequestReveal(2)])
    later = answered + timedelta(seconds=100)  # the provider's 5 s are long gone
    queued = world.tasks.proofs
    assert orchestrator.resume_stalled(world.disputes, later) == [
        dispute_id]
    assert orchestrator.tick_due(world.disputes, later) == 0
    with world.ctx.sessions() as s:
        dispute = s.get(Dispute, dispute_id)
        assert dispute is not None and dispute.status == "OPEN"
        assert (dispute.state["phase"], dispute.state["pending"]) == ("answer", 2)
        assert dispute.state["provider_clock"] == 5.0  # not charged for the outage
    # The challenger answers; the game reaches the step proof, whose task is lost.
    final = later + timedelta(seconds=1)
    orchestrator.move(world.disputes, dispute_id, Answer(actor=Actor.CHALLENGER,
                                                    at=final.timestamp(), state=2,
                                                    choice=Choice.DISAGREE), final)
    settings = world.ctx.settings
    assert orchestrator.resume_stalled(world.disputes, final) == []
    again = final + timedelta(seconds=settings.visibility_timeout_s + settings.task_time_limit_s)
    assert orchestrator.resume_stalled(world.disputes, again) == [
        dispute_id]
    assert orchestrator.resume_stalled(world.disputes, again) == []
    assert queued == [dispute_id]
    events = _books_and_chain(world, rid)
    assert events.count("reveal") == 2 and "timeout" not in events
    with world.ctx.sessions() as s:
        transcript = load_transcript(s, rid)
    replayed = [e for e in transcript.events if e.kind == "reveal"][-1]
    assert replayed.body["move_at"] == answered.timestamp()  # stamped when it was due


def test_a_lost_self_challenge_does_not_shield_the_real_lie(world: World) -> None:
    """Issue 9, finding 2: a provider lies at step 2, challenges its own honest step 1 with a
    second key and a tiny bond, and loses. The result stays open (not "upheld"): the honest
    challenge of step 2 is accepted and convicts."""
    rid = _result(world, lie_at=2, seed=31)
    decoy = open_dispute(world.disputes, rid, challenger="0x" + "5e" * 20, lo=0, hi=1, bond=1,
                         now=datetime.now(UTC))
    state = prove_pending(world.disputes, decoy, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "challenger_fault"
    assert _status(world, rid) is ResultStatus.ACCEPTED  # open to every other challenger
    client = TestClient(create_app(world.ctx))
    watch = client.post(f"/v1/results/{rid}/watch", headers={"X-API-Key": _network_key(world)})
    assert watch.status_code == 202, watch.text  # was 409 once the result was "UPHELD"
    honest = open_dispute(world.disputes, rid, challenger="service", lo=1, hi=2, bond=10,
                          now=datetime.now(UTC))
    state = prove_pending(world.disputes, honest, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "provider_fault"
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    _books_and_chain(world, rid)


def test_disputes_that_reach_one_step_share_one_proof(world: World) -> None:
    """Issue 9, finding 8: 20 fresh keys dispute the same step of a result. Each posts a bond,
    but the prover proves the step once and every dispute gets that proof's verdict."""
    rid = _result(world, lie_at=2, seed=37)
    prover = world.disputes.prover
    assert isinstance(prover, FakeProver)
    proofs = prover.made
    proofs.clear()
    queued = world.tasks.proofs
    disputes = [open_dispute(world.disputes, rid, challenger="0x" + f"{i:02x}" * 20, lo=1, hi=2,
                             bond=1, now=datetime.now(UTC))
                for i in range(20)]
    assert queued == disputes  # every dispute reached the step and queued its proof
    for dispute_id in queued:
        prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    assert proofs == [("step", 2)]
    with world.ctx.sessions() as s:
        verdicts = {s.get(Dispute, d).verdict for d in disputes}  # type: ignore[union-attr]
    assert verdicts <= {"PROVIDER_FAULT", "CLOSED"} and "PROVIDER_FAULT" in verdicts
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    assert _books_and_chain(world, rid).count("proofoutcome") == 1


def test_a_challenge_is_refused_after_the_window_and_below_the_minimum_bond(
        world: World) -> None:
    """Issue 9, finding 8: the deadline is the stored one, checked when the challenge arrives
    (whatever the timers are doing); a bond below the network's minimum is refused."""
    rid = _result(world, lie_at=None, seed=41)
    with world.ctx.sessions() as s:
        row = s.get(Result, rid)
        assert row is not None
        deadline = row.challenge_deadline.replace(tzinfo=UTC)
    with pytest.raises(RefuteError, match=r"challenge window .* closed"):
        open_dispute(world.disputes, rid, challenger="0x" + "77" * 20, lo=0, hi=3, bond=5,
                     now=deadline + timedelta(seconds=5))
    with world.ctx.sessions() as s, s.begin():
        network = s.get(Network, "net_d")
        assert network is not None
        network.min_bond = "1000"
    try:
        with pytest.raises(RefuteError, match="below this network's minimum bond 1000"):
            open_dispute(world.disputes, rid, challenger="0x" + "77" * 20, lo=0, hi=3, bond=999,
                         now=datetime.now(UTC))
        with world.ctx.sessions() as s:
            assert s.scalars(select(Dispute).where(Dispute.result_id == rid)).first() is None
    finally:
        with world.ctx.sessions() as s, s.begin():
            network = s.get(Network, "net_d")
            assert network is not None
            network.min_bond = "1"


@BOTH_PROVERS
def test_a_cheat_that_discloses_only_the_step_states_is_proven_wrong(world: World) -> None:
    """A provider that never uploads its trace is challenged at a step; the two states it
    discloses (``refute.states/2``, not the whole trace) are enough for the proof, which
    convicts the lie, and the exported dispute replays."""
    from refute.disclosure import write_states
    from verifier.lifecycle import attach_states

    rid = _result(world, lie_at=2, upload=False, seed=43)
    trace = Trace.read((world.workdir / f"{rid}.rtrace").read_bytes())
    queued = world.tasks.proofs
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=1, hi=2, bond=10,
                              now=datetime.now(UTC))
    assert queued == []  # waiting for the provider's states
    with world.ctx.sessions() as s, s.begin():
        row = s.get(Result, rid)
        assert row is not None
        attach_states(s, world.ctx.blobs, row, write_states(world.prepared.manifest,
                                                           {1: trace.states[1],
                                                            2: trace.states[2]}),
                      datetime.now(UTC))
    assert orchestrator.disclose(world.disputes, rid, datetime.now(UTC)) == [dispute_id]
    assert queued == [dispute_id]
    state = prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "provider_fault"
    assert _status(world, rid) is ResultStatus.PROVIDER_FAULT
    if not _real_proofs(world):
        return
    report = replay(orchestrator.export_dispute(world.disputes, dispute_id,
                                                world.workdir / f"{dispute_id}.rdispute"),
                    [_service_key(world)])
    assert report.ok, report.lines
