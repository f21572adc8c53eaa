"""Commitments: SHA-256 chunked leaves against an independent computation from the documented
byte layout (docs/FORMATS.md "Leaves"), the root, and Poseidon instances equal to EZKL's
(incl. the instance in a real proof)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import ezkl
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from prover.circuit import run_args
from refute import leaves
from refute.commitment import TraceCommitment
from refute.errors import BundleError, CommitmentError
from refute.instances import hash_states
from refute.leaves import CHUNK, state_leaf
from refute.merkle import verify_merkle_proof
from refute.quantize import quantize


def _ezkl_hash(values: np.ndarray, scale: int) -> int:
    felts = [ezkl.float_to_felt(float(v), scale) for v in values.ravel()]
    return int.from_bytes(bytes.fromhex(ezkl.poseidon_hash(felts)[0]), "little")


def _documented_leaf(state: list[np.ndarray]) -> bytes:
    """The leaf computed from docs/FORMATS.md alone, with plain hashlib and struct."""
    data = b""
    for t in state:
        data += b"<f4\x00" + struct.pack("<I", t.ndim)
        data += b"".join(struct.pack("<Q", d) for d in t.shape)
        data += b"".join(struct.pack("<f", float(v)) for v in t.ravel())
    nodes = [hashlib.sha256(b"\x00" + data[i : i + 4096]).digest()
             for i in range(0, max(len(data), 1), 4096)]
    while len(nodes) > 1:
        up = [hashlib.sha256(b"\x01" + nodes[i] + nodes[i + 1]).digest()
              for i in range(0, len(nodes) - 1, 2)]
        nodes = up + ([nodes[-1]] if len(nodes) % 2 else [])
    return hashlib.sha256(b"\x02" + struct.pack("<Q", len(data)) + nodes[0]).digest()


@pytest.mark.parametrize("shapes", [
    [()],                                   # a scalar: one short chunk
    [(1, 5)],
    [(1, 2, 3), (7,)],
    [(1, 1024)],                            # header pushes the values past one chunk
    [(3, 1021), (2, 2048), (5,)],           # chunks straddling tensors, odd counts per level
    [(1, 8, 64, 64)],                       # 32 chunks: many levels, several threads
])
def test_leaf_equals_the_documented_byte_layout(shapes: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(len(shapes))
    state = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    expected = _documented_leaf(state)
    assert state_leaf(state, threads=1) == expected
    assert state_leaf(state, threads=2) == expected
    assert CHUNK == 4096


def test_native_leaves_agree_for_every_thread_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads split the flat chunk list of all states anywhere (inside a state, across state
    borders, more threads than chunks): every split gives the documented leaves."""
    monkeypatch.setattr(leaves, "_CHUNKS_PER_THREAD", 1)
    rng = np.random.default_rng(3)
    states = [[rng.standard_normal(n).astype(np.float32)] for n in (1, 1019, 1024, 9000, 3)]
    states.append([rng.standard_normal((7, 333)).astype(np.float32),
                   np.asarray(rng.random(), dtype=np.float32)])  # a scalar tensor
    expected = [_documented_leaf([np.asarray(t) for t in s]) for s in states]
    for threads in (1, 2, 3, 5, 64):
        assert leaves.state_leaves(states, threads=threads) == expected
    assert leaves.state_leaves([], threads=2) == []


def test_leaf_binds_values_shapes_order_and_length() -> None:
    a = np.arange(12, dtype=np.float32)
    leaf = state_leaf([a])
    assert state_leaf([a.reshape(3, 4)]) != leaf          # shape
    assert state_leaf([a[:6], a[6:]]) != leaf             # split into two tensors
    flipped = a.copy()
    flipped[5] = np.nextafter(flipped[5], np.float32(100))
    assert state_leaf([flipped]) != leaf                  # one ulp
    b = np.ones(3, np.float32)
    assert state_leaf([a, b]) != state_leaf([b, a])       # order
    negative_zero = np.zeros(2, np.float32) * -1
    assert state_leaf([negative_zero]) != state_leaf([np.zeros(2, np.float32)])  # bytes, not =
    with pytest.raises(CommitmentError, match="float32"):
        state_leaf([np.ones(2, np.float64)])
    with pytest.raises(CommitmentError, match="at least one tensor"):
        state_leaf([])


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


def test_commitment_json_roundtrip_and_proofs() -> None:
    rng = np.random.default_rng(2)
    states = [[rng.standard_normal((2, i + 1)).astype(np.float32)] for i in range(5)]
    commitment = TraceCommitment.of_states(7, states)
    assert commitment.leaves == tuple(_documented_leaf(s) for s in states)
    big = [[rng.standard_normal((3, 300, 1000)).astype(np.float32)], *states]  # > 512 chunks
    assert TraceCommitment.of_states(7, big, threads=2).leaves == tuple(
        state_leaf(s, threads=1) for s in big)
    again = TraceCommitment.from_json(json.loads(json.dumps(commitment.to_json())))
    assert again == commitment
    for k in range(commitment.num_states):
        assert verify_merkle_proof(commitment.root, commitment.leaves[k], commitment.proof(k))
    forged = commitment.to_json()
    forged["leaves"][2] = "0x" + bytes(32).hex()
    with pytest.raises(BundleError, match="root"):
        TraceCommitment.from_json(forged)
    with pytest.raises(BundleError, match="malformed"):
        TraceCommitment.from_json({"leaf_format": "sha256-chunk4k/1", "scale": 7,
                                   "leaves": ["0x12"], "root": "0x00"})
    old = commitment.to_json()
    del old["leaf_format"]  # a commitment of refute's Poseidon leaves
    with pytest.raises(BundleError, match="no longer accepted"):
        TraceCommitment.from_json(old)


def test_non_finite_values_cannot_be_quantized_for_a_proof() -> None:
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
    # A different tensor does not hash to that instance.
    other = x.copy()
    other[0, 0] += 1.0 / 128
    assert hash_states([[other]], 7, workers=1)[0][0] != instance
    assert quantize(other, 7)[0, 0] == quantize(x, 7)[0, 0] + 1
