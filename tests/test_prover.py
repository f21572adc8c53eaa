"""Real EZKL proofs of adjudication and range circuits, bound to trace commitments."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from prover.calibration import calibrate_model
from prover.circuit import CircuitCache
from prover.errors import CircuitUnsupported, ProofRejected
from prover.evm import (
    Anvil,
    compile_solidity,
    deploy,
    verify_call,
    verify_transaction,
    write_verifier_sol,
)
from prover.prover import Prover
from prover.srs import SrsStore
from prover.step import StepProof, Verdict
from refute import zoo
from refute.errors import CommitmentError
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model, random_inputs, run_trace
from refute.trace import Trace
from tests.conftest import shared_models

pytestmark = [pytest.mark.slow, pytest.mark.ezkl]

SHARED = {m.name: m for m in shared_models()}


@pytest.fixture(scope="session")
def srs_store(tmp_path_factory: pytest.TempPathFactory) -> SrsStore:
    """A development SRS cache (unsafe: generated locally), shared by the whole run."""
    return SrsStore(dev_cache=tmp_path_factory.mktemp("srs"))


@pytest.fixture(scope="session")
def prover(srs_store: SrsStore, tmp_path_factory: pytest.TempPathFactory) -> Prover:
    return Prover(CircuitCache(tmp_path_factory.mktemp("circuits"), srs_store))


@dataclasses.dataclass
class Calibrated:
    prepared: PreparedModel
    manifest: Manifest
    trace: Trace


def _calibrated(name: str) -> Calibrated:
    if name in SHARED:
        shared = SHARED[name]
        prepared = prepare_model(shared.path, dims={"batch_size": 1})
        inputs = shared.inputs(prepared.loaded)
    else:
        model = getattr(zoo, name)()
        prepared = prepare_model(model.onnx_bytes)
        inputs = model.sample_input(0)
    manifest, report = calibrate_model(
        prepared, [random_inputs(prepared.loaded, seed=s) for s in range(4)]
    )
    assert not report.unsupported, [s.reason for s in report.unsupported]
    prepared = dataclasses.replace(prepared, manifest=manifest)
    trace = run_trace(prepared, inputs)
    return Calibrated(prepared, manifest, trace)


@pytest.fixture(scope="module")
def conv_fc() -> Calibrated:
    return _calibrated("3l_relu_conv_fc")


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    with Anvil() as chain:
        yield chain


# Three shared models (one with convolutions) and a generated model of 8 segments.
MODELS = ["3l_relu_conv_fc", "2l_relu_sigmoid_conv", "1l_mlp", "mlp_8x256"]


@pytest.mark.chain
@pytest.mark.parametrize("name", MODELS)
def test_honest_upheld_cheat_convicted_off_and_on_chain(
    name: str, prover: Prover, anvil: Anvil, tmp_path: Path
) -> None:
    """For a middle step: the honest claim is upheld, a claim moved beyond τ is convicted, and
    both proofs verify on anvil (by eth_call and by transaction); a tampered proof reverts."""
    cal = _calibrated(name)
    prepared, manifest, trace = cal.prepared, cal.manifest, cal.trace
    assert manifest.tolerances is not None
    if name == "mlp_8x256":
        assert manifest.num_segments == 8
    i = (manifest.num_segments + 1) // 2
    tau = manifest.tolerances[i - 1]
    honest = prover.prove_step(prepared, manifest, i, trace.states[i - 1], trace.states[i])
    assert prover.verify_step(prepared, manifest, honest, trace.commitment,
                              states=trace.states[i - 1 : i + 1]).verdict is (
        Verdict.CHALLENGER_FAULT
    )
    lie = _perturb(trace.states[i], 2 * tau / 2**manifest.scale + 0.05)
    lying = Trace.from_states(manifest, [*trace.states[:i], lie, *trace.states[i + 1:]])
    cheat = prover.prove_step(prepared, manifest, i, lying.states[i - 1], lying.states[i])
    assert prover.verify_step(prepared, manifest, cheat, lying.commitment,
                              states=lying.states[i - 1 : i + 1]).verdict is (
        Verdict.PROVIDER_FAULT
    )
    circuit = prover.step_circuit(prepared, manifest, i)
    sol = write_verifier_sol(circuit.vk_path, circuit.settings_path, tmp_path / "V.sol",
                             circuit.srs_path)
    address = deploy(anvil.rpc_url, compile_solidity(sol))
    for n, proof in enumerate((honest, cheat)):
        path = tmp_path / f"proof{n}.json"
        path.write_text(json.dumps(proof.proof))
        assert verify_call(anvil.rpc_url, address, path)
        tx = verify_transaction(anvil.rpc_url, address, path)
        assert tx.success and tx.gas_used > 0
        print(f"{name} step {i}: on-chain verifyProof gas {tx.gas_used:,}")
    tampered = json.loads(json.dumps(honest.proof))
    tampered["proof"][200] ^= 0x01
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    assert not verify_call(anvil.rpc_url, address, bad)
    assert not verify_transaction(anvil.rpc_url, address, bad, send_if_rejected=True).success


def _perturb(state: tuple[np.ndarray, ...], amount: float) -> list[np.ndarray]:
    out = [t.copy() for t in state]
    out[0].flat[0] += amount
    return out


def test_honest_step_upheld_and_perturbed_step_convicted(
    conv_fc: Calibrated, prover: Prover
) -> None:
    prepared, manifest, trace = conv_fc.prepared, conv_fc.manifest, conv_fc.trace
    assert manifest.tolerances is not None and manifest.range is not None
    i = 2
    honest = prover.prove_step(prepared, manifest, i, trace.states[i - 1], trace.states[i])
    honest_states = trace.states[i - 1 : i + 1]
    outcome = prover.verify_step(prepared, manifest, honest, trace.commitment,
                                 states=honest_states)
    assert outcome.verdict is Verdict.CHALLENGER_FAULT
    assert outcome.maxdiff_units <= manifest.tolerances[i - 1]

    # A cheating provider: state i moved by 3·τ quantized units at one element.
    tau = manifest.tolerances[i - 1]
    lie = _perturb(trace.states[i], 3 * tau / 2**manifest.scale)
    lying = Trace.from_states(manifest, [*trace.states[:i], lie, *trace.states[i + 1:]])
    proof = prover.prove_step(prepared, manifest, i, lying.states[i - 1], lying.states[i])
    lying_states = lying.states[i - 1 : i + 1]
    convicted = prover.verify_step(prepared, manifest, proof, lying.commitment,
                                   states=lying_states)
    assert convicted.verdict is Verdict.PROVIDER_FAULT
    assert convicted.maxdiff_units > tau

    # The same proofs are bound to their own commitments through the revealed states: a
    # revealed state that is not the committed one is refused, and so is a proof whose
    # instances are not Poseidon of the revealed states.
    with pytest.raises(ProofRejected, match="revealed state 2 does not match its committed leaf"):
        prover.verify_step(prepared, manifest, proof, trace.commitment, states=lying_states)
    with pytest.raises(ProofRejected, match="not Poseidon of state 2"):
        prover.verify_step(prepared, manifest, proof, trace.commitment, states=honest_states)
    with pytest.raises(ProofRejected, match="not Poseidon of state 2"):
        prover.verify_step(prepared, manifest, honest, lying.commitment, states=lying_states)
    # A proof for another step does not pass as this one.
    other = dataclasses.replace(honest, segment=1)
    with pytest.raises(ProofRejected):
        prover.verify_step(prepared, manifest, other, trace.commitment,
                           states=trace.states[0:2])
    # Tampered proof bytes and tampered instances are rejected.
    tampered = json.loads(json.dumps(honest.proof))
    tampered["proof"][100] ^= 0x01  # EZKL stores the proof bytes as a list of ints
    with pytest.raises(ProofRejected, match="verif"):
        prover.verify_step(prepared, manifest, dataclasses.replace(honest, proof=tampered),
                           trace.commitment, states=honest_states)
    forged = json.loads(json.dumps(honest.proof))
    forged["instances"][0][-1] = "00" * 32  # claim maxdiff 0
    forged_step = StepProof.from_json({**honest.to_json(), "proof": forged},
                                      n_inputs=len(trace.states[i - 1]))
    with pytest.raises(ProofRejected, match="verif"):
        prover.verify_step(prepared, manifest, forged_step, lying.commitment,
                           states=lying_states)


def test_range_circuit_convicts_out_of_range_state(conv_fc: Calibrated, prover: Prover) -> None:
    prepared, manifest, trace = conv_fc.prepared, conv_fc.manifest, conv_fc.trace
    assert manifest.range is not None
    k = 1
    fine = prover.prove_range(prepared, manifest, k, trace.states[k])
    ok = prover.verify_range(prepared, manifest, fine, trace.commitment, state=trace.states[k])
    assert ok.verdict is Verdict.CHALLENGER_FAULT
    bad_state = _perturb(trace.states[k], 3 * manifest.range)
    # Uploading such a trace is refused; revealed in a dispute, the range circuit convicts it.
    with pytest.raises(CommitmentError, match="range"):
        Trace.from_states(manifest, [*trace.states[:k], bad_state, *trace.states[k + 1:]])
    bad = Trace.from_states(manifest, [*trace.states[:k], bad_state, *trace.states[k + 1:]],
                            check_range=False)
    proof = prover.prove_range(prepared, manifest, k, bad.states[k])
    convicted = prover.verify_range(prepared, manifest, proof, bad.commitment,
                                    state=bad.states[k])
    assert convicted.verdict is Verdict.PROVIDER_FAULT
    with pytest.raises(ProofRejected, match="leaf"):
        prover.verify_range(prepared, manifest, proof, trace.commitment, state=bad.states[k])
    with pytest.raises(ProofRejected, match="Poseidon"):
        prover.verify_range(prepared, manifest, proof, trace.commitment, state=trace.states[k])


def _build(args: tuple[str, str, bytes, int, str]) -> str:
    cache_dir, srs_dir, graph, scale, settings = args
    cache = CircuitCache(Path(cache_dir), SrsStore(dev_cache=Path(srs_dir)))
    return cache.build(graph, scale, json.loads(settings)).vk_sha256


def test_concurrent_builders_share_one_circuit(
    conv_fc: Calibrated, srs_store: SrsStore, tmp_path: Path
) -> None:
    from circuits.adjudication import adjudication_bytes

    assert conv_fc.manifest.circuits is not None and srs_store.dev_cache is not None
    settings = json.dumps(conv_fc.manifest.circuits[2]["settings"])
    graph = adjudication_bytes(conv_fc.prepared.segmentation.segments[2])
    job = (str(tmp_path), str(srs_store.dev_cache), graph, conv_fc.manifest.scale, settings)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        digests = pool.map(_build, [job, job])
    assert digests[0] == digests[1]
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")


def test_uncalibrated_manifest_is_refused(conv_fc: Calibrated, prover: Prover) -> None:
    raw = prepare_model(SHARED["3l_relu_conv_fc"].path, dims={"batch_size": 1})
    with pytest.raises(CircuitUnsupported, match="not calibrated"):
        prover.step_circuit(raw, raw.manifest, 1)
    with pytest.raises(CircuitUnsupported, match="outside"):
        prover.step_circuit(conv_fc.prepared, conv_fc.manifest, 9)


def test_unprovable_segment_is_reported_at_calibration() -> None:
    """A segment EZKL cannot fit in the circuits allowed (here logrows capped at 8): calibration
    names it with a reason instead of failing later in a dispute."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.uniform(-0.5, 0.5, (2, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
         helper.make_node("Relu", ["c"], ["y"])],
        "nostride",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    prepared = prepare_model(model.SerializeToString())
    manifest, report = calibrate_model(prepared, [random_inputs(prepared.loaded, seed=0)],
                                       max_logrows=8)
    assert [s.index for s in report.unsupported] == [1]
    reason = report.unsupported[0].reason
    assert reason and "EZKL" in reason and "logrows capped at 8" in reason and "\n" not in reason
    assert manifest.circuits is not None and manifest.circuits[0]["unsupported"] == reason
    with pytest.raises(CircuitUnsupported, match="cannot be proven"):
        Prover(CircuitCache(Path("/nonexistent"), SrsStore(dev_cache=Path("/nonexistent")))
               ).step_circuit(dataclasses.replace(prepared, manifest=manifest), manifest, 1)
