"""The dispute logic's ports, and the one context object that holds them.

The orchestration of a dispute (:mod:`challenge.orchestrator`) talks to the outside through a
few small protocols: the **prover** (make a step or range proof and say what it established),
the **task queue** (have a proof made in the background), the **chain** (re-verify a proof on an
EVM chain), the **clock**, and the **state source** (the provider's uploaded trace, its disclosed
states, and the service's own execution of the model). Each has a real adapter — EZKL
(:mod:`prover.adapter`), Celery (:mod:`verifier.queue`), web3 (:mod:`prover.chain`), the system
clock, the blob store and ONNX Runtime (:class:`StoredStates`) — and an in-memory fake
(:mod:`challenge.fakes`). The real adapters are plugged in at one place, the composition root
(:meth:`verifier.service.ServiceContext.create`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from challenge.blobs import BlobStore
from challenge.game import TimeControl
from challenge.records import RegisteredModel, Result
from prover.adapter import ProofMade
from refute.commitment import TraceCommitment
from refute.disclosure import read_states
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_for_manifest
from refute.segmentation import run_segments
from refute.trace import Trace

State = tuple[np.ndarray, ...]
"""One committed state: its tensors, in the manifest's order."""


class ProofKind(enum.StrEnum):
    """What a proof establishes: one step's max difference, or one state's max |v|."""

    STEP = "step"
    RANGE = "range"


class Prover(Protocol):
    """Makes and verifies the proof a dispute waits for."""

    def prove(self, prepared: PreparedModel, kind: ProofKind, index: int,
              states: Mapping[int, State], commitment: TraceCommitment, *,
              tile: int | None = None) -> ProofMade:
        """Prove step ``index`` (on states index-1 and index; on its ``tile`` when the segment
        is tiled) or the range of state ``index``, verify the proof against ``commitment``,
        and return what it established."""
        ...

    def artifacts(self, prepared: PreparedModel, kind: ProofKind, index: int, *,
                  tile: int | None = None) -> list[bytes]:
        """The circuit's settings, verifying key and SRS (for a bundle, when the blob store
        does not hold them)."""
        ...


class TaskQueue(Protocol):
    """Runs slow work in the background."""

    def schedule_proof(self, dispute_id: str) -> None:
        """Have the proof a dispute waits for made (calls :func:`~challenge.orchestrator.
        prove_pending` eventually); raises when the queue cannot take it."""
        ...


class Chain(Protocol):
    """An EVM chain on which a settled proof is verified again by its Solidity verifier."""

    def verify(self, vk: bytes, settings: bytes, srs: bytes, proof: Any) -> dict[str, Any]:
        """Deploy (or reuse) the circuit's verifier and verify ``proof`` by a transaction;
        returns what to record (``gas``, ``tx``, ``contract``); raises if it does not verify."""
        ...


class Clock(Protocol):
    """The time, always timezone-aware UTC."""

    def now(self) -> datetime:
        """The current time."""
        ...


class StateSource(Protocol):
    """Where the service gets the states a dispute needs."""

    def trace(self, key: str) -> Trace:
        """The provider's uploaded trace bundle (verified at upload)."""
        ...

    def disclosed(self, manifest: Manifest, leaves: Sequence[str],
                  blobs: Mapping[int, str], needed: set[int]) -> dict[int, State]:
        """The states of ``needed`` among those disclosed one by one (``blobs`` maps a state to
        the disclosure bundle that holds it; each was checked against its leaf on arrival)."""
        ...

    def execute(self, prepared: PreparedModel, inputs: Mapping[str, np.ndarray]
                ) -> list[list[np.ndarray]]:
        """The service's own execution of the model: every state, from the input."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """The current time, UTC."""
        return datetime.now(UTC)


class StoredStates:
    """The real state source: bundles from the blob store, execution by ONNX Runtime."""

    def __init__(self, blobs: BlobStore, executor: DeterministicExecutor) -> None:
        self.blobs = blobs
        self.executor = executor

    def trace(self, key: str) -> Trace:
        """Read a stored trace bundle. It was fully verified at upload and the blob store
        checks its sha256 on read, so its states are not re-hashed here."""
        return Trace.read(self.blobs.get(key), rehash=False)

    def disclosed(self, manifest: Manifest, leaves: Sequence[str],
                  blobs: Mapping[int, str], needed: set[int]) -> dict[int, State]:
        """The needed states found in their disclosure bundles (each read once)."""
        found: dict[int, State] = {}
        for blob in sorted({blobs[k] for k in needed if k in blobs}):
            states = read_states(manifest, self.blobs.get(blob), list(leaves))
            found.update({k: v for k, v in states.items() if k in needed})
        return found

    def execute(self, prepared: PreparedModel, inputs: Mapping[str, np.ndarray]
                ) -> list[list[np.ndarray]]:
        """Run every segment from ``inputs`` (state 0)."""
        return run_segments(self.executor, prepared.segmentation, dict(inputs))


@dataclass(frozen=True)
class DisputeConfig:
    """The service's dispute policy (from its settings)."""

    clocks: TimeControl
    """The time control new disputes get."""
    resume_after_s: float
    """A step the service owes that is still undone this long after its turn began is carried
    out again by the timers (crash recovery)."""
    claim_expiry_s: float
    """A proof claimed longer ago than this belongs to a dead task and is taken over (the
    task time limit)."""
    requeue_every_s: float
    """A queued proof still missing this long after it was queued is queued again (the
    broker's redelivery of a lost task would have run it by then)."""
    watcher_bond: int
    """The bond the service's watcher posts when it challenges a result itself."""
    bls_seed: str = dataclasses.field(default="", repr=False)
    """Seed (hex) of the key that signs transcript heads; empty: a development seed kept at
    ``dev_seed_path``."""
    dev_seed_path: Path = Path("bls-dev.seed")


@dataclass
class DisputeContext:
    """Everything the dispute logic reaches: the database, the blob store, and the ports."""

    sessions: sessionmaker[Session]
    blobs: BlobStore
    states: StateSource
    prover: Prover
    tasks: TaskQueue
    clock: Clock
    config: DisputeConfig
    chain: Chain | None = None
    """When set, every proof is verified again on chain and the transaction recorded."""

    @functools.cached_property
    def _prepared(self) -> dict[str, PreparedModel]:
        return {}

    def prepared(self, model: RegisteredModel) -> PreparedModel:
        """The model prepared exactly as its manifest says (cached per context)."""
        cached = self._prepared.get(model.id)
        if cached is None:
            cached = prepare_for_manifest(self.blobs.get(model.model_blob),
                                          Manifest.from_json(model.manifest))
            self._prepared[model.id] = cached
        return cached

    def held_states(self, manifest: Manifest, result: Result, needed: set[int],
                    disclosed: Mapping[int, str]) -> dict[int, State]:
        """The provider's committed states in ``needed`` that the service holds: from the
        uploaded trace (all of them), else from the disclosures (``disclosed`` maps state →
        bundle blob). Both were verified against the result's leaves when they arrived."""
        if result.trace_blob is not None:
            trace = self.states.trace(result.trace_blob)
            return {k: trace.states[k] for k in needed}
        return self.states.disclosed(manifest, list(result.leaves), disclosed, needed)
