"""Integer and boolean model inputs: committed and proven at scale 0, as EZKL takes them; and
integer division that truncates in the circuit as it does in ONNX (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import ezkl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from circuits.adjudication import adjudication_bytes, adjudication_model
from circuits.range_graph import range_model
from prover.calibration import calibrate_segment
from prover.circuit import calibrated_settings, felt_to_int, write_input_json
from refute.errors import CommitmentError, SegmentationError, UnsupportedOperator
from refute.executor import DeterministicExecutor
from refute.instances import hash_states
from refute.loading import load_model
from refute.manifest import Manifest
from refute.poseidon import FIELD_MODULUS, poseidon_hash
from refute.provider import prepare_model, validate_inputs
from refute.quantize import quantize, quantize_whole
from refute.segmentation import run_segments, segment_model
from refute.trace import Trace, leaf_of_state
from tests.conftest import SHARED_MODELS


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto] | None = None,
           ) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _gather(rows: int = 5) -> bytes:
    """``y = Relu(MatMul(Gather(table, idx), W))``: an int64 index input and a float table."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
        helper.make_node("MatMul", ["g", "W"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("table", TensorProto.FLOAT, [rows, 3]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rng.uniform(-1, 1, (3, 4)).astype(np.float32), "W")],
    )


def _divide(divisor: np.ndarray | None) -> bytes:
    """``y = x / divisor`` on int64 (``divisor`` None: a second input)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.INT64, [8])]
    inits = []
    if divisor is None:
        inputs.append(helper.make_tensor_value_info("d", TensorProto.INT64, [8]))
    else:
        inits.append(numpy_helper.from_array(divisor, "d"))
    return _model([helper.make_node("Div", ["x", "d"], ["y"])], inputs,
                  [helper.make_tensor_value_info("y", TensorProto.INT64, [8])], inits)


def test_quantize_whole_takes_whole_numbers_at_scale_zero_and_refuses_the_rest() -> None:
    values = np.array([-3.0, 0.0, 7.0, 2.0**20], dtype=np.float32)
    assert quantize_whole(values).tolist() == [-3, 0, 7, 2**20]
    for bad in (2.5, -0.5, np.nan, np.inf):
        with pytest.raises(CommitmentError):
            quantize_whole(np.array([1.0, bad], dtype=np.float32))


def test_integer_inputs_are_whole_in_the_manifest_and_doubles_are_not() -> None:
    data = _model(
        [helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.DOUBLE),
         helper.make_node("Add", ["fi", "d"], ["y"])],
        [helper.make_tensor_value_info("i", TensorProto.INT32, [3]),
         helper.make_tensor_value_info("d", TensorProto.DOUBLE, [3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3])],
    )
    prepared = prepare_model(data)
    state0 = prepared.manifest.states[0]
    assert [(s.name, s.whole) for s in state0] == [("i", True), ("d", False)]
    assert state0[0].declared == TensorProto.INT32
    parsed = Manifest.from_json(json.loads(json.dumps(prepared.manifest.to_json())))
    assert parsed == prepared.manifest
    assert parsed.states[0][0].to_json()["declared"] == "int32"


def test_manifest_refuses_a_declared_type_on_a_tensor_that_cannot_carry_one() -> None:
    doc = prepare_model(_gather()).manifest.to_json()
    doc["states"][0][1]["declared"] = "float32"
    with pytest.raises(Exception, match="declares"):
        Manifest.from_json(doc)


def test_whole_tensors_hash_at_scale_zero_and_must_be_whole() -> None:
    prepared = prepare_model(_gather())
    manifest = prepared.manifest
    table = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
    idx = np.array([4.0, 1.0], dtype=np.float32)
    hashes = hash_states([[table, idx]], 7, specs=[manifest.states[0]])[0]
    assert hashes == [poseidon_hash(quantize(table, 7)), poseidon_hash(np.array([4, 1]))]
    assert hashes[1] != hash_states([[table, idx]], 7)[0][1]  # not the scale-7 hash
    states = run_segments(DeterministicExecutor(), prepared.segmentation,
                          validate_inputs(prepared.loaded, {"table": table, "idx": idx}))
    trace = Trace.from_states(manifest, states, check_range=False)
    assert leaf_of_state(manifest, 0, states[0]) == trace.commitment.leaves[0]
    bad = [[table, np.array([4.0, 0.25], dtype=np.float32)], *states[1:]]
    with pytest.raises(CommitmentError, match="'idx' is a whole-number input but holds a value"):
        Trace.from_states(manifest, bad, check_range=False)
    with pytest.raises(CommitmentError, match="whole numbers"):  # nor can a proof take it
        hash_states([bad[0]], 7, specs=[manifest.states[0]])


def test_no_state_after_the_first_carries_an_integer_input() -> None:
    loaded = load_model(_gather())
    # Cut 1 sits after the boundary Cast: state 1 would hold the int64 copy.
    with pytest.raises(SegmentationError, match="non-float32"):
        segment_model(loaded, cuts=[1])
    assert len(segment_model(loaded).segments) == 1


def test_adjudication_and_range_graphs_take_whole_inputs_with_their_declared_type() -> None:
    prepared = prepare_model(_gather())
    segment = prepared.segmentation.segments[0]
    graph = adjudication_model(segment).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    assert types == {"x0": TensorProto.FLOAT, "x1": TensorProto.INT64, "y0": TensorProto.FLOAT}
    assert not any(n.op_type == "Cast" and "x1" in n.input for n in graph.node)
    state0 = prepared.manifest.states[0]
    session = ort.InferenceSession(range_model(state0, opset=13, index=0).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (top,) = session.run(None, {"v0": np.full((5, 3), 0.5, np.float32),
                                "v1": np.array([-4, 3], np.int64)})
    assert top.tolist() == [4.0]


def test_ezkl_hashes_a_whole_input_as_its_leaf_does(tmp_path: Path) -> None:
    """The binding: EZKL's Poseidon instance of the index input is our scale-0 hash."""
    prepared = prepare_model(_gather())
    table = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
    idx = np.array([3.0, 0.0], dtype=np.float32)
    states = run_segments(DeterministicExecutor(), prepared.segmentation,
                          validate_inputs(prepared.loaded, {"table": table, "idx": idx}))
    tensors = [*states[0], *states[1]]
    graph = adjudication_bytes(prepared.segmentation.segments[0])
    settings = calibrated_settings(graph, 7, [tensors], tmp_path / "s")
    (tmp_path / "g.onnx").write_bytes(graph)
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    assert ezkl.compile_circuit(str(tmp_path / "g.onnx"), str(tmp_path / "c"),
                                str(tmp_path / "settings.json"))
    data = write_input_json(tmp_path / "in.json", tensors)
    witness = ezkl.gen_witness(str(data), str(tmp_path / "c"), str(tmp_path / "w.json"))
    instances = [felt_to_int(h) % FIELD_MODULUS
                 for h in witness["processed_inputs"]["poseidon_hash"]]
    specs = prepared.manifest.states
    assert instances == [*hash_states([states[0]], 7, specs=[specs[0]])[0],
                         *hash_states([states[1]], 7, specs=[specs[1]])[0]]


def test_integer_division_truncates_like_onnx_runtime() -> None:
    divisor = np.array(3, dtype=np.int64)
    data = _divide(divisor)
    x = np.arange(-16, 16, 4, dtype=np.int64)
    original = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (expected,) = original.run(None, {"x": x})
    assert expected.tolist() == [-5, -4, -2, -1, 0, 1, 2, 4]  # toward zero
    prepared = prepare_model(data)
    states = run_segments(DeterministicExecutor(), prepared.segmentation,
                          validate_inputs(prepared.loaded, {"x": x.astype(np.float32)}))
    assert states[-1][0].tolist() == expected.tolist()
    # And the circuit agrees to the unit on negative dividends (EZKL alone floors them).
    calibration = calibrate_segment(
        adjudication_bytes(prepared.segmentation.segments[0]), 1, [(states[0], states[1])],
        scale=7, bound=64.0, safety=1.0)
    assert calibration.reason is None and calibration.tolerance == 1


@pytest.mark.parametrize("divisor", [None, np.array([3, -1, 2, 2, 2, 2, 2, 2], np.int64)])
def test_integer_division_by_anything_but_a_positive_constant_is_refused(
        divisor: np.ndarray | None) -> None:
    with pytest.raises(UnsupportedOperator, match="positive constant"):
        load_model(_divide(divisor))


@pytest.mark.parametrize("name", ["gather_nd", "scatter_elements", "boolean", "bitshift"])
def test_shared_models_with_integer_inputs_calibrate_to_one_unit(name: str) -> None:
    """Index, boolean and shifted-integer inputs, which EZKL could not take at scale 7."""
    from refute.provider import calibration_inputs, input_sizes, read_inputs_json

    folder = SHARED_MODELS / name
    prepared = prepare_model(folder / "network.onnx",
                             input_sizes=input_sizes(folder / "input.json"))
    sample = read_inputs_json(folder / "input.json", prepared.loaded)
    executor = DeterministicExecutor()
    runs = [run_segments(executor, prepared.segmentation, validate_inputs(prepared.loaded, x))
            for x in calibration_inputs(prepared, sample, 2)]
    assert any(s.whole for s in prepared.manifest.states[0])
    for i, segment in enumerate(prepared.segmentation.segments, start=1):
        result = calibrate_segment(adjudication_bytes(segment), i,
                                   [(run[i - 1], run[i]) for run in runs],
                                   scale=7, bound=2048.0, safety=2.0)
        assert result.reason is None, result.reason
        assert result.tolerance is not None and result.tolerance <= 320


@pytest.mark.slow
@pytest.mark.ezkl
def test_range_proof_of_a_state_with_a_whole_input_binds_and_convicts(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """State 0 mixes a float table (scale 7) and an int64 index (scale 0): its range proof
    rebuilds leaf 0 from both hashes, upholds an honest state and convicts an index over R."""
    import dataclasses

    from prover.calibration import calibrate_model
    from prover.circuit import CircuitCache
    from prover.prover import Prover
    from prover.srs import SrsStore
    from prover.step import Verdict
    from refute.provider import random_inputs

    prepared = prepare_model(_gather())
    manifest, report = calibrate_model(
        prepared, [random_inputs(prepared.loaded, seed=s) for s in range(2)])
    assert not report.unsupported and manifest.range is not None
    prepared = dataclasses.replace(prepared, manifest=manifest)
    prover = Prover(CircuitCache(tmp_path_factory.mktemp("circuits"),
                                 SrsStore(dev_cache=tmp_path_factory.mktemp("srs"))))
    table = np.linspace(-1, 1, 15, dtype=np.float32).reshape(5, 3)
    states = run_segments(DeterministicExecutor(), prepared.segmentation, validate_inputs(
        prepared.loaded, {"table": table, "idx": np.array([4.0, 1.0], np.float32)}))
    trace = Trace.from_states(manifest, states)
    honest = prover.prove_range(prepared, manifest, 0, trace.states[0])
    assert prover.verify_range(prepared, manifest, honest, trace.commitment,
                               state=trace.states[0]).verdict is Verdict.CHALLENGER_FAULT
    over = np.array([4.0, 2 * manifest.range], np.float32)  # whole, but over R
    bad = Trace.from_states(manifest, [[table, over], *states[1:]], check_range=False)
    proof = prover.prove_range(prepared, manifest, 0, bad.states[0])
    outcome = prover.verify_range(prepared, manifest, proof, bad.commitment, state=bad.states[0])
    assert outcome.verdict is Verdict.PROVIDER_FAULT
    assert outcome.maxabs_units == 2 * manifest.range * 2**manifest.scale
