"""Generated reference models: small torch modules exported to ONNX for tests and benchmarks.

Every model built here is

* static: batch 1, no dynamic axes, float32 inputs and outputs, all weights embedded;
* deterministic: weights come from numpy's PCG64 keyed by ``(crc32(kind), seed)`` (stable
  across platforms and numpy versions), the legacy TorchScript exporter of torch 2.13 is
  byte-deterministic for a given module, and the result is canonicalised anyway (doc strings
  cleared, fixed producer fields and graph name, explicit convolution/pooling attributes), so
  the same call returns byte-identical ONNX in any process (same torch and onnx versions);
* restricted to :data:`ZOO_OPS`, default opset :data:`OPSET` (17), checked with
  ``onnx.checker.check_model(full_check=True)`` before it is returned;
* scaled for fixed-point proving: weights use He/Glorot-style uniform bounds so that every
  intermediate activation stays well inside [-8, 8] for inputs drawn from U(-1, 1).

torch is imported lazily: ``import refute.zoo`` does not import torch, and building a model
without torch raises :class:`~refute.errors.RefuteError`. Built models are cached per
(function, arguments); :func:`clear_cache` drops the cache.
"""

# torch is imported inside functions on purpose (see the module docstring).

from __future__ import annotations

import functools
import hashlib
import math
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import AttributeProto, TensorProto, helper

from refute.errors import RefuteError

if TYPE_CHECKING:
    import torch

__all__ = [
    "OPSET",
    "ZOO_OPS",
    "ZOO_VERSION",
    "ZooModel",
    "all_models",
    "attention_block",
    "clear_cache",
    "cnn",
    "mlp",
    "mlp_8x256",
    "multi_output",
    "residual_block",
]

#: Default-domain opset every zoo model is exported with.
OPSET = 17
#: Written to ``producer_version``; bump when a model's bytes change on purpose.
ZOO_VERSION = "1"
#: Written to ``producer_name``.
PRODUCER = "refute.zoo"

#: The only operators a zoo model may contain.
ZOO_OPS: frozenset[str] = frozenset(
    {
        "Gemm", "MatMul", "Conv", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Erf",
        "Softmax", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
        "Flatten", "Reshape", "Transpose", "Concat", "Identity", "Constant", "ReduceMean",
        "ReduceSum", "Sqrt", "Pow", "LeakyRelu", "Clip", "Squeeze", "Unsqueeze", "Exp", "Neg",
        "Abs", "Max", "Min", "LayerNormalization", "Split", "Slice", "Pad", "Sum",
    }
)  # fmt: skip

_TORCH_MISSING = "building zoo models needs torch: pip install torch==2.13.0"

FloatArray = npt.NDArray[np.float32]


# --- the model record ---------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """One generated model: its name, its serialized ONNX and a way back to the torch module.

    Equality and hashing use ``name``, ``onnx_bytes`` and ``description`` only.
    """

    name: str
    onnx_bytes: bytes
    description: str = ""
    #: Rebuilds the seeded torch module (eval mode) the ONNX was exported from.
    torch_factory: Callable[[], Any] | None = field(
        default=None, compare=False, hash=False, repr=False
    )

    def model_proto(self) -> onnx.ModelProto:
        """Parse ``onnx_bytes`` into a fresh :class:`onnx.ModelProto` (safe to mutate)."""
        return onnx.load_from_string(self.onnx_bytes)

    @functools.cached_property
    def _signature(
        self,
    ) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, tuple[int, ...]], ...]]:
        graph = self.model_proto().graph
        return (
            tuple((vi.name, _static_shape(vi)) for vi in graph.input),
            tuple((vi.name, _static_shape(vi)) for vi in graph.output),
        )

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Graph inputs in order, name to static shape."""
        return dict(self._signature[0])

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Graph outputs in order, name to static shape."""
        return dict(self._signature[1])

    @property
    def input_names(self) -> list[str]:
        """Names of the graph inputs, in order."""
        return [name for name, _ in self._signature[0]]

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in order."""
        return [name for name, _ in self._signature[1]]

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of ``onnx_bytes``."""
        return hashlib.sha256(self.onnx_bytes).hexdigest()

    def sample_input(self, seed: int = 0) -> dict[str, FloatArray]:
        """Float32 inputs drawn from U(-1, 1) with ``numpy.random.default_rng(seed)``.

        Inputs are drawn in graph-input order, so the same seed always gives the same arrays.
        """
        rng = np.random.default_rng(seed)
        return {
            name: rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
            for name, shape in self._signature[0]
        }

    def save(self, path: str | Path) -> Path:
        """Write ``onnx_bytes`` to ``path`` and return it as a :class:`~pathlib.Path`."""
        target = Path(path)
        target.write_bytes(self.onnx_bytes)
        return target

    def torch_module(self) -> torch.nn.Module:
        """Rebuild the (seeded, eval-mode) torch module this model was exported from."""
        if self.torch_factory is None:
            raise RefuteError(f"zoo model {self.name!r} has no torch factory")
        module: torch.nn.Module = self.torch_factory()
        return module

    def torch_outputs(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, FloatArray]:
        """Run the torch module on ``inputs`` (by input name) and name its outputs."""
        _require_torch()
        import torch

        module = self.torch_module()
        tensors = [
            torch.from_numpy(np.asarray(inputs[name], dtype=np.float32))
            for name in self.input_names
        ]
        with torch.no_grad():
            result = module(*tensors)
        values = list(result) if isinstance(result, tuple | list) else [result]
        return {
            name: value.detach().cpu().numpy().astype(np.float32)
            for name, value in zip(self.output_names, values, strict=True)
        }


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(int(d.dim_value) for d in dims)


# --- public builders ------------------------------------------------------------------------


def mlp(widths: Sequence[int] = (16, 32, 32, 8), *, seed: int = 0) -> ZooModel:
    """A stack of ``Gemm`` layers with ``Relu`` between them (none after the last).

    ``widths`` lists the layer widths, input first: ``(16, 32, 32, 8)`` is input ``[1, 16]``,
    three Gemm layers, output ``[1, 8]``.
    """
    dims = tuple(int(w) for w in widths)
    if len(dims) < 2 or any(w < 1 for w in dims):
        raise RefuteError(f"mlp widths must be at least two positive integers, got {widths!r}")
    return _mlp(dims, seed)


def mlp_8x256(*, seed: int = 0) -> ZooModel:
    """Eight ``Linear(256, 256) + ReLU`` layers (ReLU after every one), input ``[1, 256]``."""
    return _mlp_8x256(seed)


def cnn(*, seed: int = 0) -> ZooModel:
    """A small CNN on ``[1, 3, 16, 16]``.

    Conv 3→8 3x3 pad 1 + BatchNormalization + Relu, MaxPool 2, Conv 8→8 3x3 pad 1 + Relu,
    AveragePool 2, Flatten, Gemm 128→10. BatchNormalization stays a node (it is not folded).
    """
    return _cnn(seed)


def residual_block(*, seed: int = 0) -> ZooModel:
    """``relu(x + conv2(relu(conv1(x))))`` on ``[1, 8, 8, 8]``: a real skip connection."""
    return _residual_block(seed)


def attention_block(*, seed: int = 0) -> ZooModel:
    """Single-head self-attention plus an erf-GELU MLP, both residual, on ``[1, 8, 16]``.

    ``h = x + out(softmax(q kᵀ / √16) v)`` with ``q, k, v`` linear maps of ``x``, then
    ``y = h + fc2(gelu(fc1(h)))`` with GELU written as ``0.5·g·(1 + erf(g/√2))``.
    """
    return _attention_block(seed)


def multi_output(*, seed: int = 0) -> ZooModel:
    """Two graph outputs (``early`` and ``late``) and a two-output ``Split``, on ``[1, 16]``.

    ``h = relu(fc_in(x))``; ``early = fc_early(h)`` is produced right away; ``h`` is split into
    two halves, the first goes through ``relu(fc_a(.))``, the second through ``sigmoid``, they
    are concatenated and ``late = fc_out(.)`` is the last node.
    """
    return _multi_output(seed)


def all_models() -> list[ZooModel]:
    """Every zoo model with default arguments, in a fixed order."""
    return [
        mlp(),
        mlp_8x256(),
        cnn(),
        residual_block(),
        attention_block(),
        multi_output(),
    ]


def clear_cache() -> None:
    """Forget every cached model (the next call exports again)."""
    for cached in (_mlp, _mlp_8x256, _cnn, _residual_block, _attention_block, _multi_output):
        cached.cache_clear()


# --- cached builders ------------------------------------------------------------------------


def _suffix(seed: int) -> str:
    return "" if seed == 0 else f"_seed{seed}"


@functools.cache
def _mlp(widths: tuple[int, ...], seed: int) -> ZooModel:
    default = widths == (16, 32, 32, 8)
    name = ("mlp" if default else "mlp_" + "x".join(map(str, widths))) + _suffix(seed)
    return _build(
        name,
        f"MLP {'-'.join(map(str, widths))}: Gemm+Relu, no Relu after the last layer",
        functools.partial(_mlp_module, widths, seed, relu_last=False),
        {"input": (1, widths[0])},
        ["output"],
    )


@functools.cache
def _mlp_8x256(seed: int) -> ZooModel:
    return _build(
        "mlp_8x256" + _suffix(seed),
        "MLP: 8 x (Gemm 256->256 + Relu)",
        functools.partial(_mlp_module, (256,) * 9, seed, relu_last=True),
        {"input": (1, 256)},
        ["output"],
    )


@functools.cache
def _cnn(seed: int) -> ZooModel:
    return _build(
        "cnn" + _suffix(seed),
        "CNN: Conv+BN+Relu, MaxPool, Conv+Relu, AveragePool, Flatten, Gemm->10",
        functools.partial(_cnn_module, seed),
        {"input": (1, 3, 16, 16)},
        ["output"],
    )


@functools.cache
def _residual_block(seed: int) -> ZooModel:
    return _build(
        "residual_block" + _suffix(seed),
        "Residual block: relu(x + conv2(relu(conv1(x))))",
        functools.partial(_residual_module, seed),
        {"input": (1, 8, 8, 8)},
        ["output"],
    )


@functools.cache
def _attention_block(seed: int) -> ZooModel:
    return _build(
        "attention_block" + _suffix(seed),
        "Single-head self-attention + erf-GELU MLP, both residual",
        functools.partial(_attention_module, seed),
        {"input": (1, 8, 16)},
        ["output"],
    )


@functools.cache
def _multi_output(seed: int) -> ZooModel:
    return _build(
        "multi_output" + _suffix(seed),
        "Two outputs (early, late) and a two-output Split feeding different nodes",
        functools.partial(_multi_output_module, seed),
        {"input": (1, 16)},
        ["early", "late"],
    )


# --- torch modules --------------------------------------------------------------------------


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise RefuteError(_TORCH_MISSING) from exc


class _Init:
    """Seeded weight initialisation from numpy's PCG64 (stable across platforms).

    The stream is keyed by ``(crc32(kind), seed)``, never by ``seed`` alone: with
    ``default_rng(seed)`` the first weight row would be a scaled copy of
    ``sample_input(seed)`` (same generator, same draws), which makes one unit fire far outside
    the usual range on exactly the input everybody tests with.
    """

    RELU_GAIN = math.sqrt(2.0)

    def __init__(self, kind: str, seed: int) -> None:
        self.rng = np.random.default_rng([zlib.crc32(kind.encode()), seed])

    def uniform(self, shape: Sequence[int], low: float, high: float) -> FloatArray:
        return self.rng.uniform(low, high, size=tuple(shape)).astype(np.float32)

    def layer(self, layer: torch.nn.Module, gain: float, bias_bound: float = 0.1) -> None:
        """Weight ~ U(±gain·√(3/fan_in)) (variance gain²/fan_in), bias ~ U(±bias_bound)."""
        import torch

        weight = layer.weight
        bias = layer.bias
        assert isinstance(weight, torch.Tensor)
        fan_in = int(weight[0].numel())
        bound = gain * math.sqrt(3.0 / fan_in)
        with torch.no_grad():
            weight.copy_(torch.from_numpy(self.uniform(weight.shape, -bound, bound)))
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.from_numpy(self.uniform(bias.shape, -bias_bound, bias_bound)))

    def batchnorm(self, bn: torch.nn.BatchNorm2d) -> None:
        """Non-trivial affine parameters and running statistics."""
        import torch

        n = bn.num_features
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(self.uniform((n,), 0.8, 1.2)))
            bn.bias.copy_(torch.from_numpy(self.uniform((n,), -0.1, 0.1)))
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(torch.from_numpy(self.uniform((n,), -0.2, 0.2)))
            bn.running_var.copy_(torch.from_numpy(self.uniform((n,), 0.6, 1.4)))


def _mlp_module(widths: tuple[int, ...], seed: int, *, relu_last: bool) -> torch.nn.Module:
    _require_torch()
    from collections import OrderedDict

    from torch import nn

    init = _Init("mlp", seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    count = len(widths) - 1
    for i in range(count):
        fc = nn.Linear(widths[i], widths[i + 1])
        relu = relu_last or i < count - 1
        init.layer(fc, _Init.RELU_GAIN if relu else 1.0)
        layers[f"fc{i}"] = fc
        if relu:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers).eval()


def _cnn_module(seed: int) -> torch.nn.Module:
    _require_torch()
    import torch
    from torch import nn

    class Cnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, stride=1, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.maxpool = nn.MaxPool2d(2, stride=2)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
            self.avgpool = nn.AvgPool2d(2, stride=2)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h: torch.Tensor = torch.relu(self.bn1(self.conv1(x)))
            h = self.maxpool(h)
            h = torch.relu(self.conv2(h))
            h = self.avgpool(h)
            out: torch.Tensor = self.fc(torch.flatten(h, 1))
            return out

    model = Cnn()
    init = _Init("cnn", seed)
    init.layer(model.conv1, _Init.RELU_GAIN)
    init.batchnorm(model.bn1)
    init.layer(model.conv2, _Init.RELU_GAIN)
    init.layer(model.fc, 1.0)
    return model.eval()


def _residual_module(seed: int) -> torch.nn.Module:
    _require_torch()
    import torch
    from torch import nn

    class ResidualBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=1, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv1(x))
            out: torch.Tensor = torch.relu(x + self.conv2(h))
            return out

    model = ResidualBlock()
    init = _Init("residual_block", seed)
    init.layer(model.conv1, _Init.RELU_GAIN)
    init.layer(model.conv2, 1.0)
    return model.eval()


def _attention_module(seed: int) -> torch.nn.Module:
    _require_torch()
    import torch
    from torch import nn

    dim, hidden = 16, 32

    class AttentionBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, dim)
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.q(x), self.k(x), self.v(x)
            scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(dim)
            attn = torch.softmax(scores, dim=-1)
            h = x + self.out(torch.matmul(attn, v))
            g = self.fc1(h)
            g = 0.5 * g * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
            out: torch.Tensor = h + self.fc2(g)
            return out

    model = AttentionBlock()
    init = _Init("attention_block", seed)
    for layer in (model.q, model.k, model.v, model.out, model.fc1):
        init.layer(layer, 1.0)
    init.layer(model.fc2, 0.5)
    return model.eval()


def _multi_output_module(seed: int) -> torch.nn.Module:
    _require_torch()
    import torch
    from torch import nn

    class MultiOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc_in = nn.Linear(16, 16)
            self.fc_early = nn.Linear(16, 4)
            self.fc_a = nn.Linear(8, 8)
            self.fc_out = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.fc_in(x))
            early: torch.Tensor = self.fc_early(h)
            a, b = torch.split(h, [8, 8], dim=1)
            a = torch.relu(self.fc_a(a))
            b = torch.sigmoid(b)
            late: torch.Tensor = self.fc_out(torch.cat([a, b], dim=1))
            return early, late

    model = MultiOutput()
    init = _Init("multi_output", seed)
    init.layer(model.fc_in, _Init.RELU_GAIN)
    init.layer(model.fc_early, 1.0)
    init.layer(model.fc_a, _Init.RELU_GAIN)
    init.layer(model.fc_out, 1.0)
    return model.eval()


# --- export and canonicalisation ------------------------------------------------------------


def _build(
    name: str,
    description: str,
    factory: Callable[[], torch.nn.Module],
    inputs: Mapping[str, tuple[int, ...]],
    outputs: Sequence[str],
) -> ZooModel:
    _require_torch()
    module = factory()
    raw = _export(module, inputs, outputs)
    model = onnx.load_from_string(raw)
    _canonicalize(model, name, description)
    _validate(model, name)
    return ZooModel(
        name=name,
        onnx_bytes=model.SerializeToString(),
        description=description,
        torch_factory=factory,
    )


def _export(
    module: torch.nn.Module, inputs: Mapping[str, tuple[int, ...]], outputs: Sequence[str]
) -> bytes:
    """Export with the legacy TorchScript exporter (offline, opset 17, constant folding).

    ``training=PRESERVE`` keeps BatchNormalization as a node (the eval-mode exporter would fold
    it into the preceding Conv); the module is in eval mode, so the node has training_mode=0.
    """
    import torch

    args = tuple(torch.zeros(shape, dtype=torch.float32) for shape in inputs.values())
    try:
        with tempfile.TemporaryDirectory(prefix="refute-zoo-") as tmp, warnings.catch_warnings():
            path = Path(tmp) / "model.onnx"
            # The legacy exporter warns that it is deprecated; it is what works offline here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                path,
                dynamo=False,
                opset_version=OPSET,
                input_names=list(inputs),
                output_names=list(outputs),
                do_constant_folding=True,
                export_params=True,
                keep_initializers_as_inputs=False,
                training=torch.onnx.TrainingMode.PRESERVE,
            )
            return path.read_bytes()
    except Exception as exc:
        raise RefuteError(f"torch.onnx.export failed: {exc}") from exc


def _canonicalize(model: onnx.ModelProto, name: str, description: str) -> None:
    """Fix everything that is not the computation itself, in place."""
    model.producer_name = PRODUCER
    model.producer_version = ZOO_VERSION
    model.domain = ""
    model.model_version = 0
    model.doc_string = description
    del model.metadata_props[:]
    graph = model.graph
    graph.name = name
    graph.doc_string = ""
    for collection in (graph.input, graph.output, graph.value_info):
        for vi in collection:
            vi.doc_string = ""
    for tensor in graph.initializer:
        tensor.doc_string = ""
    initializers = {t.name: t for t in graph.initializer}
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        node.doc_string = ""
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
        for attr in node.attribute:
            attr.doc_string = ""
        if node.op_type == "Conv":
            weight = initializers.get(node.input[1])
            if weight is None:
                raise RefuteError(f"{name}: Conv {node.name!r} has no constant weight")
            _explicit_window_attrs(node, tuple(weight.dims[2:]), conv=True)
        elif node.op_type in {"MaxPool", "AveragePool"}:
            kernel = next(a for a in node.attribute if a.name == "kernel_shape").ints
            _explicit_window_attrs(node, tuple(kernel), conv=False)


def _explicit_window_attrs(node: onnx.NodeProto, kernel: tuple[int, ...], *, conv: bool) -> None:
    """Add ``kernel_shape``/``strides``/``pads`` (and ``dilations``/``group`` for Conv)."""
    rank = len(kernel)
    defaults: dict[str, int | list[int]] = {
        "kernel_shape": list(kernel),
        "strides": [1] * rank,
        "pads": [0] * (2 * rank),
    }
    if conv:
        defaults["dilations"] = [1] * rank
        defaults["group"] = 1
    present = {a.name for a in node.attribute}
    if "auto_pad" in present:
        auto_pad = next(a for a in node.attribute if a.name == "auto_pad").s
        if auto_pad not in (b"", b"NOTSET"):
            raise RefuteError(f"{node.name}: auto_pad={auto_pad!r} is not supported in the zoo")
    for key, value in defaults.items():
        if key not in present:
            node.attribute.append(helper.make_attribute(key, value))
    ordered = sorted(node.attribute, key=lambda a: a.name)
    del node.attribute[:]
    node.attribute.extend(ordered)


def _validate(model: onnx.ModelProto, name: str) -> None:
    """Refuse (as a bug in the zoo) anything outside the zoo's contract."""
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    if opsets != {"": OPSET}:
        raise RefuteError(f"{name}: unexpected opset imports {opsets}")
    graph = model.graph
    bad_ops = sorted({n.op_type for n in graph.node if n.domain or n.op_type not in ZOO_OPS})
    if bad_ops:
        raise RefuteError(f"{name}: exporter emitted operators outside the zoo set: {bad_ops}")
    for node in graph.node:
        if node.op_type == "Conv" and not any(a.name == "strides" for a in node.attribute):
            raise RefuteError(f"{name}: Conv {node.name!r} has no strides")
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise RefuteError(f"{name}: node {node.name!r} has a subgraph")
    for tensor in graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            raise RefuteError(f"{name}: initializer {tensor.name!r} uses external data")
    for vi in (*graph.input, *graph.output):
        tensor_type = vi.type.tensor_type
        if tensor_type.elem_type != TensorProto.FLOAT:
            raise RefuteError(f"{name}: {vi.name!r} is not float32")
        dims = tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") or d.dim_value < 1 for d in dims):
            raise RefuteError(f"{name}: {vi.name!r} does not have a static shape")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise RefuteError(f"{name}: ONNX checker failed: {exc}") from exc
