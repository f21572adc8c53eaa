"""Tiles: a segment too large to prove whole is settled on one slice of its output.

A *tile* (DESIGN.md, "Vocabulary") is a slice of a segment's output together with the region of
the segment's input it depends on. This module finds how a segment can be tiled, chooses a tiling
under a size bound, and builds, for each tile, a standalone ONNX model that computes exactly that
slice of the segment's output from exactly that region of its input.

Geometry. A tiling cuts each output of the segment on its own into blocks, one block size per
axis: the tiles of a segment are the tiles of output 0, then those of output 1, … (one global
tile index), and each tile computes one window of one output from only the inputs that window
reads (an output that is a segment input passed straight through, the residual stream, is an
Identity tile over a window of it). Tile ``t`` *owns* the output elements
``[i·b, min((i+1)·b, D))`` along each axis: the owned slices cover the output exactly once. What
the tile computes, its *window*, is always ``b`` long: an edge tile's window is shifted inward
(``[D−b, D)``), so that every tile of an output has one shape and every value a tile model
computes is a real value of the segment (padding the output instead would make the circuit
compare values no segment computes). The input *region* of a tile is what its window reads (the
receptive field of a Conv, whole rows of a MatMul, …), the same shape for every tile of an
output. Where a region reaches past the edge of a segment input, into a Conv's or a Pad's zero
padding, the missing part is zero-filled by :func:`cut_input` and the tile model pads nothing
itself, so edge tiles run the same model as the others and still compute exactly the segment's
values.

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
stays whole), Pad with zeros, Expand, Split (each used output reads its slice of the input),
and Reshape/Flatten/Squeeze/Unsqueeze: axes of size 1 come and go freely, and a run of axes it
merges or splits takes boxes aligned to it (a block of a merged H·D axis is whole heads, or
within one head; the planner offers no other). Refused: anything else (Gather, Slice, …), a used
output of a multi-output node other than Split, and padding of a tensor the segment computes
itself (only the segment's inputs can be zero-filled); the caller refuses the model at
registration with the reason.

Size. A tile's cost is the EZKL circuit rows it is estimated to need (:class:`TileCost`: the
larger of the Poseidon hashing of its input regions and output window, and its own cells:
one-row matrix products and convolutions by their multiply-accumulates, rescaling and lookup
operators by their elements; constants :data:`ROWS_PER_HASHED` and below, fitted on EZKL's
settings). :func:`plan_tiling` shrinks one axis block of one output at a time, always taking the
step that adds least total work (rows × tile count), until the estimate is within the bound,
then grows back any axis the bound still allows. :func:`make_tiling` rebuilds a tiling from its
block sizes, as a verifier does from the manifest.
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
    """One tile of a segment: a window of one of its outputs, and the input that window reads."""

    index: int
    #: The segment output this tile computes (its position in the segment's outputs).
    output_index: int
    #: Position of the tile in its output's grid (one block index per axis of that output).
    grid_position: tuple[int, ...]
    #: The slice of output :attr:`output_index` this tile owns, as a one-element tuple (the
    #: owned slices of an output's tiles are disjoint and cover it).
    outputs: tuple[Box, ...]
    #: The slice the tile model computes (contains :attr:`outputs`; one shape for every tile of
    #: the output, shifted inward at the far edges), as a one-element tuple.
    windows: tuple[Box, ...]
    #: The segment inputs the tile reads (positions in the segment's inputs, ascending): the
    #: tile model's inputs, in this order.
    input_indices: tuple[int, ...]
    #: Per tile input: the region the tile reads, clamped to the input.
    inputs: tuple[Box, ...]
    #: Per tile input and axis: zeros added ``(before, after)`` the clamped region (a Conv's
    #: or a Pad's zero padding at the input's edge).
    input_pads: tuple[tuple[Span, ...], ...]

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The tile model's input shapes (regions with their zero padding)."""
        return tuple(
            tuple(b - a + p0 + p1 for (a, b), (p0, p1) in zip(box, pads, strict=True))
            for box, pads in zip(self.inputs, self.input_pads, strict=True))

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The tile model's output shape (its window)."""
        return _sizes(self.windows[0])


@dataclass(frozen=True)
class TileCost:
    """What one tile's adjudication circuit costs (:func:`tile_cost`): the elements it hashes
    (input regions and output window), its multiply-accumulates (those EZKL lays out one a
    row, see :data:`ROWS`), the elements through other operators, weighted, and the rows
    EZKL's circuit is estimated to need."""

    elements: int
    macs: int
    op_cells: int
    rows: int


@dataclass(frozen=True)
class Tiling:
    """A segment's outputs, each cut into equal-shaped tiles: the tiles of output 0, then
    those of output 1, … (one global tile index)."""

    segment_index: int
    #: sha256 of the segment the tiling belongs to (its ONNX bytes).
    segment_sha256: str
    #: The shape of each output of the segment.
    output_shapes: tuple[tuple[int, ...], ...]
    #: Per output: block size per axis (the shape of every window of that output's tiles).
    output_blocks: tuple[tuple[int, ...], ...]
    #: How many tensors the segment's input (state i-1) holds.
    input_count: int
    tiles: tuple[Tile, ...] = field(repr=False)
    #: Per output: the cost of one of its tiles (all of an output's tiles cost the same).
    costs: tuple[TileCost, ...] = field(default=(), repr=False)

    @property
    def blocks(self) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
        """The block sizes as :func:`make_tiling` takes them and the manifest records them:
        one per axis for a segment of one output, else one such tuple per output."""
        return self.output_blocks[0] if len(self.output_blocks) == 1 else self.output_blocks

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of output 0 (:attr:`output_shapes` holds every output's)."""
        return self.output_shapes[0]

    @property
    def grids(self) -> tuple[tuple[int, ...], ...]:
        """Per output: the number of tiles along each axis."""
        return tuple(tuple(-(-d // b) for d, b in zip(shape, blocks, strict=True))
                     for shape, blocks in zip(self.output_shapes, self.output_blocks,
                                              strict=True))

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of tiles along each axis of output 0."""
        return self.grids[0]

    @property
    def split_axes(self) -> tuple[int, ...]:
        """The axes of output 0 cut into more than one block."""
        return tuple(a for a, n in enumerate(self.grid) if n > 1)

    @property
    def first_tiles(self) -> tuple[int, ...]:
        """Per output: the index of its first tile."""
        starts = [0]
        for grid in self.grids[:-1]:
            starts.append(starts[-1] + math.prod(grid))
        return tuple(starts)

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The input shapes of output 0's tile models (:attr:`Tile.input_shapes` of any tile)."""
        return self.tiles[0].input_shapes

    @property
    def tile_elements(self) -> int:
        """The largest tile's input region and output window elements."""
        return max(c.elements for c in self.costs)

    @property
    def tile_rows(self) -> int:
        """The largest tile's estimated EZKL rows (:func:`tile_cost`)."""
        return max(c.rows for c in self.costs)

    def to_json(self) -> dict[str, object]:
        """JSON form for a manifest; :func:`make_tiling` rebuilds the tiles from ``blocks``.
        A segment of one output keeps the form it always had (``output_shape``, flat
        ``blocks``, ``input_shapes``); one of several outputs records per output its shape,
        blocks, the inputs its tiles read and their shapes."""
        common = {"segment": self.segment_index, "segment_sha256": self.segment_sha256}
        if len(self.output_shapes) == 1:
            return {**common, "output_shape": list(self.output_shape),
                    "blocks": list(self.output_blocks[0]),
                    "input_shapes": [list(s) for s in self.input_shapes],
                    "tiles": len(self.tiles), "tile_elements": self.tile_elements}
        firsts = [self.tiles[k] for k in self.first_tiles]
        return {**common, "output_shapes": [list(s) for s in self.output_shapes],
                "blocks": [list(b) for b in self.output_blocks],
                "inputs": [list(t.input_indices) for t in firsts],
                "input_shapes": [[list(s) for s in t.input_shapes] for t in firsts],
                "tiles": len(self.tiles), "tile_elements": self.tile_elements}


# --- the segment graph -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Graph:
    """A segment's graph as the rules read it."""

    index: int
    #: Position in the model of the segment's first node (its own nodes come first, in order).
    start: int
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
def _parse(onnx_bytes: bytes, index: int, start: int) -> _Graph:
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
        start=start,
        model=model,
        nodes=tuple(model.graph.node),
        inputs=tuple(i.name for i in model.graph.input),
        outputs=tuple(o.name for o in model.graph.output),
        constants={t.name: numpy_helper.to_array(t) for t in model.graph.initializer},
        shapes=shapes,
        opset=opset,
    )


def _graph(segment: Segment) -> _Graph:
    return _parse(segment.onnx_bytes, segment.index, segment.start)


class _Unsplittable(Exception):
    """A box the segment cannot be restricted to (an axis an operator needs whole, a channel
    block across groups, padding of a computed tensor)."""


def _refuse(g: _Graph, node: NodeProto, why: str) -> UnprovableModel:
    """The refusal of a segment because of ``node``, with the cut that would isolate it."""
    j = next((j for j, n in enumerate(g.nodes) if n.name == node.name and n == node), None)
    where = "" if j is None else (
        f" (node positions {g.start + j} and {g.start + j + 1}: --cuts "
        f"{g.start + j},{g.start + j + 1} beside the others)")
    return UnprovableModel(
        f"segment {g.index} cannot be tiled: {node.op_type} {node_label(node)} {why}; cut the "
        f"model right before and after it{where} so that it sits in a segment small enough to "
        f"prove whole"
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


def _reshape_groups(shape: Sequence[int], out_shape: Sequence[int]
                    ) -> list[tuple[list[int], list[int]]] | None:
    """Axes of size above 1 of a Reshape's input and output, grouped into runs of equal
    product (``[1, 128, 12, 64] → [1, 128, 768]``: ``([1], [1]), ([2, 3], [2])``), or ``None``
    when the sizes do not pair up."""
    ins = [a for a, d in enumerate(shape) if d != 1]
    outs = [a for a, d in enumerate(out_shape) if d != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ins) and j < len(outs):
        group_in, group_out = [ins[i]], [outs[j]]
        p, q = shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while p != q:
            if p < q and i < len(ins):
                group_in.append(ins[i])
                p, i = p * shape[ins[i]], i + 1
            elif q < p and j < len(outs):
                group_out.append(outs[j])
                q, j = q * out_shape[outs[j]], j + 1
            else:
                return None
        groups.append((group_in, group_out))
    return groups if i == len(ins) and j == len(outs) else None


def _contiguous(spans: Sequence[Span], dims: Sequence[int]) -> Span | None:
    """The flat (row-major) range a box over ``dims`` covers, if it is one range: single
    indices on the axes before the first longer span, whole axes after it."""
    lo, size, longer = 0, 1, False
    for (a, b), d in zip(spans, dims, strict=True):
        if longer and (a, b) != (0, d):
            return None
        lo = lo * d + a
        size *= b - a
        longer = longer or b - a > 1
    return lo, lo + size


def _rectangle(span: Span, dims: Sequence[int]) -> Box | None:
    """The box over ``dims`` whose row-major elements are exactly the flat range ``span``, if
    there is one."""
    a, b = span
    if len(dims) == 1:
        return ((a, b),)
    inner = math.prod(dims[1:])
    if a // inner == (b - 1) // inner:  # within one index of the outer axis
        rest = _rectangle((a % inner, a % inner + (b - a)), dims[1:])
        return None if rest is None else ((a // inner, a // inner + 1), *rest)
    if a % inner == 0 and b % inner == 0:
        return ((a // inner, b // inner), *_full(dims[1:]))
    return None


def _reshape(g: _Graph, node: NodeProto, out: Box) -> _Step:
    """Reshape, Flatten, Squeeze, Unsqueeze: each run of axes the Reshape merges or splits
    (:func:`_reshape_groups`) maps a box that is one flat range of it to the input box of the
    same range, when that is a box: on a merged axis of size H·D, whole multiples of D (heads
    h0:h1, all of D) or a range within one D (one head, d0:d1); on split axes, single indices
    before the first partial axis and whole axes after it. The tile reshapes to its own
    window shape."""
    shape, out_shape = g.shape(node.input[0]), g.shape(node.output[0])
    groups = _reshape_groups(shape, out_shape)
    if groups is None:
        raise _refuse(g, node, f"mixes axes ({list(shape)} to {list(out_shape)})")
    box: list[Span] = [(0, 1)] * len(shape)
    for group_in, group_out in groups:
        flat = _contiguous([out[a] for a in group_out], [out_shape[a] for a in group_out])
        rect = None if flat is None else _rectangle(flat, [shape[a] for a in group_in])
        if rect is None:
            raise _Unsplittable(
                f"Reshape {node_label(node)} mixes axes ({list(shape)} to {list(out_shape)}) "
                f"and its box {[out[a] for a in group_out]} of output axes {group_out} is not "
                f"aligned to the input axes {group_in} (a block must hold whole inner axes or "
                "stay within one)")
        for a, span in zip(group_in, rect, strict=True):
            box[a] = span
    target = f"{node.output[0]}::tile_shape"
    tile_node = _rebuilt(node, op_type="Reshape", inputs=[node.input[0], target],
                         drop=[a.name for a in node.attribute])
    return _Step(tile_node, (tuple(box), None),
                 {target: np.array(_sizes(out), dtype=np.int64)})


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


# --- propagation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """The boxes one tile computes: per activation, and per node (in graph order)."""

    boxes: Mapping[str, Box]
    steps: tuple[_Step, ...]


def _propagate(g: _Graph, output: int, window: Box) -> _Plan:
    """Walk the segment backward from ``window`` of output ``output``; raise
    :class:`_Unsplittable` if the window cannot be computed on its own."""
    need: dict[str, Box] = {g.outputs[output]: window}
    steps: list[_Step] = []
    for node in reversed(g.nodes):
        used = [j for j, o in enumerate(node.output) if o and o in need]
        if not used:
            continue
        if node.op_type == "Split":
            made = _split(g, node, {j: need[node.output[j]] for j in used})
        elif used != [0]:
            raise _refuse(g, node, f"has its output {max(used)} used")
        else:
            rule = _RULES.get(node.op_type)
            if rule is None:
                raise _refuse(g, node, "has no tiling rule")
            made = [rule(g, node, need[node.output[0]])]
        for step in made:
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


def _plan_or_refuse(g: _Graph, output: int, window: Box, what: str) -> _Plan:
    try:
        return _propagate(g, output, window)
    except _Unsplittable as exc:
        raise UnprovableModel(f"segment {g.index} cannot be tiled {what}: {exc}") from exc


# --- the cost of a tile --------------------------------------------------------------------

#: EZKL 23.0.5's circuit rows, measured (``gen_settings`` + ``calibrate_settings``, target
#: ``resources``, scale 7, 2 inner columns, hashed inputs, fixed parameters) on the adjudication
#: graphs of 15 one-node models (tests/test_tiling_cost.py holds the table). Its ``num_rows``
#: is the larger of two regions, not their sum:
#:
#: * the Poseidon hashing of the inputs and outputs: exactly ``41·hashed + 4`` rows in every
#:   case (Relu, Tanh, Softmax, LayerNormalization, Mul, Add, MatMul, Conv);
#: * the model's own cells over 2 inner columns, ``(10·in + 49·out + MACs + 40·op cells)/2``,
#:   where *in* and *out* are the hashed input and output elements (quantization, and the
#:   Sub/Abs/ReduceMax tail of the adjudication graph), *MACs* the multiply-accumulates EZKL
#:   lays out one a cell (a Conv; a MatMul or Gemm whose tile has one row: a row-vector times a
#:   matrix is a chain of dot products, 589,824 cells for 1×768 @ 768×768, the GPT-2
#:   out-projection tile that needed 9.3 GB), and *op cells* the output elements of operators
#:   that rescale or look up inside a chain (Mul, Div, Tanh, Erf, Exp, Softmax, Relu, …;
#:   LayerNormalization counts 2.5 times). A MatMul of several rows is laid out by EZKL's einsum
#:   argument in columns of their own (``total_einsum_col_size`` ≈ its operands and product);
#:   those cells are counted like MACs, a bound: they did not make any measured circuit taller.
#:
#: All 15 estimates are within 2 rows of EZKL's except the GELU chain (1.5 % under). The
#: estimate is for planning (choosing blocks); the settings EZKL calibrates decide.
ROWS_PER_HASHED = 41
ROWS_FIXED = 4
CELLS_PER_INPUT = 10
CELLS_PER_OUTPUT = 49
CELLS_PER_MAC = 1
CELLS_PER_OP = 40
INNER_COLUMNS = 2

#: Operators whose every output element costs :data:`CELLS_PER_OP` cells (times the weight).
_OP_WEIGHTS: Mapping[str, float] = {
    **dict.fromkeys(("Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Tanh", "Erf", "Exp", "Log",
                     "Sigmoid", "Softmax", "LogSoftmax", "Relu", "LeakyRelu", "Clip",
                     "HardSigmoid", "HardSwish", "Max", "Min", "Abs", "ReduceMean", "ReduceMax",
                     "ReduceSum", "AveragePool", "MaxPool", "GlobalAveragePool",
                     "GlobalMaxPool", "BatchNormalization", "InstanceNormalization"), 1.0),
    "LayerNormalization": 2.5,
}


def _macs(g: _Graph, plan: _Plan, step: _Step) -> tuple[int, int]:
    """(MACs laid out one a cell, einsum cells) of one node of a tile."""
    node = step.node
    out = math.prod(_sizes(plan.boxes[node.output[0]]))
    if node.op_type == "Conv":
        w_shape = g.shape(node.input[1])
        return out * math.prod(w_shape[1:]), 0
    if node.op_type in ("MatMul", "Gemm"):
        a_box, b_box = step.boxes[0], step.boxes[1]
        assert a_box is not None and b_box is not None
        transposed = node.op_type == "Gemm" and int(_attr(node, "transA", 0))
        rows = _sizes(a_box)[-1 if transposed else -2]
        depth = _sizes(a_box)[-2 if transposed else -1]
        if rows == 1:
            return out * depth, 0
        return 0, math.prod(_sizes(a_box)) + math.prod(_sizes(b_box)) + out
    return 0, 0


def _estimate(g: _Graph, output: int, plan: _Plan) -> TileCost:
    inputs = sum(math.prod(_sizes(plan.boxes[x])) for x in g.inputs if x in plan.boxes)
    outputs = math.prod(_sizes(plan.boxes[g.outputs[output]]))
    macs = einsum = 0
    ops = 0.0
    for step in plan.steps:
        m, e = _macs(g, plan, step)
        macs, einsum = macs + m, einsum + e
        weight = _OP_WEIGHTS.get(step.node.op_type, 0.0)
        if weight:
            ops += weight * math.prod(_sizes(plan.boxes[step.node.output[0]]))
    cells = (CELLS_PER_INPUT * inputs + CELLS_PER_OUTPUT * outputs
             + CELLS_PER_MAC * (macs + einsum) + CELLS_PER_OP * ops)
    rows = max(ROWS_PER_HASHED * (inputs + outputs) + ROWS_FIXED,
               math.ceil(cells / INNER_COLUMNS))
    return TileCost(inputs + outputs, macs + einsum, math.ceil(ops), rows)


def rows_bound(logrows: int) -> int:
    """The estimated rows (:class:`TileCost`) a tile may have for its circuit to fit
    ``2^logrows`` rows: EZKL keeps a few rows for blinding, and the estimate is a few percent
    off, so 6 % is kept free."""
    return int(2**logrows * 0.94)


# --- tilings -------------------------------------------------------------------------------


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


def _per_output(g: _Graph, blocks: Sequence[int] | Sequence[Sequence[int]]
                ) -> tuple[tuple[int, ...], ...]:
    """Block sizes per output, from either form :attr:`Tiling.blocks` takes: one size per axis
    (for every output: they must then all have one rank) or one such list per output."""
    shapes = [g.shape(o) for o in g.outputs]
    items: list[object] = list(blocks)
    try:
        if all(isinstance(b, (int, np.integer)) for b in items):
            per = [tuple(int(b) for b in blocks)] * len(shapes)  # type: ignore[arg-type]
        else:
            per = [tuple(int(x) for x in b) for b in blocks]  # type: ignore[union-attr]
    except TypeError as exc:
        raise SegmentationError(f"blocks {items} are neither sizes nor lists of sizes") from exc
    if len(per) != len(shapes) or any(
            len(b) != len(s) or any(not 1 <= x <= d for x, d in zip(b, s, strict=True))
            for b, s in zip(per, shapes, strict=True)):
        raise SegmentationError(
            f"blocks {items} do not fit segment {g.index}'s output shapes "
            f"{[list(s) for s in shapes]}")
    return tuple(per)


def _tiles_of(g: _Graph, output: int, blocks: Sequence[int], first: int
              ) -> tuple[list[Tile], TileCost]:
    shape = g.shape(g.outputs[output])
    grid = [range(-(-d // b)) for d, b in zip(shape, blocks, strict=True)]
    tiles = []
    cost: TileCost | None = None
    for k, position in enumerate(itertools.product(*grid)):
        owned, window = _windows(shape, blocks, position)
        plan = _plan_or_refuse(g, output, window, f"in blocks {list(blocks)} of output {output}")
        cost = cost or _estimate(g, output, plan)
        read = tuple(j for j, x in enumerate(g.inputs) if x in plan.boxes)
        regions = [_region(plan.boxes[g.inputs[j]], g.shape(g.inputs[j])) for j in read]
        tiles.append(Tile(
            index=first + k, output_index=output, grid_position=tuple(position),
            outputs=(owned,), windows=(window,), input_indices=read,
            inputs=tuple(r for r, _ in regions), input_pads=tuple(p for _, p in regions)))
    if len({(t.input_indices, t.input_shapes) for t in tiles}) != 1:
        # every rule is translation-invariant; guard the invariant
        raise SegmentationError(f"tiles of segment {g.index} output {output} would read "
                                "different inputs or shapes")
    assert cost is not None
    return tiles, cost


def make_tiling(segment: Segment, blocks: Sequence[int] | Sequence[Sequence[int]]) -> Tiling:
    """The tiling of ``segment`` with these block sizes: one per output axis for a segment of
    one output (or the same for every output), else one list per output (:attr:`Tiling.blocks`,
    as the manifest records it).

    Raises :class:`~refute.errors.SegmentationError` for block sizes that do not fit the
    outputs, and :class:`~refute.errors.UnprovableModel` if the segment cannot be cut that way."""
    g = _graph(segment)
    per_output = _per_output(g, blocks)
    tiles: list[Tile] = []
    costs = []
    for k, b in enumerate(per_output):
        made, cost = _tiles_of(g, k, b, len(tiles))
        tiles += made
        costs.append(cost)
    return Tiling(segment.index, segment.sha256, tuple(g.shape(o) for o in g.outputs),
                  per_output, len(g.inputs), tuple(tiles), tuple(costs))


def _starts(d: int, b: int) -> list[int]:
    return sorted({*range(0, d - b, b), d - b})


class _Candidates:
    """Balanced block sizes along one axis of one output, largest first, each checked (once,
    when first asked) to cut the output there: every window along the axis, the other axes
    whole, must be computable on its own (a Reshape that merges heads needs blocks of whole
    heads or within one head, a Softmax its axis whole, …)."""

    def __init__(self, g: _Graph, output: int, axis: int) -> None:
        self.g, self.output, self.axis = g, output, axis
        self.shape = g.shape(g.outputs[output])
        d = self.shape[axis]
        self.sizes = sorted({-(-d // k) for k in range(1, d + 1)}, reverse=True)
        self.checked: dict[int, bool] = {0: True}
        #: Why the first size refused was refused.
        self.refused: str | None = None

    def valid(self, j: int) -> bool:
        if j not in self.checked:
            b, d = self.sizes[j], self.shape[self.axis]
            try:
                for start in _starts(d, b):
                    _propagate(self.g, self.output, tuple(
                        (start, start + b) if a == self.axis else (0, n)
                        for a, n in enumerate(self.shape)))
                self.checked[j] = True
            except _Unsplittable as exc:
                self.checked[j] = False
                self.refused = self.refused or str(exc)
        return self.checked[j]

    def after(self, j: int) -> int | None:
        """The next valid size after position ``j``."""
        return next((k for k in range(j + 1, len(self.sizes)) if self.valid(k)), None)


def _block_candidates(g: _Graph, output: int, axis: int) -> list[int]:
    """Block sizes output ``output`` can be cut into along ``axis`` (the other axes whole),
    largest first (balanced: the smallest block giving each tile count)."""
    cands = _Candidates(g, output, axis)
    return [b for j, b in enumerate(cands.sizes) if cands.valid(j)]


def _plan_output(g: _Graph, output: int, bound: int) -> tuple[int, ...]:
    shape = g.shape(g.outputs[output])
    _plan_or_refuse(g, output, _full(shape), f"at all (output {output})")
    candidates = [_Candidates(g, output, a) for a in range(len(shape))]
    choice = [0] * len(shape)

    def blocks_of(chosen: Sequence[int]) -> list[int]:
        return [c.sizes[i] for c, i in zip(candidates, chosen, strict=True)]

    def cost_of(blocks: Sequence[int]) -> TileCost | None:
        try:
            return _estimate(g, output, _propagate(g, output, tuple((0, b) for b in blocks)))
        except _Unsplittable:
            return None

    current = cost_of(blocks_of(choice))
    assert current is not None
    while current.rows > bound:
        options = []
        for axis, cands in enumerate(candidates):
            nxt = cands.after(choice[axis])
            if nxt is None:
                continue
            trial = list(choice)
            trial[axis] = nxt
            blocks = blocks_of(trial)
            new = cost_of(blocks)
            if new is not None and new.rows < current.rows:
                tiles = math.prod(-(-d // b) for d, b in zip(shape, blocks, strict=True))
                unit = blocks[axis] == 1
                options.append((unit, new.rows * tiles, tiles, axis, nxt, new))
        if not options:
            why = next((c.refused for c in candidates if c.refused), None)
            raise UnprovableModel(
                f"segment {g.index} cannot be tiled under {bound:,} estimated circuit rows per "
                f"tile: the smallest tile of its output {output} {list(shape)} (blocks "
                f"{blocks_of(choice)}, as far as its operators allow) needs {current.rows:,} "
                f"(it hashes {current.elements:,} elements)"
                + (f"; smaller blocks: {why}" if why else ""))
        *_, axis, nxt, current = min(options)
        choice[axis] = nxt
    # Greedy shrinking can overshoot on one axis while the bound was held up by another (a
    # tile's rows are the larger of two regions): grow each axis back as far as the bound
    # allows, fewest tiles first, until no axis can grow.
    while True:
        grown = []
        for axis, cands in enumerate(candidates):
            for j in range(choice[axis]):
                if not cands.valid(j):
                    continue
                trial = list(choice)
                trial[axis] = j
                blocks = blocks_of(trial)
                new = cost_of(blocks)
                if new is not None and new.rows <= bound:
                    tiles = math.prod(-(-d // b) for d, b in zip(shape, blocks, strict=True))
                    grown.append((tiles, new.rows, axis, j))
                    break
        if not grown:
            return tuple(blocks_of(choice))
        _, _, axis, j = min(grown)
        choice[axis] = j


def plan_tiling(segment: Segment, bound: int) -> Tiling:
    """A tiling of ``segment`` whose every tile's adjudication circuit is estimated to need at
    most ``bound`` EZKL rows (:class:`TileCost` ``rows``; :func:`rows_bound` gives the bound
    for a number of logrows): the bound bounds circuit rows, not elements.

    Each output is tiled on its own (its tiles compute a window of it from the inputs that
    window reads). Starting from one whole tile, one axis block at a time is shrunk to the
    next balanced size the operators allow, taking the step that adds least total work (tile
    rows × tile count), until the bound holds.
    A block of 1 along an axis longer than 1 is a last resort: ONNX Runtime runs a matrix
    product with one row or one column (and a depthwise Conv one column wide) by other kernels,
    whose sums round differently, so such tiles match the whole segment only to a few ULP
    (the tolerance absorbs that; larger blocks match bit for bit). EZKL also lays a one-row
    matrix product out one multiply-accumulate a cell, so such tiles cost more rows.
    Raises :class:`~refute.errors.UnprovableModel` naming the operator when the segment cannot
    be tiled, or when even its smallest tile exceeds the bound.
    """
    if bound < 1:
        raise SegmentationError("the tile bound must be at least one row")
    g = _graph(segment)
    return make_tiling(segment, [list(_plan_output(g, k, bound)) for k in range(len(g.outputs))])


def tile_at(tiling: Tiling, position: Sequence[int], output: int = 0) -> Tile:
    """The tile that owns the element at ``position`` (an index per axis) of output
    ``output``, e.g. where a challenger's own execution differs most."""
    if not 0 <= output < len(tiling.output_shapes):
        raise InputError(f"the segment has outputs 0..{len(tiling.output_shapes) - 1}, "
                         f"not {output}")
    shape = tiling.output_shapes[output]
    if len(position) != len(shape) or any(
            not 0 <= p < d for p, d in zip(position, shape, strict=True)):
        raise InputError(f"position {list(position)} is outside output {output} "
                         f"{list(shape)}")
    flat = 0
    for p, b, n in zip(position, tiling.output_blocks[output], tiling.grids[output],
                       strict=True):
        flat = flat * n + p // b
    return tiling.tiles[tiling.first_tiles[output] + flat]


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
    """The standalone ONNX model of one tile: its inputs are the segment inputs the tile reads
    (:attr:`Tile.input_indices`, same names, float32, cut to the tile's regions: shapes
    :attr:`Tile.input_shapes`), its one output the segment output :attr:`Tile.output_index`
    cut to the tile's window (named as in ``segment.graph_outputs``).

    Tiles whose weight slices are equal (e.g. every spatial tile of one channel block) get the
    same bytes, so circuits cached by content hash are shared among them."""
    g = _check_tile(segment, tiling, tile)
    window = tile.windows[0]
    plan = _plan_or_refuse(g, tile.output_index, window, f"as tile {tile.index}")
    builder = _Builder(g, plan)
    for step in plan.steps:
        builder.add(step)
    produced = g.outputs[tile.output_index]
    name = produced
    if plan.boxes[produced] != window or produced in g.inputs:
        # the output also feeds a node that reads more of it, or is an input passed through
        name = builder.fresh(f"{produced}::tile_out")
        builder.nodes.append(helper.make_node(
            "Identity", [builder.activation(produced, window)], [name], name=name))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, _sizes(window))]
    inputs = [helper.make_tensor_value_info(g.inputs[j], TensorProto.FLOAT, list(s))
              for j, s in zip(tile.input_indices, tile.input_shapes, strict=True)]
    graph = helper.make_graph(builder.nodes, f"refute_segment_{g.index}_tile",
                              inputs, outputs, initializer=list(builder.initializers.values()))
    return standalone_model(graph, opset_imports=g.model.opset_import,
                            ir_version=g.model.ir_version,
                            label=f"tile {tile.index} of segment {g.index}")


def tile_segment(segment: Segment, tiling: Tiling, tile: Tile) -> Segment:
    """The tile as a :class:`~refute.segmentation.Segment` (its model, with input and output
    specs of the tile's shapes: the inputs it reads, its one output), so that whatever takes a
    segment (``run_segment``, the adjudication graph) takes a tile."""
    model = tile_model(segment, tiling, tile)
    return replace(
        segment,
        inputs=tuple(replace(segment.inputs[j], shape=shape)
                     for j, shape in zip(tile.input_indices, tile.input_shapes, strict=True)),
        outputs=(replace(segment.outputs[tile.output_index], shape=tile.output_shape),),
        onnx_bytes=serialize(model),
        graph_outputs=tuple(o.name for o in model.graph.output),
    )


# --- cutting states ------------------------------------------------------------------------


def _check_arrays(what: str, arrays: Sequence[np.ndarray], count: int) -> None:
    if len(arrays) != count:
        raise InputError(f"the tile needs {count} {what} tensors, got {len(arrays)}")


def cut_input(tiling: Tiling, tile: Tile, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The tile model's inputs, in its input order: of the segment's inputs (state i-1, every
    tensor, in state order), those the tile reads (:attr:`Tile.input_indices`), each cut to the
    tile's region and zero-padded to the tile's input shape."""
    _check_arrays("input", inputs, tiling.input_count)
    cut = []
    for j, box, pads in zip(tile.input_indices, tile.inputs, tile.input_pads, strict=True):
        part = np.asarray(inputs[j])[tuple(slice(a, b) for a, b in box)]
        cut.append(np.pad(part, pads) if any(p for pair in pads for p in pair) else part.copy())
    return cut


def cut_output(tiling: Tiling, tile: Tile, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What the tile model outputs: of the segment's outputs (state i, every tensor, in state
    order), the tile's window of output :attr:`Tile.output_index` (a one-element list)."""
    _check_arrays("output", outputs, len(tiling.output_shapes))
    window = tile.windows[0]
    return [np.asarray(outputs[tile.output_index])[tuple(slice(s, e) for s, e in window)].copy()]


def place_output(tiling: Tiling, tile: Tile, tile_outputs: Sequence[np.ndarray],
                 into: Sequence[np.ndarray]) -> None:
    """Write the part of a tile model's output that the tile owns into the segment's outputs
    ``into`` (every tensor of state i, in place); placing every tile rebuilds them."""
    _check_arrays("tile output", tile_outputs, 1)
    _check_arrays("output", into, len(tiling.output_shapes))
    owned, window = tile.outputs[0], tile.windows[0]
    inside = tuple(slice(o0 - w0, o1 - w0) for (o0, o1), (w0, _) in zip(owned, window,
                                                                        strict=True))
    into[tile.output_index][tuple(slice(a, b) for a, b in owned)] = \
        np.asarray(tile_outputs[0])[inside]


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
        blocks = recorded["blocks"]
        tiling = make_tiling(segment, [[int(x) for x in b] for b in blocks]
                             if blocks and isinstance(blocks[0], list)
                             else [int(b) for b in blocks])
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
    from ``own`` (the challenger's own execution), over every output: the tile an honest
    challenger names. A non-finite claim counts as the largest difference."""
    best: tuple[float, int, tuple[int, ...]] | None = None
    for k, (mine, theirs) in enumerate(zip(own, claimed, strict=True)):
        diff = np.abs(np.asarray(mine, np.float64) - np.asarray(theirs, np.float64))
        diff = np.where(np.isfinite(diff), diff, np.inf)
        if diff.size == 0:
            continue
        flat = int(np.argmax(diff))
        position = tuple(int(p) for p in np.unravel_index(flat, diff.shape))
        if best is None or diff.flat[flat] > best[0]:
            best = (float(diff.flat[flat]), k, position)
    if best is None:
        return tiling.tiles[0]
    return tile_at(tiling, best[2], best[1])


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
