"""One node as a tile computes it (:class:`_Step`), and what the per-operator rules share:
rebuilding a node, broadcasting a box, axes that must stay whole."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import NodeProto, helper

from refute.rewrites import node_label
from refute.tiling.boxes import Box
from refute.tiling.graph import _Graph, _Unsplittable


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
