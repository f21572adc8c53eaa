"""Proving and verifying one disputed step (DESIGN.md "The dispute game", step 4).

The proof of segment i's adjudication circuit on (state i-1, claimed state i) has public
instances ``Poseidon(x_1) … Poseidon(x_m), Poseidon(y_1) … Poseidon(y_n), maxdiff``.
:func:`verify_step` accepts a proof only if EZKL verifies it with the circuit's verifying key
**and** it is bound to the result (:func:`refute.instances.check_binding`): the revealed states
i-1 and i reproduce leaves i-1 and i of the provider's commitment, and the hash instances are
Poseidon of their quantized tensors. It then applies the verdict rule of :mod:`refute.verdict`:
``maxdiff > τ_i`` → ``PROVIDER_FAULT``, else ``CHALLENGER_FAULT``.

``maxdiff`` is read exactly: the instance is an integer at the circuit's output scale o, so in
quantized units of the model scale s it is ``raw · 2^s / 2^o`` (a fraction, compared exactly;
:func:`refute.verdict.proven_units`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import ezkl
import numpy as np

from prover.circuit import Circuit, felt_to_int, witness
from prover.errors import ProofRejected
from prover.isolated import run_child
from refute.chunks import Chunking, range_chunking
from refute.errors import BindingError, BundleError
from refute.instances import check_binding
from refute.manifest import EZKL_VERSION, Manifest
from refute.tiling import Tile, Tiling
from refute.verdict import Verdict, VerdictError, proven_units, step_verdict

__all__ = [
    "StepOutcome",
    "StepProof",
    "Verdict",
    "bind",
    "maxdiff_units",
    "prove_step",
    "split_instances",
    "verify_proof_file",
    "verify_step",
]


def maxdiff_units(raw: int, *, output_scale: int, scale: int) -> Fraction:
    """A maxdiff instance at ``output_scale`` expressed in quantized units at ``scale``
    (:func:`refute.verdict.proven_units`); a malformed one is a :class:`ProofRejected`."""
    try:
        return proven_units(raw, output_scale=output_scale, scale=scale)
    except VerdictError as exc:
        raise ProofRejected(f"maxdiff instance: {exc.reason}") from exc


@dataclass(frozen=True)
class StepProof:
    """A proof for one step, with everything needed to check it offline."""

    segment: int
    circuit_key: str
    vk_sha256: str
    ezkl_version: str
    proof: dict[str, Any]
    x_hashes: tuple[int, ...]
    y_hashes: tuple[int, ...]
    maxdiff_raw: int
    tile: int | None = None
    """The tile of a tiled segment the proof is of, or for a range proof the chunk of a chunked
    state (``None``: the whole segment, or the whole state)."""
    prove_seconds: float | None = field(default=None, compare=False)
    """How long proving took, when this process proved it (not part of the bundle)."""
    prove_peak_bytes: int | None = field(default=None, compare=False)
    """The proving process's peak resident memory, when this process proved it."""

    def to_json(self) -> dict[str, Any]:
        """JSON form (the proof bundle written by ``refute prove``)."""
        tile = {"tile": self.tile} if self.tile is not None else {}
        return {
            "format": "refute.step-proof/1",
            "segment": self.segment,
            "circuit_key": self.circuit_key,
            "vk_sha256": self.vk_sha256,
            "ezkl_version": self.ezkl_version,
            "proof": self.proof,
            **tile,
        }

    @classmethod
    def from_json(cls, data: Any, *, n_inputs: int) -> StepProof:
        """Parse a proof bundle; instances are read from the proof itself."""
        try:
            if data["format"] != "refute.step-proof/1":
                raise ProofRejected(f"unknown proof format {data['format']!r}")
            proof = dict(data["proof"])
            x, y, raw = split_instances(proof, n_inputs)
            tile = data.get("tile")
            if tile is not None and (type(tile) is not int or tile < 0):
                raise ProofRejected(f"a proof's tile must be a tile index, not {tile!r}"[:120])
            return cls(int(data["segment"]), str(data["circuit_key"]), str(data["vk_sha256"]),
                       str(data["ezkl_version"]), proof, x, y, raw, tile)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProofRejected(f"malformed proof bundle: {exc}") from exc


def split_instances(
    proof: dict[str, Any], n_inputs: int
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(x hashes, y hashes, maxdiff raw) from a proof's instances; ``n_inputs`` = len(state i-1)
    (a tile's proof may hash fewer: the tensors it reads, then the one it computes; the binding,
    :func:`refute.instances.check_binding`, checks the count against the tile)."""
    try:
        (column,) = proof["instances"]
        values = [int.from_bytes(bytes.fromhex(v), "little") for v in column]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofRejected(f"proof has malformed instances: {exc}") from exc
    if len(values) < 2:
        raise ProofRejected(f"proof has {len(values)} instances, too few for a step")
    raw = felt_to_int(column[-1])
    n_inputs = min(n_inputs, len(values) - 1)
    return tuple(values[:n_inputs]), tuple(values[n_inputs:-1]), raw


def prove_step(
    circuit: Circuit,
    segment: int,
    state_prev: Sequence[np.ndarray],
    state_claimed: Sequence[np.ndarray],
    workdir: Path | None = None,
    *,
    tile: int | None = None,
) -> StepProof:
    """Prove segment ``segment``'s adjudication circuit on (state i-1, claimed state i), or, for
    a ``tile`` of a tiled segment, the tile's circuit on the tile's slices of them (a range
    circuit: ``segment`` is the state, ``state_prev`` what it takes, ``tile`` its chunk)."""
    with tempfile.TemporaryDirectory(prefix="refute-prove-", dir=workdir) as tmp:
        folder = Path(tmp)
        witness(circuit, [*state_prev, *state_claimed], folder)
        proof_path = folder / "proof.json"
        job = (str(folder / "witness.json"), str(circuit.compiled_path), str(circuit.pk_path),
               str(proof_path), str(circuit.srs_path))
        done = run_child("prover.step:prove_job", job, timeout_s=_proof_timeout(),
                         what=f"EZKL prove of segment {segment}",
                         hint="REFUTE_DISPUTE_PROOF_TIMEOUT_S")  # ChildFailed: a ProverError
        proof = json.loads(proof_path.read_text())
    x, y, raw = split_instances(proof, len(state_prev))
    return StepProof(segment, circuit.key, circuit.vk_sha256, EZKL_VERSION, proof, x, y, raw,
                     tile, prove_seconds=done.seconds, prove_peak_bytes=done.peak_bytes)


def _proof_timeout() -> float:
    from refute.settings import get_settings

    return get_settings().dispute_proof_timeout_s


def prove_job(job: tuple[str, str, str, str, str]) -> None:
    """EZKL's prove, in a child process of its own (:mod:`prover.isolated`): ``job`` is the
    witness, compiled circuit, proving key, proof and SRS paths."""
    witness_path, compiled, pk, proof_path, srs = job
    ezkl.prove(witness_path, compiled, pk, proof_path, srs_path=srs)


@dataclass(frozen=True)
class StepOutcome:
    """A verified step: the maxdiff it proved and the verdict."""

    segment: int
    maxdiff_units: Fraction
    tolerance: int
    verdict: Verdict


def verify_proof_file(circuit: Circuit, proof: dict[str, Any]) -> bool:
    """EZKL verification of a proof with the circuit's verifying key."""
    with tempfile.TemporaryDirectory(prefix="refute-verify-") as tmp:
        path = Path(tmp) / "proof.json"
        path.write_text(json.dumps(proof))
        try:
            return bool(ezkl.verify(str(path), str(circuit.settings_path), str(circuit.vk_path),
                                    srs_path=str(circuit.srs_path)))
        except Exception:  # EZKL raises on an invalid proof rather than returning False
            return False


def bind(step: StepProof, manifest: Manifest, leaves: Sequence[bytes],
         states: Sequence[Sequence[np.ndarray]], *, kind: str = "step",
         tiling: Tiling | None = None) -> None:
    """Check the binding of ``step`` (a step proof, or a range proof with ``kind="range"``) to
    the committed ``leaves`` through the revealed ``states`` it was made on (states i-1 and i of
    a step, state k of a range; for a tile's proof, ``tiling`` is the segment's, and the tile's
    slices are cut from them; for a range proof of a chunked state, ``step.tile`` names the
    chunk, cut by the manifest's chunking); raise :class:`ProofRejected` naming what does not
    hold."""
    i = step.segment
    indices = [i - 1, i] if kind == "step" else [i]
    try:
        if kind == "step":
            tile = _chosen_tile(step, tiling)
            chunk = None
        else:
            tile, chunk = None, _chosen_chunk(step, manifest)
        check_binding(scale=manifest.scale, specs=manifest.states, indices=indices,
                      states=states, leaves=leaves, instances=step.x_hashes + step.y_hashes,
                      tile=tile, chunk=chunk)
    except (BindingError, BundleError) as exc:
        raise ProofRejected(exc.reason) from exc


def _check_split(named: int | None, split: object, *, what: str, part: str,
                 split_as: str) -> None:
    """A proof names a ``part`` (a tile, a chunk) exactly when ``what`` it proves is split
    into them (``split``: the tiling or chunking, ``None`` when proven whole)."""
    if (named is None) != (split is None):
        raise BindingError(f"{what} is proven on a {part} exactly when it is {split_as}: the "
                           f"proof names {part} {named}, it is "
                           f"{split_as if split is not None else 'proven whole'}")


def _chosen_tile(step: StepProof, tiling: Tiling | None) -> tuple[Tiling, Tile] | None:
    """The tile a step proof names, of the segment's ``tiling``; whole or tiled as it is."""
    i = step.segment
    _check_split(step.tile, tiling, what=f"step {i}", part="tile", split_as="tiled")
    if tiling is None or step.tile is None:
        return None
    if not 0 <= step.tile < len(tiling.tiles):
        raise BindingError(f"step {i} has tiles 0..{len(tiling.tiles) - 1}, not {step.tile}")
    return tiling, tiling.tiles[step.tile]


def _chosen_chunk(step: StepProof, manifest: Manifest) -> tuple[Chunking, int] | None:
    """The chunk a range proof names (``step.tile``), of the state's chunking in the
    manifest; whole or chunked as the state is."""
    k = step.segment
    if not 0 <= k < len(manifest.states):
        raise BindingError(f"range proof names state {k}, outside the manifest")
    chunking = range_chunking(manifest.circuits, k, manifest.states[k])
    _check_split(step.tile, chunking, what=f"state {k}'s range", part="chunk",
                 split_as="chunked")
    if chunking is None or step.tile is None:
        return None
    return chunking, step.tile


def verify_step(
    circuit: Circuit,
    step: StepProof,
    *,
    manifest: Manifest,
    leaves: Sequence[bytes],
    state_prev: Sequence[np.ndarray],
    state_claimed: Sequence[np.ndarray],
    tiling: Tiling | None = None,
) -> StepOutcome:
    """Verify ``step`` and bind it to the commitment's ``leaves`` through the revealed states
    (cut to the proof's tile with the segment's ``tiling`` when it is tiled); raise
    ProofRejected if it does not hold."""
    if step.circuit_key != circuit.key or step.vk_sha256 != circuit.vk_sha256:
        raise ProofRejected("proof was made for another circuit")
    if not verify_proof_file(circuit, step.proof):
        raise ProofRejected("proof does not verify with the circuit's verifying key")
    bind(step, manifest, leaves, [state_prev, state_claimed], tiling=tiling)
    assert manifest.tolerances is not None
    tolerance = manifest.tolerances[step.segment - 1]
    units = maxdiff_units(step.maxdiff_raw, output_scale=circuit.output_scale,
                          scale=manifest.scale)
    try:
        verdict = step_verdict(units, tolerance)
    except VerdictError as exc:
        raise ProofRejected(f"step {step.segment}: {exc.reason}") from exc
    return StepOutcome(step.segment, units, tolerance, verdict)
