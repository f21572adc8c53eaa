"""What a tiling is: :class:`Tile`, :class:`TileCost` and :class:`Tiling` (its manifest
form, :meth:`Tiling.to_json`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from refute.tiling.boxes import Box, Span, _sizes


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
