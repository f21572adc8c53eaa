"""Benchmark: every model of ``../shared/models`` through registration, tracing and disputes.

For each model, in a fresh child process (its own peak memory, a wall-clock limit):

1. **load**: pins (from the model's ``input.json``), folded nodes, segments;
2. **check**: the segments reproduce the whole model bit for bit on the model's input;
3. **calibrate**: scale (raised past τ-rule refusals), range R, τ and EZKL settings per
   segment, on the input plus seeded samples;
4. **trace**: the honest trace of the input and its commitment;
5. **honest**: every step proven on the honest states and verified (offline and on anvil, one
   verifier contract per circuit), each decided for the provider (CHALLENGER_FAULT);
6. **cheat** (models with ≥ 2 segments): a claimed state of the middle step pushed off its
   honest value (inside the range rule) is proven, verified on anvil and convicted
   (PROVIDER_FAULT).

A model stops at its first failure, recorded with its stage and one-line reason. Results go to
a JSON-lines file, one row per model (``--resume`` skips the models already there), and a table
with totals is printed at the end.

Run: ``.venv/bin/python -m bench.bench_corpus [--models a,b] [--timeout 1800] [--no-chain]
[--out out/bench_corpus.jsonl] [--resume]``. Uses the development SRS under ``REFUTE_HOME``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("REFUTE_SHARED", REPO.parent / "shared")) / "models"
STAGES = ("load", "check", "calibrate", "trace", "honest", "cheat")

console = Console(stderr=True)


class _Stages:
    """Wall time per stage, and the stage running now (named in a failure)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current = "start"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
        start = time.perf_counter()
        console.print(f"  {name}…", highlight=False)
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


def run_model(name: str, rpc_url: str | None, row: dict[str, Any],
              stages: _Stages | None = None) -> None:
    """Everything the benchmark does to one model of the corpus, filling ``row``; verifies on
    the anvil at ``rpc_url`` (offline only if None). Raises on the first failure (the caller
    records it); ``tests/test_corpus_sample.py`` runs it on a sample."""
    import dataclasses

    import numpy as np

    from prover.chain import RpcChain
    from prover.config import make_prover
    from refute.executor import DeterministicExecutor
    from refute.provider import (
        calibration_inputs,
        input_sizes,
        prepare_model,
        random_inputs,
        read_inputs_json,
        run_trace,
    )
    from refute.segmentation import check_reproduces, run_segments
    from refute.settings import get_settings
    from refute.tiling import worst_tile
    from refute.trace import Trace
    from refute.verdict import Verdict

    stages = stages or _Stages()
    folder = MODELS / name
    sample = folder / "input.json"
    executor = DeterministicExecutor()
    with stages.stage("load"):
        prepared = prepare_model(folder / "network.onnx", executor=executor,
                                 input_sizes=input_sizes(sample) if sample.is_file() else None)
        loaded = prepared.loaded
        row["pins"] = [p.describe() for p in loaded.pins]
        row["folded"] = loaded.folded_nodes
        row["nodes"] = len(loaded.nodes)
        row["segments"] = prepared.segmentation.num_segments
        row["ops"] = sorted({n.op_type for n in loaded.nodes})
    with stages.stage("check"):
        feeds = (read_inputs_json(sample, loaded) if sample.is_file()
                 else random_inputs(loaded, seed=0))
        check_reproduces(executor, prepared.segmentation, feeds)
        row["bit_exact"] = True
    with stages.stage("calibrate"):
        from prover.registration import calibrate_for_registration

        samples = calibration_inputs(prepared, feeds if sample.is_file() else None, 3,
                                     executor=executor)
        manifest, report, registration = calibrate_for_registration(
            prepared, samples, budget_bytes=get_settings().proving_budget_bytes,
            executor=executor)
        row["scale"] = registration.scale
        if registration.refusals:
            raise RuntimeError(registration.refusals[0])
        prepared = dataclasses.replace(prepared, manifest=manifest)
        row["tolerances"] = list(manifest.tolerances or ())
        row["range"] = manifest.range
        row["logrows"] = [int(s.settings["run_args"]["logrows"]) for s in report.segments
                          if s.settings is not None]
    with stages.stage("trace"):
        trace = run_trace(prepared, feeds, executor=executor)
        states = run_segments(executor, prepared.segmentation, feeds)
    prover = make_prover(get_settings())
    chain = (RpcChain(rpc_url, get_settings().home / "corpus-chain") if rpc_url is not None
             else None)
    def tile_of(i: int, claimed: list[np.ndarray]) -> int | None:
        """For a tiled step, the tile an honest challenger names (where ``claimed`` differs
        most from the honest state)."""
        tiling = prover.tiling(prepared, manifest, i)
        return None if tiling is None else worst_tile(tiling, states[i], claimed).index

    with stages.stage("honest"):
        gas, tiles = [], []
        for i in range(1, manifest.num_segments + 1):
            tile = tile_of(i, states[i])
            proof = prover.prove_step(prepared, manifest, i, states[i - 1], states[i],
                                      tile=tile)
            outcome = prover.verify_step(prepared, manifest, proof, trace.commitment,
                                         states=states[i - 1 : i + 1])
            if outcome.verdict is not Verdict.CHALLENGER_FAULT:
                raise RuntimeError(f"honest step {i} decided {outcome.verdict.name}")
            gas.append(_verify_on_chain(
                chain, prover.step_circuit(prepared, manifest, i, tile=tile), proof.proof))
            tiles.append(tile)
        row["honest_steps"] = manifest.num_segments
        row["gas"] = gas
        row["tiles_proven"] = tiles
    if manifest.num_segments < 2:
        return
    with stages.stage("cheat"):
        m = (manifest.num_segments + 1) // 2
        assert manifest.range is not None
        lie = [t.copy() for t in states[m]]
        flat = lie[0].reshape(-1)
        flat[0] = np.float32(-manifest.range / 2 if flat[0] >= 0 else manifest.range / 2)
        cheated = [*states[:m], lie, *states[m + 1:]]
        commitment = Trace.from_states(manifest, cheated).commitment
        tile = tile_of(m, lie)
        proof = prover.prove_step(prepared, manifest, m, states[m - 1], lie, tile=tile)
        outcome = prover.verify_step(prepared, manifest, proof, commitment,
                                         states=[states[m - 1], lie])
        if outcome.verdict is not Verdict.PROVIDER_FAULT:
            raise RuntimeError(f"cheat at step {m} decided {outcome.verdict.name}")
        _verify_on_chain(chain, prover.step_circuit(prepared, manifest, m, tile=tile),
                         proof.proof)
        row["cheat_step"] = m


def _verify_on_chain(chain: Any, circuit: Any, proof: dict[str, Any]) -> int | None:
    """Verify ``proof`` of ``circuit`` by a transaction through ``chain`` (a
    :class:`prover.chain.RpcChain`: one verifier contract per verifying key); its gas, or None
    when there is no chain."""
    if chain is None:
        return None
    srs = Path(circuit.srs_path).read_bytes()
    outcome = chain.verify(circuit.vk_path.read_bytes(), circuit.settings_path.read_bytes(),
                           srs, proof)
    return int(outcome["gas"])


def _child(name: str, rpc_url: str | None, out: Path) -> None:
    """Run one model and write its row to ``out`` (a failure is a row too)."""
    stages = _Stages()
    row: dict[str, Any] = {"model": name, "status": "ok"}
    try:
        run_model(name, rpc_url, row, stages)
    except Exception as exc:  # every failure is a result: stage and first line
        reason = getattr(exc, "reason", None) or str(exc).strip().splitlines()[0:1]
        text = reason if isinstance(reason, str) else (reason[0] if reason else type(exc).__name__)
        row.update(status="failed", stage=stages.current,
                   reason=f"{type(exc).__name__}: {text}"[:300])
    row["seconds"] = stages.seconds
    out.write_text(json.dumps(row))


def _spawn(name: str, rpc_url: str | None, timeout: float, workdir: Path) -> dict[str, Any]:
    """Run :func:`_child` in a fresh process; add its peak memory (wait4) and total time."""
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.bench_corpus", "--child", name, "--child-out", str(out)]
    if rpc_url:
        cmd += ["--rpc-url", rpc_url]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    deadline = start + timeout
    status, usage = 0, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, 9)
            _pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if out.is_file():
        row: dict[str, Any] = json.loads(out.read_text())
    else:
        timed_out = elapsed >= timeout
        row = {"model": name, "status": "failed", "stage": "timeout" if timed_out else "crash",
               "reason": f"over the {timeout:.0f} s limit" if timed_out
               else f"child exited with status {proc.returncode}"}
    row["total_s"] = round(elapsed, 1)
    row["peak_mb"] = round(usage.ru_maxrss / 1024) if usage is not None else None
    return row


def _table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="shared corpus: register, trace, prove every step")
    for column in ("model", "pins", "folded", "segs", "logrows", "τ", "status", *STAGES,
                   "total s", "peak MB", "gas"):
        table.add_column(column)
    for r in rows:
        secs = r.get("seconds", {})
        status = r["status"] if r["status"] == "ok" else f"{r.get('stage')}: {r.get('reason')}"
        table.add_row(
            r["model"], " ".join(p.split(" (")[0] for p in r.get("pins", [])),
            str(r.get("folded", "")), str(r.get("segments", "")),
            ",".join(map(str, r.get("logrows", []))), ",".join(map(str, r.get("tolerances", []))),
            status, *(f"{secs[s]:.1f}" if s in secs else "" for s in STAGES),
            str(r.get("total_s", "")), str(r.get("peak_mb", "")),
            f"{min(r['gas']):,}–{max(r['gas']):,}" if r.get("gas") and None not in r["gas"]
            else "",
        )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments; run the corpus (or one child)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_corpus.jsonl")
    parser.add_argument("--resume", action="store_true", help="skip models already in --out")
    parser.add_argument("--no-chain", action="store_true", help="verify offline only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rpc-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.rpc_url, args.child_out)
        return
    names = (args.models.split(",") if args.models else
             sorted(d.name for d in MODELS.iterdir() if (d / "network.onnx").is_file()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.resume and args.out.is_file():
        done = {r["model"]: r for r in map(json.loads, args.out.read_text().splitlines())}
    rows = [done[n] for n in names if n in done]
    todo = [n for n in names if n not in done]
    workdir = args.out.parent / "bench_corpus.d"
    workdir.mkdir(exist_ok=True)
    from prover.evm import Anvil

    started = time.perf_counter()
    with Anvil() if not args.no_chain else _no_chain() as chain:
        rpc_url = chain.rpc_url if chain is not None else None
        for k, name in enumerate(todo, start=1):
            console.print(f"[{k}/{len(todo)}] {name}", highlight=False)
            row = _spawn(name, rpc_url, args.timeout, workdir)
            console.print(f"  → {row['status']} {row.get('stage', '')} {row.get('reason', '')} "
                          f"({row['total_s']} s, {row['peak_mb']} MB)", highlight=False)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            rows.append(row)
    rows.sort(key=lambda r: str(r["model"]))
    Console(width=250).print(_table(rows))
    ok = [r for r in rows if r["status"] == "ok"]
    cheats = [r for r in ok if "cheat_step" in r]
    steps = sum(int(r.get("honest_steps", 0)) for r in ok)
    print(f"models {len(rows)}: {len(ok)} registered, traced bit-exactly and proved every step "
          f"({steps} honest steps upheld; {len(cheats)} cheats convicted); "
          f"{len(rows) - len(ok)} refused or failed; "
          f"this run {time.perf_counter() - started:.0f} s")
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['model']}: {r.get('stage')}: {r.get('reason')}")


@contextmanager
def _no_chain() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
