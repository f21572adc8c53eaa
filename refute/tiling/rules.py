"""Per-operator rules, from the box of a node's output to the boxes of its inputs
(:data:`_RULES`), and the operators a tiled segment may hold (:data:`TILEABLE_OPS`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import NodeProto, helper

from refute.tiling.boxes import Box, Span, _axis, _full, _sizes
from refute.tiling.graph import _attr, _Graph, _refuse
from refute.tiling.reshapes import _reshape
from refute.tiling.steps import _broadcast, _rebuilt, _require_whole, _Rule, _Step
from refute.tiling.windowed import _conv, _pool


def _elementwise(g: _Graph, node: NodeProto, out: Box) -> _Step:
    out_shape = g.shape(node.output[0])
    boxes = tuple(_broadcast(out, out_shape, g.shape(x)) if x else None for x in node.input)
    return _Step(node, boxes)


def _per_channel(g: _Graph, node: NodeProto, out: Box) -> _Step:
    """BatchNormalization, InstanceNormalization: parameters indexed by axis 1."""
    if node.op_type == "InstanceNormalization":
        _require_whole(g, node, out, range(2, len(out)))
    elif int(_attr(node, "training_mode", 0)):
        raise _refuse(g, node, "normalizes by batch statistics (training mode)")
    return _Step(node, (out, *((out[1],) if x else None for x in node.input[1:])))


def _normalizing(g: _Graph, node: NodeProto, out: Box) -> _Step:
    """Softmax and kin, LayerNormalization: the normalized axes stay whole."""
    rank = len(out)
    if node.op_type == "LayerNormalization":
        whole = range(_axis(int(_attr(node, "axis", -1)), rank), rank)
    elif g.opset >= 13:
        whole = range(_axis(int(_attr(node, "axis", -1)), rank),
                      _axis(int(_attr(node, "axis", -1)), rank) + 1)
    else:  # before opset 13 the input is coerced to 2-D at ``axis``
        whole = range(_axis(int(_attr(node, "axis", 1)), rank), rank)
    _require_whole(g, node, out, whole)
    return _elementwise(g, node, out)


def _reduce(g: _Graph, node: NodeProto, out: Box) -> _Step:
    shape = g.shape(node.input[0])
    rank = len(shape)
    given = _attr(node, "axes", None)
    if given is None:
        constant = g.constant(node, 1)
        given = [] if constant is None else constant.tolist()
    axes = {_axis(int(a), rank) for a in given}
    if not axes:
        axes = set() if _attr(node, "noop_with_empty_axes", 0) else set(range(rank))
    keep = bool(_attr(node, "keepdims", 1))
    kept = iter(out)
    box = []
    for a, d in enumerate(shape):
        if a in axes:
            box.append((0, d))
            if keep:
                next(kept)
        else:
            box.append(next(kept))
    extra = tuple(_full(g.shape(x)) if x else None for x in node.input[1:])
    return _Step(node, (tuple(box), *extra))


def _global_pool(g: _Graph, node: NodeProto, out: Box) -> _Step:
    shape = g.shape(node.input[0])
    return _Step(node, ((out[0], out[1], *_full(shape[2:])),))


def _matmul(g: _Graph, node: NodeProto, out: Box) -> _Step:
    a, b = g.shape(node.input[0]), g.shape(node.input[1])
    if len(a) < 2 or len(b) < 2:
        raise _refuse(g, node, "multiplies a vector (rank 1)")
    lead, lead_shape = out[:-2], g.shape(node.output[0])[:-2]
    a_box = (*_broadcast(lead, lead_shape, a[:-2]), out[-2], (0, a[-1]))
    b_box = (*_broadcast(lead, lead_shape, b[:-2]), (0, b[-2]), out[-1])
    return _Step(node, (a_box, b_box))


def _gemm(g: _Graph, node: NodeProto, out: Box) -> _Step:
    a, b = g.shape(node.input[0]), g.shape(node.input[1])
    rows, cols = out
    a_box = ((0, a[0]), rows) if int(_attr(node, "transA", 0)) else (rows, (0, a[1]))
    b_box = (cols, (0, b[1])) if int(_attr(node, "transB", 0)) else ((0, b[0]), cols)
    boxes: tuple[Box | None, ...] = (a_box, b_box)
    if len(node.input) > 2 and node.input[2]:
        boxes = (*boxes, _broadcast(out, g.shape(node.output[0]), g.shape(node.input[2])))
    return _Step(node, boxes)


def _transpose(g: _Graph, node: NodeProto, out: Box) -> _Step:
    rank = len(out)
    perm = [int(p) for p in _attr(node, "perm", list(reversed(range(rank))))]
    box: list[Span] = [(0, 0)] * rank
    for i, p in enumerate(perm):
        box[p] = out[i]
    return _Step(node, (tuple(box),))


def _concat(g: _Graph, node: NodeProto, out: Box) -> _Step:
    axis = _axis(int(_attr(node, "axis", 0)), len(out))
    _require_whole(g, node, out, [axis])
    boxes = tuple(
        tuple((0, g.shape(x)[axis]) if a == axis else s for a, s in enumerate(out))
        for x in node.input
    )
    return _Step(node, boxes)


def _split(g: _Graph, node: NodeProto, boxes: Mapping[int, Box]) -> list[_Step]:
    """Split: each used output's box is a box of the input offset along the split axis; the
    tile takes each as an Identity of that slice of the input (cut by a ``Slice``)."""
    shape = g.shape(node.input[0])
    axis = _axis(int(_attr(node, "axis", 0)), len(shape))
    given = _attr(node, "split", None) if g.opset < 13 else None
    if g.opset >= 13:
        constant = g.constant(node, 1)
        given = None if constant is None else constant.tolist()
    if given:
        sizes = [int(s) for s in given]
    else:
        n = len(node.output)
        part = -(-shape[axis] // n)
        sizes = [min(part, max(shape[axis] - part * j, 0)) for j in range(n)]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    steps = []
    for j, box in sorted(boxes.items()):
        source = tuple((a + offsets[j], b + offsets[j]) if k == axis else (a, b)
                       for k, (a, b) in enumerate(box))
        identity = helper.make_node("Identity", [node.input[0]], [node.output[j]],
                                    name=f"{node.name or node.output[0]}::{j}")
        steps.append(_Step(identity, (source,)))
    return steps


def _expand(g: _Graph, node: NodeProto, out: Box) -> _Step:
    box = _broadcast(out, g.shape(node.output[0]), g.shape(node.input[0]))
    target = f"{node.output[0]}::tile_shape"
    tile_node = _rebuilt(node, inputs=[node.input[0], target])
    return _Step(tile_node, (box, None), {target: np.array(_sizes(out), dtype=np.int64)})


def _pad(g: _Graph, node: NodeProto, out: Box) -> _Step:
    """Pad with zeros: the region reaches into the padding, which :func:`cut_input` zero-fills
    (the tile node is an Identity)."""
    rank = len(out)
    mode = _attr(node, "mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else str(mode)) != "constant":
        raise _refuse(g, node, "pads by copying values (only zeros can be tiled)")
    if g.opset < 11:
        pads, value = [int(p) for p in _attr(node, "pads", [])], float(_attr(node, "value", 0.0))
    else:
        given = g.constant(node, 1)
        constant = g.constant(node, 2)
        axes_given = g.constant(node, 3)
        pads = [] if given is None else [int(p) for p in given.tolist()]
        value = 0.0 if constant is None or constant.size == 0 else float(constant.reshape(-1)[0])
        if axes_given is not None:
            axes = [_axis(int(a), rank) for a in axes_given.tolist()]
            full = [0] * 2 * rank
            for j, a in enumerate(axes):
                full[a], full[rank + a] = pads[j], pads[len(axes) + j]
            pads = full
    if value != 0.0:
        raise _refuse(g, node, f"pads with {value} (only zeros can be tiled)")
    box = tuple((o0 - p, o1 - p) for (o0, o1), p in zip(out, pads[:rank], strict=True))
    identity = _rebuilt(node, op_type="Identity", inputs=[node.input[0]],
                        drop=[a.name for a in node.attribute])
    return _Step(identity, (box,))


_ELEMENTWISE = frozenset({
    "Abs", "Acos", "Add", "And", "Asin", "Atan", "Cast", "Ceil", "Celu", "Clip", "Cos", "Div",
    "Elu", "Equal", "Erf", "Exp", "Floor", "Greater", "HardSigmoid", "HardSwish", "Identity",
    "LeakyRelu", "Less", "Log", "Max", "Mean", "Min", "Mul", "Neg", "Not", "Or", "PRelu", "Pow",
    "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Sqrt", "Sub",
    "Sum", "Tan", "Tanh", "Where", "Xor",
})
_REDUCTIONS = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceSum",
})

_RULES: dict[str, _Rule] = {
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    **dict.fromkeys(_REDUCTIONS, _reduce),
    **dict.fromkeys(("BatchNormalization", "InstanceNormalization"), _per_channel),
    **dict.fromkeys(("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization"), _normalizing),
    **dict.fromkeys(("GlobalAveragePool", "GlobalMaxPool"), _global_pool),
    **dict.fromkeys(("AveragePool", "MaxPool"), _pool),
    **dict.fromkeys(("Reshape", "Flatten", "Squeeze", "Unsqueeze"), _reshape),
    "Conv": _conv, "MatMul": _matmul, "Gemm": _gemm, "Transpose": _transpose,
    "Concat": _concat, "Expand": _expand, "Pad": _pad,
}  # fmt: skip

#: Operators a segment may hold and still be tiled.
TILEABLE_OPS: frozenset[str] = frozenset(_RULES)
