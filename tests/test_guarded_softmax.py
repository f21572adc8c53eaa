"""The adjudication graph's guarded Softmax (:func:`circuits.adjudication.guarded_softmax`):
``Softmax(Max(x − ReduceMax(x), −C))`` computes what the segment's Softmax does, on causal
masks of −1e4 and on rows whose every score is very negative, under every opset's axis rules;
and EZKL's exponential is looked up on ``[−C·2^s, 0]`` instead of the masked scores' range, so
an attention circuit needs far fewer rows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import ModelProto, TensorProto, helper

from circuits.adjudication import SOFTMAX_FLOOR, adjudication_model
from refute.executor import DeterministicExecutor
from refute.loading import load_model, serialize
from refute.segmentation import Segment, run_segment, segment_model

MASK = -1e4


def _adjudicate(executor: DeterministicExecutor, graph: ModelProto | bytes,
                x: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> float:
    data = graph if isinstance(graph, bytes) else serialize(graph)
    feeds = {f"x{j}": t for j, t in enumerate(x)} | {f"y{j}": t for j, t in enumerate(y)}
    return float(executor.run(data, feeds)[0][0])


def _masked_scores(shape: Sequence[int], seed: int) -> np.ndarray:
    """Scores over the last axis: a causal −1e4 mask, one row a constant −150, one row all
    below −100, one row down to ``float32``'s lowest (a ``finfo.min`` mask)."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-3, 3, size=shape).astype(np.float32)
    rows, keys = shape[-2], shape[-1]
    scores += np.triu(np.full((rows, keys), MASK, dtype=np.float32), k=1)
    scores[..., 0, :] = -150.0
    scores[..., 1, :] = rng.uniform(-400, -100, size=keys)
    scores[..., 2, 1:] = np.finfo(np.float32).min
    return scores


def _bound(row: int) -> float:
    """How far the clamp may move an output: ``(row + 1)·e^{−C}``."""
    return (row + 1) * math.exp(-SOFTMAX_FLOOR)


def unguarded(model: ModelProto) -> ModelProto:
    """``model`` with each guarded Softmax back to a plain one on the unshifted input."""
    out = ModelProto()
    out.CopyFrom(model)
    guard = {n.output[0]: n for n in out.graph.node
             if n.op_type in ("ReduceMax", "Sub", "Max") and n.output[0].startswith("softmax")}
    for node in out.graph.node:
        if node.op_type == "Softmax":
            node.input[0] = guard[guard[node.input[0]].input[0]].input[0]
    kept = [n for n in out.graph.node if n.output[0] not in guard]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    inits = [i for i in out.graph.initializer if not i.name.startswith("softmax")]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    onnx.checker.check_model(out, full_check=True)
    return out


# --- one Softmax, every opset's axis rules ---------------------------------------------------


def _softmax_segment(opset: int, shape: Sequence[int], attrs: dict[str, int]) -> Segment:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], **attrs)], "softmax",  # type: ignore[arg-type]
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8)
    return segment_model(load_model(serialize(model)), cuts=[]).segments[0]


@pytest.mark.parametrize(("opset", "shape", "attrs", "axes"), [
    (9, [2, 3, 8], {}, [1, 2]),  # before 13: coerced to 2-D at axis 1, the default
    (11, [2, 3, 8], {"axis": -2}, [1, 2]),
    (12, [2, 3, 8], {"axis": 2}, [2]),
    (13, [1, 2, 6, 6], {}, [3]),  # from 13: the one axis, -1 by default
    (17, [1, 2, 6, 6], {"axis": -1}, [3]),
    (17, [1, 2, 6, 6], {"axis": 2}, [2]),
    (18, [1, 2, 6, 6], {"axis": -1}, [3]),  # from 18: the axes are an input
])
def test_guarded_softmax_is_the_segments_softmax(
        executor: DeterministicExecutor, opset: int, shape: list[int], attrs: dict[str, int],
        axes: list[int]) -> None:
    segment = _softmax_segment(opset, shape, attrs)
    model = adjudication_model(segment)
    ops = [n.op_type for n in model.graph.node]
    assert ops[:4] == ["ReduceMax", "Sub", "Max", "Softmax"] and ops.count("Softmax") == 1
    reduce = model.graph.node[0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    given = inits[reduce.input[1]].tolist() if opset >= 18 else \
        next(a.ints for a in reduce.attribute if a.name == "axes")
    assert list(given) == axes
    assert inits["softmax0/floor"].tolist() == -SOFTMAX_FLOOR
    x = [_masked_scores(shape, seed=opset)]
    if opset < 13 and axes == [1, 2]:  # one row of the coerced 2-D input: every trailing axis
        x[0][0] = -150.0
    y = run_segment(executor, segment, x)
    row = math.prod(shape[a] for a in axes)
    assert _adjudicate(executor, model, x, y) <= _bound(row)
    lie = [y[0].copy()]
    lie[0].flat[5] += np.float32(0.25)
    assert _adjudicate(executor, model, x, lie) == pytest.approx(0.25, abs=1e-6)


def test_guard_names_cannot_meet_the_segments(executor: DeterministicExecutor) -> None:
    """A segment's own tensor called like a guard's (``softmax0/max``) is moved under ``seg/``:
    the graph's names stay distinct, and it computes what it did."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["softmax0/max"]),
         helper.make_node("Softmax", ["softmax0/max"], ["y"], axis=-1)], "named",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    segment = segment_model(load_model(serialize(model)), cuts=[]).segments[0]
    adjudication = adjudication_model(segment)
    names = [o for n in adjudication.graph.node for o in n.output]
    assert len(names) == len(set(names)) and "seg/softmax0/max" in names
    x = [np.random.default_rng(0).uniform(-3, 3, size=(2, 8)).astype(np.float32)]
    assert _adjudicate(executor, adjudication, x, run_segment(executor, segment, x)) <= _bound(8)


def test_a_graph_without_softmax_is_unchanged() -> None:
    """Only a Softmax is rewritten: another segment's adjudication graph (and the circuit
    cached by its hash) is what it was, its nodes those of the segment then the maxdiff tail."""
    from tests.test_tiling_gpt2 import _export

    for segment in segment_model(load_model(_export())).segments:
        ops = tuple(n.op_type for n in adjudication_model(segment).graph.node)
        guard = ("ReduceMax", "Sub", "Max") if "Softmax" in segment.op_types else ()
        expected = tuple(o for op in segment.op_types
                         for o in ((*guard, op) if op == "Softmax" else (op,)))
        assert ops[:len(expected)] == expected


# --- the attention segment of a small GPT-2 ---------------------------------------------------


def _attention(tokens: int, dim: int, heads: int) -> Segment:
    from tests.test_tiling_gpt2 import _export

    segmentation = segment_model(load_model(_export(tokens=tokens, dim=dim, heads=heads)))
    return next(s for s in segmentation.segments if s.op_types[0] == "Softmax")


def _scores_input(segment: Segment) -> int:
    source = onnx.load_model_from_string(segment.onnx_bytes)
    softmax = next(n for n in source.graph.node if n.op_type == "Softmax")
    return [spec.name for spec in segment.inputs].index(softmax.input[0])


def test_attention_maxdiff_is_unchanged_on_masked_and_very_negative_rows(
        executor: DeterministicExecutor) -> None:
    """The guarded graph's maxdiff is the unguarded one's (within the clamp's bound), for an
    honest claim and a lie, on scores with the −1e4 causal mask and rows of only very negative
    scores (where a clamp without the shift would make the row uniform)."""
    segment = _attention(tokens=16, dim=32, heads=2)
    guarded = adjudication_model(segment)
    plain = unguarded(guarded)
    k = _scores_input(segment)
    rng = np.random.default_rng(1)
    for seed in range(3):
        x = [rng.uniform(-2, 2, size=spec.shape).astype(np.float32) for spec in segment.inputs]
        x[k] = _masked_scores(segment.inputs[k].shape, seed)
        y = run_segment(executor, segment, x)
        assert _adjudicate(executor, guarded, x, y) <= _bound(16) * 4
        lie = [t.copy() for t in y]
        lie[-1].flat[rng.integers(lie[-1].size)] -= np.float32(0.5)
        for claim in (y, lie):
            assert _adjudicate(executor, guarded, x, claim) == pytest.approx(
                _adjudicate(executor, plain, x, claim), abs=_bound(16) * 4)


# --- EZKL --------------------------------------------------------------------------------------


def test_ezkl_looks_exp_up_on_the_clamped_range_only() -> None:
    """Calibrated in EZKL, the guarded attention circuit of a GPT-2 block (16 tokens, d 32,
    2 heads) needs 4 fewer logrows than the unguarded one: the exponential's lookup spans the
    clamped range (with EZKL's margin of 2) instead of the −1e4 mask's 1.3M values; τ and the
    honest maxdiff are the same. (Two EZKL calibrations, about 11 s: not marked slow.)"""
    from prover.calibration import calibrate_segment
    from refute.segmentation import run_segments
    from tests.test_tiling_gpt2 import _export

    segmentation = segment_model(load_model(_export(tokens=16, dim=32, heads=2)))
    segment = next(s for s in segmentation.segments if s.op_types[0] == "Softmax")
    samples = []
    for seed in range(2):
        x = np.random.default_rng(seed).uniform(-2, 2, size=(1, 16, 32)).astype(np.float32)
        states = run_segments(DeterministicExecutor(), segmentation, {"embeddings": x})
        samples.append((states[segment.index - 1], states[segment.index]))
    guarded = adjudication_model(segment)
    found, run_args = {}, {}
    for name, graph in (("guarded", guarded), ("plain", unguarded(guarded))):
        found[name] = calibrate_segment(serialize(graph), segment.index, samples, scale=7,
                                        bound=2.0**15, safety=2.0, max_logrows=21)
        settings = found[name].settings
        assert settings is not None, found[name].reason
        run_args[name] = settings["run_args"]
    low, high = run_args["guarded"], run_args["plain"]
    assert low["lookup_range"] == [-2 * SOFTMAX_FLOOR * 2**7, 0]
    assert high["lookup_range"][0] < -2 * 1e4 * 2**7
    assert low["logrows"] <= high["logrows"] - 4
    assert found["guarded"].tolerance == found["plain"].tolerance
    assert found["guarded"].honest_maxdiff == found["plain"].honest_maxdiff


@pytest.mark.slow
@pytest.mark.ezkl
def test_a_lie_in_attention_is_convicted_through_the_guarded_softmax(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Registered and proven end to end (GPT-2 block, 8 tokens, d 16): the Softmax step's
    circuit looks exp up on the clamped range only; a lie of 0.5 in one attention output is
    convicted, the honest output upheld."""
    import dataclasses

    from prover.calibration import calibrate_model
    from prover.circuit import CircuitCache
    from prover.prover import Prover
    from prover.srs import SrsStore
    from prover.step import Verdict
    from refute.provider import prepare_model, random_inputs, run_trace
    from refute.tiling import worst_tile
    from refute.trace import Trace
    from tests.test_tiling_gpt2 import _export

    prepared = prepare_model(_export())
    step = next(s.index for s in prepared.segmentation.segments if s.op_types[0] == "Softmax")
    manifest, _ = calibrate_model(
        prepared, [random_inputs(prepared.loaded, seed=s) for s in range(2)], only=[step])
    prepared = dataclasses.replace(prepared, manifest=manifest)
    prover = Prover(CircuitCache(tmp_path_factory.mktemp("circuits"),
                                 SrsStore(dev_cache=tmp_path_factory.mktemp("srs"))))
    entry = next(c for c in manifest.circuits or [] if c.get("kind") == "step"
                 and c.get("segment") == step)
    settings = [m["settings"] for m in entry["tiling"]["models"]] if entry.get("tiling") \
        else [entry["settings"]]
    assert all(s["run_args"]["lookup_range"][0] >= -2 * SOFTMAX_FLOOR * 2**manifest.scale
               for s in settings)

    trace = run_trace(prepared, random_inputs(prepared.loaded, seed=5))
    before, honest = trace.states[step - 1], trace.states[step]
    claimed = [t.copy() for t in honest]
    claimed[-1][0, 5, 3] += np.float32(0.5)
    lying = Trace.from_states(manifest, [*trace.states[:step], claimed,
                                         *trace.states[step + 1:]])
    tiling = prover.tiling(prepared, manifest, step)
    tile = None if tiling is None else worst_tile(tiling, honest, claimed).index
    for states, commitment, verdict in ((claimed, lying.commitment, Verdict.PROVIDER_FAULT),
                                        (honest, trace.commitment, Verdict.CHALLENGER_FAULT)):
        proof = prover.prove_step(prepared, manifest, step, before, states, tile=tile)
        assert prover.verify_step(prepared, manifest, proof, commitment,
                                  states=[before, states]).verdict is verdict
