"""Calibration at registration: the range R, per-segment circuit settings and tolerances τ_i.

For each calibration input the model runs in float (the deterministic executor), giving honest
states. Then:

* **R**, the declared range of every state element, is ``range_margin × max |v|`` over all
  calibration states, rounded up to a power of two;
* for each segment i, the adjudication circuit is calibrated by EZKL (``resources``) on an
  *extreme* sample — x = an honest state i-1, y = f_i(x) pushed to ±R away from the honest value —
  so that the circuit can represent any claim inside the range rule; it must then produce a
  witness for every honest sample and for the extreme one, or the segment is reported as
  unprovable with EZKL's reason;
* **τ_i** = ``ceil(safety × max honest maxdiff)`` in quantized units (at least 1), where the
  honest maxdiff is the circuit's own fixed-point ``max |f_i(x) − y|`` with y the float output;
* each state's range circuit is calibrated on a sample at ±R; a state too large for one is
  proven on chunks of it, by one circuit per chunk size and element type
  (:func:`calibrate_ranges`, :mod:`refute.chunks`).

Each segment's (and each state's) EZKL calibration runs in a child process of its own, killed
after ``calibration_segment_timeout_s`` (EZKL holds the GIL, so a thread could not be stopped),
and EZKL's logrows search is capped at ``proving_max_logrows`` (both in
:class:`refute.settings.Settings`). A segment that hits either limit is reported unprovable with
a one-line reason naming the limit and EZKL's last message, instead of EZKL trying settings for
twenty minutes. Each segment's result carries its circuit's logrows, the proving cost estimated
from its settings (:func:`prover.budget.estimate`) and the seconds its calibration took.

The results go into the manifest (``tolerances``, ``range``, ``circuits``); proving later rebuilds
exactly these circuits from the recorded settings (:mod:`prover.circuit`).
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import ezkl
import numpy as np
import onnx

from circuits.adjudication import adjudication_bytes
from circuits.range_graph import chunk_bytes, range_bytes
from prover.budget import ProvingEstimate, estimate
from prover.circuit import _ezkl, calibrated_settings, felt_to_int, write_input_json
from prover.errors import CircuitUnsupported
from prover.isolated import ChildFailed, run_child
from prover.step import maxdiff_units
from refute.chunks import CHUNKING, Chunking
from refute.errors import RefuteError
from refute.executor import DeterministicExecutor
from refute.loading import TensorSpec
from refute.manifest import Manifest
from refute.provider import PreparedModel, validate_inputs
from refute.segmentation import Segment, run_segments
from refute.settings import get_settings
from refute.tiling import (
    Tiling,
    cut_input,
    cut_output,
    make_tiling,
    plan_tiling,
    rows_bound,
    tile_segment,
)

ProgressFn = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    del stage, done, total


@dataclass(frozen=True)
class SegmentCalibration:
    """What calibration found for one segment (``settings`` is None if it cannot be proven).

    ``logrows`` and ``estimate`` describe the chosen circuit (None when there is none);
    ``seconds`` is the wall-clock time spent calibrating this segment, whatever the outcome."""

    index: int
    settings: dict[str, Any] | None
    tolerance: int | None
    honest_maxdiff: Fraction | None
    reason: str | None = None
    logrows: int | None = None
    estimate: ProvingEstimate | None = None
    seconds: float = 0.0
    tiling: dict[str, Any] | None = None
    """For a tiled segment: ``blocks``, ``tiles`` and, per distinct tile model, its
    ``sha256`` (of the tile's adjudication graph), ``settings`` and ``tolerance``."""

    def to_json(self) -> dict[str, Any]:
        """The manifest's circuit entry for this segment."""
        tiling = {"tiling": self.tiling} if self.tiling is not None else {}
        return {"kind": "step", "segment": self.index, "settings": self.settings,
                "unsupported": self.reason, "logrows": self.logrows,
                "estimate": self.estimate.to_json() if self.estimate is not None else None,
                "seconds": round(self.seconds, 3), **tiling}


@dataclass(frozen=True)
class CalibrationReport:
    """Calibration of a whole model."""

    scale: int
    range: float
    segments: tuple[SegmentCalibration, ...]
    range_settings: tuple[dict[str, Any] | None, ...]

    @property
    def unsupported(self) -> list[SegmentCalibration]:
        """Segments EZKL cannot prove, with reasons."""
        return [s for s in self.segments if s.settings is None]


def _range_of(states: Sequence[Sequence[Sequence[np.ndarray]]], margin: float) -> float:
    peak = max(float(np.max(np.abs(t))) for run in states for state in run for t in state)
    return float(2.0 ** math.ceil(math.log2(max(peak * margin, 1.0))))


def _extreme(y: Sequence[np.ndarray], bound: float) -> list[np.ndarray]:
    """Claims as far from the honest ``y`` as the range rule allows (sign opposite, at ±R)."""
    return [np.where(t >= 0, -bound, bound).astype(np.float32) for t in y]


def _maxdiff(compiled: Path, tensors: Sequence[np.ndarray], workdir: Path) -> int:
    data = write_input_json(workdir / "sample.json", tensors)
    result = _ezkl("gen_witness", lambda: ezkl.gen_witness(
        str(data), str(compiled), str(workdir / "w.json")))
    return felt_to_int(result["outputs"][0][0])


def _compile(graph: bytes, settings: dict[str, Any], workdir: Path) -> Path:
    import json

    (workdir / "graph.onnx").write_bytes(graph)
    (workdir / "settings.json").write_text(json.dumps(settings))
    compiled = workdir / "model.compiled"
    _ezkl("compile_circuit", lambda: ezkl.compile_circuit(
        str(workdir / "graph.onnx"), str(compiled), str(workdir / "settings.json")))
    return compiled


def calibrate_segment(
    graph: bytes,
    index: int,
    samples: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    *,
    scale: int,
    bound: float,
    safety: float,
    max_logrows: int | None = None,
    deadline: float | None = None,
    settings: dict[str, Any] | None = None,
) -> SegmentCalibration:
    """Calibrate segment ``index``'s adjudication circuit on honest (x, y) samples, in this
    process (see :func:`calibrate_segment_bounded` for the bounded version). With
    ``settings`` (another tile model's of the same shape), EZKL's search is skipped: the
    circuit is compiled with them and must run every sample and the extreme one."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"refute-cal{index}-") as tmp:
        workdir = Path(tmp)
        x0, y0 = samples[0]
        extreme = [*x0, *_extreme(y0, bound)]
        try:
            if settings is None:
                settings = calibrated_settings(graph, scale, [extreme], workdir / "settings",
                                               max_logrows=max_logrows, deadline=deadline)
            compiled = _compile(graph, settings, workdir)
            output_scale = int((settings.get("model_output_scales") or [scale])[0])
            _maxdiff(compiled, extreme, workdir)
            worst = Fraction(0)
            for x, y in samples:
                raw = _maxdiff(compiled, [*x, *y], workdir)
                worst = max(worst, maxdiff_units(raw, output_scale=output_scale, scale=scale))
        except CircuitUnsupported as exc:
            reason = exc.reason
            if max_logrows is not None and _about_size(reason):
                reason = f"{reason} (logrows capped at {max_logrows}: {_MAX_LOGROWS_VAR})"
            return SegmentCalibration(index, None, None, None, reason,
                                      seconds=time.monotonic() - start)
    tolerance = max(1, math.ceil(worst * Fraction(safety)))
    cost = estimate(settings)
    return SegmentCalibration(index, settings, tolerance, worst, logrows=cost.logrows,
                              estimate=cost, seconds=time.monotonic() - start)


_TIMEOUT_VAR = "REFUTE_CALIBRATION_SEGMENT_TIMEOUT_S"
_MAX_LOGROWS_VAR = "REFUTE_PROVING_MAX_LOGROWS"


def _about_size(reason: str) -> bool:
    text = reason.lower()
    return any(k in text for k in ("logrows", "suitable parameters", "too many values",
                                   "column size", "synthesis"))


def calibration_job(job: tuple[str, dict[str, Any]]) -> Any:
    """The work of a calibration child (:func:`prover.isolated.run_child`): a segment's
    calibration or a range circuit's settings."""
    name, kwargs = job
    work: Callable[..., Any] = calibrate_segment if name == "segment" else _range_settings
    return work(**kwargs)


def _run_bounded(name: str, kwargs: dict[str, Any], timeout_s: float) -> Any:
    """``name``'s calibration in a fresh Python process, killed after ``timeout_s``; raises
    :class:`~prover.isolated.ChildFailed` saying why it gave up."""
    return run_child("prover.calibration:calibration_job", (name, kwargs), timeout_s=timeout_s,
                     what="calibration", hint=_TIMEOUT_VAR).value


def calibrate_segment_bounded(
    graph: bytes,
    index: int,
    samples: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    *,
    scale: int,
    bound: float,
    safety: float,
    max_logrows: int | None,
    timeout_s: float,
    settings: dict[str, Any] | None = None,
) -> SegmentCalibration:
    """:func:`calibrate_segment` in a child process killed after ``timeout_s`` seconds; a
    segment that runs out of time (or whose child dies) gets ``settings=None`` and the reason.

    The layout search stops trying further layouts at half the time, keeping the rest for
    compiling the circuit and checking every sample's witness."""
    start = time.monotonic()
    kwargs: dict[str, Any] = {
        "graph": graph, "index": index,
        "samples": [([np.asarray(t) for t in x], [np.asarray(t) for t in y]) for x, y in samples],
        "scale": scale, "bound": bound, "safety": safety, "max_logrows": max_logrows,
        # CLOCK_MONOTONIC is system-wide: the child reads the same clock.
        "deadline": start + timeout_s / 2, "settings": settings,
    }
    try:
        outcome: SegmentCalibration = _run_bounded("segment", kwargs, timeout_s)
    except ChildFailed as exc:
        return SegmentCalibration(index, None, None, None, exc.reason,
                                  seconds=time.monotonic() - start)
    return replace(outcome, seconds=time.monotonic() - start)


@dataclass(frozen=True)
class CalibrationRules:
    """What every circuit of one model is calibrated under: the scale, the range bound R, the
    τ safety factor, EZKL's logrows cap, the time limit of each calibration child and how many
    children run at once."""

    scale: int
    bound: float
    safety: float
    max_logrows: int | None
    timeout_s: float
    workers: int = 1

    def segment(self, graph: bytes, index: int,
                samples: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], *,
                settings: dict[str, Any] | None = None) -> SegmentCalibration:
        """:func:`calibrate_segment_bounded` of ``graph`` under these rules."""
        return calibrate_segment_bounded(graph, index, samples, scale=self.scale,
                                         bound=self.bound, safety=self.safety,
                                         max_logrows=self.max_logrows,
                                         timeout_s=self.timeout_s, settings=settings)

    def range_settings(self, graph: bytes, shapes: Sequence[tuple[int, ...]]
                       ) -> dict[str, Any] | None:
        """EZKL settings of a range ``graph`` over tensors of these shapes, calibrated in a
        child process on a sample at +R; ``None`` when EZKL cannot build it within the limits."""
        sample = [np.full(shape, self.bound, dtype=np.float32) for shape in shapes]
        try:
            settings: dict[str, Any] | None = _run_bounded(
                "range", {"graph": graph, "sample": sample, "scale": self.scale,
                          "max_logrows": self.max_logrows}, self.timeout_s)
        except ChildFailed:
            return None
        return settings

    def too_many_rows(self, elements: int) -> bool:
        """Whether a circuit hashing ``elements`` certainly exceeds ``2^max_logrows`` rows,
        so that calibrating it (minutes of EZKL, up to the time limit) would be wasted."""
        return self.max_logrows is not None and \
            elements * ROWS_PER_ELEMENT > 2**self.max_logrows


#: Most tile models of one tile shape calibrated in EZKL (spread over the shape's models, the
#: first and last included); the others take their settings and largest τ.
MODEL_SAMPLES = 3
#: Most tiles of one tile model whose honest slices calibrate τ (spread over the tiling, the
#: first and last included): every tile's witness costs an EZKL run per calibration input.
TILE_SAMPLES = 8


def _spread(items: Sequence[Any], count: int) -> list[Any]:
    """Up to ``count`` of ``items`` spread evenly over them, the first and last included."""
    return [items[i] for i in sorted({round(j * (len(items) - 1) / max(count - 1, 1))
                                      for j in range(min(count, len(items)))})]


def calibrate_tiled_segment(
    segment: Segment,
    blocks: Sequence[int] | Sequence[Sequence[int]],
    runs: Sequence[Sequence[Sequence[np.ndarray]]],
    rules: CalibrationRules,
    *,
    known: dict[str, dict[str, Any]] | None = None,
) -> SegmentCalibration:
    """Calibrate a segment proven on tiles of ``blocks`` (:func:`refute.tiling.make_tiling`).

    Tiles whose weight slices differ have tile models of their own, grouped by tile shape
    (the output a tile computes and the input shapes it reads). In each group, up to
    :data:`MODEL_SAMPLES` models spread over it are calibrated like a segment, on the honest
    slices of up to :data:`TILE_SAMPLES` of their tiles in every calibration run: EZKL's
    settings search runs on the group's first model, the others are compiled with its settings
    (and searched again only when those do not run their samples). The group's other models
    (a GPT-2 MLP segment has a hundred column blocks) take the group's settings and its largest
    τ, and the manifest records them as ``"calibrated": false``: a registration costs minutes
    per tile shape, not per column block. τ of the segment is the largest of all. A tile model
    that cannot be proven makes the segment unprovable, with its reason.

    ``known`` carries settings between the segments of one model, by the structure of a tile
    model (:func:`tile_structure`): a transformer's twelve blocks have tiles of the same
    operators and shapes, and the search, about four fifths of a tile's calibration, runs for
    the first block only. Settings found this way are held to the same test as a group's:
    each calibrated model must run its samples and the extreme claim with them, or is searched
    for again."""
    start = time.monotonic()
    tiling = make_tiling(segment, blocks)
    by_model: dict[str, tuple[bytes, list[int]]] = {}
    for t in tiling.tiles:
        graph = adjudication_bytes(tile_segment(segment, tiling, t))
        by_model.setdefault(hashlib.sha256(graph).hexdigest(), (graph, []))[1].append(t.index)
    groups: dict[tuple[object, ...], list[str]] = {}
    for digest, (_, members) in by_model.items():
        first = tiling.tiles[members[0]]
        shape = (first.output_index, first.input_indices, first.input_shapes,
                 first.output_shape)
        groups.setdefault(shape, []).append(digest)
    group = _TileGroups(segment.index, tiling, by_model, runs, rules, known)
    # The groups are independent: up to ``rules.workers`` calibrate at once (each waits on its
    # own EZKL children); their results are put together in order, so the record is the same.
    with ThreadPoolExecutor(max_workers=rules.workers) as pool:
        outcomes = list(pool.map(group.calibrate, groups.values()))
    groups_done = []
    for outcome in outcomes:
        if isinstance(outcome, SegmentCalibration):  # the first group that failed, in order
            return replace(outcome, seconds=time.monotonic() - start)
        groups_done.append(outcome)
    models = [m for group_models, _ in groups_done for m in group_models]
    # τ of the segment is the largest; on a tie, the larger circuit (the first of equals).
    worst = max((found for _, found_all in groups_done for found in found_all),
                key=lambda f: (f.tolerance or 0, f.logrows or 0))
    record = {**tiling.to_json(), "models": models}
    return replace(worst, tiling=record, seconds=time.monotonic() - start)


@dataclass(frozen=True)
class _TileGroups:
    """The tile models of one tiled segment, by digest, and how to calibrate a group of them
    (the models of one tile shape)."""

    index: int
    tiling: Tiling
    by_model: Mapping[str, tuple[bytes, list[int]]]
    runs: Sequence[Sequence[Sequence[np.ndarray]]]
    rules: CalibrationRules
    known: dict[str, dict[str, Any]] | None

    def calibrate(self, digests: Sequence[str]
                  ) -> tuple[list[dict[str, Any]], list[SegmentCalibration]] | SegmentCalibration:
        """The manifest records of a group's models and the calibrations that made them, or
        the failed calibration (its reason names the tiles)."""
        tiling, index = self.tiling, self.index
        structure = tile_structure(self.by_model[digests[0]][0])
        # The group's first settings (or an earlier segment's), tried on the others.
        shared = self.known.get(structure) if self.known is not None else None
        models: list[dict[str, Any]] = []
        calibrations: list[SegmentCalibration] = []
        for digest in _spread(digests, MODEL_SAMPLES):
            graph, members = self.by_model[digest]
            samples = [(cut_input(tiling, tiling.tiles[t], run[index - 1]),
                        cut_output(tiling, tiling.tiles[t], run[index]))
                       for run in self.runs for t in _spread(members, TILE_SAMPLES)]
            found = self.rules.segment(graph, index, samples, settings=shared)
            if shared is not None and found.settings is None:  # it needs settings of its own
                found = self.rules.segment(graph, index, samples)
            if found.settings is None or found.tolerance is None:
                return replace(found, reason=f"tile model of tiles {members[:3]}…: "
                                             f"{found.reason}")
            models.append({"sha256": digest, "settings": found.settings,
                           "tolerance": found.tolerance, "tiles": len(members)})
            calibrations.append(found)
            shared = shared or found.settings
            if self.known is not None:
                self.known.setdefault(structure, found.settings)
        calibrated = {m["sha256"] for m in models}
        group_tau = max(m["tolerance"] for m in models)
        models.extend({"sha256": d, "settings": shared, "tolerance": group_tau,
                       "tiles": len(self.by_model[d][1]), "calibrated": False}
                      for d in digests if d not in calibrated)
        return models, calibrations


def tile_structure(graph: bytes) -> str:
    """What a tile model is apart from its names and weights: a hash of its graph with every
    tensor renamed by order of appearance, node names dropped and initializers reduced to
    their types and shapes (attributes, constants folded into them, stay)."""
    model = onnx.load_from_string(graph)
    names: dict[str, str] = {}

    def canonical(name: str) -> str:
        return names.setdefault(name, f"t{len(names)}") if name else ""

    g = model.graph
    for info in [*g.input, *g.initializer]:
        info.name = canonical(info.name)
    for tensor in g.initializer:
        tensor.ClearField("raw_data")
        for values in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(values)
    for node in g.node:
        node.name = ""
        node.input[:] = [canonical(n) for n in node.input]
        node.output[:] = [canonical(n) for n in node.output]
    for info in [*g.output, *g.value_info]:
        info.name = canonical(info.name)
    g.name = ""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


#: Most tile sizes :func:`tile_to_budget` tries, each a quarter of the last.
TILE_ATTEMPTS = 4


#: Fewest circuit rows one hashed element of a step's states costs (EZKL's Poseidon over x and
#: y): 41 per element plus 4 on all 15 circuits :class:`refute.tiling.TileCost` was fitted on,
#: 64 on an Identity over 8,192 elements (logrows 19); 40 stays below both. (At 16, the range
#: circuit of a MobileNet 1024×7×7 state, 2M rows, was calibrated for minutes before EZKL
#: gave up.)
ROWS_PER_ELEMENT = 40


def _elements(segment: Segment) -> int:
    return sum(t.size for t in (*segment.inputs, *segment.outputs))


def _over_budget(found: SegmentCalibration, budget_bytes: int) -> bool:
    """Whether a segment's whole circuit is over the budget, or too large for EZKL to build
    within the logrows cap or the time limit."""
    if found.estimate is not None:
        return not found.estimate.fits(budget_bytes)
    reason = found.reason or ""
    return _about_size(reason) or "gave up after" in reason


#: Most rows a tile's circuit is first planned for (2^18 at 2 inner columns: about 7 GB at peak
#: while proving) and fewest (below, a tile is mostly EZKL's fixed overhead).
TILE_LOGROWS = (10, 18)


def tile_logrows(budget_bytes: int, max_logrows: int | None) -> int | None:
    """The logrows tiles are first planned for: the largest in :data:`TILE_LOGROWS` (and at
    most ``max_logrows``) whose circuit, at EZKL's default 2 inner columns, is estimated to
    prove within ``budget_bytes`` (:mod:`prover.budget`); ``None`` when none does."""
    low, high = TILE_LOGROWS
    return next((rows for rows in range(min(high, max_logrows or high), low - 1, -1)
                 if estimate({"run_args": {"logrows": rows, "num_inner_cols": 2}}).fits(
                     budget_bytes)), None)


def tile_to_budget(
    segment: Segment,
    whole: SegmentCalibration,
    runs: Sequence[Sequence[Sequence[np.ndarray]]],
    rules: CalibrationRules,
    *,
    budget_bytes: int,
    known: dict[str, dict[str, Any]] | None = None,
) -> SegmentCalibration:
    """Tile a segment whose whole circuit is over ``budget_bytes`` (DESIGN.md "Registration"
    step 4): tiles whose circuits are estimated to need at most 2^L rows
    (:func:`refute.tiling.plan_tiling` with :func:`refute.tiling.rows_bound`), L first the
    largest logrows (at most 18 and the logrows cap) that proves within
    the budget, then one less, up to :data:`TILE_ATTEMPTS` sizes, until the tile circuits, as
    EZKL calibrates them, fit (2^18 rows at EZKL's default 2 inner columns is about 7 GB at
    peak while proving, :mod:`prover.budget`). A segment that cannot be tiled, or whose tiles
    never fit, keeps ``whole`` (the registration report then refuses it, saying why).
    ``known``: settings shared between segments (:func:`calibrate_tiled_segment`)."""
    logrows = tile_logrows(budget_bytes, rules.max_logrows)
    tried: list[str] = []  # why each tile size failed: the refusal says it, not just `whole`'s
    for _ in range(TILE_ATTEMPTS):
        if logrows is None or logrows < TILE_LOGROWS[0]:
            break
        try:
            tiling = plan_tiling(segment, rows_bound(logrows))
        except RefuteError as exc:
            tried.append(f"cannot be tiled: {exc}")
            break
        found = calibrate_tiled_segment(segment, tiling.blocks, runs, rules, known=known)
        if found.estimate is not None and found.estimate.fits(budget_bytes):
            return replace(found, seconds=found.seconds + whole.seconds)
        tried.append(_tile_failure(found, logrows, budget_bytes))
        logrows -= 1
    if not tried or whole.reason is None:  # a whole circuit over the budget: the report says
        return whole                       # what tiling could do (prover.report)
    return replace(whole, reason=f"{whole.reason}; {'; '.join(tried)}")


def _tile_failure(found: SegmentCalibration, planned: int, budget_bytes: int) -> str:
    """Why tiles planned for 2^``planned`` rows did not do."""
    if found.estimate is None:
        return f"tiles planned for 2^{planned} rows: {found.reason}"
    return (f"tiles planned for 2^{planned} rows need logrows {found.estimate.logrows} as EZKL "
            f"calibrates them ({found.estimate.rows:,} rows; a lookup table's range can set "
            f"it), estimated peak {found.estimate.peak_bytes / 2**30:.1f} GiB over the "
            f"{budget_bytes / 2**30:.1f} GiB proving budget")


def _range_settings(
    graph: bytes, sample: Sequence[np.ndarray], *, scale: int, max_logrows: int | None,
) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory(prefix="refute-range-") as tmp:
        try:
            return calibrated_settings(graph, scale, [sample], Path(tmp),
                                       max_logrows=max_logrows)
        except CircuitUnsupported:
            return None


#: Circuit rows a range circuit takes per element of the state (or chunk) it hashes, measured on
#: chunk circuits of B = 16 … 2,048 elements (EZKL 23.0.5, scale 7, ``resources``): 47·B − 3
#: (logrows 14 at most 256 elements, the floor set by its range-check table; 16 at 1,024;
#: 17 at 2,048): the Poseidon hashing (41 an element) and the |v| and maximum cells.
RANGE_ROWS_PER_ELEMENT = 47


def range_chunk_size(logrows: int) -> int:
    """B, the chunk size of range circuits planned for ``2^logrows`` rows: the largest power of
    two whose circuit is estimated to fit (:func:`refute.tiling.rows_bound`; a power of two
    leaves a third of the rows free or more). 4,096 at logrows 18, 256 at 14."""
    fits = rows_bound(logrows) // RANGE_ROWS_PER_ELEMENT
    return 1 << max(fits.bit_length() - 1, 0)


def range_chunking_plan(state: Sequence[TensorSpec], logrows: int) -> Chunking | None:
    """How state's range is proven with circuits of at most ``2^logrows`` rows: whole
    (``None``) when its whole range circuit is estimated to fit, else on chunks of
    :func:`range_chunk_size`."""
    if RANGE_ROWS_PER_ELEMENT * sum(t.size for t in state) <= rows_bound(logrows):
        return None
    return Chunking.of(state, range_chunk_size(logrows))


def _chunked_entry(k: int, state: Sequence[TensorSpec], chunking: Chunking, *, opset: int,
                   rules: CalibrationRules, calibrated: dict[str, dict[str, Any] | None]
                   ) -> dict[str, Any]:
    """The range entry of state k proven on chunks: the chunking and, per chunk circuit its
    tensors use (one per element type), the graph's sha256 and its settings, calibrated once
    per model (``calibrated``, shared by every state). Unprovable if any of them is."""
    models: dict[str, dict[str, Any] | None] = {}
    first = 0
    for count in chunking.counts:
        graph = chunk_bytes(chunking.spec(state, first), opset=opset)
        digest = hashlib.sha256(graph).hexdigest()
        if digest not in calibrated:
            calibrated[digest] = rules.range_settings(graph, [(chunking.size,)])
        models[digest] = calibrated[digest]
        first += count
    settings = list(models.values())
    if any(s is None for s in settings):
        return {"kind": "range", "state": k, "settings": None}
    record = {**chunking.to_json(),
              "models": [{"sha256": d, "settings": s} for d, s in models.items()]}
    return {"kind": "range", "state": k, "settings": settings[0], CHUNKING: record}


def calibrate_ranges(
    prepared: PreparedModel,
    rules: CalibrationRules,
    *,
    budget_bytes: int,
    progress: ProgressFn = _no_progress,
) -> list[dict[str, Any]]:
    """The manifest's range entries, one per state (DESIGN.md "Range rule").

    Range circuits are planned for the rows of :func:`tile_logrows` (at most the logrows cap
    and what proves within ``budget_bytes``): a state whose whole range circuit fits them is
    calibrated whole; a larger one (a GPT-2 residual stream, a MobileNet feature map) is proven
    on chunks (:func:`range_chunking_plan`, :mod:`refute.chunks`), whose circuit, one per chunk
    size and element type, is calibrated once for every such state. A circuit EZKL cannot build
    within the limits leaves its state's ``settings`` null (no range proof)."""
    states = prepared.segmentation.states
    opset = prepared.loaded.opset
    logrows = tile_logrows(budget_bytes, rules.max_logrows)
    calibrated: dict[str, dict[str, Any] | None] = {}
    entries: list[dict[str, Any]] = []
    for k, state in enumerate(states):
        progress("range", k, len(states))
        chunking = None if logrows is None else range_chunking_plan(state, logrows)
        if logrows is None:
            entries.append({"kind": "range", "state": k, "settings": None})
        elif chunking is None:
            graph = range_bytes(state, opset=opset, index=k)
            entries.append({"kind": "range", "state": k,
                            "settings": rules.range_settings(graph, [t.shape for t in state])})
        else:
            entries.append(_chunked_entry(k, state, chunking, opset=opset, rules=rules,
                                          calibrated=calibrated))
    progress("range", len(states), len(states))
    return entries


def calibrate_model(
    prepared: PreparedModel,
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    scale: int | None = None,
    safety: float = 2.0,
    range_margin: float = 4.0,
    executor: DeterministicExecutor | None = None,
    progress: ProgressFn = _no_progress,
    segment_timeout_s: float | None = None,
    max_logrows: int | None = None,
    tilings: Mapping[int, Sequence[int]] | None = None,
    budget_bytes: int | None = None,
    only: Collection[int] | None = None,
) -> tuple[Manifest, CalibrationReport]:
    """Calibrate every segment; return the completed manifest and the report.

    ``segment_timeout_s`` bounds each segment's (and each state's range circuit's) calibration
    and ``max_logrows`` caps its circuit; unset, they come from :func:`get_settings`
    (``calibration_segment_timeout_s``, ``proving_max_logrows``). ``tilings`` maps a segment
    index to the block sizes it is proven on (:func:`calibrate_tiled_segment`); the others are
    proven whole, unless ``budget_bytes`` is given and the whole circuit would need more to
    prove (or is too large to build): such a segment is tiled (:func:`tile_to_budget`).
    ``only`` (for benchmarks) calibrates just those segments and no range circuit: the others
    are left unprovable (τ 0), so such a manifest never registers. The states' range circuits
    are calibrated by :func:`calibrate_ranges`, planned for the rows that prove within
    ``budget_bytes`` (unset: the configured ``proving_budget_bytes``): a state too large for
    one is proven on chunks."""
    if not inputs:
        raise CircuitUnsupported("calibration needs at least one input")
    if segment_timeout_s is None or max_logrows is None:
        configured = get_settings()
        if segment_timeout_s is None:
            segment_timeout_s = configured.calibration_segment_timeout_s
        if max_logrows is None:
            max_logrows = configured.proving_max_logrows
    scale = prepared.manifest.scale if scale is None else scale
    executor = executor or DeterministicExecutor()
    runs = [run_segments(executor, prepared.segmentation, validate_inputs(prepared.loaded, x))
            for x in inputs]
    bound = _range_of(runs, range_margin)
    rules = CalibrationRules(scale, bound, safety, max_logrows, segment_timeout_s,
                             workers=get_settings().calibration_workers)
    segments = []
    total = prepared.segmentation.num_segments
    tiled = dict(tilings or {})
    unknown = sorted(set(tiled) - set(range(1, total + 1)))
    if unknown:
        raise CircuitUnsupported(f"tilings name segments {unknown}, outside 1..{total}")
    known: dict[str, dict[str, Any]] = {}  # tile settings by tile structure, for later blocks
    for i, segment in enumerate(prepared.segmentation.segments, start=1):
        progress("calibrate", i - 1, total)
        if only is not None and i not in only:
            segments.append(SegmentCalibration(i, None, None, None, "not calibrated (only "
                                               f"segments {sorted(only)} were asked for)"))
            continue
        if i in tiled:
            segments.append(calibrate_tiled_segment(segment, tiled[i], runs, rules,
                                                    known=known))
            continue
        if budget_bytes is not None and rules.too_many_rows(_elements(segment)):
            whole = SegmentCalibration(i, None, None, None, (
                f"its {_elements(segment):,} input and output elements alone need more than "
                f"2^{max_logrows} rows (hashing costs at least {ROWS_PER_ELEMENT} rows an "
                "element): not calibrated whole"))
            needs_tiles = True
        else:
            whole = rules.segment(adjudication_bytes(segment), i,
                                  [(run[i - 1], run[i]) for run in runs])
            needs_tiles = budget_bytes is not None and _over_budget(whole, budget_bytes)
        if budget_bytes is not None and needs_tiles:
            progress("tile", i - 1, total)
            whole = tile_to_budget(segment, whole, runs, rules, budget_bytes=budget_bytes,
                                   known=known)
            progress("tile", i, total)
        segments.append(whole)
    progress("calibrate", total, total)
    if only is None:
        budget = budget_bytes if budget_bytes is not None else \
            get_settings().proving_budget_bytes
        ranges = calibrate_ranges(prepared, rules, budget_bytes=budget, progress=progress)
    else:  # not asked for
        ranges = [{"kind": "range", "state": k, "settings": None}
                  for k in range(len(prepared.segmentation.states))]
    report = CalibrationReport(scale, bound, tuple(segments),
                               tuple(r["settings"] for r in ranges))
    circuits = [s.to_json() for s in segments] + ranges
    manifest = replace(
        prepared.manifest,
        scale=scale,
        scale_source="calibrated",
        tolerances=tuple(s.tolerance if s.tolerance is not None else 0 for s in segments),
        range=bound,
        circuits=tuple(circuits),
    )
    return manifest, report
