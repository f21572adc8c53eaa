"""Safe loading of untrusted ONNX models.

A model registered by a network is hostile until proven otherwise. :func:`load_model` reads it
from bytes or from one file path and refuses, with a typed :class:`~refute.errors.ModelRejected`
and a one-line reason, anything that could make the service read other files, allocate
unbounded memory, run code paths we do not re-execute deterministically, or produce shapes we
cannot commit to:

1. size limits are checked before parsing (a path is ``stat``-ed, and only that file is opened);
2. the protobuf is parsed without ever resolving external data;
3. every tensor (initializers and constant attributes) is checked: no external data, declared
   element count within limits, declared length consistent with the payload;
4. operators must be in :data:`ALLOWED_OPS` of the default domain; no subgraphs, functions or
   sparse tensors; the default-domain opset must lie in ``[min_opset, max_opset]``;
5. the graph must be well formed (every name produced once, no dangling inputs, acyclic);
6. input shapes must be static, or pinned by the caller (``shapes`` by input, ``dims`` by
   symbolic dimension name); shapes are then inferred for every tensor and bounded;
7. every float constant is finite and small enough for a circuit
   (:attr:`LoadLimits.max_abs_value`);
8. constant folding is bounded before it runs: each folded tensor's size comes from the inferred
   shapes and counts against :attr:`LoadLimits.max_folded_bytes`, and the folding work against
   :attr:`LoadLimits.max_fold_work`; nothing is materialized before its size is checked;
9. the work of one run of the model (multiply-accumulates, from the shapes) is bounded by
   :attr:`LoadLimits.max_model_work`, before anything executes it.

Cheap checks come first: sizes before parsing, declared sizes before decoding, values before
shape inference, inferred sizes before folding.

The result is a *canonical* model: nodes in a stable topological order, ``Constant`` nodes turned
into initializers, nodes whose inputs are all constant folded, every tensor's shape recorded.
Segmentation, execution and commitments all work on that canonical form.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import AttributeProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from refute.errors import (
    ExternalDataRefused,
    InvalidGraph,
    ModelDecodeError,
    ModelRejected,
    ModelTooLarge,
    ShapeError,
    UnsupportedOperator,
    UnsupportedOpset,
)
from refute.operators import ALLOWED_OPS, FOLD_ONLY_OPS
from refute.pinning import Pin, pin_input_shapes
from refute.quantize import MAX_QUANTIZED, MAX_SCALE
from refute.rewrites import faithful_rewrites
from refute.rewrites import node_label as _node_name

__all__ = ["ALLOWED_OPS", "LoadLimits", "LoadedModel", "Pin", "TensorSpec", "load_model",
           "serialize"]

#: Element types a tensor may have, with their size in bytes.
_ITEM_SIZE: dict[int, int] = {
    TensorProto.FLOAT: 4,
    TensorProto.DOUBLE: 8,
    TensorProto.INT64: 8,
    TensorProto.INT32: 4,
    TensorProto.BOOL: 1,
    TensorProto.INT8: 1,
    TensorProto.UINT8: 1,
    TensorProto.INT16: 2,
    TensorProto.UINT16: 2,
}

#: Which repeated field holds the values of a tensor of that type when ``raw_data`` is empty.
_TYPED_FIELD: dict[int, str] = {
    TensorProto.FLOAT: "float_data",
    TensorProto.DOUBLE: "double_data",
    TensorProto.INT64: "int64_data",
    TensorProto.INT32: "int32_data",
    TensorProto.BOOL: "int32_data",
    TensorProto.INT8: "int32_data",
    TensorProto.UINT8: "int32_data",
    TensorProto.INT16: "int32_data",
    TensorProto.UINT16: "int32_data",
}

#: Element types a graph input or output may have besides float32. refute commits float32
#: states, so such a tensor is carried as float32 at the model's boundary (the same values,
#: exact up to 2^24) and cast to or from its declared type by a ``Cast`` node.
_BOUNDARY_TYPES: frozenset[int] = frozenset(
    {TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32, TensorProto.INT16,
     TensorProto.UINT16, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL}
)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_MIN_IR_VERSION = 4


@dataclass(frozen=True)
class LoadLimits:
    """Resource limits applied while loading a model. All are inclusive maxima."""

    max_file_bytes: int = 64 * 2**20
    max_nodes: int = 4096
    #: Sum over all initializers and constant tensors, as declared by their dims.
    max_initializer_bytes: int = 256 * 2**20
    #: Any single tensor: initializer, constant, graph input or inferred intermediate.
    max_tensor_elements: int = 2**24
    min_opset: int = 9
    max_opset: int = 18
    #: Largest magnitude of a float constant (weights, constants, folded values). A value
    #: must stay representable in the circuit at every supported scale: its fixed-point form
    #: ``round(v · 2^MAX_SCALE)`` must stay below :data:`~refute.quantize.MAX_QUANTIZED`, so
    #: ``|v| < 2^62 / 2^30 = 2^32`` (≈ 4.3e9). NaN and infinities are always refused.
    max_abs_value: float = float(MAX_QUANTIZED / 2**MAX_SCALE)
    #: Sum of the sizes (from the inferred shapes) of all tensors produced by constant folding.
    max_folded_bytes: int = 64 * 2**20
    #: Work of constant folding: multiply-accumulates of MatMul/Gemm/Conv, output elements of
    #: other operators, summed over every folded node.
    max_fold_work: int = 2**25
    #: Work of one run of the whole model, counted the same way from the inferred shapes. The
    #: service runs every model many times at registration (reproduction checks, calibration)
    #: and in every spot-check; 2**32 is thousands of times the largest reference model.
    max_model_work: int = 2**32


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and static shape of one tensor of the graph."""

    name: str
    elem_type: int
    shape: tuple[int, ...]
    #: For a model input declared integer or boolean and carried as float32: the declared ONNX
    #: type. Its values are whole numbers, committed and proven at scale 0 (as EZKL takes an
    #: integer input), not at the model's scale.
    declared: int | None = None

    @property
    def whole(self) -> bool:
        """Whether the tensor holds whole numbers committed at scale 0 (:attr:`declared`)."""
        return self.declared is not None

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def dtype(self) -> np.dtype[np.generic]:
        """The numpy dtype of the tensor."""
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    def to_json(self) -> dict[str, object]:
        """JSON form: ``{"name", "dtype", "shape"}``, and ``"declared"`` (the declared numpy
        type name) for a whole-number input."""
        data: dict[str, object] = {"name": self.name, "dtype": self.dtype.name,
                                   "shape": list(self.shape)}
        if self.declared is not None:
            data["declared"] = np.dtype(helper.tensor_dtype_to_np_dtype(self.declared)).name
        return data


@dataclass(frozen=True)
class LoadedModel:
    """A model that passed every check, in canonical form with static shapes."""

    model: ModelProto
    #: sha256 (hex) of the bytes as submitted: the model's identity.
    sha256: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    #: Every non-constant tensor of the graph (inputs, intermediates, outputs) by name.
    tensors: Mapping[str, TensorSpec]
    #: Names of initializers (weights and folded constants): never part of a state.
    constants: frozenset[str] = field(default_factory=frozenset)
    #: The symbolic input dimensions pinned while loading, with where each value came from.
    pins: tuple[Pin, ...] = ()
    #: Inputs declared with a non-float element type (carried as float32): name → ONNX type.
    integral_inputs: Mapping[str, int] = field(default_factory=dict)
    #: How many nodes constant folding replaced by constants (shape computations included).
    folded_nodes: int = 0

    @functools.cached_property
    def onnx_bytes(self) -> bytes:
        """The canonical model, serialized deterministically."""
        return serialize(self.model)

    @functools.cached_property
    def canonical_sha256(self) -> str:
        """sha256 (hex) of :attr:`onnx_bytes`."""
        return hashlib.sha256(self.onnx_bytes).hexdigest()

    @property
    def nodes(self) -> Sequence[NodeProto]:
        """Nodes in canonical (stable topological) order."""
        nodes: Sequence[NodeProto] = self.model.graph.node
        return nodes

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the graph inputs, in graph order."""
        return tuple(self.tensors[n] for n in self.input_names)

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the graph outputs, in graph order."""
        return tuple(self.tensors[n] for n in self.output_names)


def load_model(
    source: bytes | str | os.PathLike[str],
    *,
    limits: LoadLimits | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    input_sizes: Sequence[int] | None = None,
) -> LoadedModel:
    """Load an untrusted ONNX model from bytes or a file path, refusing anything unsafe.

    Symbolic input dimensions are pinned (:mod:`refute.pinning`): ``shapes`` pins whole input
    shapes by input name and ``dims`` symbolic dimensions by their ``dim_param`` name (e.g.
    ``{"batch_size": 1}``); ``input_sizes``, the element counts of an input file (one per input,
    in graph order), fix what those leave open; ``batch_size`` and a leading dimension default
    to 1. Raises a subclass of :class:`~refute.errors.ModelRejected` with a one-line reason on
    any refusal.
    """
    limits = limits or LoadLimits()
    data = _read_source(source, limits)
    digest = hashlib.sha256(data).hexdigest()
    model = _parse(data)
    _check_header(model, limits)
    opset = default_opset(model)
    _check_tensors(model, limits)
    _check_nodes(model, limits)
    _drop_foreign_imports(model)
    _topological_sort(model)
    pins = pin_input_shapes(model, shapes=shapes or {}, dims=dims or {}, sizes=input_sizes,
                            max_elements=limits.max_tensor_elements)
    integral = _float_boundaries(model)
    _constants_to_initializers(model)
    _check_values(model, limits)
    # What is known before anything is folded is checked first: outputs that depend on no
    # input, and the work of one run as far as the shapes are known already.
    _refuse_constant_outputs(model)
    inferred = _infer_shapes(model, limits, partial=True)
    _check_model_work(model, inferred, limits)
    folded = _fold_to_fixpoint(model, limits, inferred)
    _drop_unused_initializers(model)
    _refuse_unfolded(model)
    tensors = _infer_shapes(model, limits)
    if faithful_rewrites(model, tensors):
        tensors = _infer_shapes(model, limits)
    tensors = {**tensors, **{name: dataclasses.replace(tensors[name], declared=declared)
                             for name, declared in integral.items() if _whole_type(declared)}}
    _explicit_reduce_axes(model, tensors, opset)
    _explicit_strides(model, tensors)
    _check_model_work(model, tensors, limits)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidGraph(f"model fails the ONNX checker: {_first_line(exc)}") from exc
    inputs = tuple(i.name for i in model.graph.input)
    return LoadedModel(
        model=model,
        sha256=digest,
        opset=opset,
        input_names=inputs,
        output_names=tuple(o.name for o in model.graph.output),
        tensors=tensors,
        constants=frozenset(t.name for t in model.graph.initializer),
        pins=pins,
        integral_inputs=integral,
        folded_nodes=folded,
    )


def serialize(model: ModelProto) -> bytes:
    """Deterministic protobuf serialization (map fields sorted)."""
    return bytes(model.SerializeToString(deterministic=True))


# --- reading and parsing -------------------------------------------------------------------


def _read_source(source: bytes | str | os.PathLike[str], limits: LoadLimits) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        _check_file_size(len(data), limits)
        return data
    path = Path(source)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelRejected(f"cannot read model file {path}: {exc.strerror}") from exc
    _check_file_size(size, limits)
    try:
        with path.open("rb") as handle:
            data = handle.read(limits.max_file_bytes + 1)
    except OSError as exc:
        raise ModelRejected(f"cannot read model file {path}: {exc.strerror}") from exc
    _check_file_size(len(data), limits)
    return data


def _check_file_size(size: int, limits: LoadLimits) -> None:
    if size > limits.max_file_bytes:
        raise ModelTooLarge(f"model is {size} bytes, over the limit of {limits.max_file_bytes}")
    if size == 0:
        raise ModelDecodeError("model is empty (0 bytes)")


def _parse(data: bytes) -> ModelProto:
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelDecodeError(f"not a valid ONNX protobuf: {_first_line(exc)}") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise ModelDecodeError("not an ONNX model: it has no graph or no nodes")
    _check_text(model, "model")
    return model


def _check_text(message: Message, where: str) -> None:
    """Refuse a string field that is not UTF-8 (ONNX is proto2: the parser lets it through
    as bytes, and the checker and onnxruntime then fail on it with an untyped error)."""
    for descriptor, value in message.ListFields():
        inner = f"{where}.{descriptor.name}"
        repeated = descriptor.is_repeated
        if descriptor.type == FieldDescriptor.TYPE_STRING:
            for text in value if repeated else (value,):
                if not isinstance(text, str):
                    raise ModelDecodeError(f"{inner} is not UTF-8 text: {bytes(text)[:40]!r}")
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            for index, item in enumerate(value if repeated else (value,)):
                _check_text(item, f"{inner}[{index}]" if repeated else inner)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


# --- header, tensors and nodes -------------------------------------------------------------


def _check_header(model: ModelProto, limits: LoadLimits) -> None:
    if not _MIN_IR_VERSION <= model.ir_version <= onnx.IR_VERSION:
        raise UnsupportedOpset(
            f"IR version {model.ir_version} is outside {_MIN_IR_VERSION}..{onnx.IR_VERSION}"
        )
    if model.functions:
        raise UnsupportedOperator("model-local functions are not supported")
    if model.training_info:
        raise UnsupportedOperator("training information (graphs) is not supported")
    graph = model.graph
    if graph.sparse_initializer:
        raise UnsupportedOperator("sparse initializers are not supported")
    if len(graph.node) > limits.max_nodes:
        raise ModelTooLarge(
            f"graph has {len(graph.node)} nodes, over the limit of {limits.max_nodes}"
        )
    opset = default_opset(model)
    if not limits.min_opset <= opset <= limits.max_opset:
        raise UnsupportedOpset(
            f"opset {opset} is outside the supported range {limits.min_opset}..{limits.max_opset}"
        )


def default_opset(model: ModelProto) -> int:
    """The version of the default-domain (ai.onnx) opset ``model`` imports; refused when it
    imports none or more than one."""
    versions = [imp.version for imp in model.opset_import if imp.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise UnsupportedOpset("model imports no default-domain (ai.onnx) opset")
    if len(set(versions)) > 1:
        raise UnsupportedOpset("model imports the default domain more than once")
    return int(versions[0])


def _type_name(elem_type: int) -> str:
    """The ONNX name of an element type, or its number if it has none."""
    if elem_type in TensorProto.DataType.values():
        return str(TensorProto.DataType.Name(elem_type))
    return str(elem_type)


def _attribute_tensors(node: NodeProto) -> Iterable[tuple[str, TensorProto]]:
    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR:
            yield f"{node.op_type} node {_node_name(node)}", attr.t
        for tensor in attr.tensors:
            yield f"{node.op_type} node {_node_name(node)}", tensor


def _check_tensors(model: ModelProto, limits: LoadLimits) -> None:
    """Refuse external data first (before anything could resolve it), then sizes and lengths."""
    tensors: list[tuple[str, TensorProto]] = [
        (f"initializer {t.name!r}", t) for t in model.graph.initializer
    ]
    for node in model.graph.node:
        tensors.extend(_attribute_tensors(node))
    for where, tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            detail = f" at {location!r}" if location is not None else ""
            raise ExternalDataRefused(f"{where} refers to external data{detail}")
    total_bytes = 0
    for where, tensor in tensors:
        total_bytes += _check_tensor_payload(where, tensor, limits)
        if total_bytes > limits.max_initializer_bytes:
            raise ModelTooLarge(
                f"constant tensors exceed {limits.max_initializer_bytes} bytes in total"
            )


def _check_tensor_payload(where: str, tensor: TensorProto, limits: LoadLimits) -> int:
    """Check one tensor's declared size against limits and its payload; return its byte size."""
    if any(d < 0 for d in tensor.dims):
        raise ModelDecodeError(f"{where} has a negative dimension {list(tensor.dims)}")
    count = int(math.prod(tensor.dims))
    if count > limits.max_tensor_elements:
        raise ModelTooLarge(
            f"{where} declares {count} elements, over the limit of {limits.max_tensor_elements}"
        )
    item = _ITEM_SIZE.get(tensor.data_type)
    if item is None:
        raise UnsupportedOperator(
            f"{where} has unsupported element type {_type_name(tensor.data_type)}")
    nbytes: int = count * item
    if tensor.raw_data:
        if len(tensor.raw_data) != nbytes:
            raise ModelDecodeError(
                f"{where} declares {count} elements but carries {len(tensor.raw_data)} bytes"
            )
    else:
        stored = len(getattr(tensor, _TYPED_FIELD[tensor.data_type]))
        if stored != count:
            raise ModelDecodeError(f"{where} declares {count} elements but carries {stored}")
    return nbytes


def _check_nodes(model: ModelProto, limits: LoadLimits) -> None:
    graph = model.graph
    for node in graph.node:
        label = f"node {_node_name(node)}"
        if not any(node.output):
            raise InvalidGraph(f"{label} ({node.op_type}) has no outputs")
        if node.domain not in _DEFAULT_DOMAINS:
            raise UnsupportedOperator(f"{label} uses operator {node.op_type!r} of domain "
                                      f"{node.domain!r}; only the default ONNX domain is accepted")
        if node.op_type not in ALLOWED_OPS and node.op_type not in FOLD_ONLY_OPS:
            raise UnsupportedOperator(
                f"{label} uses operator {node.op_type!r}, not in the allowlist"
            )
        for attr in node.attribute:
            if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) or attr.HasField("g"):
                raise UnsupportedOperator(f"{label} carries a subgraph (attribute {attr.name!r})")
            if attr.type in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS):
                raise UnsupportedOperator(f"{label} carries a sparse tensor attribute")
            if attr.ref_attr_name:
                raise UnsupportedOperator(f"{label} refers to a function attribute")
    initializers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if not inputs:
        raise InvalidGraph("graph has no inputs besides its weights")
    for value in graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        if not value.type.HasField("tensor_type") or (
            elem != TensorProto.FLOAT and elem not in _BOUNDARY_TYPES
        ):
            kind = _type_name(elem) if value.type.HasField("tensor_type") else "?"
            raise UnsupportedOperator(
                f"graph input {value.name!r} is of type {kind}; inputs must be float, double, "
                "integer or bool tensors"
            )
    produced: set[str] = set(initializers) | set(inputs)
    if len(produced) != len(initializers) + len(inputs) or len(set(inputs)) != len(inputs):
        raise InvalidGraph("a graph input shares its name with a weight or another input")
    for node in graph.node:
        for name in node.output:
            if not name:
                continue
            if name in produced:
                raise InvalidGraph(f"tensor {name!r} is produced more than once")
            produced.add(name)
    for node in graph.node:
        for name in node.input:
            if name and name not in produced:
                raise InvalidGraph(f"node input {name!r} is never produced")
    outputs = [o.name for o in graph.output]
    if len(set(outputs)) != len(outputs):
        raise InvalidGraph("a graph output is listed twice")
    for name in outputs:
        if name not in produced:
            raise InvalidGraph(f"graph output {name!r} is never produced")
        if name in inputs or name in initializers:
            raise InvalidGraph(f"graph output {name!r} is a graph input or weight, not computed")


def _topological_sort(model: ModelProto) -> None:
    """Reorder nodes topologically, stably (ties by original position); refuse cycles."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {name: i for i, n in enumerate(nodes) for name in n.output if name}
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    pending = [len(ds) for ds in deps]
    ready = sorted(i for i, p in enumerate(pending) if p == 0)
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise InvalidGraph("graph has a cycle")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


# --- shapes --------------------------------------------------------------------------------


def _infer_shapes(
    model: ModelProto, limits: LoadLimits, *, partial: bool = False
) -> dict[str, TensorSpec]:
    """Infer every tensor's static shape; record them in ``value_info`` and the outputs.

    ``partial`` leaves out (instead of refusing) tensors whose shape is not static yet: while
    shape computations are still being folded, a shape may depend on one not folded yet."""
    graph = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ShapeError(f"shape inference failed: {_first_line(exc)}") from exc
    except Exception as exc:  # onnx raises bare RuntimeErrors for some malformed graphs
        raise ShapeError(f"shape inference failed: {_first_line(exc)}") from exc
    known: dict[str, TensorSpec] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.name in known:
            continue
        ttype = value.type.tensor_type
        # While folding, an empty tensor (a dimension of 0, e.g. a slice of a shape) is
        # static too: it can fold. Every tensor left in the model must be non-empty.
        static = ttype.HasField("shape") and all(
            d.HasField("dim_value") and d.dim_value >= (0 if partial else 1)
            for d in ttype.shape.dim
        )
        if partial and (not static or ttype.elem_type == TensorProto.UNDEFINED):
            continue
        if not static:
            raise ShapeError(f"tensor {value.name!r} has no static shape after inference")
        shape = [d.dim_value for d in ttype.shape.dim]
        if not ttype.HasField("shape"):
            raise ShapeError(f"tensor {value.name!r} has no inferred shape")
        if ttype.elem_type == TensorProto.UNDEFINED:
            raise ShapeError(f"tensor {value.name!r} has no inferred element type")
        spec = TensorSpec(value.name, ttype.elem_type, tuple(shape))
        if spec.size > limits.max_tensor_elements:
            raise ModelTooLarge(
                f"tensor {value.name!r} of shape {list(shape)} has {spec.size} elements, over "
                f"the limit of {limits.max_tensor_elements}"
            )
        known[value.name] = spec
    initializers = {t.name for t in graph.initializer}
    for node in graph.node:
        for name in node.output:
            if name and name not in known and not partial:
                raise ShapeError(f"tensor {name!r} has no inferred shape")
    for name in [*(i.name for i in graph.input), *(o.name for o in graph.output)]:
        if name not in known and name not in initializers and not partial:
            raise ShapeError(f"tensor {name!r} has no inferred shape")
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)
    del graph.output[:]
    graph.output.extend(inferred.graph.output)
    return {k: v for k, v in known.items() if k not in initializers}


# --- canonicalization ----------------------------------------------------------------------


def _constants_to_initializers(model: ModelProto) -> None:
    graph = model.graph
    kept: list[NodeProto] = []
    for node in graph.node:
        if node.op_type != "Constant":
            kept.append(node)
            continue
        if len(node.attribute) != 1:
            raise InvalidGraph(f"Constant node {node.output[0]!r} must have exactly one value")
        attr = node.attribute[0]
        try:
            value = _constant_value(attr)
        except ValueError as exc:
            raise UnsupportedOperator(f"Constant node {node.output[0]!r}: {exc}") from exc
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)


def _constant_value(attr: AttributeProto) -> np.ndarray:
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    raise ValueError(f"value attribute {attr.name!r} is not supported")


def _check_values(model: ModelProto, limits: LoadLimits) -> None:
    """Refuse float constants that are NaN, infinite or beyond ``limits.max_abs_value``."""
    for tensor in model.graph.initializer:
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
            _check_finite(f"initializer {tensor.name!r}"[:100], numpy_helper.to_array(tensor),
                          limits)


def _check_finite(where: str, array: np.ndarray, limits: LoadLimits) -> None:
    if array.dtype.kind != "f" or array.size == 0:
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = array[~finite]
        what = "NaN" if np.isnan(bad).any() else "an infinite value"
        raise ModelRejected(f"{where} holds {what}: weights must be finite")
    peak = float(np.max(np.abs(array)))
    if peak > limits.max_abs_value:
        raise ModelRejected(
            f"{where} holds {peak:.3g}, beyond the largest magnitude {limits.max_abs_value:.3g} "
            "a circuit can represent"
        )


def _fold_work(node: NodeProto, inputs: Sequence[tuple[int, ...]],
               outputs: Sequence[TensorSpec]) -> int:
    """Work of folding ``node`` (input shapes given): multiply-accumulates of contractions,
    else output plus input elements."""
    out_elements = sum(spec.size for spec in outputs)
    if node.op_type in ("MatMul", "Gemm") and inputs and inputs[0]:
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        first = inputs[0]
        inner = first[-2] if trans_a and len(first) >= 2 else first[-1]
        return out_elements * max(1, inner)
    if node.op_type == "Conv" and len(inputs) > 1:
        return out_elements * max(1, math.prod(inputs[1][1:]))
    if node.op_type in ("AveragePool", "MaxPool"):
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
        return out_elements * max(1, int(math.prod(kernel)))
    return out_elements + sum(math.prod(shape) for shape in inputs)


def _check_model_work(
    model: ModelProto, tensors: Mapping[str, TensorSpec], limits: LoadLimits
) -> None:
    """Refuse a model whose one run would take more than ``limits.max_model_work``."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes.update({name: spec.shape for name, spec in tensors.items()})
    work = 0
    for node in model.graph.node:
        outputs = [tensors[o] for o in node.output if o in tensors]
        work += _fold_work(node, [shapes.get(x, ()) for x in node.input if x], outputs)
        if work > limits.max_model_work:
            raise ModelTooLarge(
                f"one run of the model would take over {limits.max_model_work} operations "
                f"(reached at {node.op_type} node {_node_name(node)})"
            )


def _fold_plan(
    model: ModelProto, limits: LoadLimits, shapes: Mapping[str, TensorSpec]
) -> tuple[list[tuple[NodeProto, list[TensorSpec]]], int, int]:
    """The nodes constant folding would evaluate (those whose inputs are constant and whose
    results have a static inferred shape), with their results' specs, the bytes of the results
    and the work; refuse (before anything is computed) if they exceed the limits."""
    known: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in model.graph.initializer}
    plan: list[tuple[NodeProto, list[TensorSpec]]] = []
    folded_bytes = 0
    work = 0
    for node in model.graph.node:
        inputs = [x for x in node.input if x]
        if not inputs or any(x not in known for x in inputs):
            continue
        label = f"{node.op_type} node {_node_name(node)}"
        outputs = [o for o in node.output if o]
        if node.op_type == "NonZero" and outputs[0] not in shapes:
            # Its shape depends on the values: planned at its largest, [rank, elements].
            data = known[inputs[0]]
            shapes = {**shapes, outputs[0]: TensorSpec(
                outputs[0], TensorProto.INT64, (len(data), math.prod(data)))}
        if any(o not in shapes for o in outputs):
            continue  # its shape depends on a computation not folded yet: a later round
        specs = []
        for name in outputs:
            spec = shapes[name]
            folded_bytes += spec.size * spec.dtype.itemsize
            if spec.size > limits.max_tensor_elements or folded_bytes > limits.max_folded_bytes:
                raise ModelTooLarge(
                    f"folding {label} would exceed {limits.max_folded_bytes} bytes of constants "
                    f"(its result {name!r} has shape {list(spec.shape)})"
                )
            known[name] = spec.shape
            specs.append(spec)
        work += _fold_work(node, [known[x] for x in inputs], specs)
        if work > limits.max_fold_work:
            raise ModelTooLarge(
                f"folding constants would take over {limits.max_fold_work} operations "
                f"(at {label})"
            )
        plan.append((node, specs))
    return plan, folded_bytes, work


def _fold_constants(
    model: ModelProto, limits: LoadLimits, shapes: Mapping[str, TensorSpec]
) -> tuple[int, int, int]:
    """Replace nodes whose inputs are all constant by the initializers they compute.

    The whole plan is bounded first (:func:`_fold_plan`: each result's size from the inferred
    ``shapes``, per tensor and in total, and the work); each result must then have exactly the
    inferred shape and be finite and within :attr:`LoadLimits.max_abs_value`.
    """
    plan, folded_bytes, work = _fold_plan(model, limits, shapes)
    if not plan:
        return 0, 0, 0
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in values:
            values[name] = numpy_helper.to_array(stored[name])
        return values[name]

    folded_nodes = {id(node) for node, _specs in plan}
    folded: list[str] = []
    for node, specs in plan:
        inputs = [x for x in node.input if x]
        outputs = [o for o in node.output if o]
        arrays = [value(x) for x in inputs]
        sub = helper.make_model(
            helper.make_graph(
                [node],
                "fold",
                [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(a.dtype),
                                               a.shape)
                 for x, a in zip(inputs, arrays, strict=True)],
                [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
            ),
            opset_imports=list(model.opset_import),
            ir_version=model.ir_version,
        )
        label = f"{node.op_type} node {_node_name(node)}"
        try:
            results = ReferenceEvaluator(sub).run(None, dict(zip(inputs, arrays, strict=True)))
        except Exception as exc:  # the reference evaluator raises many exception types
            raise InvalidGraph(f"cannot fold constant {label}: {_first_line(exc)}") from exc
        for name, spec, result in zip(outputs, specs, results, strict=True):
            array = np.asarray(result)
            # A NonZero was planned at its largest shape: any smaller count fits the plan.
            within = (node.op_type == "NonZero" and array.ndim == 2
                      and array.shape[0] == spec.shape[0] and array.shape[1] <= spec.shape[1])
            if (array.shape != spec.shape and not within) or array.dtype != spec.dtype:
                raise ShapeError(
                    f"folded constant {name!r} has shape {list(array.shape)} ({array.dtype}), "
                    f"inferred {list(spec.shape)} ({spec.dtype})"
                )
            _check_finite(f"folded constant {name!r}"[:100], array, limits)
            values[name] = array
            folded.append(name)
    kept = [node for node in graph.node if id(node) not in folded_nodes]
    for name in folded:
        graph.initializer.append(numpy_helper.from_array(values[name], name))
    del graph.node[:]
    graph.node.extend(kept)
    return len(plan), folded_bytes, work


def _fold_to_fixpoint(
    model: ModelProto, limits: LoadLimits, inferred: Mapping[str, TensorSpec]
) -> int:
    """Fold shape reads and constant nodes, round after round, until nothing folds; return how
    many nodes were folded.

    Each round infers the shapes it can first (a shape computation folded in one round fixes
    the shapes the next one needs), so every folded tensor is bounded by its inferred size
    before it is computed (:func:`_fold_plan`). The rounds are bounded by the node count, which
    every round that continues reduces; the limits on folded bytes and work hold over all of
    them together (:attr:`LoadLimits.max_folded_bytes`, :attr:`LoadLimits.max_fold_work`).
    ``inferred`` are the shapes of the model as it is (the first round's).
    """
    folded = 0
    budget = limits
    while True:
        before = len(model.graph.node)
        reads = _fold_shape_reads(model, inferred)
        computed, spent_bytes, spent_work = _fold_constants(model, budget, inferred)
        budget = dataclasses.replace(
            budget, max_folded_bytes=budget.max_folded_bytes - spent_bytes,
            max_fold_work=budget.max_fold_work - spent_work,
        )
        folded += reads + computed
        # A folded tensor is an initializer now: what inference said of it before (a shape
        # with unknown dimensions, for a NonZero) must not stand in for its value's shape.
        constants = {t.name for t in model.graph.initializer}
        stale = [v for v in model.graph.value_info if v.name in constants]
        for value in stale:
            model.graph.value_info.remove(value)
        if len(model.graph.node) == before:
            return folded
        inferred = _infer_shapes(model, limits, partial=True)


def _fold_shape_reads(model: ModelProto, shapes: Mapping[str, TensorSpec]) -> int:
    """Replace ``Shape`` and ``Size`` nodes by the constants they read from the (static,
    inferred) ``shapes``; the shape computations fed by them then fold like any constant
    (:func:`_fold_constants`). Returns how many nodes were replaced."""
    graph = model.graph
    kept: list[NodeProto] = []
    replaced = 0
    for node in graph.node:
        spec = shapes.get(node.input[0]) if node.input else None
        if node.op_type not in ("Shape", "Size") or spec is None:
            kept.append(node)
            continue
        if node.op_type == "Size":
            value = np.array(spec.size, dtype=np.int64)
        else:
            attrs = {a.name: a.i for a in node.attribute}
            rank = len(spec.shape)
            start, end = attrs.get("start", 0), attrs.get("end", rank)
            value = np.array(spec.shape[slice(start, end)], dtype=np.int64)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        replaced += 1
    del graph.node[:]
    graph.node.extend(kept)
    return replaced


def _refuse_unfolded(model: ModelProto) -> None:
    """Refuse a shape operator that did not fold into a constant: refute proves only the
    computation on values, so every shape computation must be fixed once inputs are pinned."""
    for node in model.graph.node:
        if node.op_type in FOLD_ONLY_OPS:
            raise UnsupportedOperator(
                f"node {_node_name(node)} ({node.op_type}) depends on the model's input values; "
                f"{node.op_type} is accepted only where it folds to a constant once the input "
                "shapes are pinned"
            )


#: Reductions whose missing ``axes`` means "every axis" (unless ``noop_with_empty_axes``).
_REDUCTIONS = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
})


def _explicit_reduce_axes(
    model: ModelProto, tensors: Mapping[str, TensorSpec], opset: int
) -> None:
    """Write out the axes of a reduction over every axis.

    ONNX reads a reduction without ``axes`` as one over all axes. EZKL 23 does not: on such a
    ``ReduceMean`` it proves 0 (``python -m bench.probe_ezkl``: model ``1l_mean``). The
    canonical model names the axes, which means the same to ONNX Runtime.
    """
    graph = model.graph
    for node in graph.node:
        if node.op_type not in _REDUCTIONS or not node.input or node.input[0] not in tensors:
            continue
        attrs = {a.name: a for a in node.attribute}
        rank = len(tensors[node.input[0]].shape)
        as_input = opset >= 18 or (node.op_type == "ReduceSum" and opset >= 13)
        if as_input:
            if (len(node.input) > 1 and node.input[1]) or (
                "noop_with_empty_axes" in attrs and attrs["noop_with_empty_axes"].i
            ):
                continue
            name = f"{node.output[0]}/axes"
            graph.initializer.append(
                numpy_helper.from_array(np.arange(rank, dtype=np.int64), name))
            del node.input[1:]
            node.input.append(name)
        elif "axes" not in attrs:
            node.attribute.append(helper.make_attribute("axes", list(range(rank))))


#: Operators whose missing ``strides`` means 1 along every spatial axis.
_STRIDED = frozenset({"Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool"})


def _explicit_strides(model: ModelProto, tensors: Mapping[str, TensorSpec]) -> None:
    """Write out the default strides (1 per spatial axis) of convolutions and pools.

    EZKL 23 refuses a ``Conv`` without ``strides`` ("missing required params: stride");
    ONNX reads it as stride 1, and so does the canonical model, which now says so."""
    for node in model.graph.node:
        if node.op_type not in _STRIDED or not node.input or node.input[0] not in tensors:
            continue
        if any(a.name == "strides" for a in node.attribute):
            continue
        spatial = len(tensors[node.input[0]].shape) - 2
        if spatial > 0:
            node.attribute.append(helper.make_attribute("strides", [1] * spatial))


def _whole_type(elem_type: int) -> bool:
    """Whether an ONNX element type holds whole numbers (integers and booleans)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).kind in "iub"


def _drop_foreign_imports(model: ModelProto) -> None:
    """Drop opset imports of other domains: no node uses them (:func:`_check_nodes` refuses
    any node outside the default domain), and the canonical model imports only ``ai.onnx``."""
    kept = [imp for imp in model.opset_import if imp.domain in _DEFAULT_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _float_boundaries(model: ModelProto) -> dict[str, int]:
    """Carry non-float inputs and outputs as float32, with a ``Cast`` at the boundary.

    An integer, boolean or double input becomes a float32 input of the same name and shape,
    cast to its declared type before its first use; such an output is cast to float32. Returns
    the inputs changed, with their declared types.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    taken = {x for n in graph.node for x in [*n.input, *n.output]} | initializers
    taken |= {v.name for v in [*graph.input, *graph.output]}

    def fresh(base: str) -> str:
        name, n = base, 0
        while name in taken:
            n += 1
            name = f"{base}.{n}"
        taken.add(name)
        return name

    integral: dict[str, int] = {}
    head: list[NodeProto] = []
    for value in graph.input:
        ttype = value.type.tensor_type
        if value.name in initializers or ttype.elem_type == TensorProto.FLOAT:
            continue
        declared = ttype.elem_type
        typed = fresh(f"{value.name}/as_{TensorProto.DataType.Name(declared).lower()}")
        for node in graph.node:
            for k, x in enumerate(node.input):
                if x == value.name:
                    node.input[k] = typed
        for output in graph.output:
            if output.name == value.name:
                raise InvalidGraph(f"graph output {value.name!r} is a graph input, not computed")
        head.append(helper.make_node("Cast", [value.name], [typed], to=declared,
                                     name=fresh(f"cast_in/{value.name}")))
        ttype.elem_type = TensorProto.FLOAT
        integral[value.name] = declared
    tail: list[NodeProto] = []
    for output in graph.output:
        ttype = output.type.tensor_type
        if ttype.elem_type not in _BOUNDARY_TYPES:
            continue
        typed = fresh(f"{output.name}/typed")
        for node in graph.node:
            for k, x in enumerate(node.output):
                if x == output.name:
                    node.output[k] = typed
            for k, x in enumerate(node.input):
                if x == output.name:
                    node.input[k] = typed
        tail.append(helper.make_node("Cast", [typed], [output.name], to=TensorProto.FLOAT,
                                     name=fresh(f"cast_out/{output.name}")))
        ttype.elem_type = TensorProto.FLOAT
    if head or tail:
        nodes = [*head, *graph.node, *tail]
        del graph.node[:]
        graph.node.extend(nodes)
    return integral


def _constant_tensors(model: ModelProto) -> set[str]:
    """Every tensor that depends on no graph input (nodes are in topological order)."""
    graph = model.graph
    constant = {t.name for t in graph.initializer}
    for node in graph.node:
        if all(x in constant for x in node.input if x):
            constant.update(o for o in node.output if o)
    return constant


def _refuse_constant_outputs(model: ModelProto) -> None:
    """Refuse a graph output that depends on no input (before anything is folded, so folding
    never computes an output)."""
    constants = _constant_tensors(model)
    for output in model.graph.output:
        if output.name in constants:
            raise InvalidGraph(
                f"graph output {output.name!r} is computed from constants only, not from the "
                "inputs"
            )


def _drop_unused_initializers(model: ModelProto) -> None:
    """Drop weights nothing uses, and weights listed as graph inputs (IR < 4 style)."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Real inputs stay even when unused: state 0 is the model's inputs.
    inputs = [v for v in graph.input if v.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
