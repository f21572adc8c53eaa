"""The prover port's EZKL adapter: step and range proofs made, verified and described.

It satisfies :class:`challenge.context.Prover` (structurally: this layer does not import the
dispute logic) and is plugged in by the composition root.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prover.circuit import Circuit
from prover.prover import Prover
from refute.commitment import TraceCommitment
from refute.provider import PreparedModel

State = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class ProofMade:
    """A proof made and verified by a prover, as the transcript records it."""

    detail: dict[str, Any]
    """What the proof established (``maxdiff_units`` and ``tolerance`` of a step, or
    ``max_abs_units`` and ``bound`` of a state, and the ``chunk`` proven of a chunked state),
    its ``circuit``, ``vk_sha256`` and ``proof``,
    and the sha256 of the settings and SRS it was made with (``settings_sha256``,
    ``srs_sha256``)."""
    files: tuple[bytes, ...] = field(default=())
    """The artifacts ``detail`` names by sha256, to keep in the blob store."""
    seconds: float | None = None
    """How long proving took, when measured (operations only: not in ``detail``)."""
    peak_bytes: int | None = None
    """The proving process's peak resident memory, when measured."""


class EzklProofs:
    """Makes and verifies EZKL proofs with a :class:`~prover.prover.Prover` built on demand
    (building it reads the circuit cache and the SRS configuration)."""

    def __init__(self, make_prover: Callable[[], Prover]) -> None:
        self._make_prover = make_prover

    @functools.cached_property
    def _prover(self) -> Prover:
        return self._make_prover()

    def _circuit(self, prepared: PreparedModel, kind: str, index: int,
                 tile: int | None) -> Circuit:
        if kind == "step":
            return self._prover.step_circuit(prepared, prepared.manifest, index, tile=tile)
        return self._prover.range_circuit(prepared, prepared.manifest, index, chunk=tile)

    def prove(self, prepared: PreparedModel, kind: str, index: int,
              states: Mapping[int, State], commitment: TraceCommitment, *,
              tile: int | None = None) -> ProofMade:
        """Prove and verify step ``index`` (its ``tile``, when it is tiled) or the range of
        state ``index`` (of the chunk holding its largest |v|, when it is chunked: the detail
        names it, ``chunk``)."""
        manifest = prepared.manifest
        if kind == "step":
            circuit = self._circuit(prepared, kind, index, tile)
            proof = self._prover.prove_step(prepared, manifest, index, states[index - 1],
                                            states[index], tile=tile)
            step = self._prover.verify_step(prepared, manifest, proof, commitment,
                                            states=[states[index - 1], states[index]])
            assert manifest.tolerances is not None
            measured: dict[str, Any] = {"step": index,
                                        "maxdiff_units": str(step.maxdiff_units),
                                        "tolerance": manifest.tolerances[index - 1],
                                        **({"tile": tile} if tile is not None else {})}
        else:
            proof = self._prover.prove_range(prepared, manifest, index, states[index])
            circuit = self._circuit(prepared, kind, index, proof.tile)
            bound = self._prover.verify_range(prepared, manifest, proof, commitment,
                                              state=states[index])
            measured = {"state": index, "max_abs_units": str(bound.maxabs_units),
                        "bound": int(bound.bound_units),
                        **({"chunk": proof.tile} if proof.tile is not None else {})}
        files = self._files(circuit)
        return ProofMade(
            detail={**measured, "circuit": proof.circuit_key, "vk_sha256": proof.vk_sha256,
                    "proof": proof.proof, "settings_sha256": _sha256(files[0]),
                    "srs_sha256": _sha256(files[2])},
            files=tuple(files), seconds=proof.prove_seconds, peak_bytes=proof.prove_peak_bytes)

    def artifacts(self, prepared: PreparedModel, kind: str, index: int, *,
                  tile: int | None = None) -> list[bytes]:
        """The circuit's settings, verifying key and SRS (``tile``: a step's tile, or the chunk
        of a chunked state's range)."""
        return self._files(self._circuit(prepared, kind, index, tile))

    @staticmethod
    def _files(circuit: Circuit) -> list[bytes]:
        return [circuit.settings_path.read_bytes(), circuit.vk_path.read_bytes(),
                circuit.srs_path.read_bytes()]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
