"""Propagation: the boxes one tile computes, walking the segment backward from a window
of one of its outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from refute.errors import UnprovableModel
from refute.tiling.boxes import Box, _hull
from refute.tiling.graph import _Graph, _refuse, _Unsplittable
from refute.tiling.rules import _RULES, _split
from refute.tiling.steps import _Step


@dataclass(frozen=True)
class _Plan:
    """The boxes one tile computes: per activation, and per node (in graph order)."""

    boxes: Mapping[str, Box]
    steps: tuple[_Step, ...]


def _propagate(g: _Graph, output: int, window: Box) -> _Plan:
    """Walk the segment backward from ``window`` of output ``output``; raise
    :class:`_Unsplittable` if the window cannot be computed on its own."""
    need: dict[str, Box] = {g.outputs[output]: window}
    steps: list[_Step] = []
    for node in reversed(g.nodes):
        used = [j for j, o in enumerate(node.output) if o and o in need]
        if not used:
            continue
        if node.op_type == "Split":
            made = _split(g, node, {j: need[node.output[j]] for j in used})
        elif used != [0]:
            raise _refuse(g, node, f"has its output {max(used)} used")
        else:
            rule = _RULES.get(node.op_type)
            if rule is None:
                raise _refuse(g, node, "has no tiling rule")
            made = [rule(g, node, need[node.output[0]])]
        for step in made:
            for name, box in zip(step.node.input, step.boxes, strict=True):
                if box is not None and name and name not in g.constants:
                    need[name] = _hull(need.get(name), box)
            steps.append(step)
    for name, box in need.items():
        if name not in g.inputs and any(
                a < 0 or b > d for (a, b), d in zip(box, g.shape(name), strict=True)):
            raise _Unsplittable(
                f"zero padding would reach past the edge of {name!r}, which the segment computes "
                f"(only the segment's inputs can be padded in a tile)")
    return _Plan(need, tuple(reversed(steps)))


def _plan_or_refuse(g: _Graph, output: int, window: Box, what: str) -> _Plan:
    try:
        return _propagate(g, output, window)
    except _Unsplittable as exc:
        raise UnprovableModel(f"segment {g.index} cannot be tiled {what}: {exc}") from exc
