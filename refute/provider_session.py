"""The provider's execution: the whole model once, in one optimized ONNX Runtime session whose
outputs include every state (DESIGN.md "Deterministic re-execution": a provider need not use the
deterministic executor; τ absorbs the float differences).

ONNX Runtime keeps every graph output intact while it optimizes, so asking for the state
tensors as outputs gives the values the optimized graph computes for them. Spot-checks, the
watcher and the prover keep :class:`~refute.executor.DeterministicExecutor`.

::

    session = StateSession(prepared.segmentation)
    states = session.run(feeds)           # N+1 lists of arrays, in manifest order
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from refute.errors import ExecutionError
from refute.segmentation import Segmentation


class StateSession:
    """One ONNX Runtime session (default graph optimizations, every core) over the whole
    canonical model, with every state tensor as an output."""

    def __init__(self, segmentation: Segmentation, *, threads: int | None = None) -> None:
        loaded = segmentation.model
        model = onnx.load_from_string(loaded.onnx_bytes)
        inputs = set(loaded.input_names)
        present = {o.name for o in model.graph.output}
        self._states = segmentation.states
        for state in segmentation.states[1:]:
            for spec in state:
                if spec.name in inputs or spec.name in present:
                    continue
                model.graph.output.append(
                    helper.make_tensor_value_info(spec.name, spec.elem_type, list(spec.shape)))
                present.add(spec.name)
        self._outputs = [o.name for o in model.graph.output]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExecutionError(f"ONNX Runtime cannot build the provider session: "
                                 f"{str(exc)[:300]}") from exc

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Execute once; return the N+1 states (state 0 is the inputs), tensors in state order
        as float32 arrays."""
        try:
            values = dict(zip(self._outputs, self._session.run(self._outputs, dict(feeds)),
                              strict=True))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExecutionError(f"ONNX Runtime failed: {str(exc)[:300]}") from exc
        values.update(feeds)
        return [[np.asarray(values[spec.name], dtype=np.float32) for spec in state]
                for state in self._states]
