"""Tiles: a segment too large to prove whole is settled on one slice of its output.

A *tile* (DESIGN.md, "Vocabulary") is a slice of a segment's output together with the region of
the segment's input it depends on. This module finds how a segment can be tiled, chooses a tiling
under a size bound, and builds, for each tile, a standalone ONNX model that computes exactly that
slice of the segment's output from exactly that region of its input.

Geometry. A tiling cuts the segment's output (every output has the same shape) into blocks, one
block size per axis. Tile ``t`` *owns* the output elements ``[i·b, min((i+1)·b, D))`` along each
axis: the owned slices cover the output exactly once. What the tile computes, its *window*, is
always ``b`` long: an edge tile's window is shifted inward (``[D−b, D)``), so that every tile has
one output shape and every value a tile model computes is a real value of the segment (padding the
output instead would make the circuit compare values no segment computes). The input *region* of a
tile is what its window reads (the receptive field of a Conv, whole rows of a MatMul, …), the same
shape for every tile. Where a region reaches past the edge of a segment input, into a Conv's or a
Pad's zero padding, the missing part is zero-filled by :func:`cut_input` and the tile model pads
nothing itself, so edge tiles run the same model as the others and still compute exactly the
segment's values.

Regions are found by propagating boxes backward through the segment's nodes (each operator has a
rule; an operator without one cannot be tiled and the segment is refused with its name). A tile
model is the segment's own nodes, each restricted to its box: weights are sliced (the output
channels of a Conv, the columns of a MatMul weight), Conv and pool padding is dropped, a shape
operator gets the tile's shape, and a tensor that feeds two consumers is cut for each with a
``Slice``. Tile models therefore differ only where their weight slices differ: all the spatial
tiles of one channel block have the same bytes (one circuit, cached by content hash).

Supported: Conv (any spatial rank, strides, pads, auto_pad, dilations, groups and depthwise),
AveragePool/MaxPool (without padding they cannot express as zeros), global pools, MatMul and Gemm
(constant or activation operands), element-wise operators with broadcasting (incl. Clip,
BatchNormalization, PRelu, Where), Softmax/LogSoftmax/Hardmax/LayerNormalization/
InstanceNormalization (their normalized axes stay whole), reductions, Transpose, Concat (its axis
stays whole), Pad with zeros, Expand, and Reshape/Flatten/Squeeze/Unsqueeze that only add or
remove axes of size 1. Refused: anything else (Reshape that splits or merges axes, Gather, Slice,
Split, …), a second output of a node, and padding of a tensor the segment computes itself (only
the segment's inputs can be zero-filled); the caller refuses the model at registration with the
reason.

Size. A tile's cost is its element count: the elements of its input regions (padded) plus those
of its output windows. :func:`plan_tiling` shrinks one axis block at a time, always taking the
step that adds least total work (cost × tile count, so splits that read their input only once,
such as spatial and row splits, whose tiles share one model, tend to come before channel and
column splits), until the cost is within the bound. :func:`make_tiling` rebuilds a tiling from
its block sizes, as a verifier does from the manifest.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from refute.errors import (
    BundleError,
    InputError,
    RefuteError,
    SegmentationError,
    UnprovableModel,
)
from refute.executor import DeterministicExecutor
from refute.loading import serialize
from refute.quantize import quantize
from refute.rewrites import node_label
from refute.segmentation import Segment, run_segment, standalone_model

#: ``(start, stop)`` along one axis.
Span = tuple[int, int]
#: One span per axis of a tensor.
Box = tuple[Span, ...]


@dataclass(frozen=True)
class Tile:
    """One tile of a segment: the output it owns and computes, and the input it reads."""

    index: int
    #: Position of the tile in the tiling's grid (one block index per output axis).
    grid_position: tuple[int, ...]
    #: Per segment output: the slice this tile owns (the owned slices of a tiling are disjoint
    #: and cover the output).
    outputs: tuple[Box, ...]
    #: Per segment output: the slice the tile model computes (contains :attr:`outputs`; the same
    #: shape for every tile, shifted inward at the far edges).
    windows: tuple[Box, ...]
    #: Per segment input: the region the tile reads, clamped to the input.
    inputs: tuple[Box, ...]
    #: Per segment input and axis: zeros added ``(before, after)`` the clamped region (a Conv's
    #: or a Pad's zero padding at the input's edge).
    input_pads: tuple[tuple[Span, ...], ...]


@dataclass(frozen=True)
class Tiling:
    """A segment's output cut into equal-shaped tiles."""

    segment_index: int
    #: sha256 of the segment the tiling belongs to (its ONNX bytes).
    segment_sha256: str
    #: The shape of every output of the segment.
    output_shape: tuple[int, ...]
    #: Block size per output axis (the shape of every tile's output window).
    blocks: tuple[int, ...]
    #: Shape of every tile's input region, per segment input (zero padding included).
    input_shapes: tuple[tuple[int, ...], ...]
    tiles: tuple[Tile, ...] = field(repr=False)

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of tiles along each output axis."""
        return tuple(-(-d // b) for d, b in zip(self.output_shape, self.blocks, strict=True))

    @property
    def split_axes(self) -> tuple[int, ...]:
        """The output axes cut into more than one block."""
        return tuple(a for a, n in enumerate(self.grid) if n > 1)

    @property
    def tile_elements(self) -> int:
        """The cost of one tile (the same for all): input region and output window elements."""
        outputs = len(self.tiles[0].windows) * math.prod(self.blocks)
        return outputs + sum(math.prod(s) for s in self.input_shapes)

    def to_json(self) -> dict[str, object]:
        """JSON form for a manifest; :func:`make_tiling` rebuilds the tiles from ``blocks``."""
        return {"segment": self.segment_index, "segment_sha256": self.segment_sha256,
                "output_shape": list(self.output_shape), "blocks": list(self.blocks),
                "input_shapes": [list(s) for s in self.input_shapes],
                "tiles": len(self.tiles), "tile_elements": self.tile_elements}


# --- the segment graph -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Graph:
    """A segment's graph as the rules read it."""

    index: int
    model: ModelProto
    nodes: tuple[NodeProto, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: Mapping[str, np.ndarray]
    shapes: Mapping[str, tuple[int, ...]]
    opset: int

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.constants:
            return tuple(self.constants[name].shape)
        return self.shapes[name]

    def constant(self, node: NodeProto, position: int) -> np.ndarray | None:
        """Input ``position`` of ``node`` as an array, or ``None`` when it is absent; refused
        when it is an activation (the rule needs its value)."""
        if len(node.input) <= position or not node.input[position]:
            return None
        name = node.input[position]
        if name not in self.constants:
            raise _refuse(self, node, f"its input {position} must be a constant")
        return self.constants[name]


@functools.lru_cache(maxsize=8)
def _parse(onnx_bytes: bytes, index: int) -> _Graph:
    model = onnx.load_model_from_string(onnx_bytes)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    shapes = {
        v.name: tuple(int(d.dim_value) for d in v.type.tensor_type.shape.dim)
        for v in [*graph.input, *graph.value_info, *graph.output]
    }
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return _Graph(
        index=index,
        model=model,
        nodes=tuple(model.graph.node),
        inputs=tuple(i.name for i in model.graph.input),
        outputs=tuple(o.name for o in model.graph.output),
        constants={t.name: numpy_helper.to_array(t) for t in model.graph.initializer},
        shapes=shapes,
        opset=opset,
    )


def _graph(segment: Segment) -> _Graph:
    return _parse(segment.onnx_bytes, segment.index)


class _Unsplittable(Exception):
    """A box the segment cannot be restricted to (an axis an operator needs whole, a channel
    block across groups, padding of a computed tensor)."""


def _refuse(g: _Graph, node: NodeProto, why: str) -> UnprovableModel:
    return UnprovableModel(
        f"segment {g.index} cannot be tiled: {node.op_type} {node_label(node)} {why}; cut the "
        f"model so that this node sits in a segment small enough to prove whole"
    )


def _attr(node: NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _full(shape: Sequence[int]) -> Box:
    return tuple((0, d) for d in shape)


def _sizes(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def _hull(a: Box | None, b: Box) -> Box:
    if a is None:
        return b
    return tuple((min(x0, y0), max(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- per-operator rules: from the box of a node's output to the boxes of its inputs ----------


@dataclass(frozen=True)
class _Step:
    """One node as a tile computes it."""

    #: The node for the tile (inputs named as in the segment; may differ from the original).
    node: NodeProto
    #: Per input of :attr:`node`: the box it reads (``None`` for an absent input or a constant
    #: of :attr:`constants`).
    boxes: tuple[Box | None, ...]
    #: Constants made for the tile (e.g. a Reshape's target shape), by input name.
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)


_Rule = Callable[[_Graph, NodeProto, Box], _Step]


def _rebuilt(node: NodeProto, *, op_type: str | None = None, inputs: Sequence[str] | None = None,
             attrs: Mapping[str, Any] | None = None, drop: Sequence[str] = ()) -> NodeProto:
    """A copy of ``node`` with another operator, other inputs or changed attributes."""
    copy = NodeProto()
    copy.CopyFrom(node)
    if op_type is not None:
        copy.op_type = op_type
    if inputs is not None:
        del copy.input[:]
        copy.input.extend(inputs)
    changed = set(attrs or {}) | set(drop)
    kept = [a for a in copy.attribute if a.name not in changed]
    del copy.attribute[:]
    copy.attribute.extend(kept)
    copy.attribute.extend(helper.make_attribute(k, v) for k, v in (attrs or {}).items())
    return copy


def _broadcast(out: Box, out_shape: Sequence[int], shape: Sequence[int]) -> Box:
    """The box of an operand broadcast (numpy rules) to an output box."""
    offset = len(out_shape) - len(shape)
    return tuple((0, 1) if d == 1 else out[offset + i] for i, d in enumerate(shape))


def _require_whole(g: _Graph, node: NodeProto, out: Box, axes: Sequence[int]) -> None:
    shape = g.shape(node.output[0])
    for a in axes:
        if out[a] != (0, shape[a]):
            raise _Unsplittable(f"{node.op_type} {node_label(node)} needs axis {a} whole")


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


@dataclass(frozen=True)
class _Window:
    """The sliding window of a Conv or a pool along its spatial axes."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    padded: bool

    @classmethod
    def of(cls, g: _Graph, node: NodeProto, kernel: Sequence[int]) -> _Window:
        n = len(kernel)
        strides = tuple(int(s) for s in _attr(node, "strides", [1] * n))
        dilations = tuple(int(d) for d in _attr(node, "dilations", [1] * n))
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if int(_attr(node, "ceil_mode", 0)):
            raise _refuse(g, node, "uses ceil_mode")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            ins = g.shape(node.input[0])[2:]
            outs = g.shape(node.output[0])[2:]
            total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i)
                     for i, o, k, s, d in zip(ins, outs, kernel, strides, dilations, strict=True)]
            begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
            padded = any(total)
        elif auto == "VALID":
            begin, padded = [0] * n, False
        else:
            pads = [int(p) for p in _attr(node, "pads", [0] * 2 * n)]
            begin, padded = pads[:n], any(pads)
        return cls(tuple(int(k) for k in kernel), strides, dilations, tuple(begin), padded)

    def spans(self, out: Box) -> Box:
        """The input spans the output spans read (possibly reaching into the padding)."""
        return tuple(
            (o0 * s - p, (o1 - 1) * s - p + (k - 1) * d + 1)
            for (o0, o1), k, s, d, p in zip(
                out, self.kernel, self.strides, self.dilations, self.pads_begin, strict=True)
        )

    def unpadded(self, node: NodeProto, **attrs: Any) -> NodeProto:
        """``node`` without padding (the tile's region carries it as zeros)."""
        zeros = [0] * 2 * len(self.kernel)
        return _rebuilt(node, attrs={"pads": zeros, **attrs}, drop=("auto_pad",))


def _conv(g: _Graph, node: NodeProto, out: Box) -> _Step:
    x_shape, w_shape = g.shape(node.input[0]), g.shape(node.input[1])
    window = _Window.of(g, node, w_shape[2:])
    group = int(_attr(node, "group", 1))
    c0, c1 = out[1]
    per_group_out, per_group_in = w_shape[0] // group, w_shape[1]
    if group == 1:
        channels: Span = (0, x_shape[1])
    elif c0 % per_group_out or c1 % per_group_out:
        raise _Unsplittable(f"Conv {node_label(node)} takes output channels by groups of "
                            f"{per_group_out}")
    else:
        channels = (c0 // per_group_out * per_group_in, c1 // per_group_out * per_group_in)
    boxes: tuple[Box, ...] = ((out[0], channels, *window.spans(out[2:])),
                              (out[1], *_full(w_shape[1:])))
    if len(node.input) > 2 and node.input[2]:
        boxes = (*boxes, (out[1],))
    tile_group = 1 if group == 1 else (c1 - c0) // per_group_out
    return _Step(window.unpadded(node, group=tile_group), boxes)


def _pool(g: _Graph, node: NodeProto, out: Box) -> _Step:
    window = _Window.of(g, node, _attr(node, "kernel_shape", []))
    zero_padding = node.op_type == "AveragePool" and int(_attr(node, "count_include_pad", 0))
    if window.padded and not zero_padding:
        raise _refuse(g, node, "pads with values other than counted zeros")
    return _Step(window.unpadded(node), ((out[0], out[1], *window.spans(out[2:])),))


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


def _reshape(g: _Graph, node: NodeProto, out: Box) -> _Step:
    """Reshape, Flatten, Squeeze, Unsqueeze that only add or remove axes of size 1: the tile
    reshapes to its own window shape."""
    shape, out_shape = g.shape(node.input[0]), g.shape(node.output[0])
    if [d for d in shape if d != 1] != [d for d in out_shape if d != 1]:
        raise _refuse(g, node, f"mixes axes ({list(shape)} to {list(out_shape)})")
    moving = iter(s for s, d in zip(out, out_shape, strict=True) if d != 1)
    box = tuple((0, 1) if d == 1 else next(moving) for d in shape)
    target = f"{node.output[0]}::tile_shape"
    tile_node = _rebuilt(node, op_type="Reshape", inputs=[node.input[0], target],
                         drop=[a.name for a in node.attribute])
    return _Step(tile_node, (box, None),
                 {target: np.array(_sizes(out), dtype=np.int64)})


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


# --- propagation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """The boxes one tile computes: per activation, and per node (in graph order)."""

    boxes: Mapping[str, Box]
    steps: tuple[_Step, ...]


def _propagate(g: _Graph, window: Box) -> _Plan:
    """Walk the segment backward from the output window; raise :class:`_Unsplittable` if the
    window cannot be computed on its own."""
    need: dict[str, Box] = dict.fromkeys(g.outputs, window)
    steps: list[_Step] = []
    for node in reversed(g.nodes):
        used = [j for j, o in enumerate(node.output) if o and o in need]
        if not used:
            continue
        if used != [0]:
            raise _refuse(g, node, f"has its output {max(used)} used")
        rule = _RULES.get(node.op_type)
        if rule is None:
            raise _refuse(g, node, "has no tiling rule")
        step = rule(g, node, need[node.output[0]])
        for name, box in zip(step.node.input, step.boxes, strict=True):
            if box is not None and name and name not in g.constants:
                need[name] = _hull(need.get(name), box)
        steps.append(step)
    for name, box in need.items():
        if name not in g.inputs and any(
                a < 0 or b > d for (a, b), d in zip(box, g.shape(name), strict=True)):
            raise _Unsplittable(
                f"zero padding would reach past the edge of {name!r}, which the segment computes "
                f"(only the segment's inputs can be padded in a tile)")
    return _Plan(need, tuple(reversed(steps)))


def _plan_or_refuse(g: _Graph, window: Box, what: str) -> _Plan:
    try:
        return _propagate(g, window)
    except _Unsplittable as exc:
        raise UnprovableModel(f"segment {g.index} cannot be tiled {what}: {exc}") from exc


# --- tilings -------------------------------------------------------------------------------


def _output_shape(g: _Graph) -> tuple[int, ...]:
    shapes = {g.shape(o) for o in g.outputs}
    if len(shapes) != 1:
        raise UnprovableModel(
            f"segment {g.index} cannot be tiled: its outputs have different shapes "
            f"{sorted(shapes)}; cut the model so that the segment has outputs of one shape")
    return shapes.pop()


def _windows(shape: Sequence[int], blocks: Sequence[int], position: Sequence[int]
             ) -> tuple[Box, Box]:
    """The owned slice and the (inward-shifted) window of the tile at ``position``."""
    owned = tuple((i * b, min((i + 1) * b, d)) for d, b, i in zip(shape, blocks, position,
                                                                    strict=True))
    window = tuple((min(i * b, d - b), min(i * b, d - b) + b)
                   for d, b, i in zip(shape, blocks, position, strict=True))
    return owned, window


def _region(box: Box, shape: Sequence[int]) -> tuple[Box, tuple[Span, ...]]:
    """A box clamped to a tensor, and the zeros around it."""
    clamped = []
    pads = []
    for (a, b), d in zip(box, shape, strict=True):
        before, after = min(max(-a, 0), b - a), min(max(b - d, 0), b - a)
        lo = min(max(a, 0), d)
        clamped.append((lo, lo + (b - a) - before - after))
        pads.append((before, after))
    return tuple(clamped), tuple(pads)


def make_tiling(segment: Segment, blocks: Sequence[int]) -> Tiling:
    """The tiling of ``segment`` with these block sizes (one per output axis).

    Raises :class:`~refute.errors.SegmentationError` for block sizes that do not fit the output,
    and :class:`~refute.errors.UnprovableModel` if the segment cannot be cut that way."""
    g = _graph(segment)
    shape = _output_shape(g)
    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != len(shape) or any(not 1 <= b <= d for b, d in zip(blocks, shape,
                                                                          strict=True)):
        raise SegmentationError(
            f"blocks {list(blocks)} do not fit segment {g.index}'s output shape {list(shape)}")
    grid = [range(-(-d // b)) for d, b in zip(shape, blocks, strict=True)]
    tiles = []
    for k, position in enumerate(itertools.product(*grid)):
        owned, window = _windows(shape, blocks, position)
        plan = _plan_or_refuse(g, window, f"in blocks {list(blocks)}")
        regions = [_region(plan.boxes.get(x, _full(g.shape(x))), g.shape(x)) for x in g.inputs]
        tiles.append(Tile(
            index=k, grid_position=tuple(position), outputs=(owned,) * len(g.outputs),
            windows=(window,) * len(g.outputs), inputs=tuple(r for r, _ in regions),
            input_pads=tuple(p for _, p in regions)))
    input_shapes = {_padded_shapes(t) for t in tiles}
    if len(input_shapes) != 1:  # every rule is translation-invariant; guard the invariant
        raise SegmentationError(f"tiles of segment {g.index} would have different input shapes")
    return Tiling(segment.index, segment.sha256, shape, blocks, input_shapes.pop(), tuple(tiles))


def _padded_shapes(tile: Tile) -> tuple[tuple[int, ...], ...]:
    return tuple(
        tuple(b - a + p0 + p1 for (a, b), (p0, p1) in zip(box, pads, strict=True))
        for box, pads in zip(tile.inputs, tile.input_pads, strict=True)
    )


def _cost(g: _Graph, blocks: Sequence[int]) -> int:
    """Elements of one tile: input regions (padded) and output windows."""
    plan = _propagate(g, tuple((0, b) for b in blocks))
    regions = sum(math.prod(_sizes(plan.boxes.get(x, _full(g.shape(x))))) for x in g.inputs)
    return regions + len(g.outputs) * math.prod(blocks)


def _block_candidates(g: _Graph, shape: Sequence[int], axis: int) -> list[int]:
    """Block sizes the segment can be cut into along ``axis``, largest first (balanced: the
    smallest block giving each tile count)."""
    d = shape[axis]
    sizes = sorted({-(-d // k) for k in range(1, d + 1)}, reverse=True)
    valid = [d]
    for b in sizes[1:]:
        try:
            for start in (0, d - b):
                _propagate(g, tuple((start, start + b) if a == axis else (0, n)
                                    for a, n in enumerate(shape)))
        except _Unsplittable:
            continue
        valid.append(b)
    return valid


def plan_tiling(segment: Segment, max_tile_elements: int) -> Tiling:
    """A tiling of ``segment`` whose tiles each hold at most ``max_tile_elements`` elements
    (input regions plus output windows, see :attr:`Tiling.tile_elements`).

    Starting from one whole tile, one axis block at a time is shrunk to the next balanced size,
    taking the step that adds least total work (tile cost × tile count), until the bound holds.
    A block of 1 along an axis longer than 1 is a last resort: ONNX Runtime runs a matrix
    product with one row or one column (and a depthwise Conv one column wide) by other kernels,
    whose sums round differently, so such tiles match the whole segment only to a few ULP
    (the tolerance absorbs that; larger blocks match bit for bit).
    Raises :class:`~refute.errors.UnprovableModel` naming the operator when the segment cannot
    be tiled, or when even its smallest tile exceeds the bound.
    """
    if max_tile_elements < 1:
        raise SegmentationError("the tile bound must be at least one element")
    g = _graph(segment)
    shape = _output_shape(g)
    _plan_or_refuse(g, _full(shape), "at all")
    candidates = [_block_candidates(g, shape, a) for a in range(len(shape))]
    choice = [0] * len(shape)
    cost = _cost(g, shape)
    while cost > max_tile_elements:
        options = []
        for axis, cands in enumerate(candidates):
            if choice[axis] + 1 < len(cands):
                trial = [c[i] for c, i in zip(candidates, choice, strict=True)]
                trial[axis] = cands[choice[axis] + 1]
                tiles = math.prod(-(-d // b) for d, b in zip(shape, trial, strict=True))
                new = _cost(g, trial)
                if new < cost:
                    unit = trial[axis] == 1
                    options.append((unit, new * tiles, tiles, axis, new))
        if not options:
            raise UnprovableModel(
                f"segment {g.index} cannot be tiled under {max_tile_elements} elements per "
                f"tile: its smallest tile holds {cost} (axes {list(shape)} split as far as "
                f"its operators allow)")
        *_, axis, cost = min(options)
        choice[axis] += 1
    return make_tiling(segment, [c[i] for c, i in zip(candidates, choice, strict=True)])


def tile_at(tiling: Tiling, position: Sequence[int]) -> Tile:
    """The tile that owns the output element at ``position`` (an index per output axis), e.g.
    where a challenger's own execution differs most."""
    if len(position) != len(tiling.output_shape) or any(
            not 0 <= p < d for p, d in zip(position, tiling.output_shape, strict=True)):
        raise InputError(f"position {list(position)} is outside the output "
                         f"{list(tiling.output_shape)}")
    grid = tiling.grid
    flat = 0
    for p, b, n in zip(position, tiling.blocks, grid, strict=True):
        flat = flat * n + p // b
    return tiling.tiles[flat]


# --- tile models ---------------------------------------------------------------------------


def _check_tile(segment: Segment, tiling: Tiling, tile: Tile) -> _Graph:
    if tiling.segment_sha256 != segment.sha256:
        raise SegmentationError(f"the tiling is of another segment than segment {segment.index}")
    if not 0 <= tile.index < len(tiling.tiles) or tiling.tiles[tile.index] != tile:
        raise SegmentationError(f"tile {tile.index} is not a tile of this tiling")
    return _graph(segment)


class _Builder:
    """Collects the nodes and constants of one tile model."""

    def __init__(self, g: _Graph, plan: _Plan) -> None:
        self.g = g
        self.plan = plan
        self.nodes: list[NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.cut: dict[tuple[str, Box], str] = {}
        self.taken = {x for n in g.nodes for x in [*n.input, *n.output]} | set(g.constants)

    def fresh(self, base: str) -> str:
        name = base
        for k in itertools.count(1):
            if name not in self.taken:
                break
            name = f"{base}{k}"
        self.taken.add(name)
        return name

    def constant(self, name: str, box: Box) -> str:
        value = self.g.constants[name]
        if box == _full(value.shape):
            key, sliced = name, value
        else:
            key = self.cut.get((name, box)) or self.fresh(f"{name}::tile")
            sliced = value[tuple(slice(a, b) for a, b in box)]
        self.cut[(name, box)] = key
        self.initializers[key] = numpy_helper.from_array(np.ascontiguousarray(sliced), key)
        return key

    def activation(self, name: str, box: Box) -> str:
        """``name`` cut to ``box`` (a Slice of the box the tile computes it over)."""
        have = self.plan.boxes[name]
        if box == have:
            return name
        if (name, box) in self.cut:
            return self.cut[(name, box)]
        sliced = self.fresh(f"{name}::tile")
        axes = [a for a, (s, h) in enumerate(zip(box, have, strict=True)) if s != h]
        parts = {"starts": [box[a][0] - have[a][0] for a in axes],
                 "ends": [box[a][1] - have[a][0] for a in axes], "axes": axes}
        inputs = [self.constant_array(f"{sliced}/{k}", np.array(v, dtype=np.int64))
                  for k, v in parts.items()]
        self.nodes.append(helper.make_node("Slice", [name, *inputs], [sliced], name=sliced))
        self.cut[(name, box)] = sliced
        return sliced

    def constant_array(self, name: str, value: np.ndarray) -> str:
        key = self.fresh(name)
        self.initializers[key] = numpy_helper.from_array(value, key)
        return key

    def add(self, step: _Step) -> None:
        inputs = []
        for name, box in zip(step.node.input, step.boxes, strict=True):
            if not name:
                inputs.append(name)
            elif name in step.constants:
                inputs.append(self.constant_array(name, step.constants[name]))
            elif name in self.g.constants:
                inputs.append(self.constant(name, box or ()))
            else:
                inputs.append(self.activation(name, box or ()))
        self.nodes.append(_rebuilt(step.node, inputs=inputs))


def tile_model(segment: Segment, tiling: Tiling, tile: Tile) -> ModelProto:
    """The standalone ONNX model of one tile: its inputs are the segment's inputs cut to the
    tile's regions (same names, float32, shapes :attr:`Tiling.input_shapes`), its outputs the
    segment's outputs cut to the tile's windows (same names as ``segment.graph_outputs``).

    Tiles whose weight slices are equal (e.g. every spatial tile of one channel block) get the
    same bytes, so circuits cached by content hash are shared among them."""
    g = _check_tile(segment, tiling, tile)
    plan = _plan_or_refuse(g, tile.windows[0], f"as tile {tile.index}")
    builder = _Builder(g, plan)
    for step in plan.steps:
        builder.add(step)
    outputs = []
    for produced, window in zip(g.outputs, tile.windows, strict=True):
        name = produced
        if plan.boxes[produced] != window:  # the output also feeds a node that reads more of it
            name = builder.fresh(f"{produced}::tile_out")
            builder.nodes.append(helper.make_node(
                "Identity", [builder.activation(produced, window)], [name], name=name))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, _sizes(window)))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(s))
              for x, s in zip(g.inputs, tiling.input_shapes, strict=True)]
    graph = helper.make_graph(builder.nodes, f"refute_segment_{g.index}_tile",
                              inputs, outputs, initializer=list(builder.initializers.values()))
    return standalone_model(graph, opset_imports=g.model.opset_import,
                            ir_version=g.model.ir_version,
                            label=f"tile {tile.index} of segment {g.index}")


def tile_segment(segment: Segment, tiling: Tiling, tile: Tile) -> Segment:
    """The tile as a :class:`~refute.segmentation.Segment` (its model, with input and output
    specs of the tile's shapes), so that whatever takes a segment (``run_segment``, the
    adjudication graph) takes a tile."""
    model = tile_model(segment, tiling, tile)
    return replace(
        segment,
        inputs=tuple(replace(s, shape=shape)
                     for s, shape in zip(segment.inputs, tiling.input_shapes, strict=True)),
        outputs=tuple(replace(s, shape=tiling.blocks) for s in segment.outputs),
        onnx_bytes=serialize(model),
        graph_outputs=tuple(o.name for o in model.graph.output),
    )


# --- cutting states ------------------------------------------------------------------------


def _check_arrays(what: str, arrays: Sequence[np.ndarray], count: int) -> None:
    if len(arrays) != count:
        raise InputError(f"the tile needs {count} {what} tensors, got {len(arrays)}")


def cut_input(tiling: Tiling, tile: Tile, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The tile's inputs: each segment input (state i-1, in state order) cut to the tile's
    region and zero-padded to the tile's input shape."""
    _check_arrays("input", inputs, len(tiling.input_shapes))
    cut = []
    for array, box, pads in zip(inputs, tile.inputs, tile.input_pads, strict=True):
        part = np.asarray(array)[tuple(slice(a, b) for a, b in box)]
        cut.append(np.pad(part, pads) if any(p for pair in pads for p in pair) else part.copy())
    return cut


def cut_output(tiling: Tiling, tile: Tile, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The tile's window of each segment output (state i, in state order): what its tile model
    computes."""
    _check_arrays("output", outputs, len(tile.windows))
    return [np.asarray(a)[tuple(slice(s, e) for s, e in w)].copy()
            for a, w in zip(outputs, tile.windows, strict=True)]


def place_output(tiling: Tiling, tile: Tile, tile_outputs: Sequence[np.ndarray],
                 into: Sequence[np.ndarray]) -> None:
    """Write the part of a tile model's outputs that the tile owns into the full outputs
    ``into`` (in place); placing every tile rebuilds the segment's output."""
    _check_arrays("output", tile_outputs, len(tile.windows))
    _check_arrays("output", into, len(tile.windows))
    for full, part, owned, window in zip(into, tile_outputs, tile.outputs, tile.windows,
                                         strict=True):
        inside = tuple(slice(o0 - w0, o1 - w0) for (o0, o1), (w0, _) in zip(owned, window,
                                                                            strict=True))
        full[tuple(slice(a, b) for a, b in owned)] = np.asarray(part)[inside]


def tile_difference_units(executor: DeterministicExecutor, segment: Segment,
                          before: Sequence[np.ndarray], after: Sequence[np.ndarray], *,
                          tiling: Tiling, tile: Tile, scale: int) -> int:
    """Re-execute ``segment`` on ``before`` and return the largest difference from ``after``
    over ``tile``'s window, both quantized at ``scale``: what a proof of that tile bounds
    (:func:`refute.segmentation.step_difference_units` for a whole segment)."""
    mine = cut_output(tiling, tile, run_segment(executor, segment, tuple(before)))
    theirs = cut_output(tiling, tile, after)
    worst = 0
    for a, b in zip(mine, theirs, strict=True):
        diff = np.abs(quantize(a, scale) - quantize(b, scale))
        worst = max(worst, int(diff.max()) if diff.size else 0)
    return worst


def recorded_tiling(entry: Mapping[str, Any], segment: Segment) -> Tiling | None:
    """The tiling a manifest's step circuit entry records for ``segment`` (its ``tiling``:
    ``blocks`` and ``tiles``, docs/FORMATS.md), rebuilt with :func:`make_tiling`; ``None`` for
    a segment proven whole. A record that does not rebuild is a :class:`BundleError`."""
    recorded = entry.get("tiling")
    if recorded is None:
        return None
    try:
        tiling = make_tiling(segment, [int(b) for b in recorded["blocks"]])
    except (KeyError, TypeError, ValueError, RefuteError) as exc:
        raise BundleError(f"segment {segment.index}: the manifest's tiling does not rebuild: "
                          f"{exc}"[:300]) from exc
    if recorded.get("segment_sha256", segment.sha256) != segment.sha256:
        raise BundleError(f"segment {segment.index}: the manifest's tiling is of another segment")
    if len(tiling.tiles) != recorded.get("tiles"):
        raise BundleError(f"segment {segment.index}: the manifest's tiling has "
                          f"{recorded.get('tiles')} tiles, its blocks make {len(tiling.tiles)}")
    return tiling


def segment_tiling(circuits: Sequence[Mapping[str, Any]] | None,
                   segment: Segment) -> Tiling | None:
    """The tiling the manifest's step ``circuits`` record for ``segment`` (``None``: whole)."""
    for entry in circuits or ():
        if entry.get("kind") == "step" and entry.get("segment") == segment.index:
            return recorded_tiling(entry, segment)
    return None


def worst_tile(tiling: Tiling, own: Sequence[np.ndarray], claimed: Sequence[np.ndarray]) -> Tile:
    """The tile owning the element where ``claimed`` (a segment's output state) differs most
    from ``own`` (the challenger's own execution): the tile an honest challenger names. A
    non-finite claim counts as the largest difference."""
    best: tuple[float, tuple[int, ...]] | None = None
    for mine, theirs in zip(own, claimed, strict=True):
        diff = np.abs(np.asarray(mine, np.float64) - np.asarray(theirs, np.float64))
        diff = np.where(np.isfinite(diff), diff, np.inf)
        if diff.size == 0:
            continue
        flat = int(np.argmax(diff))
        position = tuple(int(p) for p in np.unravel_index(flat, diff.shape))
        if best is None or diff.flat[flat] > best[0]:
            best = (float(diff.flat[flat]), position)
    if best is None:
        return tiling.tiles[0]
    return tile_at(tiling, best[1])


def tile_counts(circuits: Sequence[Mapping[str, Any]] | None,
                segments: Sequence[Segment]) -> tuple[int, ...]:
    """Tiles per segment (1: proven whole) as the manifest's step ``circuits`` record them, or
    ``()`` when no segment is tiled: what a dispute opens with."""
    tilings = {int(e["segment"]): e for e in circuits or ()
               if e.get("kind") == "step" and e.get("tiling")}
    if not tilings:
        return ()
    counts = []
    for segment in segments:
        entry = tilings.get(segment.index)
        tiling = recorded_tiling(entry, segment) if entry is not None else None
        counts.append(1 if tiling is None else len(tiling.tiles))
    return tuple(counts)
