"""The bonds ledger as stored: one journal per result (DESIGN.md "Bonds").

Every stake, bond and settlement belongs to exactly one result, so each result keeps its own
journal (rows ``(result_id, seq)`` of ``ledger_entries``, ``seq`` from 0): opening or resolving
a dispute reads and appends that result's entries only, and disputes on different results never
touch the same rows. A deposit names no result: it is written to the journal of the result whose
stake or bond it pays for, in the same transaction. Totals across results (audits, tests) come
from :func:`all_books` and :func:`combined_balances`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.ledger import LEDGER_FORMAT, Ledger, LedgerError
from challenge.records import LedgerEntry


def _replay(result_id: str, entries: list[dict[str, object]]) -> Ledger:
    return Ledger.from_json({"format": LEDGER_FORMAT, "entries": entries}, result_id=result_id)


def load_ledger(session: Session, result_id: str) -> Ledger:
    """The books of one result, replayed from its journal (its rows only)."""
    rows = session.scalars(
        select(LedgerEntry.entry)
        .where(LedgerEntry.result_id == result_id)
        .order_by(LedgerEntry.seq)
    ).all()
    return _replay(result_id, list(rows))


def save_ledger(session: Session, result_id: str, ledger: Ledger, known: int) -> None:
    """Append the ledger's entries past the first ``known`` ones to the result's journal, once
    the books are checked (a :class:`~challenge.ledger.LedgerError` aborts the caller's
    transaction: nothing moves). ``ledger`` must be the books of ``result_id``
    (:func:`load_ledger`)."""
    session.add_all(LedgerEntry(**row) for row in journal_rows(result_id, ledger, known))


def journal_rows(result_id: str, ledger: Ledger, known: int) -> list[dict[str, object]]:
    """The ``ledger_entries`` rows :func:`save_ledger` adds, for a bulk insert; the same checks
    first."""
    if ledger.result_id != result_id:
        raise LedgerError(
            f"the books of result {ledger.result_id} cannot be saved as result {result_id}'s"
        )
    ledger.check()
    return [{"result_id": result_id, "seq": entry.seq, "entry": entry.to_json()}
            for entry in ledger.entries()[known:]]


def all_books(session: Session) -> dict[str, Ledger]:
    """Every result's books, by result id (each replayed and checked): for audits and totals,
    never on a dispute's path (it reads every journal)."""
    journals: dict[str, list[dict[str, object]]] = {}
    for result_id, entry in session.execute(
        select(LedgerEntry.result_id, LedgerEntry.entry).order_by(
            LedgerEntry.result_id, LedgerEntry.seq
        )
    ):
        journals.setdefault(result_id, []).append(entry)
    return {result_id: _replay(result_id, entries) for result_id, entries in journals.items()}


def combined_balances(books: Iterable[Ledger]) -> dict[str, int]:
    """Every account's balance summed over ``books`` (e.g. ``all_books(s).values()``), sorted
    by name: a party's available balance across results, a network's whole treasury. The
    totals sum to zero, as each result's books do."""
    totals: dict[str, int] = {}
    for ledger in books:
        for account, amount in ledger.balances().items():
            totals[account] = totals.get(account, 0) + amount
    return dict(sorted(totals.items()))
