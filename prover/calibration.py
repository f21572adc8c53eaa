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
* each state's range circuit is calibrated on a sample at ±R.

The results go into the manifest (``tolerances``, ``range``, ``circuits``); proving later rebuilds
exactly these circuits from the recorded settings (:mod:`prover.circuit`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import ezkl
import numpy as np

from circuits.adjudication import adjudication_bytes
from circuits.range_graph import range_bytes
from prover.circuit import _ezkl, calibrated_settings, felt_to_int, write_input_json
from prover.errors import CircuitUnsupported
from prover.step import maxdiff_units
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, validate_inputs
from refute.segmentation import run_segments

ProgressFn = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    del stage, done, total


@dataclass(frozen=True)
class SegmentCalibration:
    """What calibration found for one segment (``settings`` is None if it cannot be proven)."""

    index: int
    settings: dict[str, Any] | None
    tolerance: int | None
    honest_maxdiff: Fraction | None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest's circuit entry for this segment."""
        return {"kind": "step", "segment": self.index, "settings": self.settings,
                "unsupported": self.reason}


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
) -> SegmentCalibration:
    """Calibrate segment ``index``'s adjudication circuit on honest (x, y) samples."""
    with tempfile.TemporaryDirectory(prefix=f"refute-cal{index}-") as tmp:
        workdir = Path(tmp)
        x0, y0 = samples[0]
        extreme = [*x0, *_extreme(y0, bound)]
        try:
            settings = calibrated_settings(graph, scale, [extreme], workdir / "settings")
            compiled = _compile(graph, settings, workdir)
            output_scale = int((settings.get("model_output_scales") or [scale])[0])
            _maxdiff(compiled, extreme, workdir)
            worst = Fraction(0)
            for x, y in samples:
                raw = _maxdiff(compiled, [*x, *y], workdir)
                worst = max(worst, maxdiff_units(raw, output_scale=output_scale, scale=scale))
        except CircuitUnsupported as exc:
            return SegmentCalibration(index, None, None, None, exc.reason)
    tolerance = max(1, math.ceil(worst * Fraction(safety)))
    return SegmentCalibration(index, settings, tolerance, worst)


def calibrate_model(
    prepared: PreparedModel,
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    scale: int | None = None,
    safety: float = 2.0,
    range_margin: float = 4.0,
    executor: DeterministicExecutor | None = None,
    progress: ProgressFn = _no_progress,
) -> tuple[Manifest, CalibrationReport]:
    """Calibrate every segment; return the completed manifest and the report."""
    if not inputs:
        raise CircuitUnsupported("calibration needs at least one input")
    scale = prepared.manifest.scale if scale is None else scale
    executor = executor or DeterministicExecutor()
    runs = [run_segments(executor, prepared.segmentation, validate_inputs(prepared.loaded, x))
            for x in inputs]
    bound = _range_of(runs, range_margin)
    segments = []
    total = prepared.segmentation.num_segments
    for i, segment in enumerate(prepared.segmentation.segments, start=1):
        progress("calibrate", i - 1, total)
        samples = [(run[i - 1], run[i]) for run in runs]
        segments.append(calibrate_segment(adjudication_bytes(segment), i, samples,
                                          scale=scale, bound=bound, safety=safety))
    progress("calibrate", total, total)
    ranges: list[dict[str, Any] | None] = []
    for k, state in enumerate(prepared.segmentation.states):
        progress("range", k, len(prepared.segmentation.states))
        graph = range_bytes(state, opset=prepared.loaded.opset, index=k)
        at_bound = [np.full(t.shape, bound, dtype=np.float32) for t in state]
        with tempfile.TemporaryDirectory(prefix=f"refute-range{k}-") as tmp:
            try:
                ranges.append(calibrated_settings(graph, scale, [at_bound], Path(tmp)))
            except CircuitUnsupported:
                ranges.append(None)
    report = CalibrationReport(scale, bound, tuple(segments), tuple(ranges))
    circuits = [s.to_json() for s in segments] + [
        {"kind": "range", "state": k, "settings": r} for k, r in enumerate(ranges)
    ]
    manifest = replace(
        prepared.manifest,
        scale=scale,
        scale_source="calibrated",
        tolerances=tuple(s.tolerance if s.tolerance is not None else 0 for s in segments),
        range=bound,
        circuits=tuple(circuits),
    )
    return manifest, report
