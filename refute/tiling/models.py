"""Tile models: the standalone ONNX model of one tile (:func:`tile_model`), and the tile as a
segment (:func:`tile_segment`)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from refute.errors import SegmentationError
from refute.loading import serialize
from refute.segmentation import Segment, standalone_model
from refute.tiling.boxes import Box, _full, _sizes
from refute.tiling.graph import _Graph, _graph
from refute.tiling.propagation import _Plan, _plan_or_refuse
from refute.tiling.steps import _rebuilt, _Step
from refute.tiling.tiles import Tile, Tiling


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
