"""The adjudication graph of a segment (DESIGN.md "Adjudication circuit").

``A_i(x, y) = max over elements of |f_i(x) − y|`` where ``f_i`` is segment i, ``x`` is state i-1
and ``y`` the claimed state i. It is an ordinary ONNX graph built from the segment's own nodes:
its inputs are the tensors of x then the tensors of y, in state order (so that EZKL's hashed
input instances come out as ``Poseidon(x_1) … Poseidon(x_m), Poseidon(y_1) … Poseidon(y_n)``, the
words of leaves i-1 and i), and its single output is ``maxdiff`` of shape ``[1]``.

Inputs are renamed ``x<j>`` / ``y<j>`` (state order); internal tensors keep their names under a
``seg/`` prefix so that no user-chosen name can collide with ours. A scalar tensor of a state is
an input of shape ``[1]`` (EZKL takes no rank-0 input; the hash is over the same one value),
reshaped back to a scalar where the segment reads it. A model input of whole numbers (an integer
or boolean input, carried as float32 in the states) is an input of its declared type, so that
EZKL takes it at scale 0, exactly as its leaf commits it.

Every ``Softmax(x, axis=a)`` of the segment is copied in a guarded form,
``Softmax(Max(x − ReduceMax(x, a), −SOFTMAX_FLOOR), axis=a)`` (:func:`guarded_softmax`). EZKL
proves the exponential with a lookup table spanning every input it observed while calibrating,
and attention adds a causal mask of −1e4 (or ``finfo.min``, or −inf, in real exports) to the
masked scores: at scale 7 that is a table of about 1.3M entries, which alone needs 2^20 rows and
tens of GiB to prove. The guarded form computes the same function: softmax is unchanged by
subtracting a row's maximum, exactly, and clamping the shifted values at −SOFTMAX_FLOOR changes
each output by less than half a fixed-point step (:data:`SOFTMAX_FLOOR`). What it changes is the
range the exponential is looked up on: ``[−SOFTMAX_FLOOR·2^s, 0]``, a few thousand entries. The
row maximum and the clamp are comparisons, which EZKL proves with range checks, not with the
lookup table. The guard's own tensors are named ``softmax<k>/…`` (outside the ``seg/``
namespace the segment's names are moved into, so that nothing can collide with them); only an
adjudication graph with a Softmax changes (and so the circuits cached by its hash).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from refute.loading import TensorSpec, default_opset, serialize
from refute.segmentation import Segment, standalone_model

MAXDIFF = "maxdiff"

#: C of the guarded softmax: shifted scores below −C are raised to −C. The row's maximum
#: becomes 0, so a row's sum of exponentials is at least 1, and raising k entries from below −C
#: to −C changes each softmax output by less than ``(k + 1)·e^{−C}``. With C = 30 that is below
#: ``2^{-(12+1)}`` (half a step at :data:`prover.registration.MAX_SCALE`, the largest scale
#: registration tries) for rows of up to ``e^{30}·2^{-13} ≈ 1.3·10^9`` entries, and below float32
#: resolution of a probability for rows of up to 10^5 entries (``1e5·e^{−30} ≈ 10^{−8}``): the
#: guarded graph is the same function in floating point too. The exponential's lookup then spans
#: ``30·2^s`` values (3,840 at scale 7) instead of the whole range of the masked scores.
SOFTMAX_FLOOR = 30.0


def _renamer(segment: Segment) -> dict[str, str]:
    return {spec.name: f"x{j}/scalar" if not spec.shape else f"x{j}"
            for j, spec in enumerate(segment.inputs)}


def adjudication_model(segment: Segment) -> ModelProto:
    """The ONNX model ``A_i(x, y)`` for ``segment``."""
    source = onnx.load_model_from_string(segment.onnx_bytes)
    rename = _renamer(segment)

    def name(n: str) -> str:
        if not n:
            return n
        return rename.get(n, f"seg/{n}")

    nodes: list[NodeProto] = [
        helper.make_node("Reshape", [f"x{j}", "scalar_shape"], [f"x{j}/scalar"])
        for j, spec in enumerate(segment.inputs) if not spec.shape
    ]
    declared = {spec.name: spec.declared for spec in segment.inputs if spec.declared is not None}
    initializers: list[TensorProto] = []
    softmaxes = [n for n in source.graph.node if n.op_type == "Softmax"]
    types = _tensor_types(source) if softmaxes else {}
    for node in source.graph.node:
        if node.op_type == "Softmax":
            guard_nodes, guard_init = guarded_softmax(
                node, name(node.input[0]), name(node.output[0]), types[node.input[0]],
                default_opset(source), prefix=f"softmax{softmaxes.index(node)}")
            nodes += guard_nodes
            initializers += guard_init
            continue
        copy = NodeProto()
        copy.CopyFrom(node)
        if _casts_to_declared(node, declared):
            # The input already has that type here; EZKL's tract fails to evaluate some
            # operators (TopK) after a Cast to the same type, so it becomes an Identity.
            copy.op_type = "Identity"
            del copy.attribute[:]
        del copy.input[:]
        copy.input.extend(name(i) for i in node.input)
        del copy.output[:]
        copy.output.extend(name(o) for o in node.output)
        copy.name = name(node.name or node.output[0])
        nodes.append(copy)
    for init in source.graph.initializer:
        tensor = TensorProto()
        tensor.CopyFrom(init)
        tensor.name = name(init.name)
        initializers.append(tensor)
    diffs: list[str] = []
    for j, produced in enumerate(segment.graph_outputs):
        nodes.append(helper.make_node("Sub", [name(produced), f"y{j}"], [f"diff{j}"]))
        diffs.append(f"diff{j}")
    reduce_nodes, reduce_init = max_abs(diffs, MAXDIFF)
    nodes += reduce_nodes
    initializers += reduce_init
    if any(not spec.shape for spec in segment.inputs):
        initializers.append(numpy_helper.from_array(np.zeros(0, dtype=np.int64), "scalar_shape"))
    graph = helper.make_graph(
        nodes,
        f"refute_adjudication_{segment.index}",
        [_vi(f"x{j}", s) for j, s in enumerate(segment.inputs)]
        + [_vi(f"y{j}", s) for j, s in enumerate(segment.outputs)],
        [helper.make_tensor_value_info(MAXDIFF, TensorProto.FLOAT, [1])],
        initializer=initializers,
    )
    return standalone_model(
        graph, opset_imports=source.opset_import, ir_version=source.ir_version,
        label=f"adjudication graph of segment {segment.index}",
    )


def guarded_softmax(node: NodeProto, x: str, y: str, x_type: tuple[int, int], opset: int, *,
                    prefix: str) -> tuple[list[NodeProto], list[TensorProto]]:
    """Nodes computing ``y = Softmax(Max(x − ReduceMax(x), −SOFTMAX_FLOOR))`` over the axes
    the Softmax ``node`` normalizes (its ``axis``; before opset 13 every axis from ``axis`` on),
    the same function as ``node`` on ``x``; ``x_type`` is the rank and element type of ``x``.
    The new tensors are named ``<prefix>/…``; the axes are written non-negative, as opsets
    before 11 require, and given as an attribute before opset 18, as an input from it."""
    dims, elem_type = x_type
    given = [a.i for a in node.attribute if a.name == "axis"]
    axis = given[0] if given else (-1 if opset >= 13 else 1)
    axis = axis + dims if axis < 0 else axis
    axes = [axis] if opset >= 13 else list(range(axis, dims))
    floor = numpy_helper.from_array(
        np.array(-SOFTMAX_FLOOR, dtype=helper.tensor_dtype_to_np_dtype(elem_type)),
        f"{prefix}/floor")
    initializers = [floor]
    if opset >= 18:
        initializers.append(numpy_helper.from_array(np.array(axes, dtype=np.int64),
                                                    f"{prefix}/axes"))
        reduce = helper.make_node("ReduceMax", [x, f"{prefix}/axes"], [f"{prefix}/max"],
                                  name=f"{prefix}/reducemax", keepdims=1)
    else:
        reduce = helper.make_node("ReduceMax", [x], [f"{prefix}/max"],
                                  name=f"{prefix}/reducemax", axes=axes, keepdims=1)
    softmax = NodeProto()
    softmax.CopyFrom(node)
    del softmax.input[:]
    softmax.input.append(f"{prefix}/clamped")
    del softmax.output[:]
    softmax.output.append(y)
    softmax.name = f"{prefix}/softmax"
    return [
        reduce,
        helper.make_node("Sub", [x, f"{prefix}/max"], [f"{prefix}/shifted"],
                         name=f"{prefix}/sub"),
        helper.make_node("Max", [f"{prefix}/shifted", f"{prefix}/floor"], [f"{prefix}/clamped"],
                         name=f"{prefix}/clamp"),
        softmax,
    ], initializers


def _tensor_types(model: ModelProto) -> dict[str, tuple[int, int]]:
    """(rank, element type) of every tensor of ``model`` whose shape is inferred."""
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    found: dict[str, tuple[int, int]] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            found[info.name] = (len(t.shape.dim), t.elem_type)
    for init in graph.initializer:
        found[init.name] = (len(init.dims), init.data_type)
    return found


def max_abs(tensors: list[str], output: str) -> tuple[list[NodeProto], list[TensorProto]]:
    """Nodes computing ``output = [max |v|]`` over every element of ``tensors``."""
    nodes: list[NodeProto] = []
    flat: list[str] = []
    for j, tensor in enumerate(tensors):
        nodes += [
            helper.make_node("Abs", [tensor], [f"abs{j}"]),
            helper.make_node("Reshape", [f"abs{j}", "flat_shape"], [f"flat{j}"]),
        ]
        flat.append(f"flat{j}")
    shape = numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape")
    if len(flat) > 1:
        nodes.append(helper.make_node("Concat", flat, ["alldiff"], axis=0))
    nodes.append(helper.make_node(
        "ReduceMax", ["alldiff" if len(flat) > 1 else flat[0]], [output], keepdims=1))
    return nodes, [shape]


def adjudication_bytes(segment: Segment) -> bytes:
    """Deterministic bytes of :func:`adjudication_model`."""
    return serialize(adjudication_model(segment))


def _casts_to_declared(node: NodeProto, declared: dict[str, int]) -> bool:
    """Whether ``node`` casts a whole-number input to the type it is declared with."""
    return (node.op_type == "Cast" and len(node.input) == 1 and node.input[0] in declared
            and any(a.name == "to" and a.i == declared[node.input[0]] for a in node.attribute))


def _vi(name: str, spec: TensorSpec) -> onnx.ValueInfoProto:
    """An input as EZKL must see it: a whole-number input with its declared type (EZKL takes
    it at scale 0, and the segment's own ``Cast`` to that type becomes a no-op)."""
    elem_type = spec.declared if spec.declared is not None else spec.elem_type
    return helper.make_tensor_value_info(name, elem_type, list(spec.shape) or [1])
