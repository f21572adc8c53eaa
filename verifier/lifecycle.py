"""What a result owes before it can finalize, and the timers that make sure it is paid.

DESIGN.md "Result lifecycle" and "Spot-checks": the checks a result owes are written with its
acceptance (:func:`verifier.results.submit_result`); this module

* takes the states a sampled provider discloses on request (:func:`attach_states` for a bundle,
  :func:`attach_state` for one state streamed alone), each verified against its leaf, so a
  provider never has to upload a whole trace;
* turns every spot-check fault into the service's dispute naming that step (:func:`watch_faults`);
* sweeps, on the timers beat (:func:`sweep`): queues again every owed check whose states are
  held but whose task was lost (a Redis restart, a failed enqueue, a killed worker), challenges
  the step of every owed check whose states were not disclosed by the deadline (the provider
  then loses by timeout like any silent provider, unless it discloses its trace in the dispute),
  and opens the dispute of a recorded fault whose dispute was lost in a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from challenge.blobs import BlobStore
from challenge.orchestrator import SERVICE, open_dispute
from challenge.records import (
    Challenge,
    DisclosedState,
    Dispute,
    RegisteredModel,
    Result,
    ResultStatus,
)
from refute.disclosure import read_state, read_states, write_states
from refute.errors import BundleError, RefuteError
from refute.manifest import Manifest
from verifier.results import needed_states
from verifier.service import ServiceContext, owed_segments

log = logging.getLogger(__name__)

_OPEN = (ResultStatus.ACCEPTED, ResultStatus.DISPUTED)


def attach_states(session: Session, blobs: BlobStore, result: Result, data: bytes,
                  now: datetime) -> list[int]:
    """Verify a disclosure bundle (``refute.states/2``) against the result's commitment, store
    it, and record the states it holds; returns them. Idempotent: a state disclosed twice keeps
    its first record. Nothing is written when any state fails its check."""
    manifest = disclosure_manifest(session, result)
    states = read_states(manifest, data, result.leaves)
    return _record(session, result, states, blobs.put(data), now)


def attach_state(session: Session, blobs: BlobStore, result: Result, data: bytes, *, k: int,
                 now: datetime) -> list[int]:
    """Verify one state sent alone as its canonical bytes against leaf ``k`` of the result
    (:func:`refute.disclosure.read_state`), store it as a one-state bundle and record it;
    returns ``[k]``. Idempotent like :func:`attach_states`; nothing is written on a refusal."""
    manifest = disclosure_manifest(session, result)
    if not 0 <= k < len(result.leaves):
        raise BundleError(f"state {k} does not exist: the result commits states "
                          f"0..{len(result.leaves) - 1}")
    tensors = read_state(manifest, k, data, result.leaves[k])
    return _record(session, result, {k: tensors},
                   blobs.put(write_states(manifest, {k: tensors})), now)


def disclosure_manifest(session: Session, result: Result) -> Manifest:
    """The manifest states of ``result`` are disclosed under; refused once it is closed."""
    if result.status not in _OPEN:
        raise BundleError(f"result {result.id} is {result.status.value}: nothing to disclose")
    model = session.get(RegisteredModel, result.model_id)
    assert model is not None
    return Manifest.from_json(model.manifest)


def _record(session: Session, result: Result, states: Mapping[int, object], key: str,
            now: datetime) -> list[int]:
    known = set(session.scalars(select(DisclosedState.state).where(
        DisclosedState.result_id == result.id)))
    for k in sorted(states):
        if k not in known:
            session.add(DisclosedState(result_id=result.id, state=k, blob=key, disclosed_at=now))
    return sorted(states)


def disclosure_needed(session: Session, result: Result) -> list[int]:
    """The states the result's owed checks still need from the provider (none once its trace
    is uploaded or they were disclosed)."""
    if result.trace_blob is not None or not result.spot_pending:
        return []
    held = set(session.scalars(select(DisclosedState.state).where(
        DisclosedState.result_id == result.id)))
    return [k for k in needed_states(owed_segments(session, result)) if k not in held]


def watch_faults(ctx: ServiceContext, result_id: str, now: datetime) -> list[str]:
    """The watcher: every open spot-check fault becomes a dispute naming that step
    (idempotent). Returns the disputes opened or found."""
    with ctx.sessions() as session:
        faults = session.scalars(select(Challenge.hi).where(
            Challenge.result_id == result_id, Challenge.filed_by == SERVICE,
            Challenge.status == "OPEN")).all()
    opened = []
    for segment in sorted(set(faults)):
        try:
            opened.append(open_dispute(ctx.disputes, result_id, challenger=SERVICE, lo=segment - 1,
                                       hi=segment, bond=ctx.settings.watcher_bond, now=now,
                                       owed_check=True))
        except RefuteError as exc:  # e.g. already convicted by the first fault's dispute
            log.info("watcher: no dispute on %s step %s: %s", result_id, segment, exc.reason)
    return opened


@dataclass
class SweepReport:
    """What one sweep did (for logs and tests)."""

    queued: list[str] = field(default_factory=list)
    """Results whose owed checks were queued again."""
    challenged: list[str] = field(default_factory=list)
    """Disputes opened because sampled states were not disclosed in time."""
    recovered: list[str] = field(default_factory=list)
    """Disputes of recorded faults that had been lost."""


def sweep(ctx: ServiceContext, now: datetime, schedule: Callable[[str], None],
          *, limit: int = 500) -> SweepReport:
    """One pass of the owed-check timers (see the module docstring); ``schedule(result_id)``
    queues a spot-check task. Bounded to ``limit`` results per kind and pass."""
    report = SweepReport()
    requeue_before = now - timedelta(seconds=ctx.settings.spotcheck_requeue_after_s)
    held = or_(Result.trace_blob.is_not(None),
               exists().where(DisclosedState.result_id == Result.id))
    with ctx.sessions() as session, session.begin():
        due = session.scalars(select(Result).where(
            Result.spot_pending.is_(True), Result.status.in_(_OPEN), held,
            or_(Result.spot_queued_at.is_(None), Result.spot_queued_at <= requeue_before))
            .limit(limit)).all()
        for result in due:
            result.spot_queued_at = now
        report.queued = [r.id for r in due]
    for result_id in report.queued:
        try:
            schedule(result_id)
        except Exception:  # the broker is down: the next sweep tries again
            log.exception("sweep: cannot queue the spot-check of %s", result_id)
    with ctx.sessions() as session:
        late = session.scalars(select(Result).where(
            Result.spot_pending.is_(True), Result.status.in_(_OPEN),
            Result.trace_blob.is_(None), Result.disclosure_deadline <= now).limit(limit)).all()
        missing = {r.id: _undisclosed_segments(session, r) for r in late}
    for result_id, segments in missing.items():
        for segment in segments:
            try:
                report.challenged.append(open_dispute(
                    ctx.disputes, result_id, challenger=SERVICE, lo=segment - 1, hi=segment,
                    bond=ctx.settings.watcher_bond, now=now, owed_check=True))
            except RefuteError as exc:  # convicted meanwhile by another dispute
                log.info("sweep: no dispute on %s step %s: %s", result_id, segment, exc.reason)
        with ctx.sessions() as session, session.begin():
            session.execute(update(Result).where(Result.id == result_id)
                            .values(disclosure_deadline=None))  # challenged once: its clock runs
    lost_before = now - timedelta(seconds=ctx.settings.dispute_resume_after_s)
    with ctx.sessions() as session:
        orphans = session.scalars(select(Challenge.result_id).where(
            Challenge.filed_by == SERVICE, Challenge.status == "OPEN",
            Challenge.created_at <= lost_before,
            ~exists().where(Dispute.result_id == Challenge.result_id,
                            Dispute.challenger == SERVICE, Dispute.lo == Challenge.lo,
                            Dispute.hi == Challenge.hi)).distinct().limit(limit)).all()
    for result_id in orphans:
        report.recovered += watch_faults(ctx, result_id, now)
    return report


def _undisclosed_segments(session: Session, result: Result) -> list[int]:
    """Owed segments of the result whose two states are not both held."""
    held = set(session.scalars(select(DisclosedState.state).where(
        DisclosedState.result_id == result.id)))
    return [i for i in owed_segments(session, result) if not {i - 1, i} <= held]
