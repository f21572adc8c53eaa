"""An honest provider is never convicted: over 200 random inputs per model, the circuit's
fixed-point execution of every segment stays within τ_i of the float execution the provider
commits: its optimized whole-model session (ONNX Runtime's graph optimizations, every core: the
run a provider makes) on all 200, and the deterministic executor on 50 of them."""

from __future__ import annotations

import dataclasses
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest

from circuits.adjudication import adjudication_bytes
from prover.calibration import _compile, _maxdiff, calibrate_model
from prover.step import maxdiff_units
from refute import zoo
from refute.executor import DeterministicExecutor
from refute.provider import PreparedModel, prepare_model, random_inputs
from refute.segmentation import run_segments
from tests.conftest import shared_models

pytestmark = [pytest.mark.slow, pytest.mark.ezkl]

SHARED = {m.name: m for m in shared_models()}
INPUTS_PER_MODEL = 200
#: Of those, how many are proven on the deterministic executor's states as well (a provider
#: runs optimized; the deterministic states are what calibration itself measured).
DETERMINISTIC = 50


def _models() -> list[tuple[str, PreparedModel]]:
    return [
        ("3l_relu_conv_fc", prepare_model(SHARED["3l_relu_conv_fc"].path, dims={"batch_size": 1})),
        ("2l_relu_sigmoid_conv",
         prepare_model(SHARED["2l_relu_sigmoid_conv"].path, dims={"batch_size": 1})),
        ("1l_gelu_noappx", prepare_model(SHARED["1l_gelu_noappx"].path, dims={"batch_size": 1})),
        ("mlp_8x256", prepare_model(zoo.mlp_8x256().onnx_bytes)),
    ]


@pytest.mark.parametrize(("name", "prepared"), _models(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_honest_float_execution_stays_within_tolerance(name: str, prepared: PreparedModel) -> None:
    manifest, report = calibrate_model(
        prepared, [random_inputs(prepared.loaded, seed=s) for s in range(4)]
    )
    assert not report.unsupported, [s.reason for s in report.unsupported]
    assert manifest.tolerances is not None
    prepared = dataclasses.replace(prepared, manifest=manifest)
    executor = DeterministicExecutor()
    inputs = [random_inputs(prepared.loaded, seed=1000 + n) for n in range(INPUTS_PER_MODEL)]
    runs = [*(prepared.state_session.run(x) for x in inputs),
            *(run_segments(executor, prepared.segmentation, x) for x in inputs[:DETERMINISTIC])]
    for cal, segment in zip(report.segments, prepared.segmentation.segments, strict=True):
        assert cal.settings is not None and cal.tolerance is not None
        tau = manifest.tolerances[segment.index - 1]
        output_scale = int(cal.settings["model_output_scales"][0])
        worst = Fraction(0)
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            compiled = _compile(adjudication_bytes(segment), cal.settings, workdir)
            for run in runs:
                raw = _maxdiff(compiled, [*run[segment.index - 1], *run[segment.index]], workdir)
                units = maxdiff_units(raw, output_scale=output_scale, scale=manifest.scale)
                worst = max(worst, units)
                assert units <= tau, f"{name} segment {segment.index}: {units} > τ={tau}"
        print(f"{name} segment {segment.index}: worst honest maxdiff {float(worst):.3f} ≤ τ={tau}")
