"""Real EZKL proofs of adjudication and range circuits, bound to trace commitments."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from prover.calibration import calibrate_model
from prover.circuit import CircuitCache
from prover.errors import CircuitUnsupported, ProofRejected
from prover.prover import Prover
from prover.srs import SrsStore
from prover.step import StepProof, Verdict
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
    shared = SHARED[name]
    prepared = prepare_model(shared.path, dims={"batch_size": 1})
    manifest, report = calibrate_model(
        prepared, [random_inputs(prepared.loaded, seed=s) for s in range(4)]
    )
    assert not report.unsupported, [s.reason for s in report.unsupported]
    prepared = dataclasses.replace(prepared, manifest=manifest)
    trace = run_trace(prepared, shared.inputs(prepared.loaded))
    return Calibrated(prepared, manifest, trace)


@pytest.fixture(scope="module")
def conv_fc() -> Calibrated:
    return _calibrated("3l_relu_conv_fc")


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
    outcome = prover.verify_step(prepared, manifest, honest, trace.commitment)
    assert outcome.verdict is Verdict.CHALLENGER_FAULT
    assert outcome.maxdiff_units <= manifest.tolerances[i - 1]

    # A cheating provider: state i moved by 3·τ quantized units at one element.
    tau = manifest.tolerances[i - 1]
    lie = _perturb(trace.states[i], 3 * tau / 2**manifest.scale)
    lying = Trace.from_states(manifest, [*trace.states[:i], lie, *trace.states[i + 1:]])
    proof = prover.prove_step(prepared, manifest, i, lying.states[i - 1], lying.states[i])
    convicted = prover.verify_step(prepared, manifest, proof, lying.commitment)
    assert convicted.verdict is Verdict.PROVIDER_FAULT
    assert convicted.maxdiff_units > tau

    # The same proofs are bound to their own commitments: swapping them is rejected.
    with pytest.raises(ProofRejected, match="leaf"):
        prover.verify_step(prepared, manifest, proof, trace.commitment)
    with pytest.raises(ProofRejected, match="leaf"):
        prover.verify_step(prepared, manifest, honest, lying.commitment)
    # A proof for another step does not pass as this one.
    other = dataclasses.replace(honest, segment=1)
    with pytest.raises(ProofRejected):
        prover.verify_step(prepared, manifest, other, trace.commitment)
    # Tampered proof bytes and tampered instances are rejected.
    tampered = json.loads(json.dumps(honest.proof))
    tampered["proof"][100] ^= 0x01  # EZKL stores the proof bytes as a list of ints
    with pytest.raises(ProofRejected, match="verif"):
        prover.verify_step(prepared, manifest, dataclasses.replace(honest, proof=tampered),
                           trace.commitment)
    forged = json.loads(json.dumps(honest.proof))
    forged["instances"][0][-1] = "00" * 32  # claim maxdiff 0
    forged_step = StepProof.from_json({**honest.to_json(), "proof": forged},
                                      n_inputs=len(trace.states[i - 1]))
    with pytest.raises(ProofRejected, match="verif"):
        prover.verify_step(prepared, manifest, forged_step, lying.commitment)


def test_range_circuit_convicts_out_of_range_state(conv_fc: Calibrated, prover: Prover) -> None:
    prepared, manifest, trace = conv_fc.prepared, conv_fc.manifest, conv_fc.trace
    assert manifest.range is not None
    k = 1
    fine = prover.prove_range(prepared, manifest, k, trace.states[k])
    ok = prover.verify_range(prepared, manifest, fine, trace.commitment)
    assert ok.verdict is Verdict.CHALLENGER_FAULT
    bad_state = _perturb(trace.states[k], 3 * manifest.range)
    # Uploading such a trace is refused; revealed in a dispute, the range circuit convicts it.
    with pytest.raises(CommitmentError, match="range"):
        Trace.from_states(manifest, [*trace.states[:k], bad_state, *trace.states[k + 1:]])
    bad = Trace.from_states(manifest, [*trace.states[:k], bad_state, *trace.states[k + 1:]],
                            check_range=False)
    proof = prover.prove_range(prepared, manifest, k, bad.states[k])
    convicted = prover.verify_range(prepared, manifest, proof, bad.commitment)
    assert convicted.verdict is Verdict.PROVIDER_FAULT
    with pytest.raises(ProofRejected, match="leaf"):
        prover.verify_range(prepared, manifest, proof, trace.commitment)


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
