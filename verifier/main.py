"""The ``refute`` command line, assembled from every layer's commands (the composition root).

``refute`` (core: segment, trace, inspect) ← ``prover`` (calibrate, prove, verify…) ←
``challenge`` (challenge, replay) ← ``verifier`` (demo, stack, serve, worker, db): each layer
registers its own commands here; none of them imports this module.
"""

from __future__ import annotations

import typer

from challenge import cli as challenge_cli
from prover import cli as prover_cli
from refute import cli as core_cli
from verifier import cli as service_cli

app = typer.Typer(
    name="refute",
    help="Verification of ML inference run on untrusted hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for layer in (core_cli, prover_cli, service_cli, challenge_cli):
    layer.register(app)


def main() -> None:
    """Entry point of ``refute`` and ``python -m verifier``."""
    app(prog_name="refute")
