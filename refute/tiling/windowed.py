"""The rules of the sliding-window operators (Conv, AveragePool, MaxPool): a box of the
output reads its receptive field; the tile's node drops the padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from onnx import NodeProto

from refute.rewrites import node_label
from refute.tiling.boxes import Box, Span, _full
from refute.tiling.graph import _attr, _Graph, _refuse, _Unsplittable
from refute.tiling.steps import _rebuilt, _Step


@dataclass(frozen=True)
class _Window:
    """The sliding window of a Conv or a pool along its spatial axes."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    padded: bool

    @classmethod
    def of(cls, g: _Graph, node: NodeProto, kernel: Sequence[int]) -> _Window:
        n = len(kernel)
        strides = tuple(int(s) for s in _attr(node, "strides", [1] * n))
        dilations = tuple(int(d) for d in _attr(node, "dilations", [1] * n))
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if int(_attr(node, "ceil_mode", 0)):
            raise _refuse(g, node, "uses ceil_mode")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            ins = g.shape(node.input[0])[2:]
            outs = g.shape(node.output[0])[2:]
            total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i)
                     for i, o, k, s, d in zip(ins, outs, kernel, strides, dilations, strict=True)]
            begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
            padded = any(total)
        elif auto == "VALID":
            begin, padded = [0] * n, False
        else:
            pads = [int(p) for p in _attr(node, "pads", [0] * 2 * n)]
            begin, padded = pads[:n], any(pads)
        return cls(tuple(int(k) for k in kernel), strides, dilations, tuple(begin), padded)

    def spans(self, out: Box) -> Box:
        """The input spans the output spans read (possibly reaching into the padding)."""
        return tuple(
            (o0 * s - p, (o1 - 1) * s - p + (k - 1) * d + 1)
            for (o0, o1), k, s, d, p in zip(
                out, self.kernel, self.strides, self.dilations, self.pads_begin, strict=True)
        )

    def unpadded(self, node: NodeProto, **attrs: Any) -> NodeProto:
        """``node`` without padding (the tile's region carries it as zeros)."""
        zeros = [0] * 2 * len(self.kernel)
        return _rebuilt(node, attrs={"pads": zeros, **attrs}, drop=("auto_pad",))


def _conv(g: _Graph, node: NodeProto, out: Box) -> _Step:
    x_shape, w_shape = g.shape(node.input[0]), g.shape(node.input[1])
    window = _Window.of(g, node, w_shape[2:])
    group = int(_attr(node, "group", 1))
    c0, c1 = out[1]
    per_group_out, per_group_in = w_shape[0] // group, w_shape[1]
    if group == 1:
        channels: Span = (0, x_shape[1])
    elif c0 % per_group_out or c1 % per_group_out:
        raise _Unsplittable(f"Conv {node_label(node)} takes output channels by groups of "
                            f"{per_group_out}")
    else:
        channels = (c0 // per_group_out * per_group_in, c1 // per_group_out * per_group_in)
    boxes: tuple[Box, ...] = ((out[0], channels, *window.spans(out[2:])),
                              (out[1], *_full(w_shape[1:])))
    if len(node.input) > 2 and node.input[2]:
        boxes = (*boxes, (out[1],))
    tile_group = 1 if group == 1 else (c1 - c0) // per_group_out
    return _Step(window.unpadded(node, group=tile_group), boxes)


def _pool(g: _Graph, node: NodeProto, out: Box) -> _Step:
    window = _Window.of(g, node, _attr(node, "kernel_shape", []))
    zero_padding = node.op_type == "AveragePool" and int(_attr(node, "count_include_pad", 0))
    if window.padded and not zero_padding:
        raise _refuse(g, node, "pads with values other than counted zeros")
    return _Step(window.unpadded(node), ((out[0], out[1], *window.spans(out[2:])),))
