"""Benchmark: disputes of a real-size model settled on tiles (issue 13).

For a model of ``bench/bench_models.py`` (MobileNet v1 224×224 by default, default cuts: 29
segments; or ``--model gpt2``, the GPT-2-small-shaped transformer: 73 segments), this

1. registers it as the service does (:func:`prover.registration.calibrate_for_registration`,
   every segment over the proving budget tiled), or reuses the manifest of an earlier run of the
   same model (``--manifest``, default ``out/<model>.manifest.json``; written after a
   registration), and reports the registration time;
2. runs one honest trace (deterministic executor);
3. for each step of ``--steps`` (default: MobileNet's first, a middle and the last; GPT-2's
   middle attention-score segment, Q·Kᵀ, middle Softmax·V segment and middle MLP segment): a
   provider lying by 0.5 in one element of that step's last output (inside the range rule) is
   disputed: the tile an honest challenger names (where the lie is,
   :func:`refute.tiling.worst_tile`) is proven, verified with the verifying key, bound to the
   commitment and judged — PROVIDER_FAULT expected — and verified again by a transaction on
   anvil (gas);
4. at the middle step, the honest state is disputed too: CHALLENGER_FAULT expected.

Printed per proof: step, operators, tiles of the segment, the tile's input and output shapes,
logrows, the step's calibration seconds, circuit setup seconds (cold: compile + keys, cached
afterwards per tile model) and the setup process's peak memory, prove seconds and the proving
process's peak memory (each runs in a child of its own, :mod:`prover.isolated`), maxdiff
against τ, verdict, gas. "dispute s" is what a dispute's settlement costs cold: setup + prove.
Exits 1 if a verdict is not the expected one.

Run: ``.venv/bin/python -m bench.bench_tiled_disputes [--model mobilenet_v1|gpt2]
[--steps 1,15,29] [--only-steps] [--no-chain] [--out FILE]``. A development SRS (unsafe; fine
for timing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.bench_commitment import prepare
from bench.bench_corpus import _verify_on_chain
from bench.bench_models import bench_model
from prover.calibration import calibrate_model
from prover.chain import RpcChain
from prover.circuit import META
from prover.config import make_prover
from prover.evm import Anvil
from prover.registration import calibrate_for_registration
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, random_inputs
from refute.segmentation import run_segments
from refute.settings import get_settings
from refute.tiling import worst_tile
from refute.trace import Trace
from refute.verdict import Verdict

#: How far the lie moves one output element (float units; far beyond τ, inside R).
LIE = 0.5
#: ``--model`` aliases to bench_models names.
ALIASES = {"mobilenet": "mobilenet_v1", "gpt2": "gpt2_small"}


def default_steps(prepared: PreparedModel) -> list[int]:
    """A transformer's middle attention-score segment (Q·Kᵀ), middle attention segment
    (Softmax, ·V) and middle MLP segment (the one with the GELU's Tanh); any other model's
    first, middle and last segments."""
    segments = prepared.segmentation.segments
    n = len(segments)
    scores = [s.index for s in segments if s.op_types == ("MatMul", "Mul", "Add")]
    attention = [s.index for s in segments if "Softmax" in s.op_types]
    mlp = [s.index for s in segments if "Tanh" in s.op_types]
    if scores and attention and mlp:
        return sorted(min(c, key=lambda i: abs(i - n / 2)) for c in (scores, attention, mlp))
    return sorted({1, (n + 1) // 2, n})


def register(prepared: PreparedModel, cached: Path, console: Console, *,
             only: list[int] | None = None) -> tuple[Manifest, float, dict[int, float]]:
    """The calibrated manifest (from ``cached`` when it is this model's), the seconds the
    registration took (0 when reused) and per segment its calibration seconds. With ``only``,
    just those segments are calibrated (as registration would: tiled when over the budget), no
    range circuit, nothing cached: a quicker run of the disputes, not a registration."""
    if only is None and cached.is_file():
        manifest = Manifest.from_json(json.loads(cached.read_text()))
        if manifest.model_sha256 == prepared.manifest.model_sha256 and \
                manifest.cuts == prepared.manifest.cuts:
            console.print(f"[dim]reusing the registration in {cached}[/dim]")
            return manifest, 0.0, {}
    start = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        console.print(f"[dim]{time.perf_counter() - start:7.1f} s {stage} {done}/{total}[/dim]")

    inputs = [random_inputs(prepared.loaded, seed=s) for s in range(2)]
    if only is not None:
        manifest, calibration = calibrate_model(
            prepared, inputs, progress=progress, only=only,
            budget_bytes=get_settings().proving_budget_bytes)
        failed = [s.reason for s in calibration.segments if s.index in only and s.reason]
        if failed:
            raise SystemExit(f"calibration failed: {failed[0]}")
        return manifest, time.perf_counter() - start, {
            s.index: s.seconds for s in calibration.segments if s.index in only}
    manifest, calibration, report = calibrate_for_registration(
        prepared, inputs, progress=progress)
    if report.refusals:
        raise SystemExit(f"registration refused: {report.refusals[0]}")
    seconds = time.perf_counter() - start
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(manifest.to_json()))
    return manifest, seconds, {s.index: s.seconds for s in calibration.segments}


@contextlib.contextmanager
def maybe_chain(enabled: bool) -> Iterator[RpcChain | None]:
    """An anvil chain for the on-chain verification, or None."""
    if not enabled:
        yield None
        return
    with Anvil() as anvil:
        yield RpcChain(anvil.rpc_url, get_settings().home / "tiled-chain")


def dispute(prepared: PreparedModel, states: list[list[np.ndarray]], step: int, *,
            lie: bool, chain: RpcChain | None) -> dict[str, Any]:
    """Prove the tile an honest challenger names at ``step`` (after a lie in one element
    when ``lie``) and judge it."""
    manifest = prepared.manifest
    prover = make_prover(get_settings())
    claimed = [t.copy() for t in states[step]]
    if lie:  # in the last output: the one the segment computes (not a residual passed on)
        flat = claimed[-1].reshape(-1)
        flat[flat.size // 2] += np.float32(LIE)
    trace = Trace.from_states(manifest, [*states[:step], claimed, *states[step + 1:]])
    tiling = prover.tiling(prepared, manifest, step)
    tile = None if tiling is None else worst_tile(tiling, states[step], claimed).index
    start = time.perf_counter()
    circuit = prover.step_circuit(prepared, manifest, step, tile=tile)
    setup_s = time.perf_counter() - start
    built = json.loads((circuit.folder / META).read_text())
    start = time.perf_counter()
    proof = prover.prove_step(prepared, manifest, step, states[step - 1], claimed, tile=tile)
    prove_s = time.perf_counter() - start
    outcome = prover.verify_step(prepared, manifest, proof, trace.commitment,
                                 states=[states[step - 1], claimed])
    gas = _verify_on_chain(chain, circuit, proof.proof)
    segment = prepared.segmentation.segments[step - 1]
    chosen = None if tiling is None or tile is None else tiling.tiles[tile]
    return {
        "step": step, "lie": lie, "ops": list(segment.op_types),
        "tiles": 1 if tiling is None else len(tiling.tiles), "tile": tile,
        "tile_input": None if chosen is None else [list(s) for s in chosen.input_shapes],
        "tile_output": None if chosen is None else list(chosen.output_shape),
        "logrows": circuit.logrows, "setup_s": setup_s, "prove_s": prove_s,
        "setup_peak_gb": (built.get("setup_peak_bytes") or 0) / 2**30,
        "prove_peak_gb": (proof.prove_peak_bytes or 0) / 2**30,
        "maxdiff_units": float(outcome.maxdiff_units), "tolerance": outcome.tolerance,
        "verdict": outcome.verdict.name, "gas": gas,
        "expected": (Verdict.PROVIDER_FAULT if lie else Verdict.CHALLENGER_FAULT).name,
    }


def main() -> None:
    """Register, trace, dispute the chosen steps; print the table (JSON with ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v1")
    parser.add_argument("--steps", default=None, help="comma-separated steps (default: "
                        "first, middle, last)")
    parser.add_argument("--manifest", type=Path, default=None)
    parser.add_argument("--no-chain", action="store_true")
    parser.add_argument("--only-steps", action="store_true",
                        help="calibrate only the disputed steps (quicker; not a registration)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    name = ALIASES.get(args.model, args.model)
    model = bench_model(name)
    prepared, _prepare_s, _refusal = prepare(model, None)
    n = prepared.segmentation.num_segments
    steps = [int(x) for x in args.steps.split(",")] if args.steps else default_steps(prepared)
    manifest, registration_s, calibrate_s = register(
        prepared, args.manifest or Path("out") / f"{name}.manifest.json", console,
        only=steps if args.only_steps else None)
    prepared = dataclasses.replace(prepared, manifest=manifest)
    states = run_segments(DeterministicExecutor(), prepared.segmentation,
                          random_inputs(prepared.loaded, seed=7))
    rows = []
    with maybe_chain(not args.no_chain) as chain:
        for step in steps:
            console.print(f"[dim]step {step}: a lie, proven on its tile…[/dim]")
            rows.append(dispute(prepared, states, step, lie=True, chain=chain))
        middle = steps[len(steps) // 2]
        console.print(f"[dim]step {middle}: the honest state, proven on a tile…[/dim]")
        rows.append(dispute(prepared, states, middle, lie=False, chain=chain))
    for r in rows:
        r["calibrate_s"] = calibrate_s.get(r["step"])
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    what = "calibration of the disputed steps" if args.only_steps else "registration"
    table = Table(title=f"{name}: {n} segments, {what} "
                        f"{registration_s:.0f} s{' (reused)' if not registration_s else ''}, "
                        f"process peak {peak_gb:.1f} GB")
    for column in ("step", "claim", "ops", "tiles", "tile in → out", "logrows", "calibrate s",
                   "setup s (GB)", "prove s (GB)", "dispute s", "maxdiff / τ", "verdict", "gas"):
        table.add_column(column)
    for r in rows:
        calibrated = r["calibrate_s"]
        table.add_row(str(r["step"]), "lie" if r["lie"] else "honest", " ".join(r["ops"]),
                      str(r["tiles"]), f"{r['tile_input']} → {r['tile_output']}",
                      str(r["logrows"]), "-" if calibrated is None else f"{calibrated:.0f}",
                      f"{r['setup_s']:.0f} ({r['setup_peak_gb']:.1f})",
                      f"{r['prove_s']:.0f} ({r['prove_peak_gb']:.1f})",
                      f"{r['setup_s'] + r['prove_s']:.0f}",
                      f"{r['maxdiff_units']:.1f} / {r['tolerance']}",
                      r["verdict"] if r["verdict"] == r["expected"]
                      else f"[red]{r['verdict']}[/red]",
                      "-" if r["gas"] is None else f"{r['gas']:,}")
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps({"model": name, "segments": n,
                                        "registration_s": registration_s, "peak_gb": peak_gb,
                                        "disputes": rows}, indent=1))
    if any(r["verdict"] != r["expected"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
