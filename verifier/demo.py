"""``refute demo``: a real end-to-end dispute on a fresh machine.

Starts the local stack (redis-server, API, spot-check / prove / timer workers), registers an
8-segment model for two networks, and submits through the API: an honest result, a cheat on a
network with spot-checks (the service's watcher catches it and disputes the faulty step), and a
cheat on a network without spot-checks (a whistleblower challenges it and bisects). Each cheat is
settled by a real EZKL proof, which the prove worker verifies again on a local anvil chain through
the chain port (``REFUTE_CHAIN_RPC_URL``: :class:`prover.chain.RpcChain` deploys the circuit's
verifier and sends a transaction); the demo reads that transaction's receipt back from anvil. The
honest result finalizes. Prints a summary table and the dispute bundles for ``refute replay``;
stops what it started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_typing import HexStr
from rich.console import Console
from rich.table import Table
from web3 import Web3

from challenge.replay import replay
from challenge.whistleblower import Whistleblower
from prover.evm import Anvil
from refute import zoo
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model, run_trace
from refute.settings import Settings
from refute.trace import Trace
from verifier.client import RefuteClient, sign_result
from verifier.service import ServiceContext
from verifier.stack import LocalStack

PROVIDER = Account.from_key(b"\x31" * 32)
WHISTLEBLOWER = Account.from_key(b"\x32" * 32)


def _submit(client: RefuteClient, network_id: str, model: dict[str, Any], *,
            prepared: PreparedModel, seed: int, workdir: Path, lie_at: int | None) -> str:
    inputs = zoo.mlp_8x256().sample_input(seed)
    trace = run_trace(prepared, inputs)
    if lie_at is not None:  # the provider returns garbage from segment lie_at on
        states = [list(s) for s in trace.states]
        for k in range(lie_at, len(states)):
            states[k] = [t * 0.5 + 0.25 for t in states[k]]
        trace = Trace.from_states(prepared.manifest, states)
    body = sign_result(network_id=network_id, model_id=model["id"],
                       model_sha256=model["model_sha256"], trace=trace,
                       input_hash=seed.to_bytes(32, "big"), output_hash=b"\x00" * 32,
                       stake=1000, nonce=time.time_ns(), deadline=int(time.time()) + 3600,
                       private_key=PROVIDER.key, provider=PROVIDER.address)
    result = client.submit_result(body)
    client.upload_trace(result.id, trace.write(workdir / f"{result.id}.rtrace"))  # streamed
    return result.id


def run_demo(workdir: Path, console: Console) -> bool:
    """Run the demo in ``workdir``; returns True when every expectation held."""
    workdir = workdir.resolve()
    console.rule("[bold]refute demo")
    console.print("starting anvil, redis-server, API and workers…")
    with Anvil() as chain:
        return _run(workdir, chain.rpc_url, console)


def _run(workdir: Path, rpc_url: str, console: Console) -> bool:
    """The demo against the anvil chain at ``rpc_url``, which the prove worker verifies every
    proof on (the chain port)."""
    stack = LocalStack(workdir / "stack", extra_env={"REFUTE_FINALIZE_EVERY_S": "1",
                                                     "REFUTE_CHAIN_RPC_URL": rpc_url})
    with stack:
        os.environ["REFUTE_HOME"] = stack.env["REFUTE_HOME"]
        console.print(f"API {stack.api_url} (logs in {stack.workdir})")
        admin = RefuteClient(stack.api_url)
        watched_id, watched_key = admin.create_network(
            "watched", admin_token=stack.admin_token, spot_probability=1.0, spot_count=8,
            challenge_window_s=20)
        open_id, open_key = admin.create_network(
            "unwatched", admin_token=stack.admin_token, spot_probability=0.0,
            challenge_window_s=600)
        watched, unwatched = RefuteClient(stack.api_url, watched_key), RefuteClient(
            stack.api_url, open_key)
        onnx_bytes = zoo.mlp_8x256().onnx_bytes
        console.print("registering an 8×256 MLP (safe load, 8 segments, calibration)…")
        model_a = watched.register_model(onnx_bytes, calibration_samples=3)
        model_b = unwatched.register_model(onnx_bytes, calibration_samples=3)
        manifest = Manifest.from_json(model_a["manifest"])
        prepared = dataclasses.replace(prepare_model(onnx_bytes), manifest=manifest)
        prepared_b = dataclasses.replace(
            prepared, manifest=Manifest.from_json(model_b["manifest"]))
        console.print(f"  τ per step = {list(manifest.tolerances or [])}, R = {manifest.range}")
        honest = _submit(watched, watched_id, model_a, prepared=prepared, seed=1,
                         workdir=workdir, lie_at=None)
        cheat_a = _submit(watched, watched_id, model_a, prepared=prepared, seed=2,
                          workdir=workdir, lie_at=5)
        cheat_b = _submit(unwatched, open_id, model_b, prepared=prepared_b, seed=3,
                          workdir=workdir, lie_at=3)
        console.print(f"submitted: honest {honest}, cheat {cheat_a} (lies from state 5, "
                      f"spot-checked), cheat {cheat_b} (lies from state 3, unwatched)")
        blower = Whistleblower(stack.api_url, WHISTLEBLOWER.key, WHISTLEBLOWER.address)
        console.print(f"whistleblower challenges {cheat_b} over the whole trace…")
        start = time.monotonic()
        verdict_b = blower.challenge(cheat_b, prepared_b, zoo.mlp_8x256().sample_input(3),
                                     bond=100, report=lambda m: console.print(f"  {m}"))
        time_b = time.monotonic() - start
        console.print("waiting for the spot-check, the watcher's dispute and its proof…")
        final_a = watched.wait(cheat_a, until=frozenset({"PROVIDER_FAULT", "FINALIZED"}),
                               timeout=900, poll=1.0)
        final_honest = watched.wait(honest, timeout=300, poll=1.0)
        ctx = ServiceContext.create(Settings(
            database_url=stack.env["REFUTE_DATABASE_URL"],
            blob_dir=Path(stack.env["REFUTE_BLOB_DIR"]), spot_key=stack.env["REFUTE_SPOT_KEY"]))
        rows = []
        ok = final_honest.status == "FINALIZED" and final_a.status == "PROVIDER_FAULT" and \
            verdict_b["verdict"] == "PROVIDER_FAULT"
        for label, rid in (("spot-check + watcher", cheat_a), ("whistleblower", cheat_b)):
            row, passed = _settle_row(ctx, label, rid, workdir=workdir, rpc_url=rpc_url,
                                      console=console)
            rows.append(row)
            ok = ok and passed
        table = Table(title="refute demo: summary")
        for column in ("result", "caught by", "rounds", "step", "maxdiff / τ", "verdict",
                       "on-chain gas", "replay"):
            table.add_column(column, no_wrap=True)
        table.add_row(honest, "—", "—", "—", "—", final_honest.status, "—", "—")
        for row in rows:
            table.add_row(*row[:-1])
        console.print(table, width=160)
        for row in rows:
            console.print(f"bundle {row[-1]}", highlight=False, soft_wrap=True)
        console.print(f"whistleblower dispute took {time_b:.0f} s (bisection + proof)")
        from challenge.orchestrator import service_signing_key

        key = "0x" + service_signing_key(ctx.disputes).public_key.hex()
        console.print(f"check any bundle offline with: refute replay <bundle> --key {key}",
                      highlight=False, soft_wrap=True)
    return ok


def _settle_row(ctx: ServiceContext, label: str, rid: str, *, workdir: Path, rpc_url: str,
                console: Console) -> tuple[list[str], bool]:
    from sqlalchemy import select

    from challenge.orchestrator import export_dispute, service_signing_key
    from challenge.records import Dispute

    with ctx.sessions() as session:
        dispute = session.scalars(select(Dispute).where(
            Dispute.result_id == rid, Dispute.verdict == "PROVIDER_FAULT")).first()
    if dispute is None:
        return [rid[:16], label, "-", "-", "-", "NO VERDICT", "-", "-", "-"], False
    bundle = export_dispute(ctx.disputes, dispute.id, workdir / f"{dispute.id}.rdispute")
    report = replay(bundle, ["0x" + service_signing_key(ctx.disputes).public_key.hex()])
    transcript = json.loads(_member(bundle, "transcript.json"))
    outcome = next(e for e in transcript["events"]
                   if e["kind"] == "proofoutcome" and e["body"]["dispute_id"] == dispute.id)
    gas = _on_chain(outcome["body"], rpc_url, console)
    state = dispute.state
    row = [rid, label, str(state["rounds"]), str(outcome["body"]["step"]),
           f"{float(eval_fraction(outcome['body']['maxdiff_units'])):.1f} / "
           f"{outcome['body']['tolerance']}", str(dispute.verdict), f"{gas:,}" if gas else "-",
           "OK" if report.ok else "FAILED", str(bundle)]
    return row, report.ok and gas > 0


def eval_fraction(text: str) -> float:
    """A fraction written as ``a/b`` (or an integer) as a float."""
    from fractions import Fraction

    return float(Fraction(text))


def _member(bundle: Path, name: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(bundle) as archive:
        return archive.read(name)


def _on_chain(body: dict[str, Any], rpc_url: str, console: Console) -> int:
    """The gas of the transaction by which the prove worker verified the proof of a
    ``proofoutcome`` event body on anvil (recorded under ``chain``), once its receipt on the
    chain at ``rpc_url`` confirms it: mined, successful, sent to the recorded verifier, with the
    recorded gas. 0 when the proof was not verified on chain."""
    recorded = body.get("chain")
    if not isinstance(recorded, dict):
        console.print(f"  proof for step {body['step']} was NOT verified on chain")
        return 0
    receipt = Web3(Web3.HTTPProvider(rpc_url)).eth.get_transaction_receipt(
        HexStr(str(recorded["tx"])))
    gas = int(recorded["gas"])
    if receipt["status"] != 1 or receipt["gasUsed"] != gas or \
            receipt["to"] != recorded["contract"]:
        console.print(f"  proof for step {body['step']}: transaction {recorded['tx']} on anvil "
                      "does not match the transcript")
        return 0
    console.print(f"  proof for step {body['step']} verified on anvil: gas {gas:,}")
    return gas
