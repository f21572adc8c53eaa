"""Disputes end to end through the real stack: redis-server, ``refute serve`` and the Celery
workers as processes, whistleblowers playing through the HTTP API, real EZKL proofs, and the
proof of a verdict verified by the prove worker with a transaction on a local anvil chain.

One stack (and one registered model) serves the whole module, beside one anvil chain it is
configured with (``REFUTE_CHAIN_RPC_URL``): the prove worker verifies every proof it makes by a
transaction there, and the transcript records that check (contract, transaction, gas), which the
dispute explorer shows. Its dispute clocks are short so timeouts are reached quickly; honest
players answer within a second or two. Every dispute ends with exactly one verdict (and at most
one proof outcome, checked on chain) in the result's hash-chained transcript, and the bonds
ledger balances after it, including after crash drills that SIGKILL the prove worker mid-proof
or the API mid-dispute, or kill the API between a committed answer and the reveal the service
serves next (the timers' recovery serves it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_typing import HexStr
from sqlalchemy import select
from web3 import Web3

from challenge.books import all_books, combined_balances, load_ledger
from challenge.game import Actor, Answer, Choice
from challenge.ledger import available_account
from challenge.orchestrator import load_transcript, move
from challenge.records import Dispute, TaskDelivery
from challenge.whistleblower import Whistleblower
from prover.evm import Anvil, proof_calldata, verify_call
from refute import settings as refute_settings
from refute import zoo
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model, run_trace
from refute.settings import Settings
from refute.trace import Trace
from tests.test_explorer import browse_dispute
from verifier.client import RefuteClient, sign_result
from verifier.service import ServiceContext
from verifier.stack import LocalStack

pytestmark = [pytest.mark.slow, pytest.mark.ezkl, pytest.mark.chain]

PROVIDER = Account.from_key(b"\x51" * 32)
STAKE = 1000
BOND = 100
#: Each party's dispute clock (s): long enough for an honest answer and an API restart, short
#: enough that a timeout is reached quickly.
CLOCK_S = 20.0
#: Visibility timeout of the broker (s): the task of a killed worker comes back after it. The
#: task time limit stays below it and well above a cold proof of one MLP step (measured 19-37 s
#: on 2 cores, the first one including EZKL's start; a warm proof takes about 9 s) and its
#: on-chain check (the first of a circuit compiles and deploys its verifier: about 3 s).
VISIBILITY_TIMEOUT_S = 90
TASK_TIME_LIMIT_S = 75
#: Slack (s) for a timeout to be applied after its deadline: the timers beat every second.
TICK_SLACK_S = 10.0


@dataclasses.dataclass
class Deployment:
    stack: LocalStack
    client: RefuteClient
    http: httpx.Client
    network_id: str
    model: dict[str, Any]
    prepared: PreparedModel
    ctx: ServiceContext
    workdir: Path
    api_key: str
    #: The anvil chain the prove worker verifies every proof on.
    rpc_url: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("dispute-stack")
    env = {
        "REFUTE_FINALIZE_EVERY_S": "1",
        "REFUTE_DISPUTE_PROVIDER_CLOCK_S": str(CLOCK_S),
        "REFUTE_DISPUTE_CHALLENGER_CLOCK_S": str(CLOCK_S),
        "REFUTE_DISPUTE_PROOF_TIMEOUT_S": "600",
        "REFUTE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "REFUTE_TASK_TIME_LIMIT_S": str(TASK_TIME_LIMIT_S),
    }
    # The chain outlives the stack. Its key is left empty: on a loopback chain the service
    # sends from anvil's development key (verifier.service.chain_from).
    with Anvil() as chain, LocalStack(workdir / "stack", extra_env={
            **env, "REFUTE_CHAIN_RPC_URL": chain.rpc_url, "REFUTE_CHAIN_KEY": ""}) as stack:
        # The in-process context below shares the stack's home (its circuit cache).
        mp = pytest.MonkeyPatch()
        mp.setenv("REFUTE_HOME", stack.env["REFUTE_HOME"])
        refute_settings.get_settings.cache_clear()
        try:
            admin = RefuteClient(stack.api_url)
            # No spot-checks and a long window: only the whistleblowers dispute, nothing
            # finalizes under them.
            network_id, key = admin.create_network(
                "disputes", admin_token=stack.admin_token, spot_probability=0.0,
                challenge_window_s=3600)
            client = RefuteClient(stack.api_url, key)
            model = zoo.mlp()
            registered = client.register_model(model.onnx_bytes, calibration_samples=2)
            manifest = Manifest.from_json(registered["manifest"])
            prepared = dataclasses.replace(prepare_model(model.onnx_bytes), manifest=manifest)
            ctx = ServiceContext.create(Settings(
                database_url=stack.env["REFUTE_DATABASE_URL"],
                blob_dir=Path(stack.env["REFUTE_BLOB_DIR"]),
                spot_key=stack.env["REFUTE_SPOT_KEY"]))
            with httpx.Client(base_url=stack.api_url, timeout=60) as http:
                yield Deployment(stack, client, http, network_id, registered, prepared, ctx,
                                 workdir, key, chain.rpc_url)
            ctx.engine.dispose()
        finally:
            mp.undo()
            refute_settings.get_settings.cache_clear()


# --- helpers ----------------------------------------------------------------------------------


def _submit(d: Deployment, *, seed: int, lie_at: int | None = None, upload: bool = True) -> str:
    """Submit a result of the MLP on ``sample_input(seed)``; a cheat moves state ``lie_at``
    (only that one) by 0.5, far beyond its tolerance. Returns the result id."""
    trace = run_trace(d.prepared, zoo.mlp().sample_input(seed))
    if lie_at is not None:
        states = [list(s) for s in trace.states]
        states[lie_at][0] = states[lie_at][0] + 0.5
        trace = Trace.from_states(d.prepared.manifest, states)
    body = sign_result(
        network_id=d.network_id, model_id=d.model["id"], model_sha256=d.model["model_sha256"],
        trace=trace, input_hash=seed.to_bytes(32, "big"), output_hash=b"\x00" * 32,
        stake=STAKE, nonce=time.time_ns(), deadline=int(time.time()) + 3600,
        private_key=PROVIDER.key, provider=PROVIDER.address)
    accepted = d.client.submit_result(body)
    assert accepted.status == "ACCEPTED"
    if upload:
        bundle = trace.write(d.workdir / f"{accepted.id}.rtrace").read_bytes()
        assert d.client.upload_trace(accepted.id, bundle).trace_uploaded
    return accepted.id


def _whistleblower(d: Deployment, key: int) -> Whistleblower:
    account = Account.from_key(bytes([key]) * 32)
    return Whistleblower(d.stack.api_url, account.key, account.address)


def _dispute(d: Deployment, dispute_id: str) -> dict[str, Any]:
    answer = d.http.get(f"/v1/disputes/{dispute_id}")
    answer.raise_for_status()
    view: dict[str, Any] = answer.json()
    return view


def _wait_resolved(d: Deployment, dispute_id: str, *, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = _dispute(d, dispute_id)
        if view["status"] == "RESOLVED":
            return view
        assert time.monotonic() < deadline, f"dispute still open after {timeout:.0f} s: {view}"
        time.sleep(0.5)


def _wait_phase(d: Deployment, dispute_id: str, phase: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        view = _dispute(d, dispute_id)
        if view["phase"] == phase:
            return
        assert view["status"] == "OPEN", f"resolved before reaching {phase}: {view}"
        assert time.monotonic() < deadline, f"not in phase {phase} after {timeout:.0f} s: {view}"
        time.sleep(0.2)


def _status(d: Deployment, result_id: str) -> str:
    return d.client.result(result_id).status


def _events(d: Deployment, result_id: str, dispute_id: str) -> list[dict[str, Any]]:
    """The dispute's events in the result's transcript (as the API serves it)."""
    answer = d.http.get(f"/v1/results/{result_id}/transcript")
    answer.raise_for_status()
    doc = answer.json()
    assert doc["length"] == len(doc["events"])
    return [e for e in doc["events"] if e["body"].get("dispute_id") == dispute_id]


def _settled_once(d: Deployment, result_id: str, dispute_id: str, verdict: str, *,
                  proved: bool) -> list[dict[str, Any]]:
    """Exactly one verdict (and one proof outcome iff ``proved``) for the dispute; the books
    balance and the transcript's hash chain verifies. Returns the dispute's events."""
    events = _events(d, result_id, dispute_id)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "challenge" and kinds[-1] == "verdict", kinds
    assert kinds.count("verdict") == 1, kinds
    assert kinds.count("proofoutcome") == (1 if proved else 0), kinds
    assert events[-1]["body"]["verdict"] == verdict
    if proved:  # the prove worker verified the proof on chain before recording it
        chain = _proof_outcome(events).get("chain")
        assert isinstance(chain, dict) and chain["gas"] > 0, chain
    with d.ctx.sessions() as session:
        ledger = load_ledger(session, result_id)
        ledger.check()
        record = ledger.dispute(dispute_id)
        assert record is not None and record.verdict is not None
        assert record.verdict == verdict
        transcript = load_transcript(session, result_id)
    transcript.verify_chain()
    return events


def _challenger_balance(d: Deployment, dispute_id: str) -> int:
    with d.ctx.sessions() as session:
        books = all_books(session)  # the challenger's balance across every result
        record = next(r for b in books.values() if (r := b.dispute(dispute_id)) is not None)
        return combined_balances(books.values()).get(available_account(record.challenger), 0)


def _proof_outcome(events: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = next(e["body"] for e in events if e["kind"] == "proofoutcome")
    return body


def _checked_on_chain(d: Deployment, outcome: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The on-chain check the prove worker recorded with ``outcome``, checked on the chain: its
    transaction was mined without reverting, used the recorded gas, called the recorded verifier
    contract with exactly this proof, and that contract accepts the proof. Returns the check."""
    recorded = outcome["chain"]
    assert isinstance(recorded, dict), recorded
    tx, gas, contract = recorded["tx"], recorded["gas"], recorded["contract"]
    assert isinstance(tx, str) and tx.startswith("0x") and len(tx) == 66, recorded
    assert isinstance(gas, int) and gas > 0, recorded
    assert isinstance(contract, str) and Web3.is_checksum_address(contract), recorded
    w3 = Web3(Web3.HTTPProvider(d.rpc_url))
    receipt = w3.eth.get_transaction_receipt(HexStr(tx))
    assert receipt["status"] == 1 and receipt["gasUsed"] == gas, receipt
    assert receipt["to"] == contract, receipt
    proof = workdir / "proof.json"
    proof.write_text(json.dumps(outcome["proof"]))
    assert bytes(w3.eth.get_transaction(HexStr(tx))["input"]) == proof_calldata(proof)
    assert verify_call(d.rpc_url, contract, proof)  # the deployed verifier accepts it
    return recorded


# --- the game ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lie_at", [1, 2, 3])  # the first, a middle and the last segment
def test_cheating_provider_loses_to_an_honest_whistleblower(deployment: Deployment, lie_at: int,
                                                            tmp_path: Path) -> None:
    d = deployment
    seed = 10 + lie_at
    rid = _submit(d, seed=seed, lie_at=lie_at)
    blower = _whistleblower(d, 0x60 + lie_at)
    log: list[str] = []
    final = blower.challenge(rid, d.prepared, zoo.mlp().sample_input(seed), bond=BOND,
                             timeout=300, report=log.append)
    assert final["verdict"] == "PROVIDER_FAULT", (final, log)
    assert final["hi"] == lie_at and final["lo"] == lie_at - 1
    assert _status(d, rid) == "PROVIDER_FAULT"
    events = _settled_once(d, rid, final["id"], "PROVIDER_FAULT", proved=True)
    outcome = _proof_outcome(events)
    assert outcome["step"] == lie_at
    assert float(Fraction(outcome["maxdiff_units"])) > outcome["tolerance"]
    # The whistleblower got its bond back and half the slashed stake.
    assert _challenger_balance(d, final["id"]) == BOND + STAKE // 2
    # The prove worker verified the proof in the transcript with a transaction on the chain
    # (the step circuit's Solidity verifier), and recorded that check with it.
    recorded = _checked_on_chain(d, outcome, tmp_path)
    print(f"step {lie_at} proof verified on anvil by the prove worker: gas {recorded['gas']:,} "
          f"({recorded['tx']})")
    if lie_at == 2:  # the dispute explorer shows this real dispute and its on-chain check
        browse_dispute(d.stack.api_url, final["id"], api_key=d.api_key, verdict="PROVIDER_FAULT",
                       step=lie_at, name="stack", chain=recorded)


def test_honest_provider_beats_a_dishonest_whistleblower(deployment: Deployment) -> None:
    d = deployment
    rid = _submit(d, seed=20)
    blower = _whistleblower(d, 0x70)
    wrong_input = zoo.mlp().sample_input(21)  # its "execution" disagrees with every state
    final = blower.challenge(rid, d.prepared, wrong_input, bond=BOND, timeout=300)
    assert final["verdict"] == "CHALLENGER_FAULT", final
    assert _status(d, rid) in {"ACCEPTED", "FINALIZED"}  # open until its window closes
    events = _settled_once(d, rid, final["id"], "CHALLENGER_FAULT", proved=True)
    outcome = _proof_outcome(events)
    assert float(Fraction(outcome["maxdiff_units"])) <= outcome["tolerance"]
    assert _challenger_balance(d, final["id"]) == 0  # the bond is slashed


def test_a_party_whose_clock_runs_out_loses(deployment: Deployment) -> None:
    """Both timeouts at once (they share the wait): a provider that never uploaded its trace
    cannot disclose or reveal anything; a whistleblower that opens and never answers."""
    d = deployment
    silent_provider = _submit(d, seed=30, upload=False)
    honest_provider = _submit(d, seed=31)
    opened = time.time()
    against_provider = _whistleblower(d, 0x80).open(silent_provider, bond=BOND)
    silent_challenger = _whistleblower(d, 0x81).open(honest_provider, bond=BOND)
    assert _dispute(d, silent_challenger["id"])["phase"] == "answer"  # state 1 was revealed
    provider_view = _wait_resolved(d, against_provider["id"], timeout=CLOCK_S + 60)
    challenger_view = _wait_resolved(d, silent_challenger["id"], timeout=CLOCK_S + 60)
    assert provider_view["verdict"] == "PROVIDER_TIMEOUT", provider_view
    assert challenger_view["verdict"] == "CHALLENGER_TIMEOUT", challenger_view
    assert _status(d, silent_provider) == "PROVIDER_FAULT"
    assert _status(d, honest_provider) in {"ACCEPTED", "FINALIZED"}
    _settled_once(d, silent_provider, against_provider["id"], "PROVIDER_TIMEOUT", proved=False)
    _settled_once(d, honest_provider, silent_challenger["id"], "CHALLENGER_TIMEOUT",
                  proved=False)
    assert _challenger_balance(d, against_provider["id"]) == BOND + STAKE // 2
    assert _challenger_balance(d, silent_challenger["id"]) == 0
    # Decided by the clock: not before it ran out, and soon after.
    with d.ctx.sessions() as session:
        for dispute_id in (against_provider["id"], silent_challenger["id"]):
            row = session.get(Dispute, dispute_id)
            assert row is not None and row.resolved_at is not None
            took = (row.resolved_at - row.opened_at).total_seconds()
            assert CLOCK_S <= took <= CLOCK_S + TICK_SLACK_S, (dispute_id, took)
    assert time.time() - opened < CLOCK_S + 60


# --- crash drills -----------------------------------------------------------------------------


def _prove_deliveries(d: Deployment) -> dict[str, int]:
    with d.ctx.sessions() as session:
        rows = session.scalars(select(TaskDelivery).where(
            TaskDelivery.task_name == "refute.prove")).all()
        return {row.task_id: row.deliveries for row in rows}


def test_prove_worker_killed_mid_proof_redelivers_to_the_same_verdict(
        deployment: Deployment) -> None:
    d = deployment
    seed = 40
    rid = _submit(d, seed=seed, lie_at=2)
    blower = _whistleblower(d, 0x90)
    before = _prove_deliveries(d)
    dispute = blower.open(rid, bond=BOND)
    own = blower.own_execution(d.prepared, zoo.mlp().sample_input(seed))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        playing = pool.submit(blower.play, dispute["id"], own, timeout=600)
        _wait_phase(d, dispute["id"], "step_proof", timeout=60)
        # Wait until the prove worker took the task (it counts the delivery first), then let
        # it get into the proof and kill it.
        deadline = time.monotonic() + 30
        while not (new := set(_prove_deliveries(d)) - set(before)):
            assert time.monotonic() < deadline, "the prove worker never took the task"
            time.sleep(0.2)
        (task_id,) = new
        time.sleep(1.5)
        assert _dispute(d, dispute["id"])["status"] == "OPEN", "proved before the kill"
        d.stack.kill("worker-prove")
        killed_at = time.monotonic()
        time.sleep(2)
        assert _dispute(d, dispute["id"])["phase"] == "step_proof"  # nothing half-applied
        d.stack.restart("worker-prove")
        final = playing.result(timeout=VISIBILITY_TIMEOUT_S + 300)
    redelivered_after = time.monotonic() - killed_at
    assert final["verdict"] == "PROVIDER_FAULT" and final["hi"] == 2, final
    assert _status(d, rid) == "PROVIDER_FAULT"
    _settled_once(d, rid, dispute["id"], "PROVIDER_FAULT", proved=True)
    # The same message came back through the visibility timeout (not a new task).
    deliveries = _prove_deliveries(d)
    assert deliveries[task_id] == 2, deliveries
    assert set(deliveries) - set(before) == {task_id}
    assert redelivered_after < VISIBILITY_TIMEOUT_S + 120


def test_api_killed_mid_dispute_play_resumes_to_the_same_verdict(deployment: Deployment) -> None:
    d = deployment
    seed = 50
    rid = _submit(d, seed=seed, lie_at=3)
    blower = _whistleblower(d, 0xA0)
    dispute = blower.open(rid, bond=BOND)
    assert _dispute(d, dispute["id"])["phase"] == "answer"
    d.stack.kill("api")
    started = time.monotonic()
    d.stack.restart("api")
    restart_s = time.monotonic() - started
    assert restart_s < CLOCK_S / 2, f"the API took {restart_s:.1f} s to restart"
    own = blower.own_execution(d.prepared, zoo.mlp().sample_input(seed))
    final = blower.play(dispute["id"], own, timeout=300)
    assert final["verdict"] == "PROVIDER_FAULT" and final["hi"] == 3, final
    assert final["rounds"] == 2
    assert _status(d, rid) == "PROVIDER_FAULT"
    events = _settled_once(d, rid, dispute["id"], "PROVIDER_FAULT", proved=True)
    assert [e["kind"] for e in events].count("challenge") == 1
    assert [e["body"]["choice"] for e in events if e["kind"] == "answer"] == ["agree", "agree"]


def test_api_crash_after_a_committed_answer_does_not_time_out_an_honest_provider(
        deployment: Deployment) -> None:
    """The API dies inside ``POST /v1/disputes/{id}/moves`` right after committing an answer and
    before serving the next reveal from the provider's uploaded trace. The provider cannot do
    anything (the service reveals for it), so the dispute must go on once the API is back."""
    d = deployment
    seed = 60
    rid = _submit(d, seed=seed)  # honest, trace uploaded
    blower = _whistleblower(d, 0xB0)
    dispute = blower.open(rid, bond=BOND)
    view = _dispute(d, dispute["id"])
    assert view["phase"] == "answer" and view["pending"] == 1
    d.stack.kill("api")
    # What the route had committed when it died: the challenger's AGREE on state 1 (the same
    # move() call, in its own transaction); its drive() that serves state 2 never ran.
    now = datetime.now(UTC)
    answer = Answer(actor=Actor.CHALLENGER, at=now.timestamp(), state=1, choice=Choice.AGREE)
    state, effects = move(d.ctx.disputes, dispute["id"], answer, now,
                          {"state": 1, "choice": "agree"})
    assert state.phase.value == "reveal" and state.pending == 2 and effects
    d.stack.restart("api")
    own = blower.own_execution(d.prepared, zoo.mlp().sample_input(seed))
    final = blower.play(dispute["id"], own, timeout=CLOCK_S + 120)
    _settled_once(d, rid, dispute["id"], str(final["verdict"]),
                  proved=final["verdict"] == "CHALLENGER_FAULT")
    assert final["verdict"] == "CHALLENGER_FAULT", final  # not PROVIDER_TIMEOUT
    assert _status(d, rid) in {"ACCEPTED", "FINALIZED"}  # open until its window closes


def test_a_lost_self_challenge_leaves_the_real_lie_open_to_challenge(
        deployment: Deployment) -> None:
    """Issue 9, finding 2, as the attacker ran it: the provider lies at step 2, challenges its
    own honest step 1 with a second key and a bond of 1, and loses. The result is not upheld:
    the watcher route still answers 202, and an honest whistleblower convicts the lie."""
    d = deployment
    rid = _submit(d, seed=40, lie_at=2)
    accomplice = _whistleblower(d, 0x7A)
    honest_model_input = zoo.mlp().sample_input(40)
    decoy = accomplice.challenge(rid, d.prepared, honest_model_input, bond=1, lo=0, hi=1,
                                 timeout=300)
    assert decoy["verdict"] == "CHALLENGER_FAULT", decoy
    assert _status(d, rid) == "ACCEPTED"
    watch = d.http.post(f"/v1/results/{rid}/watch", headers={"X-API-Key": d.api_key})
    assert watch.status_code == 202, watch.text  # was 409: "UPHELD"
    blower = _whistleblower(d, 0x7B)
    final = blower.challenge(rid, d.prepared, honest_model_input, bond=BOND, timeout=300)
    # The watcher (queued above) and the whistleblower race to the same step: one convicts,
    # the other dispute is closed by that conviction with its bond returned.
    assert final["verdict"] in {"PROVIDER_FAULT", "CLOSED"}, final
    assert _status(d, rid) == "PROVIDER_FAULT"
