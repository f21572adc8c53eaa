"""The demo's results: one submitted as the provider (:func:`send_result`), and the summary
of what their disputes came to: the table, each bundle replayed, each proof's transaction
read back from anvil."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_typing import HexStr
from rich.console import Console
from rich.table import Table
from web3 import Web3

from challenge.replay import replay
from refute.settings import Settings
from refute.trace import Trace
from verifier.client import RefuteClient, sign_result
from verifier.demo_progress import DisputeClock
from verifier.service import ServiceContext
from verifier.stack import LocalStack

PROVIDER = Account.from_key(b"\x31" * 32)


def send_result(client: RefuteClient, network_id: str, model: dict[str, Any], trace: Trace,
                *, seed: int, workdir: Path) -> str:
    """Sign and submit a result with ``trace``'s commitment, then upload the trace."""
    body = sign_result(network_id=network_id, model_id=model["id"],
                       model_sha256=model["model_sha256"], trace=trace,
                       input_hash=seed.to_bytes(32, "big"), output_hash=b"\x00" * 32,
                       stake=1000, nonce=time.time_ns(), deadline=int(time.time()) + 3600,
                       private_key=PROVIDER.key, provider=PROVIDER.address)
    result = client.submit_result(body)
    client.upload_trace(result.id, trace.write(workdir / f"{result.id}.rtrace"))  # streamed
    return result.id


def service_context(stack: LocalStack) -> ServiceContext:
    """The service's stores, opened from this process (to read and export the disputes)."""
    return ServiceContext.create(Settings(
        database_url=stack.env["REFUTE_DATABASE_URL"],
        blob_dir=Path(stack.env["REFUTE_BLOB_DIR"]), spot_key=stack.env["REFUTE_SPOT_KEY"]))


_COLUMNS = ("result", "caught by", "rounds", "step", "tile", "maxdiff / τ", "verdict",
            "on-chain gas", "replay", "dispute s", "proof s")


def print_summary(console: Console, honest: str, honest_status: str,
                  rows: Sequence[Sequence[str]]) -> None:
    """The summary table (one row per result) and the dispute bundles."""
    table = Table(title="refute demo: summary")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold")  # a narrow terminal folds cells, never cuts
    table.add_row(honest, "—", "—", "—", "—", "—", honest_status, "—", "—", "—", "—")
    for row in rows:
        table.add_row(*row[:-1])
    if console.is_terminal:
        console.print(table)
    else:  # a file or a pipe: the table at its own width, not the default 80 columns
        Console(file=console.file, width=max(console.width, 200), color_system=None).print(
            table)
    for row in rows:
        console.print(f"bundle {row[-1]}", highlight=False, soft_wrap=True)


def print_replay_hint(console: Console, ctx: ServiceContext) -> None:
    """How to check the bundles offline: ``refute replay`` with the service's signing key."""
    from challenge.orchestrator import service_signing_key

    key = "0x" + service_signing_key(ctx.disputes).public_key.hex()
    console.print(f"check any bundle offline with: refute replay <bundle> --key {key}",
                  highlight=False, soft_wrap=True)


def settle_row(ctx: ServiceContext, label: str, rid: str, *, workdir: Path, rpc_url: str,
               console: Console, clock: DisputeClock) -> tuple[list[str], bool]:
    """The summary row of a cheat (the columns of :data:`_COLUMNS`, then its bundle) and
    whether it was convicted, its bundle replays and its proof was verified on anvil; the
    dispute's and the proof's times are ``clock``'s."""
    from sqlalchemy import select

    from challenge.orchestrator import export_dispute, service_signing_key
    from challenge.records import Dispute

    with ctx.sessions() as session:
        dispute = session.scalars(select(Dispute).where(
            Dispute.result_id == rid, Dispute.verdict == "PROVIDER_FAULT")).first()
    if dispute is None:
        return [rid, label, "-", "-", "-", "-", "NO VERDICT", "-", "-", "-", "-", "-"], False
    bundle = export_dispute(ctx.disputes, dispute.id, workdir / f"{dispute.id}.rdispute")
    report = replay(bundle, ["0x" + service_signing_key(ctx.disputes).public_key.hex()])
    transcript = json.loads(_member(bundle, "transcript.json"))
    own = [e for e in transcript["events"]
           if isinstance(e.get("body"), dict) and e["body"].get("dispute_id") == dispute.id]
    outcome = next(e["body"] for e in own if e["kind"] == "proofoutcome")
    gas = _on_chain(outcome, rpc_url, console)
    tiles = next((e["body"].get("tiles") or [] for e in own if e["kind"] == "challenge"), [])
    step = int(outcome["step"])
    tile = outcome.get("tile")
    of = f" of {tiles[step - 1]}" if len(tiles) >= step else ""
    dispute_s, proof_s = clock.seconds(dispute.id)
    state = dispute.state
    row = [rid, label, str(state["rounds"]), str(step), "—" if tile is None else f"{tile}{of}",
           f"{float(eval_fraction(outcome['maxdiff_units'])):.1f} / "
           f"{outcome['tolerance']}", str(dispute.verdict), f"{gas:,}" if gas else "-",
           "OK" if report.ok else "FAILED", _seconds(dispute_s), _seconds(proof_s), str(bundle)]
    return row, report.ok and gas > 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


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
