"""The provider's execution: the whole model once, in one optimized ONNX Runtime session whose
outputs include every state (DESIGN.md "Deterministic re-execution": a provider need not use the
deterministic executor; τ absorbs the float differences).

ONNX Runtime keeps every graph output intact while it optimizes, so asking for the state
tensors as outputs gives the values the optimized graph computes for them. Spot-checks, the
watcher and the prover keep :class:`~refute.executor.DeterministicExecutor`.

With a *spool* file, ONNX Runtime writes every state tensor straight into a file mapping
(its outputs are bound to regions of it, :meth:`StateSession.run`), so the states of a large
trace live in the page cache, which the kernel writes back and evicts as it needs, and not in the
process's own memory: the provider's resident memory is ONNX Runtime's working set, however many
states the trace has; the commitment and the bundle writer read the same mapping.

::

    session = StateSession(prepared.segmentation)
    states = session.run(feeds)                      # N+1 lists of arrays, in manifest order
    states = session.run(feeds, spool=Path("t.spool"))  # the same, backed by a file
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from refute.errors import ExecutionError, InputError
from refute.loading import TensorSpec
from refute.segmentation import Segmentation

#: Alignment of every tensor in a spool file (a cache line, what ONNX Runtime's kernels prefer).
_ALIGN = 64


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
        self._float = {o.name: o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                       for o in model.graph.output}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExecutionError(f"ONNX Runtime cannot build the provider session: "
                                 f"{str(exc)[:300]}") from exc

    def run(self, feeds: Mapping[str, np.ndarray], *,
            spool: Path | None = None) -> list[list[np.ndarray]]:
        """Execute once; return the N+1 states (state 0 is the inputs), tensors in state order
        as float32 arrays. With ``spool``, that new file (an existing one is refused) holds
        every state tensor, 64-byte aligned, and the arrays returned are views of its mapping:
        ONNX Runtime writes the float32 states into it directly."""
        if spool is not None:
            return self._run_spooled(feeds, spool)
        try:
            values = dict(zip(self._outputs, self._session.run(self._outputs, dict(feeds)),
                              strict=True))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExecutionError(f"ONNX Runtime failed: {str(exc)[:300]}") from exc
        values.update(feeds)
        return [[np.asarray(values[spec.name], dtype=np.float32) for spec in state]
                for state in self._states]

    def _run_spooled(self, feeds: Mapping[str, np.ndarray],
                     spool: Path) -> list[list[np.ndarray]]:
        arrays = _spool_arrays(spool, [spec for state in self._states for spec in state])
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
            if name in arrays:
                arrays[name][...] = value
        converted = []
        for name in self._outputs:
            target = arrays.get(name)
            if target is not None and self._float[name]:
                binding.bind_output(name, "cpu", 0, np.float32, list(target.shape),
                                    target.ctypes.data)
            else:  # not a state, or not float32: ONNX Runtime allocates, the state is a copy
                binding.bind_output(name, "cpu")
                converted.append(name)
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExecutionError(f"ONNX Runtime failed: {str(exc)[:300]}") from exc
        outputs = dict(zip(self._outputs, binding.get_outputs(), strict=True))
        for name in converted:
            if name in arrays:
                arrays[name][...] = outputs[name].numpy()
        return [[arrays[spec.name] for spec in state] for state in self._states]


def _spool_arrays(spool: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """One float32 array per distinct tensor name, each a view of ``spool`` mapped in full."""
    offsets: dict[str, int] = {}
    end = 0
    for spec in specs:
        if spec.name not in offsets:
            offsets[spec.name] = end
            end += -(-4 * spec.size // _ALIGN) * _ALIGN
    size = max(end, _ALIGN)
    try:  # a new file only: an earlier trace's arrays would silently change under it
        with spool.open("xb") as created:
            created.truncate(size)
    except FileExistsError:
        raise InputError(f"the spool file {spool} exists: each trace needs a file of its own "
                         "(its arrays are views of it)") from None
    except OSError as exc:
        raise ExecutionError(f"cannot create the spool file {spool}: {exc.strerror}") from exc
    mapping = np.memmap(spool, dtype=np.uint8, mode="r+", shape=(size,))
    shapes = {spec.name: spec.shape for spec in specs}
    return {name: mapping[at : at + 4 * math.prod(shapes[name])].view(np.float32)
            .reshape(shapes[name]) for name, at in offsets.items()}
