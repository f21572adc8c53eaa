"""The result lifecycle (DESIGN.md "Result lifecycle"): one transition table that owns every
status write of a result, its ledger effect and the webhook that announces it.

::

    (accepted)  ──dispute opened / spot-check fault──▶  DISPUTED
    DISPUTED    ──dispute opened──────────────────────▶  DISPUTED
    DISPUTED    ──provider convicted──────────────────▶  PROVIDER_FAULT   (stake slashed by the
                                                                           settling dispute)
    DISPUTED    ──disputes settled────────────────────▶  ACCEPTED         (no dispute open, no
                                                                           fault left unsettled)
    ACCEPTED    ──window closed───────────────────────▶  FINALIZED        (stake released)

A result is created ACCEPTED by :func:`accept`, which locks the provider's stake. Nothing else
assigns ``Result.status``: every caller names an event, and a transition the table does not
hold is refused (:class:`IllegalTransition`), which leaves the transaction to roll back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from sqlalchemy.orm import Session

from challenge.books import load_ledger, save_ledger
from challenge.ledger import Ledger
from challenge.outbox import enqueue
from challenge.records import Result, ResultStatus
from refute.errors import Conflict


class IllegalTransition(Conflict):
    """The result is not in a state where this event can happen (a lost race, usually)."""

    code = "illegal_transition"


class ResultEvent(enum.StrEnum):
    """What happens to a result."""

    DISPUTE_OPENED = "dispute_opened"
    """A dispute was opened on it, or the service's spot-check found a fault."""
    PROVIDER_CONVICTED = "provider_convicted"
    """A dispute convicted its provider (a fault proven, or the provider timed out)."""
    DISPUTES_SETTLED = "disputes_settled"
    """Its last open dispute ended without a conviction and no recorded fault is unsettled."""
    WINDOW_CLOSED = "window_closed"
    """Its challenge window closed with every owed check recorded and nothing open."""


@dataclass(frozen=True)
class Transition:
    """One entry of the table: the new status, and what it announces."""

    to: ResultStatus
    webhook: str | None = None
    """The webhook event announcing the change (its payload is the caller's)."""


TRANSITIONS: Mapping[tuple[ResultStatus, ResultEvent], Transition] = MappingProxyType({
    (ResultStatus.ACCEPTED, ResultEvent.DISPUTE_OPENED):
        Transition(ResultStatus.DISPUTED, "result.disputed"),
    (ResultStatus.DISPUTED, ResultEvent.DISPUTE_OPENED): Transition(ResultStatus.DISPUTED),
    (ResultStatus.DISPUTED, ResultEvent.PROVIDER_CONVICTED):
        Transition(ResultStatus.PROVIDER_FAULT),
    (ResultStatus.DISPUTED, ResultEvent.DISPUTES_SETTLED): Transition(ResultStatus.ACCEPTED),
    (ResultStatus.ACCEPTED, ResultEvent.WINDOW_CLOSED):
        Transition(ResultStatus.FINALIZED, "result.finalized"),
})
"""(status, event) → the new status; anything else is refused."""


def accept(session: Session, *results: Result) -> None:
    """Record new results ACCEPTED and lock each provider's stake (if any) in the result's
    journal: the results are inserted in one flush, then their journals' opening entries. The
    results are added to ``session``; the caller commits."""
    for result in results:
        result.status = ResultStatus.ACCEPTED
    session.add_all(results)
    session.flush()  # the results' rows first: their journals refer to them
    for result in results:
        stake = int(result.stake)
        if stake > 0:  # a new result's journal is empty: nothing to read
            ledger = Ledger(result_id=result.id)
            ledger.deposit(result.provider, stake)
            ledger.lock_stake(result.id, result.provider, stake)
            save_ledger(session, result.id, ledger, 0)


def advance(session: Session, result: Result, event: ResultEvent, now: datetime,
            announce: Mapping[str, object] | None = None) -> bool:
    """Apply ``event`` to ``result`` (whose row the caller has locked): write its new status and
    the transition's ledger effect, and enqueue its webhook with the ``announce`` payload.
    Returns whether the status changed; raises :class:`IllegalTransition` for an event the
    table does not allow in the result's status."""
    step = TRANSITIONS.get((result.status, event))
    if step is None:
        raise IllegalTransition(f"result {result.id} is {result.status.value}: {event.value} "
                                "cannot happen to it")
    changed = step.to is not result.status
    if step.to is ResultStatus.FINALIZED:
        _release_stake(session, result)
        result.finalized_at = now
    result.status = step.to
    if changed and step.webhook is not None:
        prefix = step.webhook.removeprefix("result.")
        enqueue(session, result.network_id, step.webhook, f"{prefix}:{result.id}",
                dict(announce or {"result_id": result.id}), now)
    return changed


def _release_stake(session: Session, result: Result) -> None:
    """Return a finalizing result's stake to its provider (once: a result whose stake was
    never locked, such as one accepted with no stake, has nothing to release)."""
    ledger = load_ledger(session, result.id)
    stake = ledger.stake(result.id)
    if stake is None:
        return
    known = len(ledger.entries())
    ledger.release_stake(result.id)
    save_ledger(session, result.id, ledger, known)
