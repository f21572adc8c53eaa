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
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from refute.loading import TensorSpec, serialize
from refute.segmentation import Segment, standalone_model

MAXDIFF = "maxdiff"


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
    for node in source.graph.node:
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
    initializers = []
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
