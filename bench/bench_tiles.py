"""Benchmark: proving one tile of a real-size segment, beside the whole segment and whole model.

Issue 13's figures. For MobileNet v1 224×224 and a GPT-2-small-shaped transformer
(``bench/bench_models.py``, random weights, cached under ``out/bench_models/``), cut as a
provider's registration cuts them (``prepare_model``), and for each **case** (a chosen segment):

* **tiling survey** (one child per model): :func:`refute.tiling.plan_tiling` on every segment at
  the starting bound; how many tiles, which block shape, or the refusal and its reason. The
  segments of the cases are picked here from ``segment.op_types`` and the Conv attributes, and
  printed.
* **tile**: ``plan_tiling(segment, B)`` with B = ``--tile-rows`` (default ``rows_bound(18)``:
  EZKL rows per tile as :class:`refute.tiling.TileCost` estimates them). The centre tile's
  adjudication graph (``adjudication_bytes(tile_segment(...))``) gets uncalibrated EZKL
  settings (``gen_settings``, a second or so); while the rows they count need more than
  ``--max-tile-logrows``, the bound becomes :data:`SHRINK` × the tile's estimated rows and the
  segment is planned again (at most :data:`MAX_SHRINKS` times, every step reported: the
  estimate is a fit, EZKL's count is the truth). Then, each in its own child:
  **calibrate** (:func:`prover.circuit.calibrated_settings` at scale 7 on the sample
  registration uses: x the honest tile input, y pushed to ±R by
  :func:`prover.calibration._extreme`); **setup** (:meth:`prover.circuit.CircuitCache.build`:
  compile + keys; the development SRS is generated before the clock starts); **prove**
  (:func:`prover.step.prove_step` on the honest tile: x = ``cut_input`` of state i-1,
  y = ``cut_output`` of the honest state i from the deterministic executor; then on a lying y,
  1.0 added to one owned element of the window; then, unless ``--no-edge``, an honest edge tile
  that shares the centre tile's circuit, e.g. one reading the zero padding), each proof checked
  with :func:`prover.step.verify_proof_file` and its maxdiff read in quantized units
  (:func:`prover.step.maxdiff_units`); **gas** (``verifyProof`` of the honest proof as a mined
  transaction on a local anvil; ``--no-gas`` to skip).
* **whole segment**: the segment's own adjudication graph gets uncalibrated settings in a capped
  child (``--settings-timeout``); :func:`prover.budget.estimate` at the logrows those rows need
  says whether proving fits the memory cap (and the largest development SRS, logrows 20). If it
  does, the whole segment is calibrated, set up and proven like a tile; else the estimate is the
  result.
* **whole model** (MobileNet, case ``mobilenet_model``): ``ezkl.gen_settings`` then
  ``ezkl.calibrate_settings`` on the whole exported model with hashed input, fixed params and
  public output, in one capped child (``--model-timeout``); the result is how far it got, the
  rows and logrows it would need, or how it failed.

Every child runs one at a time under a memory cap (``RLIMIT_AS``, ``--mem-gb``, default 12) and a
time limit (``--timeout``, default 1800 s); its peak resident memory is the child's ``ru_maxrss``
(``wait4``), so calibrate, setup and prove peaks are reported separately. A child that fails (EZKL
error, memory cap, time limit) is a result in the tables, never a crash of the bench. Timings
are wall clock on a shared 2-core machine; the SRS is a development one (unsafe; fine for timing).

Cases: ``mobilenet_first`` (segment 1: Conv 3→32 stride 2 on 224×224 with its folded BN and
ReLU), ``mobilenet_depthwise`` and ``mobilenet_pointwise`` (the depthwise / 1×1 Conv segment
nearest the middle), ``mobilenet_last`` (the last segment), ``gpt2_mlp_up`` (the MLP
up-projection segment, MatMul 768→3072 + GELU, of the default cuts), ``gpt2_proj`` (the first
attention output projection MatMul 768→768 alone: the default cuts plus one cut after it),
``mobilenet_model`` (the whole model in one circuit).

Run: ``.venv/bin/python -m bench.bench_tiles [--cases mobilenet_first,gpt2_proj]
[--quick] [--tile-rows 246415] [--max-tile-logrows 18] [--mem-gb 12] [--timeout 1800]
[--settings-timeout 600] [--model-timeout 600] [--no-edge] [--no-gas] [--parts tile,segment]
[--keep] [--out out/bench_tiles.json]``. ``--quick``: only the MobileNet segment-1 tile (no
edge tile, whole segment or whole model). ``--show FILE`` prints the tables of a saved run. Work
files go to ``out/bench_tiles.d/`` (proving keys are deleted after each case unless ``--keep``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from refute.tiling import rows_bound

if TYPE_CHECKING:
    from refute.provider import PreparedModel
    from refute.segmentation import Segment

REPO = Path(__file__).resolve().parents[1]
#: Model scale of every circuit (refute's default).
SCALE = 7
#: R = this × max |state value|, rounded up to a power of two (``calibrate_model``'s default).
RANGE_MARGIN = 4.0
#: Most times the tile bound is lowered while the tile circuit needs more than the logrows cap.
MAX_SHRINKS = 8
#: Each time, the bound becomes this fraction of the current tile's elements.
SHRINK = 0.75
#: Rows halo2 keeps for blinding on top of the circuit's own (for the uncalibrated logrows).
RESERVED_ROWS = 64
#: In-circuit Poseidon rows per hashed element (EZKL-NOTES.md), for the first layout's logrows.
POSEIDON_ROWS = 41
#: The largest logrows the uncalibrated layout is tried at.
MAX_SETTINGS_LOGROWS = 26
#: Rows the widest layout :func:`prover.circuit.calibrated_settings` tries (8 inner columns)
#: can save over the default (2): a whole segment estimated above this × the cap is not
#: calibrated.
WIDEST = 4
#: What a lying claim adds to one element of the tile's window.
LIE = 1.0
#: Seconds between two looks at a running child.
POLL_S = 1.0

#: Case name → (model, how it is cut, which segment).
CASES: dict[str, tuple[str, str, str]] = {
    "mobilenet_first": ("mobilenet_v1", "default", "first"),
    "mobilenet_depthwise": ("mobilenet_v1", "default", "depthwise"),
    "mobilenet_pointwise": ("mobilenet_v1", "default", "pointwise"),
    "mobilenet_last": ("mobilenet_v1", "default", "last"),
    "gpt2_mlp_up": ("gpt2_small", "default", "mlp_up"),
    "gpt2_proj": ("gpt2_small", "proj", "proj"),
}
#: The whole MobileNet in one EZKL circuit.
WHOLE_MODEL = "mobilenet_model"
QUICK_CASES = ("mobilenet_first",)


# --- in the child processes ----------------------------------------------------------------


def _progress(job: dict[str, Any], text: str) -> None:
    """Append one progress line (the parent prints it, and a killed child leaves its trace)."""
    with Path(job["progress"]).open("a") as handle:
        handle.write(f"{time.perf_counter() - job['_start']:7.1f}s {text}\n")


def _write_result(job: dict[str, Any], result: dict[str, Any]) -> None:
    """Write the child's (possibly partial) result atomically."""
    target = Path(job["result"])
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(target)


def _proj_node(nodes: Sequence[Any]) -> int:
    """Position of the first attention output projection MatMul."""
    return next(k for k, n in enumerate(nodes)
                if n.op_type == "MatMul" and n.name.endswith("/proj/MatMul"))


def _prepare(model_name: str, cuts: str) -> PreparedModel:
    """The model prepared as registration does (raised load limits where the defaults refuse
    it); ``cuts`` ``"proj"``: the default cuts plus one right after the first attention output
    projection MatMul, so that the MatMul is a segment of its own."""
    from bench.bench_commitment import RAISED_LIMITS, prepare
    from bench.bench_models import bench_model
    from refute.loading import load_model
    from refute.provider import prepare_model
    from refute.segmentation import default_cuts

    model = bench_model(model_name)
    if cuts == "default":
        return prepare(model, None)[0]
    loaded = load_model(model.onnx_bytes, limits=RAISED_LIMITS)
    extra = _proj_node(loaded.nodes) + 1
    return prepare_model(model.onnx_bytes, limits=RAISED_LIMITS,
                         cuts=sorted({*default_cuts(loaded), extra}))


def _conv_kind(segment: Segment) -> str | None:
    """``depthwise``, ``pointwise``, ``conv`` for a segment whose first node is a Conv."""
    import onnx
    from onnx import helper

    node = onnx.load_model_from_string(segment.onnx_bytes).graph.node[0]
    if node.op_type != "Conv":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    channels = segment.inputs[0].shape[1]
    if int(attrs.get("group", 1)) == channels > 1:
        return "depthwise"
    if list(attrs.get("kernel_shape", [])) == [1, 1] and int(attrs.get("group", 1)) == 1:
        return "pointwise"
    return "conv"


def _pick(prepared: PreparedModel, which: str) -> int:
    """The index of the segment a case is about."""
    segments = prepared.segmentation.segments
    middle = len(segments) / 2
    if which == "first":
        return 1
    if which == "last":
        return len(segments)
    if which in ("depthwise", "pointwise"):
        found = [s for s in segments if _conv_kind(s) == which]
        return min(found, key=lambda s: abs(s.index - middle)).index
    if which == "mlp_up":
        return next(s.index for s in segments if s.op_types[0] == "MatMul" and "Tanh" in s.op_types)
    if which == "proj":
        start = _proj_node(prepared.loaded.nodes)
        return next(s.index for s in segments if s.start == start and s.end == start + 1)
    raise ValueError(f"no segment picker {which!r}")


def _shapes(specs: Sequence[Any]) -> list[list[int]]:
    return [list(s.shape) for s in specs]


def _survey(job: dict[str, Any]) -> dict[str, Any]:
    """Tile every segment of the model under the starting bound; pick the cases' segments."""
    from refute.errors import RefuteError
    from refute.tiling import plan_tiling

    picks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for cuts in sorted({CASES[c][1] for c in job["cases"]}):
        _progress(job, f"preparing {job['model']} ({cuts} cuts)")
        prepared = _prepare(job["model"], cuts)
        for case in job["cases"]:
            if CASES[case][1] == cuts:
                picks[case] = _pick(prepared, CASES[case][2])
        if cuts != "default":
            continue
        _progress(job, f"tiling {prepared.segmentation.num_segments} segments")
        for seg in prepared.segmentation.segments:
            row: dict[str, Any] = {"segment": seg.index, "ops": list(seg.op_types),
                                   "inputs": _shapes(seg.inputs), "outputs": _shapes(seg.outputs)}
            try:
                tiling = plan_tiling(seg, job["tile_rows"])
                row.update(tiles=len(tiling.tiles), blocks=list(tiling.blocks),
                           tile_inputs=[list(s) for s in tiling.input_shapes],
                           tile_elements=tiling.tile_elements)
            except RefuteError as exc:
                row["refused"] = str(exc)
            rows.append(row)
    return {"picks": picks, "segments": rows}


def _case_model(job: dict[str, Any]) -> tuple[Segment, list[list[np.ndarray]]]:
    """The case's segment and every honest state of one seeded run (deterministic executor)."""
    from refute.executor import DeterministicExecutor
    from refute.provider import random_inputs
    from refute.segmentation import run_segments

    _progress(job, f"preparing {job['model']}")
    prepared = _prepare(job["model"], job["cuts"])
    _progress(job, "running the model (deterministic executor)")
    states = run_segments(DeterministicExecutor(), prepared.segmentation,
                          random_inputs(prepared.loaded, seed=0))
    return prepared.segmentation.segments[job["segment"] - 1], states


def _needed_logrows(settings: dict[str, Any]) -> int:
    """The logrows the rows of (uncalibrated) settings need, at least the range-check table's."""
    rows = int(settings["num_rows"])
    table = int(settings["run_args"].get("decomp_base", 16384))
    return max(math.ceil(math.log2(rows + RESERVED_ROWS)), math.ceil(math.log2(table)) + 1)


def _uncalibrated(graph: bytes, workdir: Path, hashed: int,
                  job: dict[str, Any] | None = None) -> dict[str, Any]:
    """EZKL's settings for ``graph`` before calibration (it counts the circuit's rows), with
    the logrows they need and :func:`prover.budget.estimate` at that logrows.

    EZKL lays the circuit out at the run arguments' logrows and fails ("too many values to
    flush for this column size") when the ``hashed`` elements' Poseidon rows cannot fit: the
    first try is at the logrows those rows need, then one more at a time up to
    :data:`MAX_SETTINGS_LOGROWS`."""
    import ezkl

    from prover.budget import estimate
    from prover.circuit import run_args

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "uncalibrated.onnx").write_bytes(graph)
    path = workdir / "uncalibrated.json"
    first = max(17, math.ceil(math.log2(POSEIDON_ROWS * hashed + RESERVED_ROWS)))
    start = time.perf_counter()
    for logrows in range(first, MAX_SETTINGS_LOGROWS + 1):
        args = run_args(SCALE)
        args.logrows = logrows
        try:
            ezkl.gen_settings(str(workdir / "uncalibrated.onnx"), str(path), py_run_args=args)
            break
        except RuntimeError as exc:
            if "synthesis" not in str(exc) or logrows == MAX_SETTINGS_LOGROWS:
                raise
            if job is not None:
                _progress(job, f"no layout at logrows {logrows} ({exc}); trying {logrows + 1}")
    seconds = time.perf_counter() - start
    settings: dict[str, Any] = json.loads(path.read_text())
    need = _needed_logrows(settings)
    sized = {**settings, "run_args": {**settings["run_args"], "logrows": need}}
    return {"rows": int(settings["num_rows"]), "logrows": need, "seconds": seconds,
            "layout_logrows": logrows, "estimate": estimate(sized).to_json()}


def _save_tensors(path: Path, groups: dict[str, Sequence[np.ndarray]]) -> None:
    arrays: dict[str, Any] = {f"{name}:{k}": np.asarray(t) for name, ts in groups.items()
                              for k, t in enumerate(ts)}
    np.savez(path, **arrays)


def _load_tensors(path: Path) -> dict[str, list[np.ndarray]]:
    groups: dict[str, list[np.ndarray]] = {}
    with np.load(path) as data:
        for key in sorted(data.files, key=lambda k: (k.split(":")[0], int(k.split(":")[1]))):
            groups.setdefault(key.split(":")[0], []).append(data[key])
    return groups


def _lie(y: Sequence[np.ndarray], owned: tuple[tuple[int, int], ...],
         window: tuple[tuple[int, int], ...]) -> list[np.ndarray]:
    """``y`` with :data:`LIE` added to the middle element the tile owns (window coordinates)."""
    lie = [np.array(t, copy=True) for t in y]
    at = tuple((a + b) // 2 - w0 for (a, b), (w0, _) in zip(owned, window, strict=True))
    lie[0][at] += np.float32(LIE)
    return lie


def _calibrate(job: dict[str, Any], graph: bytes, x: Sequence[np.ndarray],
               y: Sequence[np.ndarray], states: Sequence[Sequence[np.ndarray]]
               ) -> dict[str, Any]:
    """Calibrated settings on registration's extreme sample, saved with the graph."""
    from prover.budget import estimate
    from prover.calibration import _extreme, _range_of
    from prover.circuit import calibrated_settings
    from prover.srs import MAX_DEV_LOGROWS

    work = Path(job["workdir"])
    bound = _range_of([states], RANGE_MARGIN)
    _progress(job, f"calibrating (R = {bound:g})")
    start = time.perf_counter()
    settings = calibrated_settings(graph, SCALE, [[*x, *_extreme(y, bound)]], work / "cal",
                                   max_logrows=MAX_DEV_LOGROWS)
    seconds = time.perf_counter() - start
    (work / "graph.onnx").write_bytes(graph)
    (work / "settings.json").write_text(json.dumps(settings))
    run = settings["run_args"]
    _progress(job, f"calibrated in {seconds:.0f} s: logrows {run['logrows']}, "
                   f"{run['num_inner_cols']} inner columns")
    return {"calibrate_s": seconds, "range": bound, "logrows": int(run["logrows"]),
            "num_inner_cols": int(run["num_inner_cols"]), "rows": int(settings["num_rows"]),
            "decomp": f"{run['decomp_base']}x{run['decomp_legs']}",
            "estimate": estimate(settings).to_json()}


def _tile_prepare(job: dict[str, Any]) -> dict[str, Any]:
    """Plan the tiling (lowering the bound while the tile is too tall), cut the tile's tensors,
    check the tile model against the segment, calibrate the tile circuit."""
    from circuits.adjudication import adjudication_bytes
    from refute.errors import RefuteError
    from refute.executor import DeterministicExecutor
    from refute.segmentation import run_segment
    from refute.tiling import cut_input, cut_output, plan_tiling, tile_at, tile_segment

    segment, states = _case_model(job)
    work = Path(job["workdir"])
    result: dict[str, Any] = {"segment": segment.index, "ops": list(segment.op_types),
                              "segment_inputs": _shapes(segment.inputs),
                              "segment_outputs": _shapes(segment.outputs), "bounds": []}
    bound = int(job["tile_rows"])
    for _ in range(MAX_SHRINKS + 1):
        try:
            tiling = plan_tiling(segment, bound)
        except RefuteError as exc:
            return {**result, "status": "refused", "reason": str(exc), "bound": bound}
        middle = tile_at(tiling, [d // 2 for d in tiling.output_shape])
        tile_seg = tile_segment(segment, tiling, middle)
        graph = adjudication_bytes(tile_seg)
        size = _uncalibrated(graph, work / "uncal", tiling.tile_elements)
        result["bounds"].append({"bound": bound, "tiles": len(tiling.tiles),
                                 "blocks": list(tiling.blocks), "rows": size["rows"],
                                 "logrows": size["logrows"]})
        _progress(job, f"bound {bound}: {len(tiling.tiles)} tiles of {list(tiling.blocks)}, "
                       f"{size['rows']:,} rows uncalibrated → logrows {size['logrows']}")
        if size["logrows"] <= job["max_tile_logrows"]:
            break
        bound = int(tiling.tile_rows * SHRINK)
    else:
        return {**result, "status": "refused", "bound": bound,
                "reason": f"no tile within logrows {job['max_tile_logrows']} after "
                          f"lowering the bound {MAX_SHRINKS} times"}
    result.update(bound=bound, tiling=tiling.to_json(), tile=middle.index,
                  grid_position=list(middle.grid_position),
                  tile_inputs=[list(s) for s in tiling.input_shapes],
                  tile_outputs=[list(tiling.blocks)] * len(middle.windows),
                  input_pads=[list(map(list, p)) for p in middle.input_pads])
    x = cut_input(tiling, middle, states[segment.index - 1])
    y = cut_output(tiling, middle, states[segment.index])
    computed = run_segment(DeterministicExecutor(), tile_seg, x)
    result["tile_vs_segment_max_abs"] = max(float(np.max(np.abs(a - b)))
                                            for a, b in zip(computed, y, strict=True))
    groups: dict[str, Sequence[np.ndarray]] = {
        "x": x, "y": y, "y_lie": _lie(y, middle.outputs[0], middle.windows[0])}
    if job["edge"]:
        edge = _edge_tile(segment, tiling, middle, graph)
        if edge is not None:
            groups["x_edge"] = cut_input(tiling, edge, states[segment.index - 1])
            groups["y_edge"] = cut_output(tiling, edge, states[segment.index])
            result.update(edge_tile=edge.index, edge_position=list(edge.grid_position),
                          edge_pads=[list(map(list, p)) for p in edge.input_pads])
    _save_tensors(work / "tensors.npz", groups)
    result.update(_calibrate(job, graph, x, y, states))
    return {**result, "status": "calibrated"}


def _edge_tile(segment: Segment, tiling: Any, middle: Any, graph: bytes) -> Any:
    """A tile at an edge (reading zero padding, else with a window shifted inward) whose
    adjudication graph is the middle tile's (same circuit), or None."""
    from circuits.adjudication import adjudication_bytes
    from refute.tiling import tile_segment

    def at_edge(tile: Any) -> bool:
        padded = any(p for pads in tile.input_pads for pair in pads for p in pair)
        return padded or tile.outputs != tile.windows

    for tile in tiling.tiles[:4096]:
        if tile.index != middle.index and at_edge(tile) and adjudication_bytes(
                tile_segment(segment, tiling, tile)) == graph:
            return tile
    return None


def _segment_prepare(job: dict[str, Any]) -> dict[str, Any]:
    """The whole segment's circuit: its uncalibrated size and estimate; calibrated when a wider
    layout could bring it within the cap; kept for setup and proving when it then fits."""
    from circuits.adjudication import adjudication_bytes
    from prover.budget import estimate
    from prover.srs import MAX_DEV_LOGROWS

    segment, states = _case_model(job)
    work = Path(job["workdir"])
    graph = adjudication_bytes(segment)
    hashed = sum(math.prod(s.shape) for s in [*segment.inputs, *segment.outputs])
    _progress(job, f"gen_settings on the whole segment {segment.index} ({hashed:,} hashed "
                   f"elements)")
    size = _uncalibrated(graph, work / "uncal", hashed)
    peak = size["estimate"]["peak_bytes"]
    result: dict[str, Any] = {"segment": segment.index, "uncalibrated": size}
    _progress(job, f"{size['rows']:,} rows → logrows {size['logrows']}, estimated peak "
                   f"{peak / 2**30:.1f} GiB")
    cap = job["mem_gb"] * 2**30
    if peak > WIDEST * cap or size["logrows"] - 2 > MAX_DEV_LOGROWS:
        return {**result, "status": "estimate",
                "reason": f"estimated {peak / 2**30:,.1f} GiB at logrows {size['logrows']} > cap "
                          f"{job['mem_gb']:g} GiB (a layout {WIDEST}x wider would not fit "
                          f"either): not calibrated"}
    x, y = states[segment.index - 1], states[segment.index]
    owned = tuple((0, d) for d in y[0].shape)
    _save_tensors(work / "tensors.npz", {"x": x, "y": y, "y_lie": _lie(y, owned, owned)})
    result.update(_calibrate(job, graph, x, y, states))
    cost = estimate(json.loads((work / "settings.json").read_text()))
    if cost.peak_bytes > cap or cost.logrows > MAX_DEV_LOGROWS:
        return {**result, "status": "estimate",
                "reason": f"calibrated: estimated {cost.peak_bytes / 2**30:.1f} GiB at logrows "
                          f"{cost.logrows} > cap {job['mem_gb']:g} GiB"}
    return {**result, "status": "calibrated"}


def _setup(job: dict[str, Any]) -> dict[str, Any]:
    """Compile and set up the calibrated circuit (development SRS generated first, untimed)."""
    from prover.circuit import CircuitCache
    from prover.config import srs_store
    from refute.settings import get_settings

    work = Path(job["workdir"])
    settings = json.loads((work / "settings.json").read_text())
    logrows = int(settings["run_args"]["logrows"])
    store = srs_store(get_settings())
    _progress(job, f"development SRS for logrows {logrows}")
    start = time.perf_counter()
    store.for_logrows(logrows)
    srs_s = time.perf_counter() - start
    cache = CircuitCache(work / "circuits", store)
    start = time.perf_counter()
    circuit = cache.build((work / "graph.onnx").read_bytes(), SCALE, settings,
                          progress=lambda stage: _progress(job, stage))
    setup_s = time.perf_counter() - start
    _progress(job, f"set up in {setup_s:.0f} s")
    return {"setup_s": setup_s, "srs_s": srs_s, "folder": str(circuit.folder),
            "pk_bytes": circuit.pk_path.stat().st_size,
            "vk_bytes": circuit.vk_path.stat().st_size}


def _prove(job: dict[str, Any]) -> dict[str, Any]:
    """Prove (and verify) the honest claim, the lie, and the edge tile when there is one."""
    from prover.circuit import Circuit
    from prover.step import maxdiff_units, prove_step, verify_proof_file

    work = Path(job["workdir"])
    circuit = Circuit.load(Path(job["folder"]))
    tensors = _load_tensors(work / "tensors.npz")
    claims = {"honest": ("x", "y"), "lie": ("x", "y_lie"), "edge": ("x_edge", "y_edge")}
    result: dict[str, Any] = {}
    for kind, (x, y) in claims.items():
        if y not in tensors:
            continue
        _progress(job, f"proving the {kind} claim")
        start = time.perf_counter()
        step = prove_step(circuit, job["segment"], tensors[x], tensors[y], workdir=work)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        ok = verify_proof_file(circuit, step.proof)
        verify_s = time.perf_counter() - start
        units = maxdiff_units(step.maxdiff_raw, output_scale=circuit.output_scale, scale=SCALE)
        (work / f"proof_{kind}.json").write_text(json.dumps(step.proof))
        _progress(job, f"{kind}: proved in {seconds:.0f} s, verify {ok}, maxdiff {float(units):g}")
        result[kind] = {"prove_s": seconds, "verify_s": verify_s, "verify_ok": ok,
                        "maxdiff_units": float(units)}
        _write_result(job, result)
    return result


def _gas(job: dict[str, Any]) -> dict[str, Any]:
    """Deploy the circuit's Solidity verifier on the anvil chain; gas of verifying the honest
    proof in a mined transaction."""
    from prover.circuit import Circuit
    from prover.evm import compile_solidity, deploy, verify_transaction, write_verifier_sol

    work = Path(job["workdir"])
    circuit = Circuit.load(Path(job["folder"]))
    _progress(job, "writing and compiling the Solidity verifier")
    sol = write_verifier_sol(circuit.vk_path, circuit.settings_path, work / "Verifier.sol",
                             circuit.srs_path)
    compiled = compile_solidity(sol)
    address = deploy(job["rpc_url"], compiled)
    outcome = verify_transaction(job["rpc_url"], address, work / "proof_honest.json")
    return {"gas": outcome.gas_used, "verified_on_chain": outcome.success,
            "deployed_bytes": compiled.deployed_size, "fits_eip170": compiled.fits_eip170}


def _whole_model(job: dict[str, Any]) -> dict[str, Any]:
    """The whole model as one EZKL circuit: uncalibrated settings (the rows, the logrows they
    need), then ``calibrate_settings``; the result is rewritten after each stage so that a
    killed child still says how far it got."""
    import ezkl

    from bench.bench_models import bench_model
    from prover.circuit import write_input_json
    from refute.loading import load_model
    from refute.provider import random_inputs

    work = Path(job["workdir"])
    model = bench_model(job["model"])
    loaded = load_model(model.onnx_bytes)
    inputs = [random_inputs(loaded, seed=0)[n] for n in loaded.input_names]
    data = write_input_json(work / "input.json", inputs)
    result: dict[str, Any] = {"stage": "gen_settings"}
    _write_result(job, result)
    hashed = sum(int(t.size) for t in inputs)
    _progress(job, f"gen_settings on the whole model (hashed input of {hashed:,} elements, "
                   f"fixed params, public output)")
    size = _uncalibrated(model.onnx_bytes, work, hashed, job)
    result = {"stage": "calibrate_settings", "uncalibrated": size}
    _write_result(job, result)
    _progress(job, f"{size['rows']:,} rows → logrows {size['logrows']}, estimated peak "
                   f"{size['estimate']['peak_bytes'] / 2**30:,.0f} GiB; calibrate_settings")
    settings_path = work / "uncalibrated.json"
    start = time.perf_counter()
    ezkl.calibrate_settings(str(data), str(work / "uncalibrated.onnx"), str(settings_path),
                            "resources", scales=[SCALE])
    calibrated = json.loads(settings_path.read_text())
    return {**result, "stage": "done", "calibrate_s": time.perf_counter() - start,
            "calibrated_logrows": int(calibrated["run_args"]["logrows"]),
            "calibrated_rows": int(calibrated["num_rows"])}


STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "survey": _survey, "tile_prepare": _tile_prepare, "segment_prepare": _segment_prepare,
    "setup": _setup, "prove": _prove, "gas": _gas, "whole_model": _whole_model,
}


def _child_main(job_path: Path) -> None:
    job: dict[str, Any] = json.loads(job_path.read_text())
    job["_start"] = time.perf_counter()
    if job.get("cap_bytes"):  # the memory cap: address space, as bench_prove.py sets it
        resource.setrlimit(resource.RLIMIT_AS, (job["cap_bytes"], job["cap_bytes"]))
    try:
        result = STEPS[job["step"]](job)
    except Exception as exc:  # EZKL raises bare RuntimeErrors: the failure is a result
        text = (getattr(exc, "reason", None) or str(exc)).strip().splitlines()
        partial: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            partial = json.loads(Path(job["result"]).read_text())
        result = {**partial, "error": f"{type(exc).__name__}: {text[0] if text else ''}"[:400]}
    _write_result(job, result)


# --- in the parent -------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs the children one at a time, prints their progress, records what they cost."""

    console: Console
    root: Path
    mem_gb: float
    timeout: float

    def run(self, step: str, job: dict[str, Any], label: str, *, timeout: float | None = None,
            capped: bool = True) -> dict[str, Any]:
        """Run ``step`` of ``job`` in a fresh process; its result with ``peak_gb`` (the
        child's ``ru_maxrss``) and ``wall_s``; a failure is a result with ``error``."""
        limit = self.timeout if timeout is None else timeout
        work = Path(job["workdir"])
        work.mkdir(parents=True, exist_ok=True)
        files = {k: work / f"{step}.{k}" for k in ("job", "result", "progress", "log")}
        for path in files.values():
            path.unlink(missing_ok=True)
        files["job"].write_text(json.dumps({**job, "step": step, "mem_gb": self.mem_gb,
                                            "cap_bytes": int(self.mem_gb * 2**30) if capped
                                            else None,
                                            "result": str(files["result"]),
                                            "progress": str(files["progress"])}))
        self.console.print(f"[bold]{label}[/bold]: {step} (limit {limit:.0f} s"
                           f"{f', {self.mem_gb:g} GB' if capped else ''})", highlight=False)
        start = time.perf_counter()
        with files["log"].open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.bench_tiles", "--child", str(files["job"])],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            status, usage, killed = self._wait(proc, start + limit, files["progress"], label)
        wall = time.perf_counter() - start
        result: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            result = json.loads(files["result"].read_text())
        code = os.waitstatus_to_exitcode(status)
        if killed:
            result["error"] = f"time limit: no result within {limit:.0f} s"
        elif code != 0 or not files["result"].exists():
            result["error"] = self._death(code, files["log"], capped)
        result.update(peak_gb=usage.ru_maxrss / 2**20, wall_s=wall)
        tail = result.get("error", "done")
        self.console.print(f"  → {tail} ({wall:.0f} s, peak {result['peak_gb']:.2f} GB)",
                           highlight=False)
        return result

    def _wait(self, proc: subprocess.Popen[bytes], deadline: float, progress: Path,
              label: str) -> tuple[int, Any, bool]:
        """Wait for ``proc`` (killed with its process group at ``deadline``), echoing its
        progress lines."""
        shown = 0
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            shown = self._echo(progress, shown, label)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return status, usage, killed
            if time.perf_counter() > deadline and not killed:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(POLL_S)

    def _echo(self, progress: Path, shown: int, label: str) -> int:
        with contextlib.suppress(OSError):
            lines = progress.read_text().splitlines()
            for line in lines[shown:]:
                self.console.print(f"  [dim]{label}: {line}[/dim]", highlight=False)
            return len(lines)
        return shown

    def _death(self, code: int, log: Path, capped: bool) -> str:
        from prover.isolated import last_message

        last = last_message(log)
        text = log.read_text(errors="replace") if log.exists() else ""
        if capped and (code == -signal.SIGABRT or "memory allocation" in text
                       or "MemoryError" in text):
            return f"memory cap {self.mem_gb:g} GB hit (exit {code}): {last}"
        return f"child died (exit {code}): {last}"


def _circuit_part(runner: Runner, job: dict[str, Any], label: str, prepared: dict[str, Any],
                  *, gas_url: str | None, keep: bool) -> dict[str, Any]:
    """Setup, prove and gas children for a calibrated circuit in ``job['workdir']``."""
    part: dict[str, Any] = {"calibrate_peak_gb": prepared.get("peak_gb")}
    setup = runner.run("setup", job, label)
    part["setup"] = setup
    if "error" not in setup:
        job = {**job, "folder": setup["folder"], "segment": prepared["segment"]}
        part["prove"] = runner.run("prove", job, label)
        honest = part["prove"].get("honest", {})
        if gas_url is not None and honest.get("verify_ok"):
            part["gas"] = runner.run("gas", {**job, "rpc_url": gas_url}, label, capped=False)
        if not keep:
            shutil.rmtree(Path(setup["folder"]), ignore_errors=True)
    return part


def run_case(runner: Runner, case: str, segment: int, args: argparse.Namespace,
             gas_url: str | None) -> dict[str, Any]:
    """Every figure of one case: its tile and (unless disabled) its whole segment."""
    model, cuts, _ = CASES[case]
    base = {"model": model, "cuts": cuts, "segment": segment,
            "tile_rows": args.tile_rows, "max_tile_logrows": args.max_tile_logrows,
            "edge": not args.no_edge}
    out: dict[str, Any] = {"model": model, "cuts": cuts, "segment": segment}
    parts = args.parts.split(",")
    if "tile" in parts:
        job = {**base, "workdir": str(runner.root / case / "tile")}
        tile = runner.run("tile_prepare", job, f"{case} tile")
        out["tile"] = tile
        if tile.get("status") == "calibrated" and "error" not in tile:
            tile.update(_circuit_part(runner, job, f"{case} tile", tile, gas_url=gas_url,
                                      keep=args.keep))
    if "segment" in parts:
        job = {**base, "workdir": str(runner.root / case / "segment")}
        whole = runner.run("segment_prepare", job, f"{case} whole segment",
                           timeout=args.settings_timeout)
        out["segment_whole"] = whole
        if whole.get("status") == "calibrated" and "error" not in whole:
            whole.update(_circuit_part(runner, job, f"{case} whole segment", whole,
                                       gas_url=gas_url, keep=args.keep))
    return out


# --- tables --------------------------------------------------------------------------------


def _gb(value: Any) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _s(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def _shape(shapes: Any) -> str:
    return " ".join("×".join(map(str, s)) for s in shapes) if shapes else "-"


def survey_table(model: str, survey: dict[str, Any], bound: int) -> Table:
    """Every segment of a model under the starting tile bound, identical rows grouped."""
    table = Table(title=f"{model}: plan_tiling on every segment (bound {bound:,} estimated rows)")
    for column in ("segments", "ops", "input → output", "tiles", "blocks", "tile input",
                   "elements", "refused"):
        table.add_column(column, overflow="fold")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in survey.get("segments", []):
        # The same refusal in another block of a transformer: segment and node names aside.
        reason = re.sub(r"'/\d+/", "'/…/", re.sub(r"^segment \d+ ", "", row.get("refused", "")))
        key = json.dumps({**{k: v for k, v in row.items() if k != "segment"},
                          "refused": reason}, sort_keys=True)
        groups.setdefault(key, []).append({**row, "refused": reason})
    for rows in groups.values():
        r = rows[0]
        indices = [str(x["segment"]) for x in rows]
        table.add_row(",".join(indices) if len(indices) <= 6 else
                      f"{','.join(indices[:4])},… ({len(indices)})",
                      " ".join(r["ops"]), f"{_shape(r['inputs'])} → {_shape(r['outputs'])}",
                      str(r.get("tiles", "-")), _shape([r["blocks"]]) if "blocks" in r else "-",
                      _shape(r.get("tile_inputs")), str(r.get("tile_elements", "-")),
                      r["refused"].split("; cut the model")[0][:160])
    tiled = sum(1 for r in survey.get("segments", []) if "tiles" in r)
    table.caption = f"{tiled} of {len(survey.get('segments', []))} segments tile under the bound"
    return table


def _calibrated_tiles(results: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for case, r in results.items():
        t = r.get("tile")
        if t is not None and t.get("status") == "calibrated" and "error" not in t:
            yield case, t


def tile_table(results: dict[str, Any], mem_gb: float) -> Table:
    """One row per case: the tile's plan and circuit, what setup and proving cost."""
    table = Table(title=f"one tile per case: plan, circuit, cost (memory cap {mem_gb:g} GB; "
                        f"peak resident memory of each child)")
    for column in ("case", "segment", "bound → tiles", "tile in → out", "logrows (uncal)",
                   "cols", "pk GB", "calib s", "setup s", "prove s", "verify",
                   "peak GB calib/setup/prove"):
        table.add_column(column, overflow="fold")
    for case, r in results.items():
        t = r.get("tile")
        if t is None:
            continue
        seg = f"{r['segment']}: {' '.join(t.get('ops', []))}"
        if t.get("status") != "calibrated" or "error" in t:
            table.add_row(case, seg, str(t.get("bound", "-")), "", "", "", "", "", "", "",
                          t.get("error") or t.get("reason", ""), f"{t['peak_gb']:.1f}")
            continue
        setup, prove = t.get("setup", {}), t.get("prove", {})
        proofs = [prove.get(k, {}) for k in ("honest", "lie", "edge")]
        uncal = t["bounds"][-1]["logrows"] if t.get("bounds") else "-"
        bounds = " ← ".join(str(b["bound"]) for b in reversed(t.get("bounds", [])))
        table.add_row(
            case, seg, f"{bounds} → {t['tiling']['tiles']}",
            f"{_shape(t['tile_inputs'])} → {_shape(t['tile_outputs'][:1])}",
            f"{t['logrows']} ({uncal})", str(t["num_inner_cols"]), _gb(setup.get("pk_bytes")),
            _s(t.get("calibrate_s")), _s(setup.get("setup_s")),
            " / ".join(_s(p.get("prove_s")) for p in proofs if p),
            " ".join("ok" if p.get("verify_ok") else "FAIL" for p in proofs if p),
            f"{t['peak_gb']:.1f} / {setup.get('peak_gb', 0):.1f} / {prove.get('peak_gb', 0):.1f}")
    return table


def proof_table(results: dict[str, Any]) -> Table:
    """One row per proven tile: maxdiffs, gas, and prover/budget.py's prediction."""
    table = Table(title="one tile per case: what the proofs say (maxdiff in quantized units at "
                        f"scale {SCALE}; the lie adds {LIE:g} = {LIE * 2**SCALE:g} units)")
    for column in ("case", "maxdiff honest", "maxdiff lie", "maxdiff edge (tile)",
                   "tile model vs segment", "verifyProof gas", "verifier bytes",
                   "budget.py est. peak GB / setup s / prove s", "failures"):
        table.add_column(column, overflow="fold")
    for case, t in _calibrated_tiles(results):
        setup, prove, gas = t.get("setup", {}), t.get("prove", {}), t.get("gas", {})
        maxdiff = [f"{prove[k]['maxdiff_units']:g}" if k in prove else "-"
                   for k in ("honest", "lie", "edge")]
        if "edge" in prove:
            maxdiff[2] += f" ({t['edge_tile']} at {t['edge_position']})"
        est = t.get("estimate") or {}
        table.add_row(
            case, *maxdiff, f"max |Δ| {t['tile_vs_segment_max_abs']:g}",
            f"{gas['gas']:,}" if gas.get("gas") else "-",
            f"{gas['deployed_bytes']:,}" if gas.get("deployed_bytes") else "-",
            f"{_gb(est['peak_bytes'])} / {_s(est['setup_seconds'])} / "
            f"{_s(est['prove_seconds'])}" if est else "-",
            "; ".join(str(x["error"]) for x in (setup, prove, gas) if "error" in x))
    return table


def whole_table(results: dict[str, Any], model_result: dict[str, Any] | None,
                mem_gb: float) -> Table:
    """The whole segment of each case, and the whole model, beside their tiles: the rows EZKL
    counts before calibration, the logrows they need and :func:`prover.budget.estimate` there;
    the calibrated circuit when there is one; the measurement when it fitted."""
    table = Table(title=f"whole segment / whole model in one circuit (cap {mem_gb:g} GB)")
    for column in ("case", "circuit", "rows (uncal)", "logrows", "est. pk GB", "est. peak GB",
                   "est. setup+prove s", "calibrated", "measured", "result"):
        table.add_column(column, overflow="fold")
    rows: list[tuple[str, str, dict[str, Any]]] = [
        (case, f"segment {r['segment']}", r["segment_whole"])
        for case, r in results.items() if "segment_whole" in r]
    if model_result is not None:
        rows.append((WHOLE_MODEL, "whole model", model_result))
    for case, what, w in rows:
        size = w.get("uncalibrated") or {}
        est = size.get("estimate") or {}
        calibrated = ""
        if "num_inner_cols" in w:
            calibrated = (f"logrows {w['logrows']}, {w['num_inner_cols']} cols, est. peak "
                          f"{_gb(w['estimate']['peak_bytes'])} GB ({_s(w['calibrate_s'])} s)")
        elif w.get("stage") == "done":
            calibrated = (f"logrows {w['calibrated_logrows']}, {w['calibrated_rows']:,} rows "
                          f"({_s(w['calibrate_s'])} s)")
        measured = ""
        if "setup" in w:
            prove = w.get("prove", {}).get("honest", {})
            measured = (f"setup {_s(w['setup'].get('setup_s'))} s, prove "
                        f"{_s(prove.get('prove_s'))} s, peak {w['prove'].get('peak_gb', 0):.1f} GB")
        result = w.get("error") or w.get("reason") or w.get("status") or w.get("stage", "")
        if "stage" in w and "error" in w:
            result = f"at {w['stage']}: {w['error']}"
        table.add_row(case, what, f"{size['rows']:,}" if "rows" in size else "-",
                      str(size.get("logrows", "-")), _gb(est.get("pk_bytes")),
                      _gb(est.get("peak_bytes")),
                      f"{est['setup_seconds'] + est['prove_seconds']:,.0f}" if est else "-",
                      calibrated, measured, f"{result} (child: {w['wall_s']:.0f} s, "
                                            f"{w['peak_gb']:.1f} GB peak)")
    return table


def print_report(console: Console, doc: dict[str, Any]) -> None:
    """Every table of a run (as written to ``--out``)."""
    args = doc["args"]
    for model, survey in doc["surveys"].items():
        console.print(survey_table(model, survey, args["tile_rows"]))
    if any("tile" in r for r in doc["cases"].values()):
        console.print(tile_table(doc["cases"], args["mem_gb"]))
        console.print(proof_table(doc["cases"]))
    if doc["whole_model"] or any("segment_whole" in r for r in doc["cases"].values()):
        console.print(whole_table(doc["cases"], doc["whole_model"], args["mem_gb"]))
    console.print(f"total {doc['total_s'] / 60:.1f} min")


@contextlib.contextmanager
def _chain(enabled: bool) -> Iterator[str | None]:
    """A local anvil for the gas measurements (stopped on exit), or None."""
    if not enabled:
        yield None
        return
    from prover.evm import Anvil

    with Anvil() as chain:
        yield chain.rpc_url


def main() -> None:
    """Parse arguments; run the survey, the cases and the whole model; print and save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--show", type=Path, help="print the tables of a saved --out file")
    parser.add_argument("--cases", default=",".join([*CASES, WHOLE_MODEL]),
                        help=f"comma-separated, from {', '.join([*CASES, WHOLE_MODEL])}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the MobileNet segment-1 tile only")
    parser.add_argument("--tile-rows", type=int, default=rows_bound(18),
                        help="starting bound of plan_tiling (estimated EZKL rows per tile)")
    parser.add_argument("--max-tile-logrows", type=int, default=18,
                        help="lower the bound while the tile circuit needs more logrows")
    parser.add_argument("--mem-gb", type=float, default=12.0, help="memory cap per child")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--settings-timeout", type=float, default=600.0,
                        help="seconds for a whole segment's settings (and its calibration)")
    parser.add_argument("--model-timeout", type=float, default=600.0,
                        help="seconds for the whole model's gen_settings + calibrate_settings")
    parser.add_argument("--no-edge", action="store_true", help="skip the edge tile's proof")
    parser.add_argument("--no-gas", action="store_true", help="skip on-chain verification")
    parser.add_argument("--parts", default="tile,segment",
                        help="per case: tile (its tile), segment (the whole segment), or both")
    parser.add_argument("--keep", action="store_true", help="keep proving keys")
    parser.add_argument("--workdir", type=Path, default=REPO / "out" / "bench_tiles.d")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_tiles.json")
    args = parser.parse_args()
    if args.child:
        _child_main(args.child)
        return
    if args.show:
        print_report(Console(width=220), json.loads(args.show.read_text()))
        return
    names = list(QUICK_CASES) if args.quick else [
        c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES and c != WHOLE_MODEL]
    if unknown:
        parser.error(f"unknown cases {unknown}")
    if args.quick:
        args.no_edge, args.parts = True, "tile"
    console = Console(width=220)
    runner = Runner(console, args.workdir, args.mem_gb, args.timeout)
    started = time.perf_counter()
    cases = [c for c in names if c in CASES]
    surveys: dict[str, dict[str, Any]] = {}
    for model in sorted({CASES[c][0] for c in cases}):
        mine = [c for c in cases if CASES[c][0] == model]
        surveys[model] = runner.run("survey", {
            "model": model, "cases": mine, "tile_rows": args.tile_rows,
            "workdir": str(args.workdir / f"survey-{model}")}, f"{model} survey")
        console.print(survey_table(model, surveys[model], args.tile_rows))
        for c in mine:
            where = surveys[model].get("picks", {}).get(c)
            console.print(f"  {c}: segment {where}", highlight=False)
    results: dict[str, Any] = {}
    model_result: dict[str, Any] | None = None
    with _chain(not args.no_gas) as gas_url:
        for case in cases:
            segment = surveys[CASES[case][0]].get("picks", {}).get(case)
            if segment is None:
                results[case] = {"segment": None, "error": "survey failed"}
                continue
            results[case] = run_case(runner, case, int(segment), args, gas_url)
            if "tile" in results[case]:
                console.print(tile_table({case: results[case]}, args.mem_gb))
    if WHOLE_MODEL in names:
        model_result = runner.run("whole_model", {
            "model": "mobilenet_v1", "workdir": str(args.workdir / WHOLE_MODEL)},
            "whole MobileNet", timeout=args.model_timeout)
    total = time.perf_counter() - started
    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "scale": SCALE, "surveys": surveys, "cases": results, "whole_model": model_result,
           "total_s": total}
    print_report(console, doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
