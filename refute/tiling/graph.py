"""The segment graph as the rules read it (:class:`_Graph`, parsed once per segment), and
how a segment that cannot be tiled is refused."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from refute.errors import UnprovableModel
from refute.loading import default_opset
from refute.rewrites import node_label
from refute.segmentation import Segment


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
    return _Graph(
        index=index,
        start=start,
        model=model,
        nodes=tuple(model.graph.node),
        inputs=tuple(i.name for i in model.graph.input),
        outputs=tuple(o.name for o in model.graph.output),
        constants={t.name: numpy_helper.to_array(t) for t in model.graph.initializer},
        shapes=shapes,
        opset=default_opset(model),
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
