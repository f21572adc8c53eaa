"""What every ``refute`` subcommand shares: the consoles, one-line errors, progress, options.

Errors print one line (``error: <reason>``) on stderr and exit with status 2; nothing is written
on failure. Long work shows a progress display on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from refute.errors import RefuteError
from refute.loading import LoadedModel
from refute.provider import ProgressFn

#: Width of output that goes to a file or a pipe: rich's default there (80 columns) squeezes a
#: table's cells into many lines; a terminal keeps its own width.
PIPE_WIDTH = 200


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream is not None and stream.isatty()
    return Console(stderr=stderr, width=None if tty else PIPE_WIDTH)


out = _console(stderr=False)
err = _console(stderr=True)

_STAGES = {
    "load": "Loading model safely",
    "segment": "Segmenting",
    "check": "Checking segments reproduce the model",
    "execute": "Executing the model",
    "commit": "Hashing states (SHA-256 leaves) and committing",
    "calibrate": "Calibrating each segment's circuit (EZKL)",
    "tile": "Tiling segments over the proving budget (EZKL, per tile model)",
    "range": "Calibrating each state's range circuit (EZKL)",
    "rescale": "Recalibrating at a finer scale (τ over its share of the range)",
}


def print_pins(loaded: LoadedModel) -> None:
    """Print every symbolic dimension the loader pinned, with where its value came from."""
    for pin in loaded.pins:
        err.print(f"pinned {pin.describe()}", highlight=False, soft_wrap=True)
    if loaded.folded_nodes:
        err.print(f"folded {loaded.folded_nodes} constant node(s) (shape computations included)",
                  highlight=False)


@contextmanager
def progress(enabled: bool = True) -> Iterator[ProgressFn]:
    """A rich progress display on stderr, as a ``progress(stage, done, total)`` callback."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not enabled,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(_STAGES.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield report


def fail(exc: RefuteError) -> typer.Exit:
    """Print ``error: <reason>`` on stderr; the exit (status 2) for the caller to raise."""
    err.print(f"[red]error:[/red] {exc.reason}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def parse_dims(values: list[str]) -> dict[str, int]:
    """``--dim NAME=INTEGER`` options as a mapping."""
    dims: dict[str, int] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit():
            raise typer.BadParameter(f"--dim takes NAME=INTEGER, got {item!r}")
        dims[name] = int(value)
    return dims


def parse_shapes(values: list[str]) -> dict[str, list[int]]:
    """``--shape NAME=D1,D2,…`` options as a mapping."""
    shapes: dict[str, list[int]] = {}
    for item in values:
        name, sep, value = item.partition("=")
        parts = value.split(",")
        if not sep or not name or not all(p.isdigit() for p in parts):
            raise typer.BadParameter(f"--shape takes NAME=D1,D2,..., got {item!r}")
        shapes[name] = [int(p) for p in parts]
    return shapes


def parse_cuts(value: str | None) -> list[int] | None:
    """``--cuts 2,5`` as node positions (None when not given)."""
    if value is None:
        return None
    parts = [p for p in value.split(",") if p]
    if not all(p.isdigit() for p in parts):
        raise typer.BadParameter(f"--cuts takes comma-separated node positions, got {value!r}")
    return [int(p) for p in parts]


DimOpt = Annotated[
    list[str], typer.Option("--dim", help="Pin a symbolic dimension, e.g. batch_size=1.")
]
ShapeOpt = Annotated[
    list[str], typer.Option("--shape", help="Pin an input's shape, e.g. input=1,3,8,8.")
]
CutsOpt = Annotated[
    str | None, typer.Option("--cuts", help="Explicit interior cuts (node positions), e.g. 2,5.")
]
MaxSegOpt = Annotated[
    int | None, typer.Option("--max-segments", min=1, help="Cap the number of segments.")
]


