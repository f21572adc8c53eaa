"""The registration report: what registering a model would commit to, segment by segment.

``refute check MODEL [INPUT]`` prints it and ``POST /v1/models`` returns it. Per segment: its
operators, the sizes of the states it reads and writes, τ, the logrows of its adjudication
circuit, the estimated proving memory and time (:mod:`prover.budget`), and whether that fits
the proving budget (:attr:`refute.settings.Settings.proving_budget_bytes`); a segment EZKL
cannot prove carries EZKL's reason instead, and so does one whose circuit disagrees with ONNX
Runtime on honest inputs by more than :data:`MAX_TOLERANCE_SHARE` of the range bound (EZKL 23
proves a ``ReduceMean`` to a scalar as 0, for one: a τ that wide would let any lie through);
such a segment is marked :attr:`SegmentReport.precision_limited`, the one refusal a higher
fixed-point scale may lift (:mod:`prover.registration`). A model registers only if every segment
is provable within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from prover.calibration import (
    TILE_ATTEMPTS,
    TILE_LOGROWS,
    CalibrationReport,
    SegmentCalibration,
    tile_logrows,
)
from refute.errors import RefuteError
from refute.provider import PreparedModel
from refute.segmentation import Segment
from refute.settings import get_settings
from refute.tiling import plan_tiling, rows_bound
from refute.verdict import range_bound_units

#: The largest share of the range bound ⌊R·2^s⌋ that τ may take: beyond it the circuit does not
#: compute what ONNX Runtime computes, and the step could not tell an honest state from a lie.
MAX_TOLERANCE_SHARE = Fraction(1, 16)


@dataclass(frozen=True)
class SegmentReport:
    """One segment's line of the report.

    ``precision_limited`` is set when the τ rule (:data:`MAX_TOLERANCE_SHARE`) is what refuses
    the segment: EZKL built and ran its circuit, but the circuit's error on honest inputs is too
    wide a share of the range bound at this scale."""

    index: int
    ops: tuple[str, ...]
    input_elements: int
    output_elements: int
    tolerance: int | None
    logrows: int | None
    peak_bytes: int | None
    setup_seconds: float | None
    prove_seconds: float | None
    fits_budget: bool
    calibration_seconds: float
    reason: str | None
    precision_limited: bool = False
    tiles: int | None = None
    """How many tiles the segment is proven on (``None``: proven whole); the circuit figures
    are then one tile's."""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "segment": self.index, "ops": list(self.ops),
            "input_elements": self.input_elements, "output_elements": self.output_elements,
            "tolerance": self.tolerance, "logrows": self.logrows,
            "estimated_peak_bytes": self.peak_bytes,
            "estimated_setup_seconds": self.setup_seconds,
            "estimated_prove_seconds": self.prove_seconds,
            "fits_budget": self.fits_budget,
            "calibration_seconds": round(self.calibration_seconds, 2), "reason": self.reason,
            "precision_limited": self.precision_limited, "tiles": self.tiles,
        }


@dataclass(frozen=True)
class RegistrationReport:
    """The whole model's report.

    ``scales_tried`` lists every scale the model was calibrated at, in order (``scale``, the
    one reported, among them); empty when the report was built from a single calibration."""

    pins: tuple[str, ...]
    folded_nodes: int
    nodes: int
    scale: int
    range: float
    budget_bytes: int
    segments: tuple[SegmentReport, ...]
    scales_tried: tuple[int, ...] = ()

    @property
    def refusals(self) -> list[str]:
        """One line per segment that stops the registration (empty: it registers)."""
        return [f"segment {s.index} cannot be proven: {s.reason}" for s in self.segments
                if s.reason]

    def to_json(self) -> dict[str, Any]:
        """JSON form (the registration API's ``report``)."""
        return {
            "pins": list(self.pins), "folded_nodes": self.folded_nodes, "nodes": self.nodes,
            "scale": self.scale, "scales_tried": list(self.scales_tried or (self.scale,)),
            "range": self.range, "budget_bytes": self.budget_bytes,
            "registrable": not self.refusals, "refusals": self.refusals,
            "segments": [s.to_json() for s in self.segments],
        }


def _at_scale(scale: int, others: Sequence[int], note: str) -> str:
    """``at scale 7 (also tried scales 8, 10; <note>)``."""
    parts = [f"also tried scale{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}"
             ] if others else []
    parts += [note] if note else []
    return f"at scale {scale}" + (f" ({'; '.join(parts)})" if parts else "")


def _segment(prepared: PreparedModel, cal: SegmentCalibration, budget: int,
             bound: int, *, at_scale: str) -> SegmentReport:
    segment = prepared.segmentation.segments[cal.index - 1]
    estimate = cal.estimate
    fits = estimate is not None and estimate.fits(budget)
    reason = cal.reason
    precision_limited = False
    if reason is None and cal.tolerance is not None and cal.tolerance > bound * MAX_TOLERANCE_SHARE:
        precision_limited = True
        reason = (f"its circuit differs from ONNX Runtime by up to "
                  f"{float(cal.honest_maxdiff or 0):.0f} units on honest inputs (τ "
                  f"{cal.tolerance}), over {MAX_TOLERANCE_SHARE} of the range bound {bound} "
                  f"{at_scale}: "
                  f"EZKL does not compute {' '.join(segment.op_types)} as ONNX does")
    if reason is None and estimate is not None and not fits:
        reason = (f"its circuit (logrows {estimate.logrows}) needs about "
                  f"{estimate.peak_bytes / 2**30:.1f} GiB to prove, over the proving budget of "
                  f"{budget / 2**30:.1f} GiB; "
                  f"{tiling_outlook(segment, budget, get_settings().proving_max_logrows)}")
    return SegmentReport(
        index=cal.index,
        ops=segment.op_types,
        input_elements=sum(t.size for t in segment.inputs),
        output_elements=sum(t.size for t in segment.outputs),
        tolerance=cal.tolerance,
        logrows=cal.logrows,
        peak_bytes=None if estimate is None else estimate.peak_bytes,
        setup_seconds=None if estimate is None else estimate.setup_seconds,
        prove_seconds=None if estimate is None else estimate.prove_seconds,
        fits_budget=fits,
        calibration_seconds=cal.seconds,
        reason=reason,
        precision_limited=precision_limited,
        tiles=None if cal.tiling is None else int(cal.tiling["tiles"]),
    )


def tiling_outlook(segment: Segment, budget: int, max_logrows: int | None) -> str:
    """Why tiling did not save a segment over the budget, in one clause: it cannot be tiled
    (the operator, or its smallest tile), or the tiles :func:`refute.tiling.plan_tiling` cuts
    for the first circuit size :func:`prover.calibration.tile_to_budget` tries did not fit,
    nor smaller ones."""
    logrows = tile_logrows(budget, max_logrows)
    if logrows is None:
        return (f"it cannot be tiled within the budget either: no circuit of 2^{TILE_LOGROWS[0]} "
                "rows is estimated to fit it")
    try:
        tiling = plan_tiling(segment, rows_bound(logrows))
    except RefuteError as exc:
        return f"it cannot be tiled either: {exc.reason}"
    return (f"nor did its tiles fit (from {len(tiling.tiles)} tiles of output block "
            f"{tiling.to_json()['blocks']} planned for 2^{logrows} rows, down to "
            f"2^{max(logrows - TILE_ATTEMPTS + 1, TILE_LOGROWS[0])})")


def registration_report(prepared: PreparedModel, calibration: CalibrationReport,
                        budget_bytes: int, *,
                        scales_tried: Sequence[int] = (), note: str = "") -> RegistrationReport:
    """The report of ``prepared`` as ``calibration`` found it, against ``budget_bytes``.

    ``scales_tried``: every scale the model was calibrated at (``calibration.scale`` among
    them); a precision refusal names the others, and ``note`` (if given) after them: why no
    further scale was tried, say."""
    loaded = prepared.loaded
    bound = range_bound_units(calibration.range, calibration.scale)
    at_scale = _at_scale(calibration.scale,
                         [s for s in scales_tried if s != calibration.scale], note)
    return RegistrationReport(
        pins=tuple(p.describe() for p in loaded.pins),
        folded_nodes=loaded.folded_nodes,
        nodes=len(loaded.nodes),
        scale=calibration.scale,
        range=calibration.range,
        budget_bytes=budget_bytes,
        segments=tuple(_segment(prepared, s, budget_bytes, bound, at_scale=at_scale)
                       for s in calibration.segments),
        scales_tried=tuple(scales_tried),
    )
