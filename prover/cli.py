"""``refute calibrate``, ``refute check``, ``refute prove`` and ``refute verify``: the prover's
command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prover.calibration import CalibrationReport
from prover.config import make_prover, srs_store
from prover.offline import BundleOutcome, check_bundle, check_on_chain
from prover.proof_bundle import ProofBundle
from prover.registration import MAX_SCALE, calibrate_for_registration
from prover.report import RegistrationReport
from refute import console
from refute.errors import BundleError, RefuteError
from refute.manifest import Manifest, canonical_json
from refute.provider import (
    PreparedModel,
    calibration_inputs,
    input_sizes,
    prepare_for_manifest,
    prepare_model,
    read_inputs_json,
)
from refute.settings import get_settings
from refute.trace import Trace

SamplesOpt = Annotated[int, typer.Option(min=1, help="Extra seeded random inputs.")]
ScaleOpt = Annotated[int, typer.Option(
    help=f"Starting fixed-point scale (log2): raised (at most twice, up to {MAX_SCALE}) while "
         "the only refusals are segments whose τ is over 1/16 of the range bound, unless a "
         "discontinuity (a step in the output) causes it.")]
SafetyOpt = Annotated[float, typer.Option(min=1.0, help="τ safety factor.")]


def _calibrated(
    model: Path, *, dims: dict[str, int], shapes: dict[str, list[int]], cuts: list[int] | None,
    max_segments: int | None, inputs: list[Path], samples: int, scale: int, safety: float,
) -> tuple[PreparedModel, Manifest, CalibrationReport, RegistrationReport]:
    """Prepare MODEL (pinned from the first input file, if any) and calibrate it on the input
    files plus ``samples`` seeded inputs near the first (:func:`calibration_inputs`), choosing
    the scale from ``scale`` up (:func:`calibrate_for_registration`), showing progress per
    stage and segment."""
    with console.progress() as report:
        prepared = prepare_model(
            model, dims=dims, shapes=shapes,
            input_sizes=input_sizes(inputs[0]) if inputs else None,
            cuts=cuts, max_segments=max_segments, scale=scale, progress=report,
        )
        console.print_pins(prepared.loaded)
        given = [read_inputs_json(p, prepared.loaded) for p in inputs]
        data = [*calibration_inputs(prepared, given[0] if given else None, samples), *given[1:]]
        manifest, result, registration = calibrate_for_registration(
            prepared, data, budget_bytes=get_settings().proving_budget_bytes, safety=safety,
            progress=report)
    return dataclasses.replace(prepared, manifest=manifest), manifest, result, registration


def calibrate(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    output: Annotated[Path, typer.Option("--out", "-o", help="Manifest to write.")],
    dim: console.DimOpt = [],  # noqa: B006
    shape: console.ShapeOpt = [],  # noqa: B006
    cuts: console.CutsOpt = None,
    max_segments: console.MaxSegOpt = None,
    inputs: Annotated[
        list[Path], typer.Option("--input", help="Calibration input (input.json); repeat.")
    ] = [],  # noqa: B006
    samples: SamplesOpt = 4,
    scale: ScaleOpt = 7,
    safety: SafetyOpt = 2.0,
) -> None:
    """Calibrate MODEL: scale, range R, circuit settings and τ per segment; write the manifest.

    The scale starts at --scale and is raised while the only refusals are segments whose τ is
    over 1/16 of the range bound (not past a discontinuity); refused segments are printed (the
    manifest is written all the same)."""
    try:
        _prepared, manifest, result, registration = _calibrated(
            model, dims=console.parse_dims(dim), shapes=console.parse_shapes(shape),
            cuts=console.parse_cuts(cuts), max_segments=max_segments, inputs=inputs,
            samples=samples, scale=scale, safety=safety,
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(canonical_json(manifest.to_json()))
    except RefuteError as exc:
        raise console.fail(exc) from exc
    for seg, line in zip(result.segments, registration.segments, strict=True):
        status = f"τ={seg.tolerance}" if seg.reason is None else f"UNPROVABLE: {seg.reason}"
        if seg.reason is None and line.reason:
            status += f"  REFUSED: {line.reason}"
        console.out.print(f"step {seg.index:<3} {status}", highlight=False)
    console.out.print(f"range R={result.range}  scale={result.scale}{_tried(registration)}",
                      highlight=False)
    console.out.print(f"manifest {output}  ({manifest.sha256})", highlight=False)


def check(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    sample: Annotated[
        Path | None,
        typer.Argument(help="A sample input (input.json): pins the symbolic dimensions and is "
                            "a calibration input."),
    ] = None,
    dim: console.DimOpt = [],  # noqa: B006
    shape: console.ShapeOpt = [],  # noqa: B006
    cuts: console.CutsOpt = None,
    max_segments: console.MaxSegOpt = None,
    samples: SamplesOpt = 4,
    scale: ScaleOpt = 7,
    safety: SafetyOpt = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
    = False,
) -> None:
    """Print MODEL's registration report: per segment its operators, state sizes, τ, circuit
    logrows, estimated proving memory and time, and whether it fits the proving budget.

    Exits with status 1 when the model would be refused (the reasons are printed)."""
    try:
        _prepared, _manifest, _result, report = _calibrated(
            model, dims=console.parse_dims(dim), shapes=console.parse_shapes(shape),
            cuts=console.parse_cuts(cuts), max_segments=max_segments,
            inputs=[sample] if sample is not None else [], samples=samples, scale=scale,
            safety=safety,
        )
    except RefuteError as exc:
        raise console.fail(exc) from exc
    if as_json:
        console.out.print_json(json.dumps(report.to_json()))
    else:
        _print_report(model, report)
    if report.refusals:
        raise typer.Exit(code=1)


def _tried(report: RegistrationReport) -> str:
    """`` (scales tried: 7, 9)`` when more than one scale was calibrated."""
    if len(report.scales_tried) < 2:
        return ""
    return f" (scales tried: {', '.join(map(str, report.scales_tried))})"


def _print_report(model: Path, report: RegistrationReport) -> None:
    table = Table(title=f"{model.name}: {len(report.segments)} segment(s), {report.nodes} "
                        f"nodes, scale {report.scale}{_tried(report)}, R={report.range:g}")
    for column in ("step", "ops", "in/out elements", "τ", "logrows", "est. memory",
                   "est. setup+prove", "budget", "calibrated in"):
        table.add_column(column)
    for s in report.segments:
        memory = "" if s.peak_bytes is None else f"{s.peak_bytes / 2**30:.2f} GiB"
        timing = ("" if s.setup_seconds is None or s.prove_seconds is None
                  else f"{s.setup_seconds:.0f}+{s.prove_seconds:.0f} s")
        table.add_row(
            str(s.index), " ".join(s.ops), f"{s.input_elements:,}/{s.output_elements:,}",
            "" if s.tolerance is None else str(s.tolerance),
            "" if s.logrows is None else str(s.logrows), memory, timing,
            ("fits" if s.tiles is None else f"fits, {s.tiles} tiles") if s.fits_budget
            else "[red]over[/red]" if s.reason is None
            else "[red]refused[/red]", f"{s.calibration_seconds:.1f} s",
        )
    console.out.print(table)
    for line in report.refusals:
        console.out.print(f"[red]refused[/red] {line}", highlight=False, soft_wrap=True)
    if not report.refusals:
        console.out.print(f"registrable: every segment proves within the budget of "
                          f"{report.budget_bytes / 2**30:.1f} GiB", highlight=False)


def prove(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    step: Annotated[int, typer.Argument(help="Step i (segment) to prove, or state k with "
                                             "--range.")],
    trace: Annotated[Path, typer.Argument(help="Trace bundle (.rtrace) with a calibrated "
                                               "manifest.")],
    output: Annotated[Path | None, typer.Option("--out", "-o", help="Proof bundle path.")]
    = None,
    range_proof: Annotated[bool, typer.Option("--range", help="Prove state STEP's range.")]
    = False,
) -> None:
    """Prove step STEP of TRACE (state i-1 → claimed state i) and write the proof bundle."""
    settings = get_settings()
    prover = make_prover(settings)
    try:
        with console.progress() as report:
            report("verify", 0, 1)
            result = Trace.read(trace)
            report("verify", 1, 1)
            prepared = prepare_for_manifest(model, result.manifest)
            stages = ["compile", "setup", "prove"]

            def stage(name: str) -> None:
                report("prove", stages.index(name) if name in stages else 0, len(stages))

            if range_proof:
                proof = prover.prove_range(prepared, result.manifest, step,
                                           result.states[step])
                circuit = prover.range_circuit(prepared, result.manifest, step,
                                               chunk=proof.tile)
                kind = "range"
            else:
                if not 1 <= step <= result.manifest.num_segments:
                    raise BundleError(f"step must be in 1..{result.manifest.num_segments}")
                proof = prover.prove_step(prepared, result.manifest, step,
                                          result.states[step - 1], result.states[step],
                                          progress=stage)
                circuit = prover.step_circuit(prepared, result.manifest, step)
                kind = "step"
            report("prove", len(stages), len(stages))
            bundle = ProofBundle.of(kind, result.manifest, result.commitment, proof, circuit,
                                    states=dict(enumerate(result.states)))
            target = output or trace.with_suffix(f".{kind}{step}.rproof")
            bundle.write(target)
            outcome = check_bundle(bundle, srs_store(settings))
    except RefuteError as exc:
        raise console.fail(exc) from exc
    _report(outcome)
    console.out.print(f"proof    {target}", highlight=False)

def verify(
    proof: Annotated[Path, typer.Argument(help="Proof bundle (.rproof).")],
    chain: Annotated[bool, typer.Option("--chain", help="Also verify on a local anvil.")]
    = False,
) -> None:
    """Check PROOF offline (EZKL verify, leaf binding, verdict) and, with --chain, on anvil."""
    settings = get_settings()
    try:
        bundle = ProofBundle.read(proof)
        outcome = check_bundle(bundle, srs_store(settings))
        _report(outcome)
        if chain:
            with console.progress() as report:
                report("chain", 0, 1)
                onchain = check_on_chain(bundle, srs_store(settings))
                report("chain", 1, 1)
            console.out.print(
                f"on chain eth_call={'valid' if onchain.call_ok else 'INVALID'}  "
                f"tx={'ok' if onchain.tx_ok else 'REVERTED'}  gas={onchain.gas_used:,}  "
                f"verifier={onchain.deployed_size:,} bytes", highlight=False,
            )
            if not (onchain.call_ok and onchain.tx_ok):
                raise typer.Exit(code=1)
    except RefuteError as exc:
        raise console.fail(exc) from exc


def register(app: typer.Typer) -> None:
    """Add the prover's commands to the ``refute`` app."""
    for command in (calibrate, check, prove, verify):
        app.command()(command)


def _report(outcome: BundleOutcome) -> None:
    what = "maxdiff" if outcome.kind == "step" else "max|v|"
    limit = "τ" if outcome.kind == "step" else "R·2^s"
    console.out.print(
        f"{outcome.kind} {outcome.index}: proof valid, bound to the commitment; "
        f"{what}={float(outcome.value_units):.4g} units, {limit}={float(outcome.threshold):.4g}",
        highlight=False,
    )
    console.out.print(f"verdict  {outcome.verdict.value}", highlight=False)
    if outcome.unsafe_srs:
        console.out.print("warning  verified with an UNSAFE development SRS (not for production)",
                       highlight=False)
