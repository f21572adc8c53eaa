"""The range graph of a state, and of one chunk of a large state (DESIGN.md "Range rule").

``R_k(v) = max over elements of |v|`` for the tensors of state k, given as hashed inputs in state
order, so the proof's instances are ``Poseidon(v_1) … Poseidon(v_m), max|v|``: the hashes rebuild
leaf k and the public maximum shows whether the state breaks the declared range R.

A state too large for one such circuit is proven on a chunk (:mod:`refute.chunks`): the chunk
graph takes one tensor of shape ``[B]`` and does not depend on the state, so one circuit per
(B, element type) serves every chunk of every chunked state; its instances are
``Poseidon(chunk), max|chunk|``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from onnx import ModelProto, TensorProto, helper

from circuits.adjudication import max_abs
from refute.chunks import CHUNKING
from refute.loading import TensorSpec, serialize
from refute.segmentation import standalone_model

MAXABS = "maxabs"


def _max_abs_model(tensors: Sequence[TensorSpec], *, opset: int, name: str,
                   label: str) -> ModelProto:
    """``[max |v|]`` over every element of hashed inputs with these specs."""
    inputs = [f"v{j}" for j in range(len(tensors))]
    # A whole-number input is taken with its declared type (at scale 0, as its leaf commits
    # it) and cast to float for the maximum.
    casts = [helper.make_node("Cast", [n], [f"{n}/float"], to=TensorProto.FLOAT)
             for n, s in zip(inputs, tensors, strict=True) if s.whole]
    floats = [f"{n}/float" if s.whole else n for n, s in zip(inputs, tensors, strict=True)]
    nodes, initializers = max_abs(floats, MAXABS)
    graph = helper.make_graph(
        [*casts, *nodes],
        name,
        [helper.make_tensor_value_info(n, s.declared or s.elem_type, list(s.shape) or [1])
         for n, s in zip(inputs, tensors, strict=True)],  # scalars as [1]
        [helper.make_tensor_value_info(MAXABS, TensorProto.FLOAT, [1])],
        initializer=initializers,
    )
    return standalone_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8, label=label,
    )


def range_model(state: Sequence[TensorSpec], *, opset: int, index: int) -> ModelProto:
    """The ONNX model ``R_k`` over a state with these tensor specs."""
    return _max_abs_model(state, opset=opset, name=f"refute_range_{index}",
                          label=f"range graph of state {index}")


def range_bytes(state: Sequence[TensorSpec], *, opset: int, index: int) -> bytes:
    """Deterministic bytes of :func:`range_model`."""
    return serialize(range_model(state, opset=opset, index=index))


def chunk_model(chunk: TensorSpec, *, opset: int) -> ModelProto:
    """The ONNX model of a range chunk: ``[max |v|]`` over one tensor with the chunk's element
    type and shape ``[B]`` (:meth:`refute.chunks.Chunking.spec`). Its bytes depend on B, the
    element type and the opset only."""
    (size,) = chunk.shape
    plain = TensorSpec("chunk", chunk.elem_type, (size,), declared=chunk.declared)
    return _max_abs_model([plain], opset=opset, name=f"refute_range_chunk_{size}",
                          label=f"range graph of a chunk of {size} elements")


def chunk_bytes(chunk: TensorSpec, *, opset: int) -> bytes:
    """Deterministic bytes of :func:`chunk_model`."""
    return serialize(chunk_model(chunk, opset=opset))


def chunk_circuit(entry: Mapping[str, Any], chunk: TensorSpec, *,
                  opset: int) -> tuple[bytes, dict[str, Any] | None]:
    """The graph of a chunk with spec ``chunk`` (:meth:`refute.chunks.Chunking.spec`) and the
    settings a chunked state's range ``entry`` records for it (``chunking.models``, by the
    sha256 of the graph); ``None`` when it records none."""
    graph = chunk_bytes(chunk, opset=opset)
    digest = hashlib.sha256(graph).hexdigest()
    chunking = entry.get(CHUNKING)
    models = chunking.get("models") if isinstance(chunking, Mapping) else None
    for model in models if isinstance(models, list) else []:
        if isinstance(model, Mapping) and model.get("sha256") == digest:
            settings = model.get("settings")
            return graph, dict(settings) if isinstance(settings, Mapping) else None
    return graph, None
