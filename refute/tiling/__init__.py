"""Tiles: a segment too large to prove whole is settled on one slice of its output.

A *tile* (DESIGN.md, "Vocabulary") is a slice of a segment's output together with the region of
the segment's input it depends on. This package finds how a segment can be tiled, chooses a tiling
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

Modules, each depending only on those before it: :mod:`~refute.tiling.boxes` (spans and boxes),
:mod:`~refute.tiling.tiles` (:class:`Tile`, :class:`TileCost`, :class:`Tiling`),
:mod:`~refute.tiling.graph` (the segment graph, refusals), :mod:`~refute.tiling.steps`,
:mod:`~refute.tiling.windowed`, :mod:`~refute.tiling.reshapes` and :mod:`~refute.tiling.rules`
(the per-operator rules, :data:`TILEABLE_OPS`), :mod:`~refute.tiling.propagation`,
:mod:`~refute.tiling.cost` (:func:`rows_bound`), :mod:`~refute.tiling.layout`
(:func:`make_tiling`, :func:`tile_at`), :mod:`~refute.tiling.planning` (:func:`plan_tiling`),
:mod:`~refute.tiling.models` (:func:`tile_model`, :func:`tile_segment`) and
:mod:`~refute.tiling.states` (cutting states, the tilings a manifest records). Other code
imports from here.
"""

from __future__ import annotations

from refute.tiling.boxes import Box, Span
from refute.tiling.cost import (
    CELLS_PER_INPUT,
    CELLS_PER_MAC,
    CELLS_PER_OP,
    CELLS_PER_OUTPUT,
    INNER_COLUMNS,
    ROWS_FIXED,
    ROWS_PER_HASHED,
    rows_bound,
)
from refute.tiling.graph import _graph
from refute.tiling.layout import make_tiling, tile_at
from refute.tiling.models import tile_model, tile_segment
from refute.tiling.planning import _block_candidates, plan_tiling
from refute.tiling.rules import TILEABLE_OPS
from refute.tiling.states import (
    cut_input,
    cut_output,
    place_output,
    recorded_tiling,
    segment_tiling,
    tile_counts,
    tile_difference_units,
    worst_tile,
)
from refute.tiling.tiles import Tile, TileCost, Tiling

#: Everything other code imports from :mod:`refute.tiling` (the tests also reach two private
#: helpers, ``_graph`` and ``_block_candidates``).
__all__ = [
    "CELLS_PER_INPUT",
    "CELLS_PER_MAC",
    "CELLS_PER_OP",
    "CELLS_PER_OUTPUT",
    "INNER_COLUMNS",
    "ROWS_FIXED",
    "ROWS_PER_HASHED",
    "TILEABLE_OPS",
    "Box",
    "Span",
    "Tile",
    "TileCost",
    "Tiling",
    "_block_candidates",
    "_graph",
    "cut_input",
    "cut_output",
    "make_tiling",
    "place_output",
    "plan_tiling",
    "recorded_tiling",
    "rows_bound",
    "segment_tiling",
    "tile_at",
    "tile_counts",
    "tile_difference_units",
    "tile_model",
    "tile_segment",
    "worst_tile",
]
