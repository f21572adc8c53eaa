"""The rule of Reshape, Flatten, Squeeze and Unsqueeze: boxes aligned to the runs of axes
the reshape merges or splits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from onnx import NodeProto

from refute.rewrites import node_label
from refute.tiling.boxes import Box, Span, _full, _sizes
from refute.tiling.graph import _Graph, _refuse, _Unsplittable
from refute.tiling.steps import _rebuilt, _Step


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
