"""A tiling from its block sizes (:func:`make_tiling`): each tile's owned slice, window and
input regions; and the tile that owns an element (:func:`tile_at`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from refute.errors import InputError, SegmentationError
from refute.segmentation import Segment
from refute.tiling.boxes import Box, Span
from refute.tiling.cost import _estimate
from refute.tiling.graph import _Graph, _graph
from refute.tiling.propagation import _plan_or_refuse
from refute.tiling.tiles import Tile, TileCost, Tiling


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
