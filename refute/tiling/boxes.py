"""Spans and boxes: the slices of a tensor a tile owns, computes and reads."""

from __future__ import annotations

from collections.abc import Sequence

#: ``(start, stop)`` along one axis.
Span = tuple[int, int]
#: One span per axis of a tensor.
Box = tuple[Span, ...]


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
