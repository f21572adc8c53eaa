"""The cost of a tile: the EZKL circuit rows its adjudication circuit is estimated to need
(the constants fitted on EZKL), and :func:`rows_bound` for a number of logrows."""

from __future__ import annotations

import math
from collections.abc import Mapping

from refute.tiling.boxes import _sizes
from refute.tiling.graph import _attr, _Graph
from refute.tiling.propagation import _Plan
from refute.tiling.steps import _Step
from refute.tiling.tiles import TileCost

#: EZKL 23.0.5's circuit rows, measured (``gen_settings`` + ``calibrate_settings``, target
#: ``resources``, scale 7, 2 inner columns, hashed inputs, fixed parameters) on the adjudication
#: graphs of 15 one-node models (tests/test_tiling_cost.py holds the table). Its ``num_rows``
#: is the larger of two regions, not their sum:
#:
#: * the Poseidon hashing of the inputs and outputs: exactly ``41·hashed + 4`` rows in every
#:   case (Relu, Tanh, Softmax, LayerNormalization, Mul, Add, MatMul, Conv);
#: * the model's own cells over 2 inner columns, ``(10·in + 49·out + MACs + 40·op cells)/2``,
#:   where *in* and *out* are the hashed input and output elements (quantization, and the
#:   Sub/Abs/ReduceMax tail of the adjudication graph), *MACs* the multiply-accumulates EZKL
#:   lays out one a cell (a Conv; a MatMul or Gemm whose tile has one row: a row-vector times a
#:   matrix is a chain of dot products, 589,824 cells for 1×768 @ 768×768, the GPT-2
#:   out-projection tile that needed 9.3 GB), and *op cells* the output elements of operators
#:   that rescale or look up inside a chain (Mul, Div, Tanh, Erf, Exp, Softmax, Relu, …;
#:   LayerNormalization counts 2.5 times, a Softmax with its guard 3.4 times). A MatMul of
#:   several rows is laid out by EZKL's einsum argument in columns of their own
#:   (``total_einsum_col_size`` ≈ its operands and product); those cells are counted like MACs,
#:   a bound: they did not make any measured circuit taller.
#:
#: All 15 estimates are within 2 rows of EZKL's except the GELU chain (1.5 % under). The
#: estimate is for planning (choosing blocks); the settings EZKL calibrates decide.
ROWS_PER_HASHED = 41
ROWS_FIXED = 4
CELLS_PER_INPUT = 10
CELLS_PER_OUTPUT = 49
CELLS_PER_MAC = 1
CELLS_PER_OP = 40
INNER_COLUMNS = 2

#: Operators whose every output element costs :data:`CELLS_PER_OP` cells (times the weight).
_OP_WEIGHTS: Mapping[str, float] = {
    **dict.fromkeys(("Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Tanh", "Erf", "Exp", "Log",
                     "Sigmoid", "LogSoftmax", "Relu", "LeakyRelu", "Clip",
                     "HardSigmoid", "HardSwish", "Max", "Min", "Abs", "ReduceMean", "ReduceMax",
                     "ReduceSum", "AveragePool", "MaxPool", "GlobalAveragePool",
                     "GlobalMaxPool", "BatchNormalization", "InstanceNormalization"), 1.0),
    "LayerNormalization": 2.5,
    # The adjudication graph guards each Softmax with a ReduceMax, a Sub and a Max
    # (circuits/adjudication.py): 398,494 rows for 1×2×16×128 against 335,876 unguarded.
    "Softmax": 3.4,
}


def _macs(g: _Graph, plan: _Plan, step: _Step) -> tuple[int, int]:
    """(MACs laid out one a cell, einsum cells) of one node of a tile."""
    node = step.node
    out = math.prod(_sizes(plan.boxes[node.output[0]]))
    if node.op_type == "Conv":
        w_shape = g.shape(node.input[1])
        return out * math.prod(w_shape[1:]), 0
    if node.op_type in ("MatMul", "Gemm"):
        a_box, b_box = step.boxes[0], step.boxes[1]
        assert a_box is not None and b_box is not None
        transposed = node.op_type == "Gemm" and int(_attr(node, "transA", 0))
        rows = _sizes(a_box)[-1 if transposed else -2]
        depth = _sizes(a_box)[-2 if transposed else -1]
        if rows == 1:
            return out * depth, 0
        return 0, math.prod(_sizes(a_box)) + math.prod(_sizes(b_box)) + out
    return 0, 0


def _estimate(g: _Graph, output: int, plan: _Plan) -> TileCost:
    inputs = sum(math.prod(_sizes(plan.boxes[x])) for x in g.inputs if x in plan.boxes)
    outputs = math.prod(_sizes(plan.boxes[g.outputs[output]]))
    macs = einsum = 0
    ops = 0.0
    for step in plan.steps:
        m, e = _macs(g, plan, step)
        macs, einsum = macs + m, einsum + e
        weight = _OP_WEIGHTS.get(step.node.op_type, 0.0)
        if weight:
            ops += weight * math.prod(_sizes(plan.boxes[step.node.output[0]]))
    cells = (CELLS_PER_INPUT * inputs + CELLS_PER_OUTPUT * outputs
             + CELLS_PER_MAC * (macs + einsum) + CELLS_PER_OP * ops)
    rows = max(ROWS_PER_HASHED * (inputs + outputs) + ROWS_FIXED,
               math.ceil(cells / INNER_COLUMNS))
    return TileCost(inputs + outputs, macs + einsum, math.ceil(ops), rows)


def rows_bound(logrows: int) -> int:
    """The estimated rows (:class:`TileCost`) a tile may have for its circuit to fit
    ``2^logrows`` rows: EZKL keeps a few rows for blinding, and the estimate is a few percent
    off, so 6 % is kept free."""
    return int(2**logrows * 0.94)
