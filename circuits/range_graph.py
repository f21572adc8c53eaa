"""The range graph of a state (DESIGN.md "Range rule").

``R_k(v) = max over elements of |v|`` for the tensors of state k, given as hashed inputs in state
order, so the proof's instances are ``Poseidon(v_1) … Poseidon(v_m), max|v|``: the hashes rebuild
leaf k and the public maximum shows whether the state breaks the declared range R.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnx import ModelProto, TensorProto, helper

from circuits.adjudication import max_abs
from refute.loading import TensorSpec, serialize
from refute.segmentation import standalone_model

MAXABS = "maxabs"


def range_model(state: Sequence[TensorSpec], *, opset: int, index: int) -> ModelProto:
    """The ONNX model ``R_k`` over a state with these tensor specs."""
    inputs = [f"v{j}" for j in range(len(state))]
    # A whole-number input is taken with its declared type (at scale 0, as its leaf commits
    # it) and cast to float for the maximum.
    casts = [helper.make_node("Cast", [n], [f"{n}/float"], to=TensorProto.FLOAT)
             for n, s in zip(inputs, state, strict=True) if s.whole]
    floats = [f"{n}/float" if s.whole else n for n, s in zip(inputs, state, strict=True)]
    nodes, initializers = max_abs(floats, MAXABS)
    graph = helper.make_graph(
        [*casts, *nodes],
        f"refute_range_{index}",
        [helper.make_tensor_value_info(n, s.declared or s.elem_type, list(s.shape) or [1])
         for n, s in zip(inputs, state, strict=True)],  # scalars as [1]
        [helper.make_tensor_value_info(MAXABS, TensorProto.FLOAT, [1])],
        initializer=initializers,
    )
    return standalone_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8,
        label=f"range graph of state {index}",
    )


def range_bytes(state: Sequence[TensorSpec], *, opset: int, index: int) -> bytes:
    """Deterministic bytes of :func:`range_model`."""
    return serialize(range_model(state, opset=opset, index=index))
