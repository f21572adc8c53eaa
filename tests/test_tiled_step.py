"""A segment proven on tiles (issue 13): calibrated per tile model at registration, proven on
the tile the challenger names, and bound to the commitment through the tile's slices of the
revealed states. Real EZKL proofs."""

from __future__ import annotations

import dataclasses

import pytest

from prover.calibration import calibrate_model
from prover.circuit import CircuitCache
from prover.errors import CircuitUnsupported, ProofRejected
from prover.prover import Prover
from prover.srs import SrsStore
from prover.step import Verdict
from refute.provider import PreparedModel, prepare_model, random_inputs, run_trace
from refute.tiling import Tiling
from refute.trace import Trace
from tests.dispute_world import tiled_conv

pytestmark = [pytest.mark.slow, pytest.mark.ezkl]

#: Segment 1 (a 3×3 convolution, 3 → 4 channels on 8×8, and its Relu) on tiles of 2 output
#: channels × 4 rows × 8 columns: 4 tiles, 2 tile models (the channel blocks' weights differ).
BLOCKS = [1, 2, 4, 8]


@dataclasses.dataclass
class Tiled:
    prepared: PreparedModel
    trace: Trace
    tiling: Tiling
    prover: Prover


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Tiled:
    prepared = prepare_model(tiled_conv().onnx_bytes)
    assert prepared.segmentation.num_segments == 2
    manifest, report = calibrate_model(
        prepared, [random_inputs(prepared.loaded, seed=s) for s in range(3)],
        tilings={1: BLOCKS})
    assert not report.unsupported, [s.reason for s in report.unsupported]
    prepared = dataclasses.replace(prepared, manifest=manifest)
    prover = Prover(CircuitCache(tmp_path_factory.mktemp("circuits"),
                                 SrsStore(dev_cache=tmp_path_factory.mktemp("srs"))))
    tiling = prover.tiling(prepared, manifest, 1)
    assert tiling is not None
    trace = run_trace(prepared, random_inputs(prepared.loaded, seed=11))
    return Tiled(prepared, trace, tiling, prover)


def test_the_manifest_records_the_tiling_and_one_circuit_per_tile_model(tiled: Tiled) -> None:
    manifest = tiled.prepared.manifest
    assert manifest.circuits is not None and manifest.tolerances is not None
    entry = next(c for c in manifest.circuits if c.get("kind") == "step" and c["segment"] == 1)
    assert entry["tiling"]["blocks"] == BLOCKS and entry["tiling"]["tiles"] == 4
    models = entry["tiling"]["models"]
    assert len(models) == 2 and sorted(m["tiles"] for m in models) == [2, 2]
    assert manifest.tolerances[0] == max(m["tolerance"] for m in models)
    second = next(c for c in manifest.circuits if c.get("kind") == "step" and c["segment"] == 2)
    assert "tiling" not in second
    assert tiled.prover.tiling(tiled.prepared, manifest, 2) is None


def test_a_lie_is_convicted_on_its_tile_and_only_there(tiled: Tiled) -> None:
    prepared, trace, tiling, prover = tiled.prepared, tiled.trace, tiled.tiling, tiled.prover
    manifest = prepared.manifest
    assert manifest.tolerances is not None
    tau = manifest.tolerances[0]
    lie_tile, other = tiling.tiles[3], tiling.tiles[0]  # other channels, other rows
    (_, _), (c0, _), (h0, _), (w0, _) = lie_tile.outputs[0]
    state = trace.states[1][0].copy()
    state[0, c0, h0, w0] += 2 * tau / 2**manifest.scale + 0.05
    lying = Trace.from_states(manifest, [trace.states[0], [state], *trace.states[2:]])
    states = lying.states[0:2]
    verdicts = {}
    for tile in (lie_tile, other):
        proof = prover.prove_step(prepared, manifest, 1, *states, tile=tile.index)
        assert proof.tile == tile.index
        verdicts[tile.index] = prover.verify_step(prepared, manifest, proof, lying.commitment,
                                                  states=states).verdict
    assert verdicts == {3: Verdict.PROVIDER_FAULT, 0: Verdict.CHALLENGER_FAULT}
    honest = prover.prove_step(prepared, manifest, 1, *trace.states[0:2], tile=3)
    assert prover.verify_step(prepared, manifest, honest, trace.commitment,
                              states=trace.states[0:2]).verdict is Verdict.CHALLENGER_FAULT
    # The proof of tile 3 does not count for tile 2 (same tile model, other slices), nor for
    # the lying trace, nor without its tile.
    with pytest.raises(ProofRejected, match="Poseidon"):
        prover.verify_step(prepared, manifest, dataclasses.replace(honest, tile=2),
                           trace.commitment, states=trace.states[0:2])
    with pytest.raises(ProofRejected, match="does not match its committed leaf"):
        prover.verify_step(prepared, manifest, honest, lying.commitment,
                           states=trace.states[0:2])
    with pytest.raises(ProofRejected, match="tiled"):
        prover.verify_step(prepared, manifest, dataclasses.replace(honest, tile=None),
                           trace.commitment, states=trace.states[0:2])


def test_a_tiled_step_needs_its_tile_and_a_whole_one_has_none(tiled: Tiled) -> None:
    prepared, trace, prover = tiled.prepared, tiled.trace, tiled.prover
    manifest = prepared.manifest
    with pytest.raises(CircuitUnsupported, match="name the tile"):
        prover.prove_step(prepared, manifest, 1, *trace.states[0:2])
    with pytest.raises(CircuitUnsupported, match=r"tiles 0\.\.3, not 4"):
        prover.prove_step(prepared, manifest, 1, *trace.states[0:2], tile=4)
    with pytest.raises(CircuitUnsupported, match="proven whole"):
        prover.prove_step(prepared, manifest, 2, *trace.states[1:3], tile=0)
