"""bonds ledger per result: ledger_entries keyed by (result_id, seq), the global journal split

Every stake, bond and settlement belongs to one result; each result now keeps its own journal,
numbered from 0, so a dispute reads and writes its result's entries only and disputes on
different results never conflict. Upgrade attributes every entry of the old global journal:

* a stake (locked or released) or a bond names its result;
* a settlement or a returned bond names a dispute, whose result is the one its bond named
  (a journal replays only if the bond came first);
* a deposit names no result: it goes to the result named by the next entry that names one
  (the service always deposits right before the stake or bond it pays for).

Each result's entries are renumbered from 0 and must replay as that result's books. Anything
that cannot be attributed (a withdrawal, a deposit with no later stake or bond, a dispute
without a bond), or a split that does not replay, is refused with
:class:`~challenge.ledger.LedgerError` before the schema is touched. Downgrade concatenates the
journals (result by result, in result id order) back into one renumbered global journal.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from alembic import op

from challenge.ledger import LEDGER_FORMAT, Ledger, LedgerError

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_old = sa.table("ledger_entries", sa.column("seq", sa.Integer), sa.column("entry", sa.JSON))
_new = sa.table(
    "ledger_entries",
    sa.column("result_id", sa.String),
    sa.column("seq", sa.Integer),
    sa.column("entry", sa.JSON),
)
_results = sa.table("results", sa.column("id", sa.String))


def _refuse(reason: str) -> LedgerError:
    return LedgerError(f"migration 0005 cannot split the bonds ledger per result: {reason}")


def _param(entry: Mapping[str, object], name: str, where: str) -> str:
    params = entry.get("params")
    value = params.get(name) if isinstance(params, dict) else None
    if not isinstance(value, str):
        raise _refuse(f"{where} has no {name!r} parameter")
    return value


def split_journal(entries: list[Mapping[str, object]]) -> dict[str, list[dict[str, object]]]:
    """The global journal ``entries`` (in seq order) as one journal per result, each renumbered
    from 0. Raises LedgerError if an entry cannot be attributed."""
    journals: dict[str, list[dict[str, object]]] = {}
    bonds: dict[str, str] = {}  # dispute id -> result id, from the bonds posted so far
    deposits: list[Mapping[str, object]] = []
    for entry in entries:
        kind = entry.get("kind")
        where = f"entry {entry.get('seq')} ({kind})"
        if kind == "DEPOSIT":
            deposits.append(entry)
            continue
        if kind in ("STAKE_LOCKED", "STAKE_RELEASED"):
            result_id = _param(entry, "result_id", where)
        elif kind == "BOND_POSTED":
            result_id = _param(entry, "result_id", where)
            bonds[_param(entry, "dispute_id", where)] = result_id
        elif kind in ("SETTLEMENT", "BOND_RETURNED"):
            dispute_id = _param(entry, "dispute_id", where)
            if dispute_id not in bonds:
                raise _refuse(f"{where}: dispute {dispute_id} has no bond earlier in the journal")
            result_id = bonds[dispute_id]
        else:  # a withdrawal draws on a balance that may span results
            raise _refuse(f"{where} names no result and cannot be attributed to one")
        journal = journals.setdefault(result_id, [])
        for item in [*deposits, entry]:
            journal.append({**item, "seq": len(journal)})
        deposits.clear()
    if deposits:
        seqs = ", ".join(str(d.get("seq")) for d in deposits)
        raise _refuse(f"deposit entries {seqs} are followed by no stake or bond of any result")
    return journals


def upgrade() -> None:
    """Apply this revision."""
    bind = op.get_bind()
    entries = [row.entry for row in bind.execute(sa.select(_old.c.entry).order_by(_old.c.seq))]
    journals = split_journal(entries)
    known = {row.id for row in bind.execute(sa.select(_results.c.id))}
    for result_id, journal in sorted(journals.items()):
        if result_id not in known:
            raise _refuse(f"result {result_id} has ledger entries but no results row")
        try:
            Ledger.from_json({"format": LEDGER_FORMAT, "entries": journal}, result_id=result_id)
        except LedgerError as exc:
            raise _refuse(f"the books of result {result_id} do not replay: {exc.reason}") from exc
    op.drop_table("ledger_entries")
    op.create_table(
        "ledger_entries",
        sa.Column("result_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("entry", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"],
                                name=op.f("fk_ledger_entries_result_id_results")),
        sa.PrimaryKeyConstraint("result_id", "seq", name=op.f("pk_ledger_entries")),
    )
    rows = [
        {"result_id": result_id, "seq": entry["seq"], "entry": entry}
        for result_id, journal in sorted(journals.items())
        for entry in journal
    ]
    if rows:
        op.bulk_insert(_new, rows)


def downgrade() -> None:
    """Revert this revision: one global journal again (result by result, renumbered)."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_new.c.entry).order_by(_new.c.result_id, _new.c.seq)
    ).all()
    merged = [{**row.entry, "seq": seq} for seq, row in enumerate(rows)]
    op.drop_table("ledger_entries")
    op.create_table(
        "ledger_entries",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("entry", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_ledger_entries")),
    )
    if merged:
        op.bulk_insert(_old, [{"seq": e["seq"], "entry": e} for e in merged])
