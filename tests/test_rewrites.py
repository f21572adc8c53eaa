"""Rewrites that make the circuit compute what ONNX Runtime computes (refute/rewrites.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from circuits.adjudication import adjudication_bytes
from prover.calibration import calibrate_segment
from refute.executor import DeterministicExecutor
from refute.loading import load_model
from refute.provider import prepare_model, validate_inputs
from refute.segmentation import run_segments, run_whole


def _pool(shape: list[int], **attrs: object) -> bytes:
    spatial = len(shape) - 2
    attrs.setdefault("kernel_shape", [3] * spatial)
    node = helper.make_node("MaxPool", ["x"], ["y"], **attrs)  # type: ignore[arg-type]
    graph = helper.make_graph(
        [node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _original(data: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    return np.asarray(y)


POOLS = [
    ([1, 2, 7, 6], {"pads": [1, 1, 1, 1]}),
    ([1, 2, 7, 6], {"pads": [2, 0, 1, 2], "strides": [2, 2]}),
    ([1, 1, 8, 5], {"pads": [1, 2, 1, 0], "strides": [3, 2]}),
    ([1, 3, 9], {"pads": [2, 1], "kernel_shape": [4]}),
    ([1, 1, 4, 5, 3], {"pads": [1, 0, 1, 1, 1, 0]}),
]


@pytest.mark.parametrize(("shape", "attrs"), POOLS)
def test_padded_max_pool_pads_the_border_explicitly_with_the_same_result(
        shape: list[int], attrs: dict[str, object]) -> None:
    data = _pool(shape, **attrs)
    loaded = load_model(data)
    pools = [n for n in loaded.nodes if n.op_type == "MaxPool"]
    assert len(pools) == 1
    assert not any(helper.get_attribute_value(a) != [0] * len(attrs["pads"])  # type: ignore[arg-type]
                   for a in pools[0].attribute if a.name == "pads")
    assert {n.op_type for n in loaded.nodes} == {"Slice", "Concat", "MaxPool"}
    rng = np.random.default_rng(len(shape))
    executor = DeterministicExecutor()
    for x in (rng.uniform(-9, -1, shape), rng.uniform(-1, 1, shape), np.full(shape, -3.0)):
        x32 = x.astype(np.float32)
        (ours,) = run_whole(executor, loaded, {"x": x32})
        assert ours.tobytes() == _original(data, x32).tobytes()


def test_max_pools_the_rewrite_cannot_keep_exact_are_left_alone() -> None:
    for attrs in ({"pads": [1, 1, 1, 1], "dilations": [2, 2]}, {"auto_pad": "SAME_UPPER"},
                  {"pads": [0, 0, 0, 0]}, {"pads": [1, 2, 1, 0], "ceil_mode": 1}):
        loaded = load_model(_pool([1, 1, 7, 7], **attrs))
        assert [n.op_type for n in loaded.nodes] == ["MaxPool"]


def test_padded_max_pool_circuit_agrees_with_onnx_on_negative_inputs() -> None:
    """EZKL 23 pads a MaxPool with 0: before the rewrite a window of negative values at the
    border came out 0 in the circuit (τ 254 on the shared 1l_max_pool), now to the unit."""
    prepared = prepare_model(_pool([1, 2, 6, 6], pads=[1, 1, 1, 1]))
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, -0.5, (1, 2, 6, 6)).astype(np.float32)
    states = run_segments(DeterministicExecutor(), prepared.segmentation,
                          validate_inputs(prepared.loaded, {"x": x}))
    result = calibrate_segment(adjudication_bytes(prepared.segmentation.segments[0]), 1,
                               [(states[0], states[1])], scale=7, bound=4.0, safety=1.0)
    assert result.reason is None and result.tolerance == 1


def test_old_opsets_keep_their_max_pool() -> None:
    model = onnx.load_model_from_string(_pool([1, 1, 5, 5], pads=[1, 1, 1, 1]))
    model.opset_import[0].version = 9
    loaded = load_model(model.SerializeToString())
    assert [n.op_type for n in loaded.nodes] == ["MaxPool"]
