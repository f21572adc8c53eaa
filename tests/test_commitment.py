"""Commitments: Poseidon hashes equal EZKL's (incl. the instance in a real proof), leaves, root."""

from __future__ import annotations

import json
from pathlib import Path

import ezkl
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from prover.circuit import run_args
from refute.commitment import TraceCommitment, hash_states, hash_word, state_leaf
from refute.errors import BundleError, CommitmentError
from refute.merkle import keccak256, verify_merkle_proof
from refute.poseidon import FIELD_MODULUS
from refute.quantize import quantize


def _ezkl_hash(values: np.ndarray, scale: int) -> int:
    felts = [ezkl.float_to_felt(float(v), scale) for v in values.ravel()]
    return int.from_bytes(bytes.fromhex(ezkl.poseidon_hash(felts)[0]), "little")


def test_state_hashes_equal_ezkl_binding() -> None:
    rng = np.random.default_rng(1)
    states = [
        [rng.uniform(-3, 3, (1, 5)).astype(np.float32)],
        [rng.uniform(-3, 3, (1, 2, 3)).astype(np.float32),
         rng.uniform(-3, 3, (7,)).astype(np.float32)],
    ]
    hashes = hash_states(states, 7, workers=1)
    for state, got in zip(states, hashes, strict=True):
        assert got == [_ezkl_hash(t, 7) for t in state]


def test_leaf_is_keccak_of_big_endian_words() -> None:
    hashes = [1, FIELD_MODULUS - 1, 2**200]
    expected = keccak256(b"".join(h.to_bytes(32, "big") for h in hashes))
    assert state_leaf(hashes) == expected
    with pytest.raises(CommitmentError):
        state_leaf([])
    with pytest.raises(CommitmentError):
        hash_word(FIELD_MODULUS)


def test_commitment_json_roundtrip_and_proofs() -> None:
    hashes = [[i + 1, i + 2] for i in range(5)]
    commitment = TraceCommitment.from_hashes(7, hashes)
    again = TraceCommitment.from_json(json.loads(json.dumps(commitment.to_json())))
    assert again == commitment
    for k in range(commitment.num_states):
        assert verify_merkle_proof(commitment.root, commitment.leaves[k], commitment.proof(k))
    forged = commitment.to_json()
    forged["leaves"][2] = "0x" + bytes(32).hex()
    with pytest.raises(BundleError, match="root"):
        TraceCommitment.from_json(forged)
    with pytest.raises(BundleError, match="malformed"):
        TraceCommitment.from_json({"scale": 7, "leaves": ["0x12"], "root": "0x00"})


def test_non_finite_state_cannot_be_committed() -> None:
    with pytest.raises(CommitmentError, match="non-finite"):
        hash_states([[np.array([1.0, np.nan], np.float32)]], 7)


@pytest.mark.slow
@pytest.mark.ezkl
def test_hash_equals_instance_in_real_ezkl_proof(tmp_path: Path) -> None:
    """The test vector: our Poseidon of a tensor is the hash EZKL puts in a proof for it."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"])], "vector",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    paths = {n: str(tmp_path / n) for n in (
        "m.onnx", "in.json", "settings.json", "m.compiled", "w.json", "vk.key", "pk.key",
        "proof.json", "kzg.srs")}
    onnx.save(model, paths["m.onnx"])
    x = rng.uniform(-1, 1, (1, 4)).astype(np.float32)
    Path(paths["in.json"]).write_text(json.dumps({"input_data": [x.ravel().tolist()]}))
    args = run_args(7)  # hashed input, fixed params, public output, scale 7
    assert ezkl.gen_settings(paths["m.onnx"], paths["settings.json"], py_run_args=args)
    assert ezkl.calibrate_settings(paths["in.json"], paths["m.onnx"], paths["settings.json"],
                                   "resources", scales=[7])
    logrows = json.loads(Path(paths["settings.json"]).read_text())["run_args"]["logrows"]
    assert ezkl.compile_circuit(paths["m.onnx"], paths["m.compiled"], paths["settings.json"])
    ezkl.gen_witness(paths["in.json"], paths["m.compiled"], paths["w.json"])
    # Development SRS, generated locally: unsafe for production, fine for a test vector.
    ezkl.gen_srs(paths["kzg.srs"], logrows)
    assert ezkl.setup(paths["m.compiled"], paths["vk.key"], paths["pk.key"],
                      srs_path=paths["kzg.srs"])
    proof = ezkl.prove(paths["w.json"], paths["m.compiled"], paths["pk.key"], paths["proof.json"],
                       srs_path=paths["kzg.srs"])
    assert ezkl.verify(paths["proof.json"], paths["settings.json"], paths["vk.key"],
                       srs_path=paths["kzg.srs"])
    instance = int.from_bytes(bytes.fromhex(proof["instances"][0][0]), "little")
    (ours,) = hash_states([[x]], 7, workers=1)[0]
    assert ours == instance
    # And the big-endian word the chain sees is what the leaf is built from.
    assert ezkl.felt_to_big_endian(proof["instances"][0][0]) == "0x" + hash_word(ours).hex()
    assert state_leaf([ours]) == keccak256(hash_word(ours))
    # A different tensor does not hash to that instance.
    other = x.copy()
    other[0, 0] += 1.0 / 128
    assert hash_states([[other]], 7, workers=1)[0][0] != instance
    assert quantize(other, 7)[0, 0] == quantize(x, 7)[0, 0] + 1
