"""In-memory fakes of the dispute logic's ports (:mod:`challenge.context`), for fast tests.

Each fake does what its port promises without the slow or external part: :class:`FakeProver`
measures what a proof would establish by re-executing the step (no circuit, no EZKL);
:class:`FakeTasks` keeps queued proofs in a list that the test runs when it chooses;
:class:`FakeClock` moves only when told; :class:`FakeChain` records what it was asked to
verify. The real adapters are tested on their own and in the end-to-end suites.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import numpy as np

from challenge.context import ProofKind, State
from prover.adapter import ProofMade
from prover.errors import ProverError
from prover.prover import manifest_tiling
from refute.commitment import TraceCommitment
from refute.executor import DeterministicExecutor
from refute.provider import PreparedModel
from refute.segmentation import step_difference_units
from refute.tiling import tile_difference_units
from refute.trace import leaf_of_state
from refute.verdict import range_bound_units


class FakeProver:
    """Measures what a step or range proof would establish, by re-executing the step on the
    committed states (ONNX Runtime) and reading the state's max |v|; checks the states against
    the commitment's leaves as a verifier checks a proof's hashes. ``fail`` makes the next
    proofs raise (a prover crash); every proof made is listed in ``made``."""

    def __init__(self, executor: DeterministicExecutor | None = None) -> None:
        self.executor = executor or DeterministicExecutor()
        self.made: list[tuple[ProofKind, int]] = []
        self.fail = 0

    def prove(self, prepared: PreparedModel, kind: ProofKind, index: int,
              states: Mapping[int, State], commitment: TraceCommitment, *,
              tile: int | None = None) -> ProofMade:
        """What the proof of ``(kind, index)`` (of ``tile``, for a tiled step) would
        establish, as its transcript detail."""
        if self.fail:
            self.fail -= 1
            raise ProverError(f"fake prover: {kind} proof {index} failed on purpose")
        manifest = prepared.manifest
        for k, state in states.items():
            if leaf_of_state(manifest, k, state) != commitment.leaves[k]:
                raise ProverError(f"fake prover: state {k} does not match its leaf")
        self.made.append((kind, index))
        artifact = f"fake circuit {kind} {index} of {manifest.sha256}".encode()
        digest = hashlib.sha256(artifact).hexdigest()
        common = {"circuit": f"fake-{kind}-{index}", "vk_sha256": digest,
                  "settings_sha256": digest, "srs_sha256": digest,
                  "proof": {"fake": True, "kind": str(kind), "index": index}}
        if kind is ProofKind.STEP:
            assert manifest.tolerances is not None
            segment = prepared.segmentation.segments[index - 1]
            tiling = manifest_tiling(prepared, manifest, index) if manifest.circuits else None
            if (tiling is None) != (tile is None):
                raise ProverError(f"fake prover: step {index} is tiled exactly when a tile is "
                                  f"named (tile {tile})")
            if tiling is not None and tile is not None:
                units = tile_difference_units(self.executor, segment, states[index - 1],
                                              states[index], tiling=tiling,
                                              tile=tiling.tiles[tile], scale=manifest.scale)
            else:
                units = step_difference_units(self.executor, segment, states[index - 1],
                                              states[index], manifest.scale)
            measured: dict[str, Any] = {"step": index, "maxdiff_units": str(units),
                                        "tolerance": manifest.tolerances[index - 1],
                                        **({"tile": tile} if tile is not None else {})}
        else:
            assert manifest.range is not None
            top = max((float(np.max(np.abs(t))) for t in states[index] if t.size), default=0.0)
            units_abs = Fraction(top) * 2**manifest.scale if np.isfinite(top) else Fraction(2**64)
            measured = {"state": index, "max_abs_units": str(units_abs),
                        "bound": range_bound_units(manifest.range, manifest.scale)}
        return ProofMade(detail={**measured, **common}, files=(artifact,))

    def artifacts(self, prepared: PreparedModel, kind: ProofKind, index: int, *,
                  tile: int | None = None) -> list[bytes]:
        """The fake circuit's one artifact."""
        del tile
        return [f"fake circuit {kind} {index} of {prepared.manifest.sha256}".encode()]


@dataclass
class FakeTasks:
    """A queue the test drains: ``proofs`` (dispute ids), ``spotchecks`` and ``watches``
    (result ids). A runner in ``inline`` (keyed by the queue's name) runs an item at once
    instead of queueing it, as a worker picking it up immediately would; ``down`` makes
    scheduling raise, as a broker outage does."""

    proofs: list[str] = field(default_factory=list)
    spotchecks: list[str] = field(default_factory=list)
    watches: list[str] = field(default_factory=list)
    inline: dict[str, Callable[[str], object]] = field(default_factory=dict)
    down: bool = False

    def _put(self, queue: str, item: str) -> None:
        if self.down:
            raise ConnectionError("fake broker is down")
        runner = self.inline.get(queue)
        if runner is not None:
            runner(item)
        else:
            getattr(self, queue).append(item)

    def schedule_proof(self, dispute_id: str) -> None:
        """Queue a proof."""
        self._put("proofs", dispute_id)

    def schedule_spotcheck(self, result_id: str) -> None:
        """Queue a result's spot-checks."""
        self._put("spotchecks", result_id)

    def schedule_watch(self, result_id: str) -> None:
        """Queue a watcher's check."""
        self._put("watches", result_id)

    def drain_proofs(self, run: Callable[[str], object]) -> int:
        """Run every queued proof (and those queued meanwhile) with ``run``; how many ran."""
        ran = 0
        while self.proofs:
            run(self.proofs.pop(0))
            ran += 1
        return ran

    def clear(self) -> None:
        """Forget everything queued, and run nothing inline."""
        self.proofs.clear()
        self.spotchecks.clear()
        self.watches.clear()
        self.inline.clear()
        self.down = False


@dataclass
class FakeClock:
    """A clock that moves only when told."""

    moment: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))

    def now(self) -> datetime:
        """The fake time."""
        return self.moment

    def advance(self, seconds: float) -> datetime:
        """Move the clock forward; the new time."""
        self.moment += timedelta(seconds=seconds)
        return self.moment


@dataclass
class FakeChain:
    """Accepts every proof and records it, with a fixed gas figure."""

    verified: list[dict[str, Any]] = field(default_factory=list)
    gas: int = 777_000

    def verify(self, vk: bytes, settings: bytes, srs: bytes, proof: Any) -> dict[str, Any]:
        """Record the proof; a fake transaction."""
        del settings, srs
        self.verified.append(proof)
        tx = hashlib.sha256(json.dumps(proof, sort_keys=True).encode() + vk).hexdigest()
        return {"contract": "0x" + "00" * 20, "tx": "0x" + tx, "gas": self.gas}
