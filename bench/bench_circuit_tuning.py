"""What tuning EZKL's run arguments saves on adjudication circuits (issue 11).

For the first segment of each case, the adjudication circuit ``max |f(x) − y|`` is calibrated
twice on the extreme sample that :func:`prover.calibration.calibrate_segment` uses (x an honest
state, y pushed to ±R):

* **before**: the settings refute used until issue 11 (EZKL's default run arguments: 2 inner
  columns, decomposition 16384 × 2, check mode unsafe; one ``resources`` calibration);
* **after**: what :func:`prover.circuit.calibrated_settings` chooses now;

then each is compiled, set up and proven with a development SRS, each step in a fresh child
process so that its peak resident memory (``ru_maxrss``) is its own. Prints logrows, rows,
advice columns, proving-key bytes, setup and prove seconds, peak memory of setup and of proving,
whether the proof verifies, the after/before ratios, and the prediction of
:func:`prover.budget.estimate` next to each measurement.

Cases: ``2l_relu_sigmoid_conv`` and ``3l_relu_conv_fc`` (shared models, first segment),
``lenet5_conv1`` (a LeNet-5 first step built here: Conv 1→6 5×5 on 32×32, Mul, Add,
AveragePool 2; 1,024 inputs and 1,176 outputs, as in EZKL-NOTES.md) and ``mlp_8x256`` (one
Linear 256→256 + ReLU, the dense reference).

    .venv/bin/python -m bench.bench_circuit_tuning [--cases 2l_relu_sigmoid_conv,lenet5_conv1]
        [--variants before,after] [--srs-cache DIR] [--json OUT]

Timings are wall clock on a shared 2-core machine: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The shared models (``REFUTE_SHARED``, as in tests/conftest.py, else ``../shared``).
SHARED_MODELS = Path(os.environ.get("REFUTE_SHARED", REPO.parent / "shared")) / "models"
CASES = ("2l_relu_sigmoid_conv", "3l_relu_conv_fc", "lenet5_conv1", "mlp_8x256")
VARIANTS = ("before", "after")


def lenet5_conv1() -> bytes:
    """LeNet-5's first step as one ONNX graph (deterministic weights)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = {
        "w": rng.uniform(-0.2, 0.2, (6, 1, 5, 5)),
        "b": rng.uniform(-0.1, 0.1, (6,)),
        "mul": rng.uniform(0.5, 1.5, (1, 6, 1, 1)),
        "add": rng.uniform(-0.1, 0.1, (1, 6, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[5, 5], strides=[1, 1],
                         pads=[0, 0, 0, 0], dilations=[1, 1], group=1),
        helper.make_node("Mul", ["c", "mul"], ["m"]),
        helper.make_node("Add", ["m", "add"], ["a"]),
        helper.make_node("AveragePool", ["a"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                         pads=[0, 0, 0, 0]),
    ]
    graph = helper.make_graph(
        nodes, "lenet5_conv1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 14, 14])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def _prepared(case: str) -> Any:
    from refute import zoo
    from refute.provider import prepare_model

    if case == "lenet5_conv1":
        return prepare_model(lenet5_conv1())
    if case == "mlp_8x256":
        return prepare_model(zoo.mlp_8x256().onnx_bytes)
    return prepare_model(SHARED_MODELS / case / "network.onnx", dims={"batch_size": 1})


def _legacy_settings(graph: bytes, scale: int, sample: list[Any], workdir: Path) -> dict[str, Any]:
    """Settings as refute made them before issue 11 (EZKL's defaults, one calibration)."""
    import ezkl

    from prover.circuit import run_args, write_input_json

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "network.onnx").write_bytes(graph)
    args = run_args(scale)  # EZKL's default layout; and its default check mode, as then:
    args.check_mode = "unsafe"
    data = write_input_json(workdir / "calibration.json", sample)
    ezkl.gen_settings(str(workdir / "network.onnx"), str(workdir / "settings.json"),
                      py_run_args=args)
    ezkl.calibrate_settings(str(data), str(workdir / "network.onnx"),
                            str(workdir / "settings.json"), "resources", scales=[scale])
    settings: dict[str, Any] = json.loads((workdir / "settings.json").read_text())
    return settings


def _calibrate(job: dict[str, Any]) -> dict[str, Any]:
    from circuits.adjudication import adjudication_bytes
    from prover.calibration import _extreme, _range_of
    from prover.circuit import calibrated_settings
    from refute.executor import DeterministicExecutor
    from refute.provider import random_inputs
    from refute.segmentation import run_segments

    prepared = _prepared(job["case"])
    executor = DeterministicExecutor()
    runs = [run_segments(executor, prepared.segmentation, random_inputs(prepared.loaded, seed=s))
            for s in range(4)]
    bound = _range_of(runs, 4.0)
    segment = prepared.segmentation.segments[0]
    graph = adjudication_bytes(segment)
    scale = prepared.manifest.scale
    extreme = [*runs[0][0], *_extreme(runs[0][1], bound)]
    work = Path(job["workdir"])
    start = time.perf_counter()
    if job["variant"] == "before":
        settings = _legacy_settings(graph, scale, extreme, work / "cal")
    else:
        settings = calibrated_settings(graph, scale, [extreme], work / "cal")
    seconds = time.perf_counter() - start
    (work / "network.onnx").write_bytes(graph)
    (work / "settings.json").write_text(json.dumps(settings))
    from prover.circuit import write_input_json

    write_input_json(work / "input.json", [*runs[1][0], *runs[1][1]])
    return {"calibrate_s": seconds, "bound": bound}


def _setup(job: dict[str, Any]) -> dict[str, Any]:
    import ezkl

    from prover.srs import SrsStore

    work = Path(job["workdir"])
    settings = json.loads((work / "settings.json").read_text())
    srs = SrsStore(dev_cache=Path(job["srs_cache"])).for_logrows(
        int(settings["run_args"]["logrows"]))
    start = time.perf_counter()
    ezkl.compile_circuit(str(work / "network.onnx"), str(work / "model.compiled"),
                         str(work / "settings.json"))
    ezkl.setup(str(work / "model.compiled"), str(work / "vk.key"), str(work / "pk.key"),
               srs_path=str(srs.path))
    return {"setup_s": time.perf_counter() - start, "srs": str(srs.path),
            "pk_bytes": (work / "pk.key").stat().st_size,
            "vk_bytes": (work / "vk.key").stat().st_size}


def _prove(job: dict[str, Any]) -> dict[str, Any]:
    import ezkl

    work = Path(job["workdir"])
    start = time.perf_counter()
    ezkl.gen_witness(str(work / "input.json"), str(work / "model.compiled"),
                     str(work / "witness.json"))
    ezkl.prove(str(work / "witness.json"), str(work / "model.compiled"), str(work / "pk.key"),
               str(work / "proof.json"), srs_path=job["srs"])
    seconds = time.perf_counter() - start
    ok = bool(ezkl.verify(str(work / "proof.json"), str(work / "settings.json"),
                          str(work / "vk.key"), srs_path=job["srs"]))
    return {"prove_s": seconds, "verify_ok": ok}


def _child_main(job: dict[str, Any]) -> None:
    step = {"calibrate": _calibrate, "setup": _setup, "prove": _prove}[job["step"]]
    try:
        result = step(job)
    except Exception as exc:  # EZKL raises bare RuntimeErrors; the failure is a result
        text = str(exc).strip().splitlines()
        result = {"error": text[0] if text else type(exc).__name__}
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.bench_circuit_tuning", "--child", json.dumps(job)],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return {"error": f"child died ({proc.returncode}): {tail[:200]}"}


def measure(case: str, variant: str, *, srs_cache: Path, timeout: float) -> dict[str, Any]:
    """Calibrate, set up and prove one case's circuit in child processes; the figures."""
    from prover.budget import estimate

    with tempfile.TemporaryDirectory(prefix=f"refute-tune-{case}-{variant}-") as tmp:
        job = {"case": case, "variant": variant, "workdir": tmp, "srs_cache": str(srs_cache)}
        row: dict[str, Any] = {"case": case, "variant": variant}
        cal = _run_child({**job, "step": "calibrate"}, timeout)
        row["calibrate_s"] = cal.get("calibrate_s")
        if "error" in cal:
            return {**row, "error": f"calibrate: {cal['error']}"}
        settings = json.loads((Path(tmp) / "settings.json").read_text())
        run_args = settings["run_args"]
        row.update(logrows=run_args["logrows"], rows=settings["num_rows"],
                   inner_cols=run_args["num_inner_cols"],
                   decomp=f"{run_args['decomp_base']}x{run_args['decomp_legs']}",
                   check_mode=settings.get("check_mode"),
                   estimate=estimate(settings).to_json())
        setup = _run_child({**job, "step": "setup"}, timeout)
        if "error" in setup:
            return {**row, "error": f"setup: {setup['error']}"}
        row.update(setup_s=setup["setup_s"], pk_bytes=setup["pk_bytes"],
                   setup_peak=setup["peak_rss"])
        proof = _run_child({**job, "step": "prove", "srs": setup["srs"]}, timeout)
        if "error" in proof:
            return {**row, "error": f"prove: {proof['error']}"}
        row.update(prove_s=proof["prove_s"], prove_peak=proof["peak_rss"],
                   verify_ok=proof["verify_ok"])
        return row


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "bytes":
        return f"{value / 2**20:,.0f} MiB"
    if kind == "s":
        return f"{value:.1f}"
    return str(value)


def _ratio(after: Any, before: Any) -> str:
    if not isinstance(after, int | float) or not isinstance(before, int | float) or not before:
        return "—"
    return f"{after / before:.2f}"


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--srs-cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "refute-bench-srs",
                        help="development SRS files (kept between runs)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per child step (s)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--table", type=Path,
                        help="only print the table of rows written earlier with --json")
    args = parser.parse_args()
    if args.child:
        _child_main(json.loads(args.child))
        return
    from rich.console import Console

    console = Console(width=220)
    rows: list[dict[str, Any]] = []
    if args.table:
        rows = json.loads(args.table.read_text())
        args.cases = ",".join(dict.fromkeys(r["case"] for r in rows))
    for case in [] if args.table else args.cases.split(","):
        for variant in args.variants.split(","):
            with console.status(f"{case}: {variant}…"):
                row = measure(case, variant, srs_cache=args.srs_cache, timeout=args.timeout)
            console.print(json.dumps(row), highlight=False)
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    _print_table(console, rows, args.cases.split(","))


def _print_table(console: Any, rows: list[dict[str, Any]], cases: list[str]) -> None:
    from rich.table import Table
    columns = [("logrows", "", "logrows"), ("rows", "", "rows"), ("inner cols", "", "inner_cols"),
               ("decomp", "", "decomp"), ("pk", "bytes", "pk_bytes"), ("setup s", "s", "setup_s"),
               ("prove s", "s", "prove_s"), ("setup peak", "bytes", "setup_peak"),
               ("prove peak", "bytes", "prove_peak"), ("verify", "", "verify_ok")]
    table = Table(title="adjudication circuit of segment 1: before vs after tuning")
    table.add_column("case")
    table.add_column("variant")
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    table.add_column("estimate pk / peak / prove s", justify="right")
    from prover.budget import estimate

    for row in rows:
        est = {} if "logrows" not in row else estimate(
            {"run_args": {"logrows": row["logrows"], "num_inner_cols": row["inner_cols"]},
             "num_rows": row["rows"]}).to_json()
        table.add_row(row["case"], row["variant"],
                      *[_fmt(row.get(key), kind) for _, kind, key in columns],
                      " / ".join([_fmt(est.get("pk_bytes"), "bytes"),
                                  _fmt(est.get("peak_bytes"), "bytes"),
                                  _fmt(est.get("prove_seconds"), "s")]))
        if "error" in row:
            table.add_row("", "", f"[red]{row['error']}[/red]")
    by_key = {(r["case"], r["variant"]): r for r in rows}
    for case in cases:
        before, after = by_key.get((case, "before")), by_key.get((case, "after"))
        if before and after:
            table.add_row(case, "after/before",
                          *[_ratio(after.get(key), before.get(key))
                            if kind or key in ("rows", "logrows") else ""
                            for _, kind, key in columns], "")
    console.print(table)


if __name__ == "__main__":
    main()
