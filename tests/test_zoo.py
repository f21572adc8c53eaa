"""Tests of the generated reference models in :mod:`refute.zoo`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from refute import zoo
from refute.errors import RefuteError

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="building zoo models needs torch"
)

BUILDERS: dict[str, Callable[[], zoo.ZooModel]] = {
    "mlp": zoo.mlp,
    "mlp_8x256": zoo.mlp_8x256,
    "cnn": zoo.cnn,
    "residual_block": zoo.residual_block,
    "attention_block": zoo.attention_block,
    "multi_output": zoo.multi_output,
}

#: The node op lists the exporter produces today; a change here changes every model's bytes.
EXPECTED_OPS: dict[str, list[str]] = {
    "mlp": ["Gemm", "Relu", "Gemm", "Relu", "Gemm"],
    "mlp_8x256": ["Gemm", "Relu"] * 8,
    "cnn": [
        "Conv", "BatchNormalization", "Relu", "MaxPool", "Conv", "Relu", "AveragePool",
        "Flatten", "Gemm",
    ],
    "residual_block": ["Conv", "Relu", "Conv", "Add", "Relu"],
    "attention_block": [
        "MatMul", "Add", "MatMul", "Add", "MatMul", "Add",  # q, k, v
        "Transpose", "MatMul", "Constant", "Div", "Softmax", "MatMul",  # attention
        "MatMul", "Add", "Add",  # out projection + residual
        "MatMul", "Add",  # fc1
        "Constant", "Mul", "Constant", "Mul", "Erf", "Constant", "Add", "Mul",  # erf-GELU
        "MatMul", "Add", "Add",  # fc2 + residual
    ],
    "multi_output": [
        "Gemm", "Relu", "Gemm", "Constant", "Split", "Gemm", "Relu", "Sigmoid", "Concat", "Gemm",
    ],
}  # fmt: skip

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (1, 16),
    "mlp_8x256": (1, 256),
    "cnn": (1, 3, 16, 16),
    "residual_block": (1, 8, 8, 8),
    "attention_block": (1, 8, 16),
    "multi_output": (1, 16),
}

by_name = pytest.mark.parametrize("name", list(BUILDERS))


def _session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _run(model: zoo.ZooModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(model.onnx_bytes)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


# --- without torch ----------------------------------------------------------------------------


def test_import_does_not_import_torch() -> None:
    code = "import sys, refute.zoo; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_missing_torch_raises_refute_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(RefuteError, match=r"pip install torch==2\.13\.0"):
        zoo.mlp((3, 5, 2), seed=987654)  # not cached by any other test


# --- every model ------------------------------------------------------------------------------


@needs_torch
def test_all_models_lists_every_builder() -> None:
    models = zoo.all_models()
    assert [m.name for m in models] == list(BUILDERS)
    for model in models:
        assert model == BUILDERS[model.name]()  # cached: the very same model


@needs_torch
@by_name
def test_checker_passes(name: str) -> None:
    onnx.checker.check_model(BUILDERS[name]().model_proto(), full_check=True)


@needs_torch
@by_name
def test_only_allowed_ops_and_expected_op_list(name: str) -> None:
    graph = BUILDERS[name]().model_proto().graph
    ops = [node.op_type for node in graph.node]
    assert all(node.domain == "" for node in graph.node)
    assert set(ops) <= zoo.ZOO_OPS
    assert not {"Shape", "Gather", "ConstantOfShape", "Cast", "Gelu"} & set(ops)
    assert ops == EXPECTED_OPS[name]


@needs_torch
@by_name
def test_conv_and_pool_attributes_are_explicit(name: str) -> None:
    for node in BUILDERS[name]().model_proto().graph.node:
        attrs = {a.name for a in node.attribute}
        if node.op_type == "Conv":
            assert {"strides", "pads", "dilations", "kernel_shape", "group"} <= attrs
        if node.op_type in {"MaxPool", "AveragePool"}:
            assert {"strides", "pads", "kernel_shape"} <= attrs


@needs_torch
@by_name
def test_static_float32_io_opset_and_embedded_weights(name: str) -> None:
    model = BUILDERS[name]()
    proto = model.model_proto()
    assert [(e.domain, e.version) for e in proto.opset_import] == [("", zoo.OPSET)]
    assert 9 <= zoo.OPSET <= 18
    for vi in (*proto.graph.input, *proto.graph.output):
        tensor_type = vi.type.tensor_type
        assert tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert tensor_type.shape.dim, vi.name
        for dim in tensor_type.shape.dim:
            assert dim.HasField("dim_value") and dim.dim_value >= 1, vi.name
            assert not dim.dim_param
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # batch 1
    assert model.input_shapes == {"input": INPUT_SHAPES[name]}
    initializer_names = {t.name for t in proto.graph.initializer}
    assert not initializer_names & {vi.name for vi in proto.graph.input}
    for tensor in proto.graph.initializer:
        assert tensor.data_location == onnx.TensorProto.DEFAULT
        assert not tensor.external_data
    assert proto.producer_name == zoo.PRODUCER
    assert proto.producer_version == zoo.ZOO_VERSION
    assert proto.graph.name == name
    assert all(not node.doc_string for node in proto.graph.node)
    names = [node.name for node in proto.graph.node]
    assert all(names) and len(set(names)) == len(names)


@needs_torch
@by_name
def test_sample_input(name: str) -> None:
    model = BUILDERS[name]()
    feeds = model.sample_input()
    assert list(feeds) == model.input_names
    for input_name, array in feeds.items():
        assert array.dtype == np.float32
        assert array.shape == model.input_shapes[input_name]
        assert array.min() >= -1.0 and array.max() <= 1.0
    again = model.sample_input(0)
    other = model.sample_input(1)
    for input_name in feeds:
        np.testing.assert_array_equal(feeds[input_name], again[input_name])
        assert not np.array_equal(feeds[input_name], other[input_name])


@needs_torch
@by_name
def test_onnxruntime_matches_torch(name: str) -> None:
    model = BUILDERS[name]()
    for seed in (0, 1, 2):
        feeds = model.sample_input(seed)
        got = _run(model, feeds)
        want = model.torch_outputs(feeds)
        assert list(got) == list(want) == model.output_names
        for output_name, value in want.items():
            assert got[output_name].shape == model.output_shapes[output_name]
            np.testing.assert_allclose(got[output_name], value, rtol=1e-5, atol=1e-5)


@needs_torch
@by_name
def test_activations_fit_fixed_point_range(name: str) -> None:
    """Every intermediate tensor stays in [-8, 8], and outputs are not vanishingly small."""
    model = BUILDERS[name]()
    proto = model.model_proto()
    graph = proto.graph
    present = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        for output in node.output:
            if output not in present:
                graph.output.append(onnx.ValueInfoProto(name=output))
                present.add(output)
    session = _session(proto)
    for seed in range(8):
        for value in session.run(None, model.sample_input(seed)):
            assert np.all(np.isfinite(value))
            assert float(np.abs(value).max()) <= 8.0
    for value in _run(model, model.sample_input(0)).values():
        assert float(np.abs(value).max()) > 0.1  # well above one step at scale 2^7


@needs_torch
def test_export_is_byte_deterministic() -> None:
    first = zoo.all_models()
    zoo.clear_cache()
    second = zoo.all_models()
    for a, b in zip(first, second, strict=True):
        assert a is not b  # really built twice
        assert a.onnx_bytes == b.onnx_bytes, a.name


@needs_torch
def test_export_is_byte_deterministic_across_processes() -> None:
    code = "from refute import zoo; print(*(m.sha256 for m in zoo.all_models()))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == [m.sha256 for m in zoo.all_models()]


# --- particular models ------------------------------------------------------------------------


@needs_torch
def test_multi_output_structure() -> None:
    model = zoo.multi_output()
    graph = model.model_proto().graph
    assert model.output_names == ["early", "late"]
    assert len(graph.output) == 2
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output}
    assert producer["early"] < len(graph.node) // 2  # produced early
    assert producer["late"] == len(graph.node) - 1  # produced by the last node
    splits = [node for node in graph.node if len(node.output) == 2]
    assert len(splits) == 1 and splits[0].op_type == "Split"
    consumers = [
        {index for index, node in enumerate(graph.node) if out in node.input}
        for out in splits[0].output
    ]
    assert all(len(c) == 1 for c in consumers)
    assert consumers[0] != consumers[1]  # the two halves feed different nodes


@needs_torch
def test_residual_block_has_a_skip_connection() -> None:
    graph = zoo.residual_block().model_proto().graph
    users = [node for node in graph.node if "input" in node.input]
    assert [node.op_type for node in users] == ["Conv", "Add"]


@needs_torch
def test_mlp_with_custom_widths_and_seed() -> None:
    model = zoo.mlp([4, 8, 2], seed=3)
    assert model.name == "mlp_4x8x2_seed3"
    assert model.input_shapes == {"input": (1, 4)}
    assert model.output_shapes == {"output": (1, 2)}
    assert [n.op_type for n in model.model_proto().graph.node] == ["Gemm", "Relu", "Gemm"]
    assert zoo.mlp((4, 8, 2), seed=3) is model  # cached, lists and tuples alike
    assert zoo.mlp([4, 8, 2], seed=4).onnx_bytes != model.onnx_bytes
    with pytest.raises(RefuteError):
        zoo.mlp([4])
    with pytest.raises(RefuteError):
        zoo.mlp([4, 0, 2])


@needs_torch
def test_seed_changes_weights_not_structure() -> None:
    base, other = zoo.cnn(), zoo.cnn(seed=1)
    assert other.name == "cnn_seed1"
    assert base.onnx_bytes != other.onnx_bytes
    ops = [n.op_type for n in other.model_proto().graph.node]
    assert ops == EXPECTED_OPS["cnn"]


def test_zoo_model_without_factory() -> None:
    model = zoo.ZooModel(name="x", onnx_bytes=b"")
    with pytest.raises(RefuteError, match="no torch factory"):
        model.torch_module()
