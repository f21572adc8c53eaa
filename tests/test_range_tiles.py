"""Range proofs on chunks of a large state (DESIGN.md "Range rule"; :mod:`refute.chunks`).

The EZKL tests calibrate an MLP 8 → 340 → 8 with the logrows cap at 14: its 340-element hidden
state (state 1) is too large for one range circuit of 2^14 rows, so its range is proven on two
chunks of 256 elements by one chunk circuit, while states 0 and 2 keep whole-state range
circuits (the entries old manifests hold). Every proof is a real EZKL proof.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from challenge import orchestrator
from challenge.orchestrator import load_transcript, open_dispute, prove_pending
from challenge.replay import replay
from circuits.range_graph import chunk_bytes
from prover.calibration import range_chunk_size, range_chunking_plan
from prover.config import make_prover
from prover.errors import ProofRejected
from prover.prover import Prover
from prover.step import StepProof, Verdict
from refute import zoo
from refute.chunks import Chunking, range_chunking
from refute.errors import BindingError, BundleError, CommitmentError
from refute.loading import TensorSpec
from refute.manifest import Manifest
from refute.provider import run_trace
from refute.settings import get_settings
from refute.trace import Trace
from tests.dispute_world import World, add_result, make_world

EZKL = [pytest.mark.slow, pytest.mark.ezkl]
#: The chunked state of the EZKL tests' model, and a whole one.
CHUNKED, WHOLE = 1, 2


def _spec(name: str, shape: tuple[int, ...], declared: int | None = None) -> TensorSpec:
    return TensorSpec(name, TensorProto.FLOAT, shape, declared=declared)


# --- chunking, without EZKL -------------------------------------------------------------------


def test_chunks_reassemble_the_state_exactly_and_pad_with_zeros() -> None:
    specs = [_spec("a", (1, 3, 100)), _spec("b", (5,))]
    rng = np.random.default_rng(0)
    state = [rng.standard_normal(s.shape).astype(np.float32) for s in specs]
    chunking = Chunking.of(specs, 128)
    assert chunking.counts == (3, 1) and chunking.total == 4
    chunks = [chunking.cut(state, c) for c in range(chunking.total)]
    assert all(c.shape == (128,) and c.dtype == np.float32 for c in chunks)
    assert np.array_equal(np.concatenate(chunks[:3])[:300], state[0].reshape(-1))
    assert np.array_equal(chunks[3][:5], state[1]) and not chunks[3][5:].any()
    assert not chunks[2][300 - 256:].any()  # the padding of tensor a's last chunk
    assert chunking.locate(3) == (1, 0) and chunking.locate(2) == (0, 256)
    assert [chunking.spec(specs, c).name for c in (0, 3)] == ["a[0:128]", "b[0:128]"]
    with pytest.raises(BindingError, match=r"chunks 0\.\.3, not 4"):
        chunking.cut(state, 4)


def test_the_worst_chunk_holds_the_largest_value_and_non_finite_states_have_none() -> None:
    specs = [_spec("a", (300,)), _spec("b", (5,))]
    state = [np.zeros(300, np.float32), np.zeros(5, np.float32)]
    chunking = Chunking.of(specs, 128)
    assert chunking.worst(state) == 0  # all zero: the first
    state[0][200] = -7.0
    assert chunking.worst(state) == 1
    state[1][4] = 7.5
    assert chunking.worst(state) == 3
    state[0][299] = np.nan
    with pytest.raises(CommitmentError, match="non-finite"):
        chunking.worst(state)


def test_one_chunk_circuit_serves_every_chunk_of_every_state_of_one_type() -> None:
    """The chunk graph depends on B and the element type only: the same bytes (hence the same
    circuit) for any chunk of any state; a whole-number tensor's chunks have their own."""
    gpt2 = Chunking.of([_spec("resid", (1, 128, 768))], 4096)
    mobilenet = Chunking.of([_spec("map", (1, 32, 112, 112))], 4096)
    graphs = {chunk_bytes(c.spec(specs, i), opset=17)
              for c, specs in ((gpt2, [_spec("resid", (1, 128, 768))]),
                               (mobilenet, [_spec("map", (1, 32, 112, 112))]))
              for i in (0, 1, c.total - 1)}
    assert len(graphs) == 1
    whole = _spec("ids", (1, 5000), declared=TensorProto.INT64)
    chunking = Chunking.of([whole], 4096)
    assert chunk_bytes(chunking.spec([whole], 0), opset=17) not in graphs


def test_the_chunk_size_fits_the_planned_rows() -> None:
    assert (range_chunk_size(14), range_chunk_size(17), range_chunk_size(18)) == (256, 2048,
                                                                                   4096)
    assert range_chunking_plan([_spec("h", (1, 300))], 14) is None  # 47·300 rows fit 2^14
    assert range_chunking_plan([_spec("h", (1, 340))], 14) == Chunking(256, (2,))
    gpt2 = range_chunking_plan([_spec("resid", (1, 128, 768))], 18)
    mobilenet = range_chunking_plan([_spec("map", (1, 32, 112, 112))], 18)
    assert gpt2 is not None and mobilenet is not None
    assert (gpt2.size, gpt2.total, mobilenet.total) == (4096, 24, 98)


def test_a_manifest_chunking_is_checked_against_the_state() -> None:
    specs = [_spec("h", (1, 340))]
    entry = {"kind": "range", "state": 1, "settings": {}, "chunking": {"chunk": 256,
                                                                        "chunks": [2]}}
    assert range_chunking([entry], 1, specs) == Chunking(256, (2,))
    assert range_chunking([{"kind": "range", "state": 1, "settings": {}}], 1, specs) is None
    for bad in ({"chunk": 256, "chunks": [3]}, {"chunk": 0, "chunks": []}, {"chunk": 2.5},
                [256]):
        with pytest.raises(BundleError, match="malformed manifest"):
            range_chunking([{**entry, "chunking": bad}], 1, specs)


# --- real proofs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The service with an MLP 8 → 340 → 8 calibrated under a logrows cap of 14."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFUTE_PROVING_MAX_LOGROWS", "14")
        get_settings.cache_clear()
        try:
            built = make_world(tmp_path_factory.mktemp("range-tiles"), network_id="net_r",
                               model_id="mdl_r", model=zoo.mlp((8, 340, 8)))
        finally:
            get_settings.cache_clear()
    yield built


@pytest.fixture(scope="module")
def prover(world: World) -> Prover:
    """A prover over the world's circuit cache (the circuits the service builds)."""
    return make_prover(world.ctx.settings)


def _trace(world: World, *, at: tuple[int, int] | None = None, seed: int = 0) -> Trace:
    """The honest trace on ``sample_input(seed)``; with ``at`` = (state, element), that element
    set to 3·R (committed, but an upload would refuse it)."""
    manifest = world.prepared.manifest
    trace = run_trace(world.prepared, world.model.sample_input(seed))
    if at is None:
        return trace
    assert manifest.range is not None
    states = [list(s) for s in trace.states]
    k, element = at
    states[k][0] = states[k][0].copy()
    states[k][0].flat[element] = 3 * manifest.range
    return Trace.from_states(manifest, states, check_range=False)


@dataclasses.dataclass
class Proven:
    honest: Trace
    bad: Trace  # 3·R at element 300 of state 1: in its chunk 1
    honest_proof: StepProof
    bad_proof: StepProof


@pytest.fixture(scope="module")
def proven(world: World, prover: Prover) -> Proven:
    prepared, manifest = world.prepared, world.prepared.manifest
    honest, bad = _trace(world), _trace(world, at=(CHUNKED, 300))
    return Proven(honest, bad,
                  prover.prove_range(prepared, manifest, CHUNKED, honest.states[CHUNKED]),
                  prover.prove_range(prepared, manifest, CHUNKED, bad.states[CHUNKED]))


@pytest.mark.slow
@pytest.mark.ezkl
def test_calibration_chunks_the_large_state_with_one_circuit(world: World,
                                                             prover: Prover) -> None:
    manifest = world.prepared.manifest
    assert manifest.circuits is not None
    ranges = {e["state"]: e for e in manifest.circuits if e["kind"] == "range"}
    assert set(ranges[0]) == set(ranges[WHOLE]) == {"kind", "state", "settings"}
    chunked = ranges[CHUNKED]
    assert chunked["settings"] is not None
    record = chunked["chunking"]
    assert (record["chunk"], record["chunks"], len(record["models"])) == (256, [2], 1)
    assert record["models"][0]["settings"] == chunked["settings"]
    assert Manifest.from_json(manifest.to_json()) == manifest
    circuits = {prover.range_circuit(world.prepared, manifest, CHUNKED, chunk=c).key
                for c in (0, 1)}
    assert len(circuits) == 1  # one chunk circuit serves both chunks


@pytest.mark.slow
@pytest.mark.ezkl
def test_the_chunk_with_the_largest_value_decides_the_range(world: World, prover: Prover,
                                                            proven: Proven) -> None:
    prepared, manifest = world.prepared, world.prepared.manifest
    honest = prover.verify_range(prepared, manifest, proven.honest_proof,
                                 proven.honest.commitment, state=proven.honest.states[CHUNKED])
    assert honest.verdict is Verdict.CHALLENGER_FAULT
    expected = Chunking(256, (2,)).worst(proven.honest.states[CHUNKED])
    assert proven.honest_proof.tile == expected
    assert proven.bad_proof.tile == 1
    bad = prover.verify_range(prepared, manifest, proven.bad_proof, proven.bad.commitment,
                              state=proven.bad.states[CHUNKED])
    assert bad.verdict is Verdict.PROVIDER_FAULT and bad.maxabs_units > bad.bound_units
    # The proof bundle's form carries the chunk as its tile.
    again = StepProof.from_json(proven.bad_proof.to_json(), n_inputs=1)
    assert again.tile == 1 and again == proven.bad_proof


@pytest.mark.slow
@pytest.mark.ezkl
def test_tampered_misnamed_and_foreign_chunks_are_rejected(world: World, prover: Prover,
                                                           proven: Proven) -> None:
    prepared, manifest = world.prepared, world.prepared.manifest
    bad, honest = proven.bad, proven.honest

    def verify(proof: StepProof, trace: Trace, state: list[np.ndarray] | None = None) -> None:
        revealed = trace.states[proof.segment] if state is None else state
        prover.verify_range(prepared, manifest, proof, trace.commitment, state=revealed)

    # Tampered: the chunk proven is not the revealed (committed) state's.
    with pytest.raises(ProofRejected, match=r"not Poseidon of state 1 tensor '.*\[256:512\]'"):
        verify(proven.bad_proof, honest)
    with pytest.raises(ProofRejected, match="does not match its committed leaf"):
        verify(proven.bad_proof, honest, list(bad.states[CHUNKED]))
    # Misnamed: the proof of chunk 1 presented as chunk 0, or as a chunk that does not exist.
    with pytest.raises(ProofRejected, match=r"not Poseidon of state 1 tensor '.*\[0:256\]'"):
        verify(dataclasses.replace(proven.bad_proof, tile=0), bad)
    with pytest.raises(ProofRejected, match=r"chunks 0\.\.1"):
        verify(dataclasses.replace(proven.bad_proof, tile=2), bad)
    with pytest.raises(ProofRejected, match="proven on chunks"):
        verify(dataclasses.replace(proven.bad_proof, tile=None), bad)
    # A chunk of the state, but not the one holding its largest |v|.
    other = prover.prove_range(prepared, manifest, CHUNKED, bad.states[CHUNKED], chunk=0)
    with pytest.raises(ProofRejected, match=r"largest \|v\| is chunk 1"):
        verify(other, bad)
    # A chunk of another state: of state 1 of another result, or named as another state's.
    foreign = _trace(world, at=(CHUNKED, 300), seed=1)
    with pytest.raises(ProofRejected, match="not Poseidon of state 1"):
        verify(proven.bad_proof, foreign)
    with pytest.raises(ProofRejected, match="proven whole"):
        verify(dataclasses.replace(proven.bad_proof, segment=WHOLE), bad)


@pytest.mark.slow
@pytest.mark.ezkl
def test_a_whole_state_entry_as_old_manifests_hold_it_still_works(world: World,
                                                                  prover: Prover) -> None:
    """An entry without ``chunking`` (every range entry before chunks) is proven whole."""
    manifest = Manifest.from_json(world.prepared.manifest.to_json())
    prepared = dataclasses.replace(world.prepared, manifest=manifest)
    bad = _trace(world, at=(WHOLE, 3))
    proof = prover.prove_range(prepared, manifest, WHOLE, bad.states[WHOLE])
    assert proof.tile is None
    outcome = prover.verify_range(prepared, manifest, proof, bad.commitment,
                                  state=bad.states[WHOLE])
    assert outcome.verdict is Verdict.PROVIDER_FAULT
    with pytest.raises(ProofRejected, match="proven whole"):
        prover.verify_range(prepared, manifest, dataclasses.replace(proof, tile=0),
                            bad.commitment, state=bad.states[WHOLE])


@pytest.mark.slow
@pytest.mark.ezkl
def test_a_dispute_ends_in_the_range_verdict_of_a_chunk_and_replays(world: World,
                                                                   tmp_path: Path) -> None:
    """The watcher challenges a trace whose state 1 holds 3·R (element 0: chunk 0): the revealed
    state goes to a range proof, proven on its worst chunk, which convicts the provider; the
    exported bundle carries the chunk, and replay re-verifies the proof bound to it."""
    rid = add_result(world, seed=2, out_of_range_at=CHUNKED)
    dispute_id = open_dispute(world.disputes, rid, challenger="service", lo=0, hi=2, bond=4,
                              now=datetime.now(UTC))
    state = prove_pending(world.disputes, dispute_id, datetime.now(UTC))
    assert state is not None and state.verdict is not None
    assert state.verdict.value == "provider_fault"
    with world.ctx.sessions() as s:
        events = load_transcript(s, rid).events
    (proof_event,) = [e for e in events if e.kind == "rangeoutcome"]
    assert (proof_event.body["state"], proof_event.body["chunk"]) == (CHUNKED, 0)
    bundle = orchestrator.export_dispute(world.disputes, dispute_id, tmp_path / "r.rdispute")
    key = "0x" + orchestrator.service_signing_key(world.disputes).public_key.hex()
    report = replay(bundle, [key])
    assert report.ok, report.lines
    binding = next(detail for name, _ok, detail in report.lines if name == "binding")
    assert "chunk 0" in binding
