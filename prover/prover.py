"""The prover facade: circuits from a calibrated manifest, step and range proofs, verification.

::

    prover = Prover(CircuitCache(cache_dir, SrsStore(dev_cache=srs_dir)))
    proof = prover.prove_step(prepared, manifest, i, state_prev, state_claimed)
    outcome = prover.verify_step(prepared, manifest, proof, commitment,
                                 states=[state_prev, state_claimed])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from circuits.adjudication import adjudication_bytes
from circuits.range_graph import chunk_circuit, range_bytes
from prover.circuit import Circuit, CircuitCache
from prover.errors import CircuitUnsupported, ProofRejected
from prover.step import (
    StepOutcome,
    StepProof,
    bind,
    maxdiff_units,
    prove_step,
    verify_proof_file,
    verify_step,
)
from refute.chunks import range_chunking
from refute.commitment import TraceCommitment
from refute.errors import CommitmentError
from refute.manifest import Manifest
from refute.provider import PreparedModel
from refute.segmentation import Segment
from refute.tiling import Tiling, cut_input, cut_output, recorded_tiling, tile_segment
from refute.verdict import Verdict, VerdictError, range_bound_units, range_verdict

StageFn = Callable[[str], None]


def _quiet(stage: str) -> None:
    del stage


def _entry(manifest: Manifest, kind: str, field: str, index: int) -> dict[str, Any]:
    if manifest.circuits is None or manifest.tolerances is None or manifest.range is None:
        raise CircuitUnsupported("the manifest is not calibrated yet (run calibration first)")
    for entry in manifest.circuits:
        if entry.get("kind") == kind and entry.get(field) == index:
            if entry.get("settings") is None:
                reason = entry.get("unsupported") or "EZKL cannot compile it"
                raise CircuitUnsupported(f"{kind} circuit {index} cannot be proven: {reason}")
            return dict(entry)
    raise CircuitUnsupported(f"the manifest has no {kind} circuit {index}")


def manifest_tiling(prepared: PreparedModel, manifest: Manifest, i: int) -> Tiling | None:
    """Segment i's tiling, rebuilt from the manifest's block sizes (``None``: proven whole)."""
    entry = _entry(manifest, "step", "segment", i)
    return recorded_tiling(entry, prepared.segmentation.segments[i - 1])


def tile_circuit(entry: dict[str, Any], segment: Segment, tiling: Tiling,
                 tile: int) -> tuple[bytes, dict[str, Any]]:
    """The adjudication graph of ``tile`` and the settings calibrated for its tile model."""
    graph = adjudication_bytes(tile_segment(segment, tiling, tiling.tiles[tile]))
    digest = hashlib.sha256(graph).hexdigest()
    for model in entry["tiling"].get("models", []):
        if model.get("sha256") == digest:
            return graph, dict(model["settings"])
    raise CircuitUnsupported(f"segment {segment.index} tile {tile}: its circuit was not "
                             "calibrated at registration")


def _tile_index(i: int, tiling: Tiling, tile: int | None) -> int:
    if tile is None:
        raise CircuitUnsupported(f"step {i} is tiled ({len(tiling.tiles)} tiles): name the tile "
                                 "to prove")
    if not 0 <= tile < len(tiling.tiles):
        raise CircuitUnsupported(f"step {i} has tiles 0..{len(tiling.tiles) - 1}, not {tile}")
    return tile


@dataclass(frozen=True)
class RangeOutcome:
    """A verified range proof: the state's max |v| and R (``⌊R·2^s⌋``), in quantized units, and
    the verdict of :func:`refute.verdict.range_verdict` (CHALLENGER_FAULT: in range)."""

    state: int
    maxabs_units: Fraction
    bound_units: int
    verdict: Verdict


class Prover:
    """Builds (or reuses) circuits and proves/verifies steps and ranges for a manifest."""

    def __init__(self, cache: CircuitCache) -> None:
        self.cache = cache

    def tiling(self, prepared: PreparedModel, manifest: Manifest, i: int) -> Tiling | None:
        """Segment i's tiling (:func:`manifest_tiling`)."""
        return manifest_tiling(prepared, manifest, i)

    def step_circuit(
        self, prepared: PreparedModel, manifest: Manifest, i: int, progress: StageFn = _quiet,
        *, tile: int | None = None,
    ) -> Circuit:
        """Segment i's adjudication circuit (of its ``tile``, when it is tiled), built from
        the manifest's recorded settings."""
        if not 1 <= i <= manifest.num_segments:
            raise CircuitUnsupported(f"step {i} is outside 1..{manifest.num_segments}")
        entry = _entry(manifest, "step", "segment", i)
        segment = prepared.segmentation.segments[i - 1]
        tiling = recorded_tiling(entry, segment)
        if tiling is None:
            if tile is not None:
                raise CircuitUnsupported(f"step {i} is proven whole, it has no tile {tile}")
            graph, settings = adjudication_bytes(segment), entry["settings"]
        else:
            graph, settings = tile_circuit(entry, segment, tiling, _tile_index(i, tiling, tile))
        return self.cache.build(graph, manifest.scale, settings, progress=progress)

    def range_circuit(
        self, prepared: PreparedModel, manifest: Manifest, k: int, progress: StageFn = _quiet,
        *, chunk: int | None = None,
    ) -> Circuit:
        """State k's range circuit (for a chunked state, the circuit of its ``chunk``: one per
        chunk size and element type, shared by every chunked state)."""
        entry = _entry(manifest, "range", "state", k)
        state = manifest.states[k]
        chunking = range_chunking([entry], k, state)
        opset = prepared.loaded.opset
        if chunking is None:
            if chunk is not None:
                raise CircuitUnsupported(f"state {k}'s range is proven whole, it has no chunk "
                                         f"{chunk}")
            graph, settings = range_bytes(state, opset=opset, index=k), entry["settings"]
        else:
            if chunk is None or not 0 <= chunk < chunking.total:
                raise CircuitUnsupported(f"state {k}'s range is proven on chunks "
                                         f"0..{chunking.total - 1}: name one, not {chunk}")
            graph, recorded = chunk_circuit(entry, chunking.spec(state, chunk), opset=opset)
            if recorded is None:
                raise CircuitUnsupported(f"state {k} chunk {chunk}: its circuit was not "
                                         "calibrated at registration")
            settings = recorded
        return self.cache.build(graph, manifest.scale, settings, progress=progress)

    def prove_step(
        self,
        prepared: PreparedModel,
        manifest: Manifest,
        i: int,
        state_prev: Sequence[np.ndarray],
        state_claimed: Sequence[np.ndarray],
        *,
        tile: int | None = None,
        progress: StageFn = _quiet,
    ) -> StepProof:
        """Prove step i on (state i-1, claimed state i); a tiled step on its ``tile`` (the
        tile's slices are cut from the two states here)."""
        circuit = self.step_circuit(prepared, manifest, i, progress, tile=tile)
        tiling = self.tiling(prepared, manifest, i)
        if tiling is not None and tile is not None:
            chosen = tiling.tiles[tile]
            state_prev = cut_input(tiling, chosen, state_prev)
            state_claimed = cut_output(tiling, chosen, state_claimed)
        progress("prove")
        return prove_step(circuit, i, state_prev, state_claimed, tile=tile)

    def verify_step(
        self,
        prepared: PreparedModel,
        manifest: Manifest,
        proof: StepProof,
        commitment: TraceCommitment,
        *,
        states: Sequence[Sequence[np.ndarray]],
    ) -> StepOutcome:
        """Verify a step proof, bind it to the commitment through the revealed ``states`` it
        was made on (state i-1, state i), and apply the verdict rule."""
        i = proof.segment
        if not 1 <= i <= manifest.num_segments or commitment.num_states != len(manifest.states):
            raise ProofRejected("proof step or commitment does not fit this manifest")
        if commitment.scale != manifest.scale:
            raise ProofRejected("commitment scale differs from the manifest's")
        tiling = self.tiling(prepared, manifest, i)
        if (tiling is None) != (proof.tile is None):
            raise ProofRejected(f"step {i} is {'tiled' if tiling else 'proven whole'}, the "
                                f"proof names tile {proof.tile}")
        circuit = self.step_circuit(prepared, manifest, i, tile=proof.tile)
        assert manifest.tolerances is not None
        return verify_step(circuit, proof, manifest=manifest, leaves=commitment.leaves,
                           state_prev=states[0], state_claimed=states[1], tiling=tiling)

    def prove_range(
        self, prepared: PreparedModel, manifest: Manifest, k: int, state: Sequence[np.ndarray],
        *, chunk: int | None = None,
    ) -> StepProof:
        """Prove state k's max |v| (a range proof; ``segment`` holds k). A chunked state is
        proven on the chunk holding its largest |v| (``tile`` holds the chunk), or on
        ``chunk`` when it is given (a verifier accepts only the former)."""
        chunking = range_chunking(manifest.circuits, k, manifest.states[k])
        if chunking is None:
            return prove_step(self.range_circuit(prepared, manifest, k), k, state, [])
        if chunk is None:
            try:
                chunk = chunking.worst(state)
            except CommitmentError as exc:
                raise CircuitUnsupported(f"state {k}: {exc.reason}") from exc
        circuit = self.range_circuit(prepared, manifest, k, chunk=chunk)
        return prove_step(circuit, k, [chunking.cut(state, chunk)], [], tile=chunk)

    def verify_range(
        self,
        prepared: PreparedModel,
        manifest: Manifest,
        proof: StepProof,
        commitment: TraceCommitment,
        *,
        state: Sequence[np.ndarray],
    ) -> RangeOutcome:
        """Verify a range proof for state ``proof.segment`` against the commitment, bound to it
        through the revealed ``state`` (through the chunk it names, for a chunked state)."""
        k = proof.segment
        if not 0 <= k < commitment.num_states or commitment.num_states != len(manifest.states):
            raise ProofRejected(f"range proof names state {k}, outside the commitment")
        try:
            circuit = self.range_circuit(prepared, manifest, k, chunk=proof.tile)
        except CircuitUnsupported as exc:
            raise ProofRejected(f"range proof of state {k}: {exc.reason}") from exc
        if proof.circuit_key != circuit.key:
            raise ProofRejected("range proof was made for another circuit")
        if not verify_proof_file(circuit, proof.proof):
            raise ProofRejected("range proof does not verify with the circuit's verifying key")
        bind(proof, manifest, commitment.leaves, [state], kind="range")
        assert manifest.range is not None
        units = maxdiff_units(proof.maxdiff_raw, output_scale=circuit.output_scale,
                              scale=manifest.scale)
        try:
            bound = range_bound_units(manifest.range, manifest.scale)
            verdict = range_verdict(units, bound)
        except VerdictError as exc:
            raise ProofRejected(f"range proof of state {k}: {exc.reason}") from exc
        return RangeOutcome(k, units, bound, verdict)
