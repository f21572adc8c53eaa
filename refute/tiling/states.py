"""Cutting states: a tile's inputs and outputs from a segment's states and back, the
difference a tile's proof bounds, and the tilings a manifest records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from refute.errors import BundleError, InputError, RefuteError
from refute.executor import DeterministicExecutor
from refute.quantize import quantize
from refute.segmentation import Segment, run_segment
from refute.tiling.layout import make_tiling, tile_at
from refute.tiling.tiles import Tile, Tiling


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
