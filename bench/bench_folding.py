"""Constant and shape folding: refute's own loader vs onnxslim vs onnxsim (measurement only).

For every model of the corpus with an ``input.json``, pins the inputs' symbolic dimensions to the
shapes the input file implies, then folds the model three ways — refute's ``load_model`` (ONNX
shape inference + ``onnx.reference`` per node, sizes bounded first), ``onnxslim.slim`` and
``onnxsim.simplify`` — timing each (best of 3) and recording the node count after, the shape
computations left (Shape, Size, ConstantOfShape, Range, Gather on a shape), the operator set
after, and whether the folded model's outputs are bit-identical to the original's under ONNX
Runtime (CPU, graph optimizations off) on the ``input.json`` values. Prints a table and totals,
and writes everything (plus the libraries' versions and safety notes) as JSON.

onnxslim and onnxsim are not dependencies of refute; install them into the venv first:

    .venv/bin/pip install onnxslim onnxsim
    .venv/bin/python -m bench.bench_folding [--models a,b] [--out out/bench_folding.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, helper
from rich.console import Console
from rich.table import Table

from refute.errors import ModelRejected
from refute.loading import load_model
from refute.pinning import pin_input_shapes
from refute.provider import input_sizes

MODELS_DIR = Path("/work/shared/models")
METHODS = ("refute", "onnxslim", "onnxsim")
SHAPE_OPS = ("Shape", "Size", "ConstantOfShape", "Range")
REPEATS = 3
MAX_ELEMENTS = 2**24

#: What each library does with a model before any safety check could run (read from the
#: installed sources; paths relative to the venv's site-packages, lines as of the versions
#: recorded alongside).
SAFETY_NOTES: dict[str, list[str]] = {
    "onnxslim": [
        "runs ONNX Runtime on the model while folding: graph.fold_constants builds one ORT "
        "session over the whole foldable sub-graph, onnxslim/third_party/onnx_graphsurgeon/ir/"
        "graph.py:1194 (onnxrt.InferenceSession), or per partition at graph.py:1110; called from "
        "onnxslim/core/__init__.py:159 on every one of up to 10 iterations (cli/_main.py:56,109)",
        "size bound: size_threshold defaults to None (cli/_main.py:46-47, graph.py:675), i.e. no "
        "bound; when set it only skips *materializing* an output with a static shape over the "
        "threshold (graph.py:1148-1155) — intermediates inside the ORT session are never bounded",
        "external data: slim(path) calls onnx.load(path) with load_external_data defaulting to "
        "True (onnxslim/cli/_main.py:63; also utils.py:410 ModelInfo) — it reads whatever "
        "external files the model names before anything is checked",
        "shape inference: onnxslim/core/__init__.py:126-136 runs its vendored ORT symbolic shape "
        "inference (third_party/symbolic_shape_infer.py), falling back to onnx.shape_inference",
        "errors while folding are swallowed as warnings (error_ok=True, graph.py:673, 1200-1207)",
    ],
    "onnxsim": [
        "runs ONNX Runtime on the model while folding: the C++ core hands each constant sub-model "
        "to PyModelExecutor.Run (onnxsim/onnx_simplifier.py:9700-9730) -> backend.run_model "
        "(onnxsim/backend.py:432) -> _run_with_onnxruntime -> rt.InferenceSession "
        "(onnxsim/backend.py:298); its C++ core also bundles its own ORT executor "
        "(onnxsim/constant_folding.cpp:214-306)",
        "size bound: only Tile/ConstantOfShape/Expand outputs are checked, against "
        "tensor_size_threshold = 1.5 GB by default (onnxsim/onnx_simplifier.py:191, "
        "onnxsim/constant_folding.cpp:601-624); a deferred ConstantOfShape/Expand is still "
        "computed transiently inside the ORT fold session (constant_folding.cpp:756-768); no "
        "other op (Range, Resize, MatMul, Concat, ...) is bounded",
        "external data: simplify(path) loads the model then onnx.load_external_data_for_model "
        "(onnxsim/onnx_simplifier.py:9469-9490); the fast path hands the path to C++ "
        "loadModel(&model, in_path, true) (onnxsim/onnxsim.cpp:1092)",
        "per-op executor failures are caught and the op is left unfolded "
        "(onnx_simplifier.py:9182-9186, constant_folding.cpp:913), so a failed fold is silent",
    ],
    "refute": [
        "no ONNX Runtime: folds with onnx.shape_inference (data_prop) and "
        "onnx.reference.ReferenceEvaluator per node, after the file size, header, tensor, node "
        "and work checks (refute/loading.py load_model), each result's size bounded before it is "
        "computed; external data is refused (refute.errors.ExternalDataRefused)",
    ],
}


@dataclass
class Outcome:
    """One folding method's result on one model."""

    method: str
    error: str = ""
    ms: float | None = None
    nodes: int | None = None
    shape_ops: dict[str, int] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)
    exact: bool | None = None
    diff: str = ""
    folded_nodes: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the method produced a model."""
        return not self.error

    @property
    def fully_folded(self) -> bool:
        """Whether no shape computation is left."""
        return self.ok and not self.shape_ops


@dataclass
class ModelRow:
    """Every method's outcome on one model."""

    name: str
    nodes: int = 0
    shape_ops: dict[str, int] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)
    error: str = ""
    note: str = ""
    outcomes: dict[str, Outcome] = field(default_factory=dict)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _import_libraries() -> tuple[Any, Any]:
    """Import onnxslim and onnxsim, or exit with the one-line install hint."""
    try:
        return importlib.import_module("onnxslim"), importlib.import_module("onnxsim")
    except ImportError as exc:
        sys.exit(f"bench_folding needs onnxslim and onnxsim ({exc.name} is missing): "
                 ".venv/bin/pip install onnxslim onnxsim")


def _versions() -> dict[str, str]:
    out = {}
    for package in ("onnx", "onnxruntime", "onnxslim", "onnxsim", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "missing"
    return out


def _real_inputs(model: ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _shape_ops(model: ModelProto) -> dict[str, int]:
    """Shape computations left in the main graph, by operator (``Gather(shape)``: on a Shape)."""
    nodes = model.graph.node
    shape_outputs = {o for n in nodes if n.op_type == "Shape" for o in n.output}
    counts = Counter(n.op_type for n in nodes if n.op_type in SHAPE_OPS)
    gathers = sum(1 for n in nodes
                  if n.op_type == "Gather" and n.input and n.input[0] in shape_outputs)
    if gathers:
        counts["Gather(shape)"] = gathers
    return dict(sorted(counts.items()))


def _describe(outcome: Outcome, model: ModelProto) -> None:
    outcome.nodes = len(model.graph.node)
    outcome.shape_ops = _shape_ops(model)
    outcome.ops = sorted({n.op_type for n in model.graph.node})


def _run_ort(model: ModelProto, values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` under ONNX Runtime (CPU, no graph optimizations), inputs cast to its types."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feeds = {}
    for value in _real_inputs(model):
        if value.name in wanted:
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = values[value.name].astype(dtype)
    return [np.asarray(o) for o in session.run(None, feeds)]


def _compare(reference: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> tuple[bool, str]:
    """Whether ``got`` equals ``reference`` bit for bit (values compared in the reference dtype).

    A changed output dtype (refute carries integral boundaries as float32) is noted, not failed,
    when the values are identical.
    """
    if len(reference) != len(got):
        return False, f"{len(got)} outputs, original has {len(reference)}"
    notes = []
    for k, (ref, out) in enumerate(zip(reference, got, strict=True)):
        if ref.shape != out.shape:
            return False, f"output {k}: shape {list(out.shape)}, original {list(ref.shape)}"
        same = out
        if ref.dtype != out.dtype:
            notes.append(f"output {k} dtype {out.dtype} (original {ref.dtype})")
            same = out.astype(ref.dtype)
        if ref.tobytes() != same.tobytes():
            if np.issubdtype(ref.dtype, np.number):
                worst = float(np.nanmax(np.abs(ref.astype(np.float64) - same.astype(np.float64)),
                                        initial=0.0))
                return False, f"output {k}: max |diff| {worst:.3g}"
            return False, f"output {k}: values differ"
    return True, "; ".join(notes)


def _best_of(fn: Callable[[], ModelProto]) -> tuple[ModelProto, float]:
    """Run ``fn`` :data:`REPEATS` times; return its last model and the best time in ms."""
    best, model = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        model = fn()
        best = min(best, time.perf_counter() - start)
    assert model is not None
    return model, best * 1000


def _read_values(path: Path, model: ModelProto) -> dict[str, np.ndarray]:
    """The input file's tensors, reshaped to the pinned input shapes (float64; cast per run)."""
    data = json.loads(path.read_text())["input_data"]
    out = {}
    for value, flat in zip(_real_inputs(model), data, strict=False):
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        out[value.name] = np.asarray(flat, dtype=np.float64).reshape(shape)
    return out


def _measure(name: str, onnxslim: Any, onnxsim: Any) -> ModelRow:
    """Fold one model three ways and check each result against the original."""
    path, inputs = MODELS_DIR / name / "network.onnx", MODELS_DIR / name / "input.json"
    row = ModelRow(name)
    original = onnx.load(str(path), load_external_data=False)
    row.nodes = len(original.graph.node)
    row.shape_ops = _shape_ops(original)
    row.ops = sorted({n.op_type for n in original.graph.node})
    try:
        # refute gets the input file's sizes as a user would pass them; the baseline pins only
        # the inputs the graph has (a file may hold tensors for inputs the model lacks).
        sizes = input_sizes(inputs)
        pinned = copy.deepcopy(original)
        real = len(_real_inputs(pinned))
        if len(sizes) != real:
            row.note = f"input file holds {len(sizes)} tensor(s), the model has {real} input(s)"
        pin_input_shapes(pinned, shapes={}, dims={}, sizes=sizes[:real],
                         max_elements=MAX_ELEMENTS)
        values = _read_values(inputs, pinned)
    except Exception as exc:
        row.error = _one_line(exc)
        return row
    reference: list[np.ndarray] | None = None
    try:
        reference = _run_ort(original, values)
    except Exception as exc:
        # Still folded and timed; exactness is then checked only as "ORT runs the result".
        row.note = f"ORT cannot run the original: {_one_line(exc)}"

    def refute_fold() -> ModelProto:
        loaded = load_model(path, input_sizes=sizes)
        row.outcomes["refute"].folded_nodes = loaded.folded_nodes
        return loaded.model

    def slim_fold() -> ModelProto:
        result: ModelProto = onnxslim.slim(copy.deepcopy(pinned))
        return result

    def sim_fold() -> ModelProto:
        result, _checked = onnxsim.simplify(copy.deepcopy(pinned))
        return result  # type: ignore[no-any-return]

    for method, fold in (("refute", refute_fold), ("onnxslim", slim_fold),
                         ("onnxsim", sim_fold)):
        outcome = row.outcomes[method] = Outcome(method)
        try:
            folded, outcome.ms = _best_of(fold)
        except ModelRejected as exc:
            outcome.error = f"refused: {exc}"
            continue
        except Exception as exc:
            outcome.error = _one_line(exc)
            continue
        _describe(outcome, folded)
        try:
            outputs = _run_ort(folded, values)
        except Exception as exc:
            if reference is not None:
                outcome.exact = False
            outcome.diff = f"ORT fails on it: {_one_line(exc)}"
            continue
        if reference is None:
            outcome.diff = "no baseline to compare with; ORT runs the folded model"
        else:
            outcome.exact, outcome.diff = _compare(reference, outputs)
    return row


def _totals(rows: Sequence[ModelRow]) -> dict[str, dict[str, Any]]:
    measured = [r for r in rows if not r.error]
    with_shape_ops = [r for r in measured if r.shape_ops]
    totals: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        outcomes = [r.outcomes[method] for r in measured]
        times = [o.ms for o in outcomes if o.ms is not None]
        totals[method] = {
            "models": len(outcomes),
            "produced": sum(o.ok for o in outcomes),
            "failed_or_refused": sum(not o.ok for o in outcomes),
            "fully_folded": sum(o.fully_folded for o in outcomes),
            "fully_folded_of_models_with_shape_ops": (
                f"{sum(r.outcomes[method].fully_folded for r in with_shape_ops)}"
                f"/{len(with_shape_ops)}"),
            "shape_ops_left": sum(sum(o.shape_ops.values()) for o in outcomes),
            "nodes_after": sum(o.nodes or 0 for o in outcomes),
            "bit_exact": sum(o.exact is True for o in outcomes),
            "not_compared": sum(o.ok and o.exact is None for o in outcomes),
            "mismatches": sum(o.exact is False for o in outcomes),
            "median_ms": round(statistics.median(times), 2) if times else None,
            "total_ms": round(sum(times), 1),
        }
    # Like for like: the models every method produced a model for.
    common = [r for r in measured if all(o.ok for o in r.outcomes.values())]
    for method in METHODS:
        times = [r.outcomes[method].ms or 0.0 for r in common]
        totals[method]["common_models"] = len(common)
        totals[method]["common_nodes_after"] = sum(r.outcomes[method].nodes or 0 for r in common)
        totals[method]["common_median_ms"] = round(statistics.median(times), 2) if times else None
        totals[method]["common_total_ms"] = round(sum(times), 1)
    totals["original"] = {"models": len(measured),
                          "not_measured": len(rows) - len(measured),
                          "ort_cannot_run": sum(r.note.startswith("ORT") for r in measured),
                          "models_with_shape_ops": len(with_shape_ops),
                          "shape_ops": sum(sum(r.shape_ops.values()) for r in measured),
                          "nodes": sum(r.nodes for r in measured),
                          "common_nodes": sum(r.nodes for r in common)}
    return totals


def _cell(row: ModelRow, render: Callable[[Outcome], str]) -> str:
    return " / ".join(render(row.outcomes[m]) for m in METHODS)


def _print(console: Console, rows: Sequence[ModelRow], totals: Mapping[str, Any]) -> None:
    table = Table(title="folding: refute / onnxslim / onnxsim  (✗ = failed or refused)")
    for column in ("model", "nodes", "nodes after", "shape ops", "shape ops left", "ms",
                   "bit-exact"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        if row.error:
            table.add_row(row.name, str(row.nodes), "baseline fails", "", "", "", "")
            continue
        table.add_row(
            row.name, str(row.nodes),
            _cell(row, lambda o: str(o.nodes) if o.ok else "✗"),
            str(sum(row.shape_ops.values())),
            _cell(row, lambda o: str(sum(o.shape_ops.values())) if o.ok else "✗"),
            _cell(row, lambda o: f"{o.ms:.1f}" if o.ms is not None else "✗"),
            _cell(row, lambda o: "✗" if not o.ok else "n/a" if o.exact is None
                  else "yes" if o.exact else "NO"),
        )
    console.print(table)
    summary = Table(title="totals")
    keys = [k for k in totals["refute"] if k != "models"]
    summary.add_column("")
    for method in METHODS:
        summary.add_column(method, justify="right")
    for key in keys:
        summary.add_row(key, *(str(totals[m][key]) for m in METHODS))
    console.print(summary)
    console.print(f"original: {totals['original']}")
    for row in rows:
        if row.error or row.note:
            console.print(f"  {row.name}: {row.error or row.note}", markup=False)
        for outcome in row.outcomes.values():
            if outcome.error or outcome.exact is False or outcome.diff:
                detail = outcome.error or outcome.diff
                console.print(f"  {row.name} [{outcome.method}]: {detail}", markup=False)


def main() -> None:
    """Run the measurement, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_folding.json"),
                        help="where to write the JSON results")
    args = parser.parse_args()
    onnxslim, onnxsim = _import_libraries()
    names = ([n for n in args.models.split(",") if n] if args.models else
             sorted(p.parent.name for p in MODELS_DIR.glob("*/input.json")
                    if (p.parent / "network.onnx").is_file()))
    console = Console(width=150)
    rows = []
    for k, name in enumerate(names, 1):
        with console.status(f"[{k}/{len(names)}] {name}"):
            rows.append(_measure(name, onnxslim, onnxsim))
    totals = _totals(rows)
    _print(console, rows, totals)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "versions": _versions(),
        "repeats": REPEATS,
        "safety_notes": SAFETY_NOTES,
        "totals": totals,
        "models": [
            {**{k: v for k, v in asdict(r).items() if k != "outcomes"},
             "outcomes": {m: {**asdict(o), "ok": o.ok, "fully_folded": o.fully_folded}
                          for m, o in r.outcomes.items()}}
            for r in rows
        ],
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"versions: {report['versions']}")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
