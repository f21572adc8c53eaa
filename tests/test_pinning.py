"""Pins, shape folding, boundary casts and foreign opset imports (issue 11: real exports)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from refute.errors import InputError, ShapeError, UnsupportedOperator
from refute.executor import DeterministicExecutor
from refute.loading import load_model
from refute.pinning import FROM_DEFAULT, FROM_DIM, FROM_INPUT, FROM_SHAPE
from refute.provider import prepare_for_manifest, prepare_model, random_inputs, validate_inputs
from refute.segmentation import run_whole
from tests import hostile_models


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto] = (),  # type: ignore[assignment]
           opset: int = 13) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _torch_style_flatten(batch: str = "batch_size") -> bytes:
    """``y = Reshape(x, Concat(Gather(Shape(x), 0), [-1]))`` on x [batch, 3, 4]: the shape
    sub-graph every PyTorch ``x.view(x.size(0), -1)`` export carries."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 12])],
        inits,
    )


def test_batch_size_defaults_to_one_and_is_reported() -> None:
    loaded = load_model(_torch_style_flatten())
    assert loaded.input_specs[0].shape == (1, 3, 4)
    [pin] = loaded.pins
    assert (pin.input, pin.axis, pin.dim, pin.value, pin.source) == ("x", 0, "batch_size", 1,
                                                                      FROM_DEFAULT)


def test_input_file_fixes_the_batch() -> None:
    loaded = load_model(_torch_style_flatten(), input_sizes=[2 * 3 * 4])
    assert loaded.input_specs[0].shape == (2, 3, 4)
    assert loaded.output_specs[0].shape == (2, 12)
    assert [(p.value, p.source) for p in loaded.pins] == [(2, FROM_INPUT)]


def test_explicit_pins_win_over_the_input_file() -> None:
    by_dim = load_model(_torch_style_flatten(), dims={"batch_size": 3}, input_sizes=[36])
    assert by_dim.input_specs[0].shape == (3, 3, 4)
    assert [p.source for p in by_dim.pins] == [FROM_DIM]
    by_shape = load_model(_torch_style_flatten(), shapes={"x": [3, 3, 4]})
    assert [p.source for p in by_shape.pins] == [FROM_SHAPE]


@pytest.mark.parametrize("sizes", [[25], [0], [12, 12]])
def test_an_input_file_that_does_not_fit_is_refused(sizes: list[int]) -> None:
    with pytest.raises(ShapeError) as info:
        load_model(_torch_style_flatten(), input_sizes=sizes)
    assert "input file" in info.value.reason


def test_a_symbolic_dimension_nothing_fixes_is_refused_by_name() -> None:
    with pytest.raises(ShapeError) as info:
        load_model(hostile_models.second_symbolic_dim())
    assert "'features'" in info.value.reason and "--dim" in info.value.reason


def test_the_input_file_fixes_the_one_dimension_left_after_the_batch() -> None:
    loaded = load_model(hostile_models.second_symbolic_dim(), input_sizes=[3])
    assert loaded.input_specs[0].shape == (1, 3)
    assert {(p.dim, p.source) for p in loaded.pins} == {("batch_size", FROM_DEFAULT),
                                                       ("features", FROM_INPUT)}


def test_shape_subgraph_folds_into_constants_and_runs_the_same() -> None:
    source = _torch_style_flatten()
    loaded = load_model(source)
    assert [n.op_type for n in loaded.nodes] == ["Reshape", "Relu"]
    assert loaded.folded_nodes == 4  # Shape read, then Gather, Unsqueeze, Concat folded
    x = np.random.default_rng(1).normal(size=(1, 3, 4)).astype(np.float32)
    [ours] = run_whole(DeterministicExecutor(), loaded, {"x": x})
    assert np.array_equal(ours, np.maximum(x.reshape(1, 12), 0))


def test_a_shape_operator_on_values_is_refused_by_name() -> None:
    """``ConstantOfShape`` fed by the input's values cannot fold: refused, naming the node."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
        helper.make_node("ConstantOfShape", ["xi"], ["y"], name="grow",
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
    ]
    source = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises((UnsupportedOperator, ShapeError)) as info:
        load_model(source)
    assert "grow" in info.value.reason or "shape" in info.value.reason


def test_unused_foreign_opset_import_is_accepted_and_dropped() -> None:
    loaded = load_model(hostile_models.opset_extra_unknown_domain())
    assert [imp.domain for imp in loaded.model.opset_import] == [""]


def test_integral_and_double_inputs_are_carried_as_float32() -> None:
    loaded = load_model(hostile_models.double_input_identity())
    assert loaded.input_specs[0].dtype == np.float32
    assert loaded.output_specs[0].dtype == np.float32
    assert loaded.integral_inputs == {"input": TensorProto.DOUBLE}
    x = np.array([[-1.5, 0.25, 3.0]], np.float32)
    [out] = run_whole(DeterministicExecutor(), loaded, {"input": x})
    assert np.array_equal(out, np.maximum(x, 0))


def test_integral_inputs_must_hold_whole_numbers() -> None:
    nodes = [helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["f"], ["y"])]
    source = _model(nodes, [helper.make_tensor_value_info("i", TensorProto.INT64, [1, 3])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    loaded = load_model(source)
    assert loaded.integral_inputs == {"i": TensorProto.INT64}
    validate_inputs(loaded, {"i": np.array([[1.0, -2.0, 7.0]])})
    with pytest.raises(InputError, match="whole numbers"):
        validate_inputs(loaded, {"i": np.array([[1.5, 0.0, 0.0]])})
    with pytest.raises(InputError, match="2\\^24"):
        validate_inputs(loaded, {"i": np.array([[2.0**25, 0.0, 0.0]])})
    sample = random_inputs(loaded, seed=3)["i"]
    assert np.array_equal(sample, np.round(sample))


def test_manifest_records_inferred_pins_so_the_model_loads_the_same() -> None:
    source = _torch_style_flatten()
    prepared = prepare_model(source, input_sizes=[24])
    assert prepared.manifest.pins["shapes"] == {"x": [2, 3, 4]}
    again = prepare_for_manifest(source, prepared.manifest)
    assert again.loaded.input_specs[0].shape == (2, 3, 4)
    assert again.segmentation.segments[0].sha256 == prepared.segmentation.segments[0].sha256


def test_a_scalar_state_stays_a_scalar_through_trace_and_commitment() -> None:
    """``1l_mean`` reduces to a scalar: executing, committing and re-reading keep its shape []
    (numpy's ascontiguousarray used to turn it into [1] on the way)."""
    from refute.provider import input_sizes, read_inputs_json, run_trace
    from refute.trace import Trace
    from tests.conftest import SHARED_MODELS

    folder = SHARED_MODELS / "1l_mean"
    prepared = prepare_model(folder / "network.onnx",
                             input_sizes=input_sizes(folder / "input.json"))
    assert prepared.manifest.states[-1][0].shape == ()
    trace = run_trace(prepared, read_inputs_json(folder / "input.json", prepared.loaded))
    [output] = trace.states[-1]
    assert output.shape == () and np.isfinite(output)
    again = Trace.from_states(prepared.manifest, trace.states)
    assert again.commitment.root == trace.commitment.root
