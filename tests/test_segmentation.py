"""Segmentation: the segments in sequence reproduce the whole model bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from refute import zoo
from refute.errors import SegmentationError
from refute.executor import DeterministicExecutor
from refute.loading import LoadedModel, load_model
from refute.provider import random_inputs
from refute.segmentation import (
    HEAVY_OPS,
    check_reproduces,
    default_cuts,
    run_segments,
    run_whole,
    segment_model,
)
from tests.conftest import SharedModel, load_shared, shared_models

SHARED = shared_models()
ZOO = zoo.all_models()


def _assert_bit_exact(
    executor: DeterministicExecutor, loaded: LoadedModel, cuts: tuple[int, ...] | None,
    inputs: dict[str, np.ndarray], max_segments: int | None = None,
) -> None:
    seg = segment_model(loaded, cuts=cuts, max_segments=max_segments)
    whole = run_whole(executor, loaded, inputs)
    states = run_segments(executor, seg, inputs)
    assert len(states) == seg.num_segments + 1
    for a, b in zip(whole, states[-1], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    check_reproduces(executor, seg, inputs)


@pytest.mark.parametrize("shared", SHARED, ids=[m.name for m in SHARED])
def test_shared_models_every_cut_reproduces(
    shared: SharedModel, executor: DeterministicExecutor
) -> None:
    loaded = load_shared(shared.path)
    if loaded is None:
        return  # refused with a one-line reason (checked by load_shared)
    inputs = shared.inputs(loaded)
    _assert_bit_exact(executor, loaded, None, inputs)
    # Every single interior cut, and every node a segment of its own: each reproduces, or is
    # refused because its state would hold an integer or boolean tensor.
    m = len(loaded.nodes)
    for cuts in [*((0, c, m) for c in range(1, m)), tuple(range(m + 1))]:
        try:
            _assert_bit_exact(executor, loaded, cuts, inputs)
        except SegmentationError as exc:
            assert "non-float32" in exc.reason, exc.reason


@pytest.mark.parametrize("model", ZOO, ids=[m.name for m in ZOO])
def test_zoo_models_reproduce(model: zoo.ZooModel, executor: DeterministicExecutor) -> None:
    loaded = load_model(model.onnx_bytes)
    for seed in range(3):
        inputs = model.sample_input(seed)
        _assert_bit_exact(executor, loaded, None, inputs)
        for k in (1, 2, 3):
            _assert_bit_exact(executor, loaded, None, inputs, max_segments=k)
    _assert_bit_exact(executor, loaded, tuple(range(len(loaded.nodes) + 1)),
                      model.sample_input(7))


def test_default_policy_one_segment_per_heavy_node() -> None:
    for model in ZOO:
        loaded = load_model(model.onnx_bytes)
        seg = segment_model(loaded)
        heavy = sum(n.op_type in HEAVY_OPS for n in loaded.nodes)
        assert seg.num_segments == max(heavy, 1), model.name
        for s in seg.segments:
            assert sum(op in HEAVY_OPS for op in s.op_types) <= 1


def test_mlp_8x256_has_8_segments() -> None:
    loaded = load_model(zoo.mlp_8x256().onnx_bytes)
    seg = segment_model(loaded)
    assert seg.num_segments == 8
    assert [s.op_types for s in seg.segments] == [("Gemm", "Relu")] * 8


def test_skip_connection_is_carried_in_state(executor: DeterministicExecutor) -> None:
    loaded = load_model(zoo.residual_block().onnx_bytes)
    seg = segment_model(loaded)
    assert seg.num_segments >= 2
    # Between the two convolutions the block's input is still needed by the residual add.
    assert any(len(state) >= 2 for state in seg.states[1:-1])
    inner = next(s for s in seg.states[1:-1] if len(s) >= 2)
    assert loaded.input_names[0] in [t.name for t in inner]
    check_reproduces(executor, seg, random_inputs(loaded, seed=3))


def test_multi_output_states_keep_graph_output_order(executor: DeterministicExecutor) -> None:
    loaded = load_model(zoo.multi_output().onnx_bytes)
    assert len(loaded.output_names) == 2
    seg = segment_model(loaded, cuts=tuple(range(len(loaded.nodes) + 1)))
    assert tuple(t.name for t in seg.states[-1]) == loaded.output_names
    early = min(
        loaded.output_names,
        key=lambda n: next(i for i, node in enumerate(loaded.nodes) if n in node.output),
    )
    produced = next(i for i, node in enumerate(loaded.nodes) if early in node.output)
    for k in range(produced + 1, len(loaded.nodes)):
        assert early in [t.name for t in seg.states[k]], f"early output missing from state {k}"
    check_reproduces(executor, seg, random_inputs(loaded, seed=5))


def test_segments_are_standalone_and_deterministic() -> None:
    loaded = load_model(zoo.cnn().onnx_bytes)
    first = segment_model(loaded)
    again = segment_model(load_model(zoo.cnn().onnx_bytes))
    assert [s.sha256 for s in first.segments] == [s.sha256 for s in again.segments]
    for s in first.segments:
        model = onnx.load_model_from_string(s.onnx_bytes)
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [t.name for t in s.inputs]
        assert len(model.graph.output) == len(s.outputs)


def test_default_cuts_cover_the_model() -> None:
    loaded = load_model(zoo.attention_block().onnx_bytes)
    cuts = default_cuts(loaded)
    assert cuts[0] == 0 and cuts[-1] == len(loaded.nodes)
    assert list(cuts) == sorted(set(cuts))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cuts": [0, 0]}, "strictly increasing"),
        ({"cuts": [99]}, "outside"),
        ({"cuts": [-1]}, "outside"),
        ({"cuts": [1], "max_segments": 2}, "either"),
        ({"max_segments": 0}, "at least 1"),
    ],
)
def test_bad_cuts_are_refused(kwargs: dict[str, object], message: str) -> None:
    loaded = load_model(zoo.mlp().onnx_bytes)
    if kwargs.get("cuts") == [0, 0]:
        from refute.segmentation import state_names

        with pytest.raises(SegmentationError, match=message):
            state_names(loaded, [0, 0, len(loaded.nodes)])
        return
    with pytest.raises(SegmentationError, match=message):
        segment_model(loaded, **kwargs)  # type: ignore[arg-type]


def test_max_segments_caps_the_count() -> None:
    loaded = load_model(zoo.mlp_8x256().onnx_bytes)
    for k in range(1, 10):
        seg = segment_model(loaded, max_segments=k)
        assert seg.num_segments == min(k, 8)


def _residual_blocks(blocks: int, width: int) -> onnx.ModelProto:
    """x → blocks of ``r ← r + MatMul(Sigmoid(r), W)``: before each MatMul two tensors are live
    (r and its Sigmoid), right after each Add only r."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, r = [], [], "x"
    for b in range(blocks):
        weights.append(numpy_helper.from_array(
            rng.standard_normal((width, width)).astype(np.float32), f"w{b}"))
        nodes += [helper.make_node("Sigmoid", [r], [f"s{b}"]),
                  helper.make_node("MatMul", [f"s{b}", f"w{b}"], [f"m{b}"]),
                  helper.make_node("Add", [r, f"m{b}"], [f"r{b}"])]
        r = f"r{b}"
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(r, TensorProto.FLOAT, [1, width])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_max_segments_cuts_where_the_state_is_narrowest(
        executor: DeterministicExecutor) -> None:
    loaded = load_model(_residual_blocks(6, 16).SerializeToString())
    default = segment_model(loaded)
    assert [len(s) for s in default.states[1:-1]] == [2] * 5  # r and Sigmoid(r) before MatMul
    narrow = segment_model(loaded, max_segments=3)
    assert narrow.num_segments == 3
    assert [len(s) for s in narrow.states] == [1, 1, 1, 1]  # moved back to just after the Add
    assert all(loaded.nodes[c - 1].op_type == "Add" for c in narrow.cuts[1:-1])
    _assert_bit_exact(executor, loaded, None, random_inputs(loaded), max_segments=3)


def _whole_axis_model() -> onnx.ModelProto:
    """Conv → Relu → GlobalAveragePool → Flatten → Gemm → LayerNorm → MatMul → Relu → MatMul
    → LayerNorm: the two kinds of node that need a whole axis, each after a heavy node."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["g"]),
        helper.make_node("LayerNormalization", ["g", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["m2"]),
        helper.make_node("LayerNormalization", ["m2", "gamma", "beta"], ["y"], axis=-1),
    ]
    weights = [weight("wc", 8, 3, 3, 3), weight("wg", 8, 16), weight("gamma", 16),
               weight("beta", 16), weight("w1", 16, 16), weight("w2", 16, 16)]
    graph = helper.make_graph(
        nodes, "whole_axis", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_normalizations_and_global_pools_after_a_heavy_node_start_a_segment(
        executor: DeterministicExecutor) -> None:
    """Kept with the heavy node before them, they would make every tile of that segment
    compute whole rows of it (or read its whole input); a pool stays alone, a normalization
    goes on through the next heavy node."""
    loaded = load_model(_whole_axis_model().SerializeToString())
    seg = segment_model(loaded)
    assert [s.op_types for s in seg.segments] == [
        ("Conv", "Relu"), ("GlobalAveragePool", "Flatten"), ("Gemm",),
        ("LayerNormalization", "MatMul", "Relu"), ("MatMul",), ("LayerNormalization",)]
    _assert_bit_exact(executor, loaded, None, random_inputs(loaded))
