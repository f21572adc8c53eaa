"""Benchmark: wall time from challenge to verdict, split into bisection and proving.

For an 8×256 MLP and a small CNN, in one process with a real database and blob store: a trace
lying from the middle state on is challenged over the whole trace by the service's watcher (it
answers from its own execution); the bisection runs to the step, then the step is proven with
EZKL (cold: circuit compiled and set up; warm: circuit reused) and the verdict applied. Waiting
on clocks is excluded (the watcher answers at once). For comparison it prints the time to prove
the whole model in one circuit as measured by ``bench/bench_prove.py`` when given
(``--whole mlp_8x256=154,cnn=47``).

Run: ``.venv/bin/python -m bench.bench_dispute [--models mlp_8x256,cnn] [--whole ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from challenge import orchestrator
from challenge.fakes import FakeTasks
from challenge.records import Network, RegisteredModel, Result, ResultStatus, new_id
from prover.calibration import calibrate_model
from refute import zoo
from refute.provider import prepare_model, random_inputs, run_trace
from refute.settings import Settings
from refute.trace import Trace
from verifier.db import migrate
from verifier.service import ServiceContext


def _one(model_name: str, work: Path, ctx: ServiceContext,
         lie_from: int | None) -> tuple[int, list[float]]:
    model = getattr(zoo, model_name)()
    prepared = prepare_model(model.onnx_bytes)
    manifest, _ = calibrate_model(prepared, [random_inputs(prepared.loaded, seed=s)
                                             for s in range(3)])
    prepared = dataclasses.replace(prepared, manifest=manifest)
    now = datetime.now(UTC)
    net, mdl = new_id("net"), new_id("mdl")
    with ctx.sessions() as s, s.begin():
        s.add(Network(id=net, name=net, created_at=now))
        s.add(RegisteredModel(id=mdl, network_id=net, model_sha256=manifest.model_sha256,
                              manifest_sha256=manifest.sha256, manifest=manifest.to_json(),
                              model_blob=ctx.blobs.put(model.onnx_bytes), created_at=now))
    times = []
    n = manifest.num_segments
    for _attempt in range(2):  # cold (builds the circuit), then warm (reuses it)
        trace = run_trace(prepared, model.sample_input(0))
        start_lie = lie_from if lie_from is not None else max(1, n // 2)
        states = [list(x) for x in trace.states]
        for k in range(start_lie, n + 1):
            states[k] = [t * 0.5 + 0.25 for t in states[k]]
        trace = Trace.from_states(manifest, states)
        rid = new_id("res")
        blob = ctx.blobs.put(trace.write(work / f"{rid}.rtrace").read_bytes())
        with ctx.sessions() as s, s.begin():
            s.add(Result(id=rid, network_id=net, model_id=mdl, message_hash=rid.ljust(64, "0"),
                         provider="0x" + "ab" * 20, nonce=rid, deadline=0, stake="10",
                         input_hash="0x", output_hash="0x",
                         trace_root="0x" + trace.commitment.root.hex(),
                         leaves=["0x" + x.hex() for x in trace.commitment.leaves],
                         signature="0x", status=ResultStatus.ACCEPTED, accepted_at=now,
                         challenge_deadline=now + timedelta(hours=1), trace_blob=blob))
        t0 = time.perf_counter()
        dispute_id = orchestrator.open_dispute(ctx.disputes, rid, challenger="service", lo=0,
                                               hi=n, bond=1, now=datetime.now(UTC))
        t1 = time.perf_counter()
        state = orchestrator.prove_pending(ctx.disputes, dispute_id, datetime.now(UTC))
        t2 = time.perf_counter()
        assert state is not None and state.verdict is not None
        times += [t1 - t0, t2 - t1]
    return n, times


def main() -> None:
    """Run and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp_8x256,cnn")
    parser.add_argument("--whole", default="")
    args = parser.parse_args()
    whole = dict(item.split("=") for item in args.whole.split(",") if item)
    console = Console(width=160)
    table = Table(title="challenge → verdict (clocks excluded)")
    for column in ("model", "segments", "bisection s", "prove cold s", "prove warm s",
                   "total warm s", "whole-model prove s", "whole / dispute (warm)"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="refute-bench-") as tmp:
        work = Path(tmp)
        os.environ["REFUTE_HOME"] = str(work / "home")
        settings = Settings(database_url=f"sqlite:///{work / 'b.db'}",
                            blob_dir=work / "blobs", spot_key="ab" * 16)
        migrate(settings.database_url)
        ctx = ServiceContext.create(settings, tasks=FakeTasks())  # proofs run here, timed
        for name in args.models.split(","):
            console.print(f"[dim]{name}…[/dim]")
            n, (b1, p1, b2, p2) = _one(name, work, ctx, None)
            w = float(whole[name]) if name in whole else None
            table.add_row(name, str(n), f"{(b1 + b2) / 2:.2f}", f"{p1:.1f}", f"{p2:.1f}",
                          f"{b2 + p2:.1f}", f"{w:.0f}" if w else "-",
                          f"{w / (b2 + p2):.1f}x" if w else "-")
    console.print(table)


if __name__ == "__main__":
    main()
