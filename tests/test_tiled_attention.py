"""A transformer's attention scores proven on tiles (issue 13), with real EZKL proofs: the
Q·Kᵀ segment of a GPT-2-shaped block (toy size: d 16, 2 heads, 8 tokens) has outputs of three
shapes (the residual and V passed on, the scores); each is tiled on its own, a tile's proof
hashes only the tensors it reads and the one it computes, and is bound to the commitment
through those slices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from prover.calibration import calibrate_model
from prover.circuit import CircuitCache
from prover.errors import ProofRejected
from prover.prover import Prover
from prover.srs import SrsStore
from prover.step import StepProof, Verdict
from refute.provider import prepare_model, random_inputs, run_trace
from refute.tiling import tile_at, worst_tile
from refute.trace import Trace
from tests.test_tiling_gpt2 import HEADS, TOKENS, _export

pytestmark = [pytest.mark.slow, pytest.mark.ezkl]


def test_a_lie_in_one_head_is_convicted_on_its_scores_tile(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    prepared = prepare_model(_export())
    step = next(s.index for s in prepared.segmentation.segments
                if s.op_types == ("MatMul", "Mul", "Add"))
    segment = prepared.segmentation.segments[step - 1]
    blocks = [list(o.shape) for o in segment.outputs]
    assert blocks[-1] == [1, HEADS, TOKENS, TOKENS]
    blocks[-1] = [1, 1, 4, TOKENS]  # a head's block of 4 queries against every key
    manifest, report = calibrate_model(
        prepared, [random_inputs(prepared.loaded, seed=s) for s in range(2)],
        tilings={step: blocks}, only=[step])  # type: ignore[dict-item]
    assert not [s for s in report.unsupported if s.index == step]
    prepared = dataclasses.replace(prepared, manifest=manifest)
    prover = Prover(CircuitCache(tmp_path_factory.mktemp("circuits"),
                                 SrsStore(dev_cache=tmp_path_factory.mktemp("srs"))))
    tiling = prover.tiling(prepared, manifest, step)
    assert tiling is not None and len(tiling.tiles) == 1 + 1 + HEADS * 2

    trace = run_trace(prepared, random_inputs(prepared.loaded, seed=5))
    claimed = [t.copy() for t in trace.states[step]]
    claimed[-1][0, 1, 5, 3] += np.float32(0.5)
    lying = Trace.from_states(manifest, [*trace.states[:step], claimed,
                                         *trace.states[step + 1:]])
    tile = worst_tile(tiling, trace.states[step], claimed)
    assert tile == tile_at(tiling, [0, 1, 5, 3], len(claimed) - 1)
    assert tile.input_indices != tuple(range(len(segment.inputs)))  # Q and Kᵀ only
    states = [trace.states[step - 1], claimed]
    proof = prover.prove_step(prepared, manifest, step, *states, tile=tile.index)
    assert len(proof.x_hashes) + len(proof.y_hashes) == len(tile.input_indices) + 1
    outcome = prover.verify_step(prepared, manifest, proof, lying.commitment, states=states)
    assert outcome.verdict is Verdict.PROVIDER_FAULT
    # As a proof bundle reads it back (split by the state's tensor count, not the tile's).
    again = StepProof.from_json(proof.to_json(), n_inputs=len(segment.inputs))
    assert prover.verify_step(prepared, manifest, again, lying.commitment,
                              states=states).verdict is Verdict.PROVIDER_FAULT

    honest = prover.prove_step(prepared, manifest, step, *trace.states[step - 1:step + 1],
                               tile=tile.index)
    assert prover.verify_step(prepared, manifest, honest, trace.commitment,
                              states=trace.states[step - 1:step + 1]).verdict \
        is Verdict.CHALLENGER_FAULT
    other = tiling.tiles[tile.index - 2]  # head 0, the same queries: the same tile model
    assert other.output_index == tile.output_index and other.windows[0][1] == (0, 1)
    with pytest.raises(ProofRejected, match="Poseidon"):  # not a proof of another head's tile
        prover.verify_step(prepared, manifest, dataclasses.replace(honest, tile=other.index),
                           trace.commitment, states=trace.states[step - 1:step + 1])
