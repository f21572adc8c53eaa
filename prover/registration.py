"""Calibration at registration, choosing the fixed-point scale (DESIGN, registration step 3).

:func:`calibrate_for_registration` calibrates the model at the requested scale (7 unless the
network asks otherwise) and builds its registration report (:mod:`prover.report`). When every
refusal in it is a *precision* refusal (:attr:`prover.report.SegmentReport.precision_limited`:
the circuit runs, but its error on honest inputs is over
:data:`prover.report.MAX_TOLERANCE_SHARE` of the range bound ⌊R·2^s⌋), the whole model is
calibrated again at a higher scale, since the scale is one per model.

Why that can work: for most circuits EZKL's error in quantized units stays roughly constant as
the scale grows, while the bound doubles with every extra bit. Measured on the shared models:
``lstm_large`` has τ 42 against a bound of 512 at scale 7 and τ 34 against 1024 at scale 8;
``1l_mean`` (a ReduceMean of 300 values, whose circuit multiplies by 1/300 quantized at the
scale) τ 12908 against 65536 at 7 and τ 8874 against 262144 at 9.

Why it must not always be tried: a discontinuity (Round, Floor, Ceil, a comparison) differs by
a whole step wherever an input lies within half a unit of a step point. Calibration meets such
inputs only by chance, and each extra bit halves that chance without making the step any
smaller: the shared ``rounding_ops`` (Round, Floor, Ceil), refused at scale 7, would register at
scale 9 only because its calibration samples no longer fall near a step, and an honest provider
whose input does would then be convicted. So before each retry the refused segments are
searched for a step in ONNX Runtime alone (:func:`find_step`): from each calibration state,
towards the same state quantized at the current scale, bisected down to adjacent float32 values.
A jump that the τ rule refuses at any scale (``safety × jump > share × R``, both in float units)
that survives the bisection is a discontinuity: no retry, and the reason says so. A systematic
error of EZKL's (a MaxPool padded with 0 where ONNX pads with -inf) is continuous in ONNX; it
is retried, and refused again as its τ doubles with the bound.

The next scale assumes the worst segment's error in units stays constant: it adds the fewest
bits that bring that τ within the share, at least one (:func:`next_scale`). At most
:data:`MAX_RETRIES` retries, never above :data:`MAX_SCALE`. The first attempt at which nothing
is refused is returned. Otherwise the attempt at the *requested* scale is returned: its
refusals are all precision ones, the model's own problem, whereas a refusal that appears only
at a higher scale (over the proving budget, EZKL failing) is a cost of the rescaling. Its
reasons name the other scales tried, and why the search stopped if not for lack of retries.

Each retry is a whole calibration: a model that needs two retries takes about three times as
long to register.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from prover.calibration import CalibrationReport, ProgressFn, calibrate_model
from prover.report import MAX_TOLERANCE_SHARE, RegistrationReport, registration_report
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, validate_inputs
from refute.segmentation import Segment, run_segment, run_segments
from refute.settings import get_settings
from refute.verdict import range_bound_units

#: The highest scale a retry goes to. Each extra bit doubles ⌊R·2^s⌋, the span EZKL's range
#: checks and lookups must cover, so a circuit's logrows (and with it the proving memory and
#: time) tends to grow with the scale, and products inside a circuit are held at twice the
#: scale before rescaling, which brings values towards what EZKL's lookup tables can cover
#: within the logrows cap. Twelve bits is five above the default: more than the measured
#: precision-limited models need (``lstm_large`` passes at 8, ``1l_mean`` at 9), while a
#: circuit whose error in units still grows with the scale is not limited by precision at all.
MAX_SCALE = 12

#: How many times the whole model is calibrated again at a higher scale (each is a full
#: calibration: registration time grows with every retry).
MAX_RETRIES = 2

#: Bisection steps of :func:`find_step`: more than enough to go from half a unit at scale 0 to
#: adjacent float32 values (it stops there).
_BISECTION_STEPS = 60


def _no_progress(stage: str, done: int, total: int) -> None:
    del stage, done, total


def precision_only(report: RegistrationReport) -> bool:
    """Whether ``report`` refuses the model and only by the τ rule (a higher scale may help)."""
    refused = [s for s in report.segments if s.reason]
    return bool(refused) and all(s.precision_limited for s in refused)


def next_scale(report: RegistrationReport, calibration: CalibrationReport,
               *, cap: int = MAX_SCALE) -> int | None:
    """The scale to try after ``report``'s precision refusals, or None if none is left below
    ``cap``.

    Assumes each refused segment's τ (in units) stays as it is while the bound doubles per
    bit: the fewest extra bits k ≥ 1 with τ ≤ share·bound·2^k for the worst segment, i.e.
    ``s + max(1, ceil(log2(16·τ / bound)))``, capped at ``cap``."""
    scale = calibration.scale
    if scale >= cap:
        return None
    bound = range_bound_units(calibration.range, scale)
    bits = 1
    for segment in report.segments:
        if not segment.precision_limited or segment.tolerance is None:
            continue
        k = 1
        while k < cap - scale and segment.tolerance > bound * 2**k * MAX_TOLERANCE_SHARE:
            k += 1
        bits = max(bits, k)
    return min(scale + bits, cap)


@dataclass(frozen=True)
class Step:
    """A discontinuity of a segment found by :func:`find_step`: its output moves by ``jump``
    (float units) between two inputs at most ``width`` apart."""

    segment: int
    jump: float
    width: float

    def describe(self) -> str:
        """One clause for a refusal reason."""
        return (f"not retried: segment {self.segment} jumps by {self.jump:.3g} between inputs "
                f"{self.width:.1g} apart, a discontinuity")


def _quantized(tensor: np.ndarray, scale: int) -> np.ndarray:
    if not np.issubdtype(tensor.dtype, np.floating):
        return tensor
    quantized: np.ndarray = (np.round(tensor.astype(np.float64) * 2**scale)
                             / 2**scale).astype(tensor.dtype)
    return quantized


def _gap(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max((float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
                for x, y in zip(a, b, strict=True) if x.size), default=0.0)


def _midpoint(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Halfway from ``a`` to ``b`` (float tensors), or None if no element lies strictly
    between them any more (adjacent float values)."""
    middle, moved = [], False
    for x, y in zip(a, b, strict=True):
        if not np.issubdtype(x.dtype, np.floating):
            middle.append(x)
            continue
        m = (x.astype(np.float64) + (y.astype(np.float64) - x.astype(np.float64)) / 2)
        m32 = m.astype(x.dtype)
        moved = moved or bool(np.any((m32 != x) & (m32 != y)))
        middle.append(m32)
    return middle if moved else None


def find_step(executor: DeterministicExecutor, segment: Segment,
              states: Sequence[Sequence[np.ndarray]], *, scale: int, limit: float) -> Step | None:
    """A jump of ``segment``'s ONNX output larger than ``limit`` (float units) between inputs as
    close as float32 allows, or None.

    From each input state x (float tensors only) towards x quantized at ``scale`` (what the
    circuit computes on): when the outputs differ by more than ``limit``, the segment between
    them is halved, keeping the half whose ends differ most, until no float32 value lies
    between the ends. A continuous function's difference shrinks with the interval; a step's
    does not. Costs one ONNX run per state, and about 30 more per state that crosses a step."""
    for x in states:
        a: Sequence[np.ndarray] = list(x)
        b: Sequence[np.ndarray] = [_quantized(t, scale) for t in x]
        fa, fb = run_segment(executor, segment, a), run_segment(executor, segment, b)
        if _gap(fa, fb) <= limit:
            continue
        for _ in range(_BISECTION_STEPS):
            m = _midpoint(a, b)
            if m is None:
                break
            fm = run_segment(executor, segment, m)
            if _gap(fa, fm) >= _gap(fm, fb):
                b, fb = m, fm
            else:
                a, fa = m, fm
        jump = _gap(fa, fb)
        if jump > limit:
            return Step(segment.index, jump, _gap(a, b))
    return None


def _step_among_refused(executor: DeterministicExecutor, prepared: PreparedModel,
                        runs: Sequence[Sequence[Sequence[np.ndarray]]], *,
                        report: RegistrationReport, calibration: CalibrationReport,
                        safety: float) -> Step | None:
    """The first step (:func:`find_step`) of a precision-refused segment that the τ rule
    refuses at any scale: ``safety × jump > share × R``."""
    limit = float(MAX_TOLERANCE_SHARE * Fraction(calibration.range) / Fraction(safety))
    for line in report.segments:
        if line.precision_limited:
            step = find_step(executor, prepared.segmentation.segments[line.index - 1],
                             [run[line.index - 1] for run in runs], scale=calibration.scale,
                             limit=limit)
            if step is not None:
                return step
    return None


def _why_refused(report: RegistrationReport) -> str:
    """What refused ``report`` besides the τ rule, in a few words."""
    for s in report.segments:
        if s.reason and not s.precision_limited:
            what = "has no circuit (EZKL)" if s.logrows is None else "over the proving budget"
            return f"at {report.scale} segment {s.index} {what}"
    return ""


def calibrate_for_registration(
    prepared: PreparedModel,
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    budget_bytes: int | None = None,
    scale: int | None = None,
    safety: float = 2.0,
    executor: DeterministicExecutor | None = None,
    progress: ProgressFn = _no_progress,
    max_scale: int = MAX_SCALE,
    max_retries: int = MAX_RETRIES,
    segment_timeout_s: float | None = None,
    max_logrows: int | None = None,
) -> tuple[Manifest, CalibrationReport, RegistrationReport]:
    """Calibrate ``prepared`` on ``inputs`` for registration, raising the scale past precision
    refusals (see the module's documentation).

    Starts at ``scale`` (default: the prepared manifest's); ``budget_bytes`` defaults to
    :attr:`refute.settings.Settings.proving_budget_bytes`. Returns the manifest, the calibration
    and the registration report of the chosen attempt: the first with no refusal, else the one
    at the starting scale, whose precision refusals name the other scales tried. The report's
    ``scales_tried`` lists every scale calibrated. Each retry is reported as stage ``rescale``
    of ``progress`` (besides :func:`prover.calibration.calibrate_model`'s own stages)."""
    if budget_bytes is None:
        budget_bytes = get_settings().proving_budget_bytes
    executor = executor or DeterministicExecutor()

    def attempt(at: int) -> tuple[Manifest, CalibrationReport]:
        return calibrate_model(prepared, inputs, scale=at, safety=safety, executor=executor,
                               progress=progress, segment_timeout_s=segment_timeout_s,
                               max_logrows=max_logrows, budget_bytes=budget_bytes)

    start = prepared.manifest.scale if scale is None else scale
    manifest, calibration = first = attempt(start)
    report = registration_report(prepared, calibration, budget_bytes)
    tried, note, retries = [start], "", 0
    runs: list[list[list[np.ndarray]]] | None = None
    while precision_only(report) and retries < max_retries:
        at = next_scale(report, calibration, cap=max_scale)
        if at is None:
            break
        if runs is None:
            runs = [run_segments(executor, prepared.segmentation,
                                 validate_inputs(prepared.loaded, x)) for x in inputs]
        step = _step_among_refused(executor, prepared, runs, report=report,
                                   calibration=calibration, safety=safety)
        if step is not None:
            note = step.describe()
            break
        retries += 1
        progress("rescale", retries - 1, max_retries)
        tried.append(at)
        manifest, calibration = attempt(at)
        report = registration_report(prepared, calibration, budget_bytes)
        if not report.refusals:
            progress("rescale", retries, retries)
            return manifest, calibration, registration_report(
                prepared, calibration, budget_bytes, scales_tried=tried)
        if not precision_only(report):
            note = _why_refused(report)
            break
    if retries:
        progress("rescale", retries, retries)
    manifest, calibration = first
    return manifest, calibration, registration_report(
        prepared, calibration, budget_bytes, scales_tried=tried, note=note)
