"""The deterministic executor: identical bytes across runs and across fresh processes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from refute import zoo
from refute.errors import ExecutionError, InputError
from refute.executor import DeterministicExecutor, session_options
from refute.loading import load_model
from refute.provider import random_inputs
from refute.segmentation import run_segment, run_segments, segment_model

MODELS = [zoo.cnn, zoo.attention_block, zoo.mlp_8x256]


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("build", MODELS, ids=[b.__name__ for b in MODELS])
def test_same_segment_same_state_same_bytes_50_runs(build: object) -> None:
    model = build()  # type: ignore[operator]
    loaded = load_model(model.onnx_bytes)
    seg = segment_model(loaded)
    states = run_segments(DeterministicExecutor(), seg, model.sample_input(1))
    for segment, state in zip(seg.segments, states, strict=False):
        executor = DeterministicExecutor()  # fresh sessions, too
        reference = _digest(run_segment(executor, segment, state))
        for _ in range(50):
            assert _digest(run_segment(executor, segment, state)) == reference


_CHILD = textwrap.dedent(
    """
    import hashlib, sys
    from refute import zoo
    from refute.executor import DeterministicExecutor
    from refute.loading import load_model
    from refute.segmentation import run_segments, segment_model
    model = getattr(zoo, sys.argv[1])()
    seg = segment_model(load_model(model.onnx_bytes))
    h = hashlib.sha256()
    for state in run_segments(DeterministicExecutor(), seg, model.sample_input(1)):
        for t in state:
            h.update(t.tobytes())
    print(h.hexdigest())
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "attention_block"])
def test_fresh_processes_agree(name: str) -> None:
    model = getattr(zoo, name)()
    seg = segment_model(load_model(model.onnx_bytes))
    here = _digest(
        [t for s in run_segments(DeterministicExecutor(), seg, model.sample_input(1)) for t in s]
    )
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, name], capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == here


def test_configuration_is_the_designed_one() -> None:
    import onnxruntime as ort

    options = session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_sessions_are_cached_by_content() -> None:
    executor = DeterministicExecutor(cache_size=2)
    a = zoo.mlp().onnx_bytes
    b = zoo.cnn().onnx_bytes
    c = zoo.residual_block().onnx_bytes
    first = executor.session(a)
    assert executor.session(bytes(a)) is first
    executor.session(b)
    executor.session(c)  # evicts a
    assert executor.session(a) is not first


def test_bad_feeds_are_refused() -> None:
    model = zoo.mlp()
    loaded = load_model(model.onnx_bytes)
    executor = DeterministicExecutor()
    good = random_inputs(loaded)
    name = loaded.input_names[0]
    graph = model.onnx_bytes
    with pytest.raises(InputError, match="missing"):
        executor.run(graph, {})
    with pytest.raises(InputError, match="float32"):
        executor.run(graph, {name: good[name].astype(np.float64)})
    with pytest.raises(InputError, match="shape"):
        executor.run(graph, {name: np.zeros((2, *good[name].shape[1:]), np.float32)})
    with pytest.raises(ExecutionError):
        executor.run(b"not an onnx graph", {})
