"""The ``refute`` command line.

Errors print one line (``error: <reason>``) on stderr and exit with status 2; nothing is written
on failure. Long work shows a progress display on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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
from rich.table import Table

from refute import safejson
from refute.errors import BundleError, InputError, RefuteError
from refute.manifest import Manifest
from refute.provider import ProgressFn, prepare_model, read_inputs_json, run_trace
from refute.quantize import DEFAULT_SCALE
from refute.segmentation import node_cost
from refute.trace import Trace

app = typer.Typer(
    name="refute",
    help="Verification of ML inference run on untrusted hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

_STAGES = {
    "load": "Loading model safely",
    "segment": "Segmenting",
    "check": "Checking segments reproduce the model",
    "execute": "Executing segments",
    "commit": "Hashing states (Poseidon) and committing",
}


@contextmanager
def _progress(enabled: bool = True) -> Iterator[ProgressFn]:
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


def _fail(exc: RefuteError) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc.reason}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _parse_dims(values: list[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit():
            raise typer.BadParameter(f"--dim takes NAME=INTEGER, got {item!r}")
        dims[name] = int(value)
    return dims


def _parse_shapes(values: list[str]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for item in values:
        name, sep, value = item.partition("=")
        parts = value.split(",")
        if not sep or not name or not all(p.isdigit() for p in parts):
            raise typer.BadParameter(f"--shape takes NAME=D1,D2,..., got {item!r}")
        shapes[name] = [int(p) for p in parts]
    return shapes


def _parse_cuts(value: str | None) -> list[int] | None:
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


@app.command()
def segment(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    dim: DimOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    shape: ShapeOpt = [],  # noqa: B006
    cuts: CutsOpt = None,
    max_segments: MaxSegOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the segment table of MODEL (default policy, or the given cuts)."""
    try:
        with _progress(not as_json) as progress:
            prepared = prepare_model(
                model, dims=_parse_dims(dim), shapes=_parse_shapes(shape),
                cuts=_parse_cuts(cuts), max_segments=max_segments, progress=progress,
            )
    except RefuteError as exc:
        raise _fail(exc) from exc
    seg = prepared.segmentation
    if as_json:
        out.print_json(json.dumps(prepared.manifest.to_json()))
        return
    table = Table(title=f"{model.name}: {seg.num_segments} segments, {len(seg.model.nodes)} nodes")
    for column in ("step", "nodes", "ops", "input state", "output state", "est. MACs", "sha256"):
        table.add_column(column)
    for s in seg.segments:
        macs = sum(node_cost(seg.model, n) for n in seg.model.nodes[s.start : s.end])
        table.add_row(
            str(s.index),
            f"{s.start + 1}..{s.end}",
            " ".join(s.op_types),
            "\n".join(f"{t.name} {list(t.shape)}" for t in s.inputs),
            "\n".join(f"{t.name} {list(t.shape)}" for t in s.outputs),
            f"{macs:,}",
            s.sha256[:12],
        )
    out.print(table)


@app.command()
def trace(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    inputs: Annotated[Path, typer.Argument(help="Inputs as EZKL input.json ('input_data').")],
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Bundle path (default: <input>.rtrace).")
    ] = None,
    dim: DimOpt = [],  # noqa: B006
    shape: ShapeOpt = [],  # noqa: B006
    cuts: CutsOpt = None,
    max_segments: MaxSegOpt = None,
    scale: Annotated[int, typer.Option(help="Fixed-point scale (log2).")] = DEFAULT_SCALE,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Threads for hashing (default: all cores).")
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(help="Calibrated manifest (from `refute calibrate`): its pins, cuts and "
                          "scale are used."),
    ] = None,
) -> None:
    """Run MODEL on INPUTS, write the trace bundle and print the commitment."""
    try:
        with _progress() as progress:
            if manifest is not None:
                from prover.cli import prepare_for

                prepared = prepare_for(model, _read_manifest(manifest))
            else:
                prepared = prepare_model(
                    model, dims=_parse_dims(dim), shapes=_parse_shapes(shape),
                    cuts=_parse_cuts(cuts), max_segments=max_segments, scale=scale,
                    progress=progress,
                )
            feeds = read_inputs_json(inputs, prepared.loaded)
            result = run_trace(prepared, feeds, workers=workers, progress=progress)
        target = output or inputs.with_suffix(".rtrace")
        result.write(target)
    except RefuteError as exc:
        raise _fail(exc) from exc
    _print_commitment(result, target)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Trace bundle (.rtrace) to verify.")],
) -> None:
    """Verify a trace bundle completely (hashes, leaves, root, manifest) and summarize it."""
    try:
        with _progress() as progress:
            progress("verify", 0, 1)
            result = Trace.read(bundle)
            progress("verify", 1, 1)
    except RefuteError as exc:
        raise _fail(exc) from exc
    _print_commitment(result, bundle)


def _read_manifest(path: Path) -> Manifest:
    try:
        data = safejson.loads(path.read_bytes(), what=f"manifest {path}")
    except OSError as exc:
        raise BundleError(f"cannot read manifest {path}: {exc.strerror}") from exc
    except InputError as exc:
        raise BundleError(exc.reason) from exc
    return Manifest.from_json(data)


def _print_commitment(result: Trace, path: Path) -> None:
    manifest = result.manifest
    for k, (specs, leaf) in enumerate(zip(manifest.states, result.commitment.leaves, strict=True)):
        tensors = ", ".join(f"{t.name}{list(t.shape)}" for t in specs)
        out.print(f"leaf {k:<3} 0x{leaf.hex()}  {tensors}", highlight=False, soft_wrap=True)
    out.print(f"model    {manifest.model_sha256}", highlight=False)
    out.print(f"manifest {manifest.sha256}", highlight=False)
    out.print(f"scale    {manifest.scale}  segments {manifest.num_segments}", highlight=False)
    out.print(f"bundle   {path}", highlight=False, soft_wrap=True)
    out.print(f"root     0x{result.commitment.root.hex()}", highlight=False)


def _register_components() -> None:
    from challenge.cli import register as register_challenge
    from prover.cli import register as register_prover
    from verifier.cli import register as register_verifier

    register_prover(app)
    register_verifier(app)
    register_challenge(app)


_register_components()


def main() -> None:
    """Entry point used by ``python -m refute``."""
    app(prog_name="refute")


if __name__ == "__main__":  # pragma: no cover
    main()
