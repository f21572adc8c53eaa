"""Deterministic re-execution of ONNX graphs with ONNX Runtime.

DESIGN.md fixes the configuration: CPU execution provider, one intra-op and one inter-op thread,
sequential execution, graph optimizations disabled, and a pinned onnxruntime version (see
``pyproject.toml``). Under it the same graph on the same inputs yields the same bytes on every
run and in every process, which is what lets a provider, the service and a challenger agree on a
state bit for bit.

Sessions are expensive to build, so :class:`DeterministicExecutor` caches them by the sha256 of
the graph bytes (a small LRU, thread-safe).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from refute.errors import ExecutionError, InputError

#: The onnxruntime version traces are reproducible under; recorded in every manifest.
ORT_VERSION: str = ort.__version__


def session_options() -> ort.SessionOptions:
    """The one ONNX Runtime configuration refute executes with (DESIGN.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.use_deterministic_compute = True
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class DeterministicExecutor:
    """Runs ONNX graphs under the deterministic configuration, caching sessions by content."""

    def __init__(self, cache_size: int = 64) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._cache_size = cache_size
        self._sessions: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, model_bytes: bytes, *, key: str | None = None) -> ort.InferenceSession:
        """Return the cached session for these graph bytes, building it on first use.

        ``key`` is the sha256 (hex) of ``model_bytes`` when the caller already knows it; hashing
        a large graph on every run would otherwise dominate small executions.
        """
        key = key or hashlib.sha256(model_bytes).hexdigest()
        with self._lock:
            cached = self._sessions.get(key)
            if cached is not None:
                self._sessions.move_to_end(key)
                return cached
        try:
            built = ort.InferenceSession(
                model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise ExecutionError(f"ONNX Runtime cannot load the graph: {_one_line(exc)}") from exc
        with self._lock:
            self._sessions[key] = built
            self._sessions.move_to_end(key)
            while len(self._sessions) > self._cache_size:
                self._sessions.popitem(last=False)
        return built

    def run(
        self,
        model_bytes: bytes,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        *,
        key: str | None = None,
    ) -> list[np.ndarray]:
        """Run the graph on ``feeds`` and return its outputs (all, or those named) in order.

        Feeds must name exactly the graph's inputs, with the declared dtype and shape. ``key``
        is as for :meth:`session`.
        """
        sess = self.session(model_bytes, key=key)
        expected = {i.name: i for i in sess.get_inputs()}
        if set(feeds) != set(expected):
            missing = sorted(set(expected) - set(feeds))
            extra = sorted(set(feeds) - set(expected))
            raise InputError(
                f"inputs do not match the graph: missing {missing}, unexpected {extra}"
            )
        prepared: dict[str, np.ndarray] = {}
        for name, value in feeds.items():
            array = np.asarray(value)
            meta = expected[name]
            if array.dtype != np.float32:
                raise InputError(f"input {name!r} must be float32, got {array.dtype}")
            if list(array.shape) != list(meta.shape):
                raise InputError(
                    f"input {name!r} must have shape {list(meta.shape)}, got {list(array.shape)}"
                )
            prepared[name] = np.asarray(array, order="C")  # a scalar stays 0-d
        try:
            outputs = sess.run(list(output_names) if output_names is not None else None, prepared)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise ExecutionError(f"ONNX Runtime failed: {_one_line(exc)}") from exc
        return [np.asarray(o) for o in outputs]


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]
