"""Probe: which real third-party ONNX models EZKL 23 can build and satisfy a circuit for.

For each model under ``/work/shared/models`` (``NAME/network.onnx`` + ``NAME/input.json``), in
fresh child processes with a wall-clock limit and a temporary folder:

* **ONNX Runtime**: the model run once (CPUExecutionProvider, symbolic dims pinned to 1, the
  input.json values cast to each input's dtype);
* **EZKL**: ``gen_settings`` with the run arguments of the project's circuits (hashed input, fixed
  params, public output, scale 7, every symbolic dim pinned to 1), ``calibrate_settings``
  (resources, ``scales=[7]``, ``max_logrows=20``), ``compile_circuit``, ``gen_witness`` and
  ``mock`` (checks the constraints without an SRS or keys). A model that fails is retried with a
  public input, to tell "EZKL cannot" from "EZKL cannot hash this input".

Records per model: its operator types, input element types, the status (``ok`` or the stage that
failed: ``gen_settings``, ``calibrate``, ``compile``, ``witness``, ``mock``, ``timeout``,
``crash``), the first line of EZKL's error, logrows and num_rows, the largest difference between
EZKL's rescaled outputs and ONNX Runtime's, and the seconds taken. Prints one line per model, a
table, totals and, per operator, the models using it that passed ``mock`` and those that failed;
writes everything as JSON (after each model, so an interrupted run keeps what it measured).

    .venv/bin/python -m bench.probe_ezkl [--models NAME,NAME] [--timeout 120]
        [--out out/probe_ezkl.json] [--no-retry-public]

``doodles`` ships no input.json: it gets seeded random inputs of its input's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
MODELS = Path("/work/shared/models")
SCALE = 7
MAX_LOGROWS = 20
MESSAGE_CHARS = 200
STAGES = ("gen_settings", "calibrate", "compile", "witness", "mock")
RANDOM_SEED = 0

# ONNX Runtime's input type strings -> numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


@dataclass
class GraphInput:
    """One graph input that is not an initializer."""

    name: str
    elem_type: str
    shape: list[int | str]


@dataclass
class ModelInfo:
    """What the ONNX file says, read without running anything."""

    ops: list[str]
    inputs: list[GraphInput]
    symbolic_dims: list[str]
    opsets: dict[str, int]


@dataclass
class ProbeRecord:
    """The outcome of probing one model."""

    model: str
    ops: list[str] = field(default_factory=list)
    input_types: list[str] = field(default_factory=list)
    input_shapes: list[list[int | str]] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)
    symbolic_dims: list[str] = field(default_factory=list)
    inputs_source: str = "input.json"
    note: str | None = None
    status: str = "crash"
    stage: str | None = None
    message: str | None = None
    logrows: int | None = None
    num_rows: int | None = None
    max_abs_err: float | None = None
    ort_absmax: float | None = None
    seconds: float = 0.0
    ort_ok: bool = False
    ort_message: str | None = None
    ort_output_shapes: list[list[int]] | None = None
    public_retry_status: str | None = None
    public_retry_message: str | None = None
    public_retry_logrows: int | None = None


def first_line(text: str) -> str:
    """The first non-empty line of an error message, trimmed to MESSAGE_CHARS."""
    for line in str(text).strip().splitlines():
        if line.strip():
            return line.strip()[:MESSAGE_CHARS]
    return ""


# --- reading the ONNX file ------------------------------------------------------------------


def _graph_ops(graph: Any, ops: set[str]) -> None:
    """Collect op types of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}")
        for attr in node.attribute:
            if attr.HasField("g"):
                _graph_ops(attr.g, ops)
            for sub in attr.graphs:
                _graph_ops(sub, ops)


def describe(path: Path) -> ModelInfo:
    """Op types (with domain if not the default one), real inputs, symbolic dim names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: set[str] = set()
    _graph_ops(model.graph, ops)
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    symbolic: set[str] = set()
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                symbolic.add(dim.dim_param)
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape: list[int | str] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                                  for d in tensor.shape.dim]
        inputs.append(GraphInput(value.name,
                                 onnx.TensorProto.DataType.Name(tensor.elem_type).lower(), shape))
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    return ModelInfo(sorted(ops), inputs, sorted(symbolic), opsets)


def random_inputs(inputs: list[GraphInput], seed: int = RANDOM_SEED) -> list[list[Any]]:
    """Seeded random values for each input (symbolic dims = 1), flat, in EZKL's layout."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data: list[list[Any]] = []
    for spec in inputs:
        size = int(np.prod([d if isinstance(d, int) else 1 for d in spec.shape]))
        if spec.elem_type == "bool":
            data.append([bool(v) for v in rng.integers(0, 2, size)])
        elif spec.elem_type.startswith(("int", "uint")):
            data.append([int(v) for v in rng.integers(0, 4, size)])
        else:
            data.append([float(v) for v in rng.uniform(0.0, 1.0, size)])
    return data


# --- children -------------------------------------------------------------------------------


def _write(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def _flat(values: Any) -> list[Any]:
    """Flatten nested lists (input.json entries are usually flat already)."""
    if isinstance(values, list):
        return [x for v in values for x in _flat(v)]
    return [values]


def child_ort(model: Path, data: Path, out: Path) -> None:
    """Run the model once with ONNX Runtime; write status and flat outputs to ``out``."""
    import numpy as np
    import onnxruntime as ort

    result: dict[str, Any] = {"ok": False}
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        lists = json.loads(data.read_text()).get("input_data", [])
        feeds = {}
        for spec, values in zip(session.get_inputs(), lists, strict=False):
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            dtype = ORT_DTYPES.get(spec.type, "float32")
            feeds[spec.name] = np.asarray(_flat(values), dtype=np.float64).astype(dtype) \
                .reshape(shape)
        outputs = session.run(None, feeds)
        result = {"ok": True,
                  "outputs": [np.asarray(o, dtype=np.float64).ravel().tolist() for o in outputs],
                  "shapes": [list(np.asarray(o).shape) for o in outputs]}
    except Exception as exc:
        result = {"ok": False, "message": first_line(f"{type(exc).__name__}: {exc}")}
    _write(out, result)


def child_ezkl(model: Path, data: Path, out: Path, *, visibility: str,
               symbolic: list[str]) -> None:
    """Settings, calibration, compilation, witness and mock, in ``out``'s folder; ``out`` names
    the stage reached."""
    import ezkl

    work = out.parent

    settings, compiled, witness = work / "settings.json", work / "circuit.ezkl", work / "w.json"
    result: dict[str, Any] = {"status": "crash", "stage": None}

    def settings_numbers() -> None:
        values = json.loads(settings.read_text())
        result["logrows"] = int(values["run_args"]["logrows"])
        result["num_rows"] = int(values.get("num_rows") or 0)

    def gen_settings() -> Any:
        args = ezkl.PyRunArgs()
        args.input_visibility = visibility
        args.param_visibility = "fixed"
        args.output_visibility = "public"
        args.input_scale = SCALE
        args.param_scale = SCALE
        args.variables = [(name, 1) for name in sorted({"batch_size", *symbolic})]
        return ezkl.gen_settings(str(model), str(settings), py_run_args=args)

    steps: dict[str, Callable[[], Any]] = {
        "gen_settings": gen_settings,
        "calibrate": lambda: ezkl.calibrate_settings(
            str(data), str(model), str(settings), "resources", scales=[SCALE],
            max_logrows=MAX_LOGROWS),
        "compile": lambda: ezkl.compile_circuit(str(model), str(compiled), str(settings)),
        "witness": lambda: ezkl.gen_witness(str(data), str(compiled), str(witness)),
        "mock": lambda: ezkl.mock(str(witness), str(compiled)),
    }
    for stage, step in steps.items():
        result["stage"] = stage
        _write(out, result)
        try:
            value = step()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pyo3 panics are BaseExceptions
            result.update(status=stage, message=first_line(str(exc) or type(exc).__name__))
            _write(out, result)
            return
        if value is False:
            result.update(status=stage, message=f"{stage} returned False")
            _write(out, result)
            return
        if stage == "calibrate":
            settings_numbers()
        if stage == "witness":
            pretty = json.loads(witness.read_text()).get("pretty_elements") or {}
            result["rescaled_outputs"] = [[float(x) for x in _flat(o)]
                                          for o in pretty.get("rescaled_outputs", [])]
    result.update(status="ok", stage=None)
    _write(out, result)


# --- the parent -----------------------------------------------------------------------------


def run_child(argv: list[str], work: Path, out: Path, timeout: float) -> dict[str, Any]:
    """Run ``python -m bench.probe_ezkl <argv>`` in its own session; its result, or why none."""
    start = time.perf_counter()
    log = work / f"{out.stem}.log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "bench.probe_ezkl", *argv], cwd=REPO,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.perf_counter() - start
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result["seconds"] = seconds
    if code is None:
        result.update(status="timeout", message=f"no result within {timeout:.0f} s")
    elif code != 0 or result.get("status") == "crash":
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        why = f"exit code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        tail = f": {lines[-1].strip()}" if lines else ""
        result.update(status="crash", message=f"{why}{tail}"[:MESSAGE_CHARS], ok=False)
    return result


def _max_abs_err(ezkl_outputs: list[list[float]], ort_outputs: list[list[float]]
                 ) -> tuple[float | None, float | None]:
    """Largest |EZKL - ORT| over all outputs, and the largest |ORT| (None if shapes differ)."""
    if len(ezkl_outputs) != len(ort_outputs) or not ort_outputs:
        return None, None
    err, mag = 0.0, 0.0
    for mine, theirs in zip(ezkl_outputs, ort_outputs, strict=True):
        if len(mine) != len(theirs):
            return None, None
        for a, b in zip(mine, theirs, strict=True):
            err = max(err, abs(a - b))
            mag = max(mag, abs(b))
    return err, mag


def probe(name: str, timeout: float, retry_public: bool) -> ProbeRecord:
    """Probe one model: ONNX Runtime once, then the EZKL pipeline (and a public-input retry)."""
    folder = MODELS / name
    model = folder / "network.onnx"
    record = ProbeRecord(model=name)
    start = time.perf_counter()
    try:
        info = describe(model)
    except Exception as exc:
        record.status, record.stage, record.message = "crash", "onnx.load", first_line(str(exc))
        return record
    record.ops = info.ops
    record.input_types = [i.elem_type for i in info.inputs]
    record.input_shapes = [i.shape for i in info.inputs]
    record.opsets = info.opsets
    record.symbolic_dims = info.symbolic_dims
    with tempfile.TemporaryDirectory(prefix=f"probe-ezkl-{name}-") as tmp:
        work = Path(tmp)
        data = folder / "input.json"
        if not data.exists():
            data = work / "input.json"
            data.write_text(json.dumps({"input_data": random_inputs(info.inputs)}))
            record.inputs_source = f"random (seed {RANDOM_SEED})"
        lists = json.loads(data.read_text()).get("input_data", [])
        if len(lists) != len(info.inputs):
            record.note = (f"input.json has {len(lists)} tensors, the graph "
                           f"{len(info.inputs)} inputs")

        ort_out = work / "ort.json"
        ort = run_child(["--child", "ort", str(model), str(data), str(ort_out)], work, ort_out,
                        timeout)
        record.ort_ok = bool(ort.get("ok"))
        record.ort_message = None if record.ort_ok else ort.get("message")
        record.ort_output_shapes = ort.get("shapes")

        ezkl_out = work / "ezkl.json"
        result = run_child(["--child", "ezkl", str(model), str(data), str(ezkl_out), "hashed",
                            ",".join(info.symbolic_dims)], work, ezkl_out, timeout)
        record.status = str(result.get("status", "crash"))
        record.stage = result.get("stage") if record.status in ("timeout", "crash") else None
        record.message = result.get("message")
        record.logrows, record.num_rows = result.get("logrows"), result.get("num_rows")
        if record.status == "ok" and record.ort_ok:
            record.max_abs_err, record.ort_absmax = _max_abs_err(
                result.get("rescaled_outputs", []), ort.get("outputs", []))

        if retry_public and record.status not in ("ok", "timeout"):
            retry_out = work / "ezkl-public.json"
            retry = run_child(["--child", "ezkl", str(model), str(data), str(retry_out),
                               "public", ",".join(info.symbolic_dims)], work, retry_out, timeout)
            record.public_retry_status = str(retry.get("status", "crash"))
            record.public_retry_message = retry.get("message")
            record.public_retry_logrows = retry.get("logrows")
    record.seconds = round(time.perf_counter() - start, 2)
    return record


def op_summary(records: list[ProbeRecord]) -> dict[str, dict[str, list[str]]]:
    """For each op type, the models using it that passed mock and those that did not."""
    summary: dict[str, dict[str, list[str]]] = {}
    for record in records:
        for op in record.ops:
            entry = summary.setdefault(op, {"passed": [], "failed": []})
            entry["passed" if record.status == "ok" else "failed"].append(record.model)
    return dict(sorted(summary.items()))


def write_json(path: Path, records: list[ProbeRecord], timeout: float) -> None:
    """All records, the op summary and the versions, as one JSON file."""
    import ezkl
    import onnxruntime

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "ezkl_version": getattr(ezkl, "__version__", "?"),
        "onnxruntime_version": onnxruntime.__version__,
        "run_args": {"input_visibility": "hashed", "param_visibility": "fixed",
                     "output_visibility": "public", "scale": SCALE, "max_logrows": MAX_LOGROWS,
                     "calibration_target": "resources"},
        "timeout_s": timeout,
        "records": [asdict(r) for r in records],
        "ops": op_summary(records),
    }
    _write(path, payload)


def _brief(record: ProbeRecord) -> str:
    """Stage and message in one cell."""
    where = record.stage or ("" if record.status == "ok" else record.status)
    return f"{where}: {record.message}" if record.message else where


def report(console: Console, records: list[ProbeRecord]) -> None:
    """Print the per-model table, the totals and the per-operator summary."""
    table = Table(title="EZKL 23 on the shared ONNX models (hashed input, fixed params, scale 7)")
    for column in ("model", "status", "stage / message", "logrows", "s", "ort", "retry public"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(escape(r.model), r.status, escape(_brief(r)),
                      "" if r.logrows is None else str(r.logrows), f"{r.seconds:.1f}",
                      "ok" if r.ort_ok else escape(f"FAIL {r.ort_message}"),
                      escape(r.public_retry_status or ""))
    console.print(table)
    totals = Counter(r.status for r in records)
    console.print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.most_common())
                  + f" (of {len(records)}); ORT ran {sum(r.ort_ok for r in records)}")
    ops = Table(title="per operator: models that passed mock / that failed")
    for column in ("op", "passed", "failed"):
        ops.add_column(column, overflow="fold")
    for op, entry in op_summary(records).items():
        ops.add_row(escape(op), escape(", ".join(entry["passed"])),
                    escape(", ".join(entry["failed"])))
    console.print(ops)


def main() -> None:
    """Probe the models and print the tables (or, with ``--child``, run one child job)."""
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "ort":
            child_ort(Path(rest[0]), Path(rest[1]), Path(rest[2]))
        else:
            out = Path(rest[2])
            child_ezkl(Path(rest[0]), Path(rest[1]), out, visibility=rest[3],
                       symbolic=[s for s in rest[4].split(",") if s] if len(rest) > 4 else [])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="",
                        help="comma-separated model names (default: every model folder)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="wall-clock seconds per child (ORT, EZKL, retry)")
    parser.add_argument("--out", type=Path, default=Path("out/probe_ezkl.json"))
    parser.add_argument("--no-retry-public", dest="retry_public", action="store_false",
                        help="do not retry a failed model with a public input")
    args = parser.parse_args()
    names = ([n for n in args.models.split(",") if n] if args.models else
             sorted(p.parent.name for p in MODELS.glob("*/network.onnx")))
    console = Console(width=None if sys.stdout.isatty() else 200)
    records: list[ProbeRecord] = []
    start = time.perf_counter()
    for index, name in enumerate(names, 1):
        record = probe(name, args.timeout, args.retry_public)
        records.append(record)
        write_json(args.out, records, args.timeout)
        retry = f" (public input: {record.public_retry_status})" \
            if record.public_retry_status else ""
        console.print(f"[{index}/{len(names)}] {name}: {record.status}{retry} "
                      f"{_brief(record) if record.status != 'ok' else ''} "
                      f"logrows={record.logrows} err={record.max_abs_err} {record.seconds:.1f}s "
                      f"ort={'ok' if record.ort_ok else 'FAIL'}", markup=False, highlight=False)
    report(console, records)
    console.print(f"total {time.perf_counter() - start:.0f} s; records written to {args.out}")


if __name__ == "__main__":
    main()
