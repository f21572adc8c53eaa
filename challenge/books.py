"""The bonds ledger as stored: one journal per result (DESIGN.md "Bonds").

Every stake, bond and settlement belongs to exactly one result, so each result keeps its own
journal: opening or resolving a dispute reads and appends that result's entries only, and
disputes on different results never touch the same rows.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.ledger import Ledger
from challenge.records import LedgerEntry


def load_ledger(session: Session, result_id: str) -> Ledger:
    """The ledger of one result, replayed from its journal."""
    del result_id  # one global journal until it is split per result
    rows = session.scalars(select(LedgerEntry).order_by(LedgerEntry.seq)).all()
    return Ledger.from_json({"format": "refute-ledger/1", "entries": [r.entry for r in rows]})


def save_ledger(session: Session, result_id: str, ledger: Ledger, known: int) -> None:
    """Append the ledger's entries past the first ``known`` ones to the result's journal, once
    the books are checked (a :class:`~challenge.ledger.LedgerError` aborts the caller's
    transaction: nothing moves)."""
    del result_id
    ledger.check()
    for entry in ledger.entries()[known:]:
        data = entry.to_json()
        session.add(LedgerEntry(seq=int(str(data["seq"])), entry=data))
