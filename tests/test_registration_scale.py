"""Registration chooses the fixed-point scale (:mod:`prover.registration`): a model refused at
scale 7 only by the τ rule is calibrated again at a higher scale; a discontinuity, or an error
that grows with the scale, is still refused, with the scales tried in the reason."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from prover.calibration import CalibrationReport, SegmentCalibration
from prover.registration import (
    MAX_SCALE,
    calibrate_for_registration,
    find_step,
    next_scale,
    precision_only,
)
from prover.report import SegmentReport, registration_report
from refute.executor import DeterministicExecutor
from refute.provider import (
    PreparedModel,
    calibration_inputs,
    input_sizes,
    prepare_model,
    read_inputs_json,
)
from refute.segmentation import run_segments
from tests.conftest import SHARED_MODELS

FLOAT = onnx.TensorProto.FLOAT


def _model(node: onnx.NodeProto, shape: list[int], out_shape: list[int]) -> PreparedModel:
    graph = helper.make_graph(
        [node], "one_node", [helper.make_tensor_value_info("x", FLOAT, shape)],
        [helper.make_tensor_value_info("y", FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return prepare_model(model.SerializeToString())


def _round() -> PreparedModel:
    return _model(helper.make_node("Round", ["x"], ["y"]), [1, 8], [1, 8])


def _mean() -> PreparedModel:
    return _model(helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0), [1, 300], [])


def _padded_max_pool() -> PreparedModel:
    """A MaxPool padded by ``auto_pad``: refute.rewrites pads one with explicit pads itself (so
    that EZKL's zero padding never shows), and leaves ``auto_pad`` to EZKL."""
    return _model(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3],
                                   auto_pad="SAME_UPPER", strides=[1, 1]),
                  [1, 1, 6, 6], [1, 1, 6, 6])


#: Round's inputs: 1.499 is read as 1.5 at scale 7 (and rounds to 2, not 1).
ROUND_INPUT = {"x": np.array([[1.499, 0.3, -0.7, 2.2, -1.2, 0.1, 0.9, -2.4]], np.float32)}


# --- the rules, on synthetic reports (no EZKL) ----------------------------------------------


def _line(index: int, tolerance: int | None, *, precision: bool = False,
          reason: str | None = None) -> SegmentReport:
    return SegmentReport(
        index=index, ops=("Op",), input_elements=1, output_elements=1, tolerance=tolerance,
        logrows=14, peak_bytes=1, setup_seconds=1.0, prove_seconds=1.0, fits_budget=True,
        calibration_seconds=1.0, reason=reason or ("τ" if precision else None),
        precision_limited=precision)


def _report(*lines: SegmentReport, scale: int = 7, range_: float = 4.0) -> Any:
    from prover.report import RegistrationReport

    return RegistrationReport(pins=(), folded_nodes=0, nodes=len(lines), scale=scale,
                              range=range_, budget_bytes=2**33, segments=tuple(lines))


def _calibration(scale: int, range_: float = 4.0) -> CalibrationReport:
    return CalibrationReport(scale, range_, (), ())


def test_next_scale_adds_the_bits_the_worst_segment_needs() -> None:
    # lstm_large: τ 42 against 512 at scale 7 needs one bit; 1l_mean: τ 12908 against 65536
    # needs two (16·12908/65536 ≈ 3.2).
    assert next_scale(_report(_line(1, 42, precision=True)), _calibration(7)) == 8
    assert next_scale(_report(_line(1, 12908, precision=True), range_=512.0),
                      _calibration(7, 512.0)) == 9
    # The worst of two segments decides (16·250/512 ≈ 7.8: three bits); a segment the τ rule
    # does not refuse does not count.
    assert next_scale(_report(_line(1, 42, precision=True), _line(2, 250, precision=True),
                              _line(3, 10**6)), _calibration(7)) == 10
    # Never above the cap, and nothing left at the cap.
    assert next_scale(_report(_line(1, 10**9, precision=True)), _calibration(7)) == MAX_SCALE
    assert next_scale(_report(_line(1, 10**9, precision=True)), _calibration(11), cap=11) is None


def test_only_precision_refusals_are_retried() -> None:
    assert precision_only(_report(_line(1, 42, precision=True), _line(2, 3)))
    assert not precision_only(_report(_line(1, 3), _line(2, 3)))  # nothing refused
    assert not precision_only(_report(_line(1, 42, precision=True),
                                      _line(2, 3, reason="over the proving budget")))


def test_the_precision_refusal_is_flagged_and_names_the_scales_tried() -> None:
    prepared = _round()
    honest = SegmentCalibration(1, {"run_args": {"logrows": 14}}, 300, Fraction(150),
                                logrows=14)
    calibration = CalibrationReport(7, 8.0, (honest,), ())
    report = registration_report(prepared, calibration, 2**33, scales_tried=[7, 9, 11],
                                 note="why")
    [line] = report.segments
    assert line.precision_limited and line.to_json()["precision_limited"]
    assert "range bound 1024 at scale 7 (also tried scales 9, 11; why)" in report.refusals[0]
    assert report.to_json()["scales_tried"] == [7, 9, 11]
    plain = registration_report(prepared, CalibrationReport(7, 8.0, (honest,), ()), 2**33)
    assert "at scale 7: EZKL does not compute Round" in plain.refusals[0]
    assert plain.to_json()["scales_tried"] == [7]
    within = SegmentCalibration(1, {"run_args": {"logrows": 14}}, 3, Fraction(1), logrows=14)
    ok = registration_report(prepared, CalibrationReport(7, 8.0, (within,), ()), 2**33)
    assert not ok.refusals and not ok.segments[0].precision_limited


# --- the step search (ONNX Runtime only) ----------------------------------------------------


def test_find_step_finds_round_and_not_a_mean() -> None:
    executor = DeterministicExecutor()
    prepared = _round()
    state = run_segments(executor, prepared.segmentation, ROUND_INPUT)[0]
    step = find_step(executor, prepared.segmentation.segments[0], [state], scale=7, limit=0.25)
    assert step is not None and step.segment == 1 and step.jump == 1.0 and step.width < 1e-6
    # Far from a step point (every value at least 1/256 away from a half), nothing is found.
    calm = [np.array([[0.3, 1.1, -0.7, 2.2, -1.2, 0.1, 0.9, -2.4]], np.float32)]
    assert find_step(executor, prepared.segmentation.segments[0], [calm], scale=7,
                     limit=0.25) is None
    mean = _mean()
    values = np.random.default_rng(0).uniform(15, 88, (1, 300)).astype(np.float32)
    state = run_segments(executor, mean.segmentation, {"x": values})[0]
    assert find_step(executor, mean.segmentation.segments[0], [state], scale=7,
                     limit=1.0) is None


# --- real EZKL calibrations ------------------------------------------------------------------


def _shared(name: str) -> tuple[PreparedModel, list[dict[str, np.ndarray]]]:
    folder = SHARED_MODELS / name
    executor = DeterministicExecutor()
    prepared = prepare_model(folder / "network.onnx",
                             input_sizes=input_sizes(folder / "input.json"), executor=executor)
    sample = read_inputs_json(folder / "input.json", prepared.loaded)
    return prepared, calibration_inputs(prepared, sample, 3, executor=executor)


@pytest.mark.ezkl
def test_a_mean_refused_at_7_registers_at_a_higher_scale() -> None:
    """1l_mean (ReduceMean of 300 values around 50): its circuit multiplies by 1/300 quantized
    at the scale (0 at scale 7), so τ is over 1/16 of the bound at 7 and within it above."""
    prepared, inputs = _shared("1l_mean")
    seen: list[tuple[str, int, int]] = []
    _manifest, at_7, refused = calibrate_for_registration(prepared, inputs, max_retries=0)
    assert refused.scale == 7 and refused.scales_tried == (7,) and at_7.scale == 7
    assert refused.refusals and all(s.precision_limited for s in refused.segments)

    manifest, calibration, report = calibrate_for_registration(
        prepared, inputs, progress=lambda *event: seen.append(event))
    assert report.scale > 7 and not report.refusals, report.refusals
    assert report.scales_tried[0] == 7 and report.scales_tried[-1] == report.scale
    assert manifest.scale == calibration.scale == report.scale
    assert manifest.tolerances == tuple(s.tolerance for s in report.segments)
    assert ("rescale", 0, 2) in seen and seen[-1] == ("rescale", 1, 1)
    assert report.to_json()["registrable"]


@pytest.mark.ezkl
def test_a_discontinuity_is_refused_without_retries() -> None:
    """Round at scale 7 reads 1.499 as 1.5: a whole unit off. A finer scale would only make
    calibration miss the step; the refusal names it instead."""
    prepared = _round()
    _manifest, calibration, report = calibrate_for_registration(prepared, [ROUND_INPUT])
    assert report.scale == calibration.scale == 7 and report.scales_tried == (7,)
    [reason] = report.refusals
    assert report.segments[0].precision_limited
    assert "at scale 7 (not retried: segment 1 jumps by 1 between inputs" in reason, reason
    assert "discontinuity" in reason and "\n" not in reason


@pytest.mark.ezkl
def test_an_error_that_grows_with_the_scale_is_refused_with_the_scales_tried() -> None:
    """A padded (auto_pad) MaxPool: EZKL pads with 0 where ONNX pads with -inf, so on negative
    inputs the border differs by about 1 whatever the scale (continuous in ONNX: no step).
    Retried, still refused; the reported attempt is the one at 7, naming the other scales."""
    prepared = _padded_max_pool()
    inputs = [{"x": np.random.default_rng(s).uniform(-2, -1, (1, 1, 6, 6)).astype(np.float32)}
              for s in range(2)]
    seen: list[tuple[str, int, int]] = []
    manifest, calibration, report = calibrate_for_registration(
        prepared, inputs, progress=lambda *event: seen.append(event))
    assert report.scale == calibration.scale == manifest.scale == 7
    assert len(report.scales_tried) == 3 and report.scales_tried[0] == 7
    assert list(report.scales_tried) == sorted(report.scales_tried)
    assert report.scales_tried[-1] <= MAX_SCALE
    [reason] = report.refusals
    later = ", ".join(map(str, report.scales_tried[1:]))
    assert f"at scale 7 (also tried scales {later}" in reason, reason
    assert seen[-1] == ("rescale", 2, 2)
