"""Choosing a tiling under a bound of circuit rows per tile (:func:`plan_tiling`): the block
sizes each axis can be cut into, shrunk greedily, then grown back."""

from __future__ import annotations

import math
from collections.abc import Sequence

from refute.errors import SegmentationError, UnprovableModel
from refute.segmentation import Segment
from refute.tiling.boxes import _full
from refute.tiling.cost import _estimate
from refute.tiling.graph import _Graph, _graph, _Unsplittable
from refute.tiling.layout import make_tiling
from refute.tiling.propagation import _plan_or_refuse, _propagate
from refute.tiling.tiles import TileCost, Tiling


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
