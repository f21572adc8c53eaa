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
from typing import cast

from sqlalchemy import Table, insert, inspect
from sqlalchemy.engine import ExecutionContext
from sqlalchemy.orm import Session
from sqlalchemy.sql.schema import CallableColumnDefault, ScalarElementColumnDefault

from challenge.books import journal_rows, load_ledger, save_ledger
from challenge.ledger import Ledger
from challenge.outbox import enqueue
from challenge.records import LedgerEntry, Result, ResultStatus
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
    journal, in two bulk inserts (one statement each, run as the driver's executemany): the
    results, then their journals' opening entries. The ``results`` stay out of ``session``
    (complete as built, so they can be shown; read a result again to change it); the caller
    commits. Without the unit of work's bookkeeping, inserting a batch of results takes about
    half the time of the flush it replaced."""
    if not results:
        return
    journal: list[dict[str, object]] = []
    for result in results:
        result.status = ResultStatus.ACCEPTED
        stake = int(result.stake)
        if stake > 0:  # a new result's journal is empty: nothing to read
            ledger = Ledger(result_id=result.id)
            ledger.deposit(result.provider, stake)
            ledger.lock_stake(result.id, result.provider, stake)
            journal += journal_rows(result.id, ledger, 0)
    session.execute(insert(_RESULT_TABLE), [_row(result) for result in results])
    if journal:  # after the results: the entries refer to them
        session.execute(insert(LedgerEntry), journal)


def _row(result: Result) -> dict[str, object]:
    """Every column of ``result``'s row: the values it was given, the column's Python default
    for the others (else NULL). The same columns for every row: the batch is one executemany
    (the ORM's bulk insert would split it by which columns are NULL)."""
    given = inspect(result).dict
    row: dict[str, object] = {}
    for column in _RESULT_TABLE.columns:
        if column.key in given:
            row[column.key] = given[column.key]
        elif isinstance(column.default, ScalarElementColumnDefault | CallableColumnDefault):
            # A callable default here takes no context (``list``): SQLAlchemy's wrapper
            # passes on none.
            row[column.key] = (column.default.arg(cast("ExecutionContext", None))
                               if column.default.is_callable else column.default.arg)
        else:
            row[column.key] = None
    return row


_RESULT_TABLE = cast("Table", Result.__table__)


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
