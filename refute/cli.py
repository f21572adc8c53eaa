"""The core commands of the ``refute`` command line: ``segment``, ``trace``, ``inspect``.

The whole command line is assembled by :mod:`verifier.main`.

Errors print one line (``error: <reason>``) on stderr and exit with status 2; nothing is written
on failure. Long work shows a progress display on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from refute import console, safejson
from refute.errors import BundleError, InputError, RefuteError
from refute.manifest import Manifest
from refute.provider import (
    input_sizes,
    prepare_for_manifest,
    prepare_model,
    read_inputs_json,
    run_trace,
)
from refute.quantize import DEFAULT_SCALE
from refute.segmentation import node_cost
from refute.trace import Trace


def segment(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    dim: console.DimOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    shape: console.ShapeOpt = [],  # noqa: B006
    cuts: console.CutsOpt = None,
    max_segments: console.MaxSegOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the segment table of MODEL (default policy, or the given cuts)."""
    try:
        with console.progress(not as_json) as progress:
            prepared = prepare_model(
                model, dims=console.parse_dims(dim), shapes=console.parse_shapes(shape),
                cuts=console.parse_cuts(cuts), max_segments=max_segments, progress=progress,
            )
    except RefuteError as exc:
        raise console.fail(exc) from exc
    console.print_pins(prepared.loaded)
    seg = prepared.segmentation
    if as_json:
        console.out.print_json(json.dumps(prepared.manifest.to_json()))
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
    console.out.print(table)


def trace(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    inputs: Annotated[Path, typer.Argument(help="Inputs as EZKL input.json ('input_data').")],
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Bundle path (default: <input>.rtrace).")
    ] = None,
    dim: console.DimOpt = [],  # noqa: B006
    shape: console.ShapeOpt = [],  # noqa: B006
    cuts: console.CutsOpt = None,
    max_segments: console.MaxSegOpt = None,
    scale: Annotated[int, typer.Option(help="Fixed-point scale (log2).")] = DEFAULT_SCALE,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads for hashing (default: all cores).")
    ] = None,
    deterministic: Annotated[
        bool, typer.Option(help="Run segment by segment under the deterministic executor (the "
                                "states a checker gets bit for bit) instead of one optimized "
                                "multi-threaded ONNX Runtime run, as a provider does.")
    ] = False,
    manifest: Annotated[
        Path | None,
        typer.Option(help="Calibrated manifest (from `refute calibrate`): its pins, cuts and "
                          "scale are used."),
    ] = None,
    spool: Annotated[
        bool, typer.Option(help="Let ONNX Runtime write the states into a file beside the "
                                "bundle (<out>.spool, removed afterwards) instead of memory: "
                                "for traces larger than memory.")
    ] = False,
) -> None:
    """Run MODEL on INPUTS, write the trace bundle and print the commitment."""
    try:
        with console.progress() as progress:
            if manifest is not None:
                prepared = prepare_for_manifest(model, _read_manifest(manifest))
            else:
                prepared = prepare_model(
                    model, dims=console.parse_dims(dim), shapes=console.parse_shapes(shape),
                    input_sizes=input_sizes(inputs), cuts=console.parse_cuts(cuts),
                    max_segments=max_segments, scale=scale, progress=progress,
                )
                console.print_pins(prepared.loaded)
            feeds = read_inputs_json(inputs, prepared.loaded)
            target = output or inputs.with_suffix(".rtrace")
            spool_file = target.with_name(target.name + ".spool") if spool else None
            ours = spool_file is not None and not spool_file.exists()  # else: refused, kept
            try:
                result = run_trace(prepared, feeds, deterministic=deterministic,
                                   threads=threads, spool=spool_file, progress=progress)
                result.write(target)
            finally:
                if ours and spool_file is not None:
                    spool_file.unlink(missing_ok=True)
    except RefuteError as exc:
        raise console.fail(exc) from exc
    _print_commitment(result, target)


def inspect(
    bundle: Annotated[Path, typer.Argument(help="Trace bundle (.rtrace) to verify.")],
) -> None:
    """Verify a trace bundle completely (hashes, leaves, root, manifest) and summarize it."""
    try:
        with console.progress() as progress:
            progress("verify", 0, 1)
            result = Trace.read(bundle)
            progress("verify", 1, 1)
    except RefuteError as exc:
        raise console.fail(exc) from exc
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
        console.out.print(f"leaf {k:<3} 0x{leaf.hex()}  {tensors}", highlight=False, soft_wrap=True)
    console.out.print(f"model    {manifest.model_sha256}", highlight=False)
    console.out.print(f"manifest {manifest.sha256}", highlight=False)
    console.out.print(f"scale    {manifest.scale}  segments {manifest.num_segments}",
                      highlight=False)
    console.out.print(f"bundle   {path}", highlight=False, soft_wrap=True)
    console.out.print(f"root     0x{result.commitment.root.hex()}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the core commands (``segment``, ``trace``, ``inspect``) to the ``refute`` app."""
    app.command()(segment)
    app.command()(trace)
    app.command()(inspect)
