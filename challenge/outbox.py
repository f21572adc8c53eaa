"""The webhook outbox write: an event is added *in the caller's transaction*.

The row commits (or rolls back) together with the state change that caused it (the outbox
pattern), so an event is never announced for a change that did not happen and never lost for one
that did. Delivery (signing, retries, target checks) is the service's: :mod:`verifier.webhooks`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Table, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from challenge.records import WebhookDelivery, WebhookEndpoint
from refute.errors import RefuteError

#: Every event a network can subscribe to.
EVENTS: frozenset[str] = frozenset({"result.finalized", "result.disputed", "dispute.verdict",
                                    "dispute.disclosure_requested",
                                    "spotcheck.disclosure_requested"})

#: Delivery states.
PENDING = "PENDING"
DELIVERED = "DELIVERED"
FAILED = "FAILED"
STATUSES: frozenset[str] = frozenset({PENDING, DELIVERED, FAILED})

MAX_EVENT_ID_LENGTH = 80


class WebhookError(RefuteError):
    """A webhook request is invalid (bad URL, unknown event, unknown network, bad payload)."""

    code = "webhook_error"


def utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (naive values, as SQLite returns them, are UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def canonical_json(payload: Mapping[str, object]) -> bytes:
    """The exact bytes POSTed for ``payload``: UTF-8 JSON, sorted keys, no whitespace."""
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WebhookError(f"webhook payload is not JSON-serializable: {exc}") from exc
    return text.encode("utf-8")


def enqueue(  # noqa: PLR0917 - the outbox call mirrors the event's fields, positionally
    session: Session, network_id: str, event: str, event_id: str,
    payload: Mapping[str, object], now: datetime,
) -> int:
    """Add one PENDING delivery per endpoint of ``network_id`` subscribed to ``event``.

    Runs in the caller's transaction (nothing is committed here), so the deliveries are written
    atomically with the state change they announce. Idempotent: an (endpoint, ``event_id``) pair
    that already has a delivery is skipped. It is checked first (so a repeated event takes no
    write lock), and the insert itself cannot duplicate: ``INSERT … ON CONFLICT DO NOTHING`` on
    the unique constraint (SQLite and PostgreSQL), so a concurrent transaction enqueuing the same
    event leaves one row and neither transaction fails. Returns how many rows were added.
    """
    return enqueue_all(session, network_id, event, [(event_id, payload)], now)


def enqueue_all(
    session: Session, network_id: str, event: str,
    occurrences: Sequence[tuple[str, Mapping[str, object]]], now: datetime,
) -> int:
    """:func:`enqueue` of several occurrences of ``event`` (``(event_id, payload)`` each), the
    network's endpoints read once: a batch of accepted results announces in one query when
    nobody subscribed. Returns how many rows were added."""
    if event not in EVENTS:
        raise WebhookError(f"unknown webhook event {event!r} (choose from {sorted(EVENTS)})")
    for event_id, _ in occurrences:
        if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_EVENT_ID_LENGTH:
            raise WebhookError(f"webhook event id must be 1..{MAX_EVENT_ID_LENGTH} characters")
    # Store exactly what will be sent (a JSON round trip normalises tuples, key types, ...).
    stored = [(event_id, cast("dict[str, object]", json.loads(canonical_json(payload))))
              for event_id, payload in occurrences]
    if not stored:
        return 0
    moment = utc(now)
    dialect = session.get_bind().dialect.name
    endpoints = [endpoint for endpoint in session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.network_id == network_id)
        .order_by(WebhookEndpoint.id)).all() if event in endpoint.events]
    added = 0
    for event_id, payload in stored:
        for endpoint in endpoints:
            exists = session.scalar(
                select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint.id,
                                                 WebhookDelivery.event_id == event_id))
            if exists is not None:
                continue
            row = {"endpoint_id": endpoint.id, "event_id": event_id, "event": event,
                   "payload": payload, "status": PENDING, "attempts": 0,
                   "next_attempt_at": moment, "last_error": None, "delivered_at": None}
            if _insert_once(session, dialect, row):
                added += 1
    return added


def _insert_once(session: Session, dialect: str, row: dict[str, Any]) -> bool:
    """Insert one delivery unless its (endpoint, event id) exists; whether it was inserted.

    SQLite and PostgreSQL use ``ON CONFLICT DO NOTHING``. Any other database gets a SAVEPOINT
    around the insert and the unique violation is swallowed. (The savepoint is not used on
    SQLite: with the stdlib driver a SAVEPOINT that opens the transaction commits it when
    released, which would break the outbox's atomicity.)
    """
    # Plain Core on the session's connection (same transaction). Whether a row was inserted is
    # read from an explicit RETURNING where the database has it: with the implicit RETURNING
    # SQLAlchemy adds for the primary key, psycopg reports rowcount -1 either way.
    table = cast("Table", WebhookDelivery.__table__)
    connection = session.connection()
    conflict = ["endpoint_id", "event_id"]
    if dialect in {"sqlite", "postgresql"}:
        statement = (sqlite_insert(table) if dialect == "sqlite" else pg_insert(table))
        statement = statement.values(**row).on_conflict_do_nothing(index_elements=conflict)
        if connection.dialect.insert_returning:
            return connection.execute(statement.returning(table.c.id)).first() is not None
        return cast("CursorResult[Any]", connection.execute(statement)).rowcount == 1
    try:
        with session.begin_nested():
            # Ask the session again: the SAVEPOINT is emitted when the nested transaction
            # first hands out its connection (using ``connection`` here would skip it).
            session.connection().execute(insert(table).values(**row))
    except IntegrityError:
        return False  # a concurrent transaction enqueued the same event first
    return True
