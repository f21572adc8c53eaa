"""``refute challenge`` (a whistleblower's dispute) and ``refute replay`` (an auditor's check)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from refute import console
from refute.errors import RefuteError


def challenge(
    result_id: Annotated[str, typer.Argument(help="The result to challenge.")],
    model: Annotated[Path, typer.Option(help="The result's ONNX model file.")],
    inputs: Annotated[Path, typer.Option("--input", help="The job's input (input.json).")],
    api: Annotated[str, typer.Option(help="Service URL.")] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(envvar="REFUTE_CHALLENGER_KEY",
                                     help="Challenger's private key (hex).")] = "",
    bond: Annotated[int, typer.Option(min=1, help="Bond to post.")] = 100,
    dim: console.DimOpt = [],  # noqa: B006
) -> None:
    """Challenge RESULT as a whistleblower: open a dispute and bisect it to a verdict."""
    from eth_account import Account

    from challenge.whistleblower import Whistleblower
    from refute.provider import prepare_model, read_inputs_json

    try:
        if not key:
            raise RefuteError("a challenger key is needed (--key or REFUTE_CHALLENGER_KEY)")
        account = Account.from_key(key)
        prepared = prepare_model(model, dims=console.parse_dims(dim))
        feeds = read_inputs_json(inputs, prepared.loaded)
        final = Whistleblower(api, account.key, account.address).challenge(
            result_id, prepared, feeds, bond=bond,
            report=lambda m: console.out.print(m, highlight=False))
    except (RefuteError, ValueError) as exc:
        raise console.fail(exc if isinstance(exc, RefuteError) else RefuteError(str(exc))) from exc
    console.out.print(f"dispute {final['id']}: {final['verdict']}", highlight=False)


def replay_bundle(
    bundle: Annotated[Path, typer.Argument(help="Dispute bundle (.rdispute).")],
    trusted_key: Annotated[list[str], typer.Option("--key", help="A BLS public key (hex) you "
                                                   "trust to sign transcripts; repeat for "
                                                   "co-signers (each must have signed). Keys "
                                                   "named in the bundle are never trusted.")]
    = [],  # noqa: B006
) -> None:
    """Re-check a dispute bundle offline and print a report; exit 1 if any check fails.

    The transcript's signature passes only against a key given with --key."""
    from challenge.replay import replay

    report = replay(bundle, trusted_key)
    signers = ", ".join(report.signers) or "unknown (no valid signer found in the bundle)"
    state = "trusted" if report.trusted else "NOT trusted"
    console.out.print(f"signed by: {signers} ({state})", soft_wrap=True, highlight=False)
    for line in report.checks:
        mark = "[green]PASS[/green]" if line.ok else "[red]FAIL[/red]"
        console.out.print(f"{mark} {line.name:<11} {escape(line.text())}", soft_wrap=True,
                       highlight=False)
    if not trusted_key and report.signers:
        console.out.print(f"to trust the signer, run: refute replay {escape(str(bundle))} --key "
                       f"{report.signers[0]}", soft_wrap=True, highlight=False)
    if not report.ok:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add the dispute commands to the ``refute`` app."""
    app.command()(challenge)
    app.command("replay")(replay_bundle)
