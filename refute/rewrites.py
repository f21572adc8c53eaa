"""Rewrites that make the canonical model compute, in EZKL 23's circuit, what ONNX Runtime
computes, without changing what ONNX Runtime computes (docs/FORMATS.md, canonical model).

Each rewrite replaces a node whose ONNX semantics EZKL 23 proves differently by nodes with the
same ONNX semantics that EZKL 23 proves the same way; what neither can express is refused.
They run on the folded model with every shape inferred, and report whether they changed it
(shapes must then be inferred again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper

from refute.errors import InvalidGraph, UnsupportedOperator

if TYPE_CHECKING:
    from refute.loading import TensorSpec


def node_label(node: NodeProto) -> str:
    """How a node is named in reasons: its name, else its first output, else ``'?'``."""
    return repr(node.name or (node.output[0] if node.output else "?"))[:80]


def faithful_rewrites(model: ModelProto, tensors: Mapping[str, TensorSpec]) -> bool:
    """Apply every rewrite; whether any changed the model."""
    divided = truncating_integer_division(model, tensors)
    pooled = edge_padded_max_pools(model, tensors)
    return divided or pooled


def _fresh(taken: set[str], node: NodeProto, parts: list[str]) -> list[str]:
    """Names ``<node>/<part>`` for new tensors and nodes, refused if any is taken."""
    base = node.name or node.output[0]
    names = [f"{base}/{p}" for p in parts]
    if taken & set(names):
        raise InvalidGraph(f"node {node_label(node)}: names {names} are taken")
    taken.update(names)
    return names


def truncating_integer_division(model: ModelProto, tensors: Mapping[str, TensorSpec]) -> bool:
    """Make ``Div`` on integers provable. ONNX truncates the quotient toward zero; EZKL 23
    carries the exact quotient on (``-16 / 3`` is ``-5`` in ONNX Runtime, ``-5.33`` in the
    circuit) and floors it where a ``Cast`` to an integer type follows. So ``a / b`` by a
    positive constant becomes ``a < 0 ? -Cast(|a| / b) : Cast(|a| / b)`` (the ``Cast`` to the
    same integer type is a no-op in ONNX, a floor in the circuit): equal in ONNX, and the
    truncated quotient in the circuit too. A divisor that is not a positive constant is
    refused. Returns whether any node was rewritten (shapes must then be inferred again)."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    taken = {x for n in graph.node for x in [*n.input, *n.output]} | set(weights)
    nodes: list[NodeProto] = []
    changed = False
    for node in graph.node:
        out = tensors.get(node.output[0]) if node.output else None
        if node.op_type != "Div" or out is None or out.dtype.kind not in "iu":
            nodes.append(node)
            continue
        divisor = weights.get(node.input[1])
        if divisor is None or not (numpy_helper.to_array(divisor) > 0).all():
            raise UnsupportedOperator(
                f"node {node_label(node)} divides {out.dtype} integers by a divisor that is not "
                "a positive constant: ONNX truncates the quotient, EZKL 23 floors it"
            )
        base = node.name or node.output[0]
        parts = _fresh(taken, node, ["abs", "exact", "floor", "negative", "negated", "zero"])
        dividend, result = node.input[0], node.output[0]
        changed = True
        if out.dtype.kind == "u":  # no negative quotient: truncating is flooring
            nodes += [
                helper.make_node("Div", [dividend, node.input[1]], [parts[1]], name=parts[1]),
                helper.make_node("Cast", [parts[1]], [result], to=out.elem_type, name=base),
            ]
            continue
        graph.initializer.append(numpy_helper.from_array(np.zeros((), out.dtype), parts[5]))
        nodes += [
            helper.make_node("Abs", [dividend], [parts[0]], name=parts[0]),
            helper.make_node("Div", [parts[0], node.input[1]], [parts[1]], name=parts[1]),
            helper.make_node("Cast", [parts[1]], [parts[2]], to=out.elem_type, name=parts[2]),
            # Where rather than Sign: EZKL's tract cannot evaluate Sign on integers.
            helper.make_node("Less", [dividend, parts[5]], [parts[3]], name=parts[3]),
            helper.make_node("Neg", [parts[2]], [parts[4]], name=parts[4]),
            helper.make_node("Where", [parts[3], parts[4], parts[2]], [result], name=base),
        ]
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def edge_padded_max_pools(model: ModelProto, tensors: Mapping[str, TensorSpec]) -> bool:
    """Make a padded ``MaxPool`` provable. ONNX pads it with -inf (padding never wins); EZKL 23
    pads with 0, so a window of negative values next to the border comes out 0. The padding is
    made explicit instead, by repeating the border (``Slice`` and ``Concat`` per spatial axis),
    and the ``MaxPool`` then pads nothing: a window that meets the padding holds the border
    element repeated there (windows are contiguous when ``dilations`` are 1), so its maximum is
    the maximum of its real elements, in ONNX and in the circuit. Pools with dilations,
    ``ceil_mode`` (ONNX Runtime sizes the output from the real input there), an ``auto_pad`` or
    an indices output are left as they are."""
    graph = model.graph
    if max((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), default=0) < 10:
        return False  # Slice takes its bounds as inputs from opset 10
    taken = {x for n in graph.node for x in [*n.input, *n.output]}
    taken |= {t.name for t in graph.initializer}
    nodes: list[NodeProto] = []
    changed = False
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attrs.get("pads", []))
        source = tensors.get(node.input[0]) if node.op_type == "MaxPool" else None
        if (source is None or not any(pads) or len(node.output) > 1 or attrs.get("ceil_mode")
                or any(d != 1 for d in attrs.get("dilations", []))
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            nodes.append(node)
            continue
        spatial = len(pads) // 2
        current = node.input[0]
        for j in range(spatial):
            axis = len(source.shape) - spatial + j
            before, after, size = pads[j], pads[j + spatial], source.shape[axis]
            if not before and not after:
                continue
            first, last, padded, axes, *bounds = _fresh(taken, node, [
                f"edge{j}/{p}" for p in ("first", "last", "padded", "axes", "0", "1", "2", "3")])
            for name, value in zip([axes, *bounds], [axis, 0, 1, size - 1, size], strict=True):
                graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64),
                                                                 name))
            nodes += [
                helper.make_node("Slice", [current, bounds[0], bounds[1], axes], [first],
                                 name=first),
                helper.make_node("Slice", [current, bounds[2], bounds[3], axes], [last],
                                 name=last),
                helper.make_node("Concat", [first] * before + [current] + [last] * after,
                                 [padded], axis=axis, name=padded),
            ]
            current = padded
        rewritten = NodeProto()
        rewritten.CopyFrom(node)
        rewritten.input[0] = current
        for attribute in rewritten.attribute:
            if attribute.name == "pads":
                del attribute.ints[:]
                attribute.ints.extend([0] * len(pads))
        nodes.append(rewritten)
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    return changed
