"""The bonds ledger as stored, one journal per result (challenge.books), and migration 0005
that split the old global journal: isolation, numbering, reads of one result only, concurrent
writers on PostgreSQL, the split (and its refusals) and its reversal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session

from challenge.books import all_books, combined_balances, load_ledger, save_ledger
from challenge.ledger import LEDGER_FORMAT, Ledger, LedgerError
from challenge.records import LedgerEntry
from tests.servers import postgres_server
from verifier.db import alembic_config, make_engine, migrate, session_factory

P1, P2, C1, C2, C3 = "prov1", "prov2", "chal1", "chal2", "chal3"

_networks = sa.table("networks", *(sa.column(c) for c in (
    "id", "name", "spot_probability", "spot_count", "challenge_window_s")),
    sa.column("created_at", sa.DateTime(timezone=True)))
_models = sa.table("models", *(sa.column(c) for c in (
    "id", "network_id", "model_sha256", "manifest_sha256", "model_blob")),
    sa.column("manifest", sa.JSON), sa.column("created_at", sa.DateTime(timezone=True)))
_results = sa.table("results", *(sa.column(c) for c in (
    "id", "network_id", "model_id", "message_hash", "provider", "nonce", "deadline", "stake",
    "input_hash", "output_hash", "trace_root", "signature", "status")),
    sa.column("leaves", sa.JSON), sa.column("accepted_at", sa.DateTime(timezone=True)),
    sa.column("challenge_deadline", sa.DateTime(timezone=True)))
_old_journal = sa.table("ledger_entries", sa.column("seq", sa.Integer),
                        sa.column("entry", sa.JSON))


# --- databases ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def _fresh_pg(server_url: str, name: str) -> str:
    """A new, empty database ``name`` on the test PostgreSQL server."""
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'refute.db'}"
    server: str = request.getfixturevalue("pg_server")
    return _fresh_pg(server, f"books_{request.node.name.split('[')[0][-40:]}")


def _seed(engine: Engine, *result_ids: str) -> None:
    """One network, one model and the results ``result_ids`` (the columns of revision 0004,
    so that this also seeds a database not yet migrated to head)."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(sa.insert(_networks).values(
            id="net_b", name="B", spot_probability=0.1, spot_count=1, challenge_window_s=3600,
            created_at=now))
        conn.execute(sa.insert(_models).values(
            id="mdl_b", network_id="net_b", model_sha256="a" * 64, manifest_sha256="b" * 64,
            model_blob="c" * 64, manifest={"format": "x"}, created_at=now))
        for n, rid in enumerate(result_ids):
            conn.execute(sa.insert(_results).values(
                id=rid, network_id="net_b", model_id="mdl_b", message_hash=f"{n:064x}",
                provider=f"prov{n}", nonce=str(n), deadline=0, stake="10",
                input_hash="0x" + "00" * 32, output_hash="0x" + "00" * 32,
                trace_root="0x" + "22" * 32, signature="0x" + "44" * 65, status="ACCEPTED",
                leaves=["0x" + "33" * 32], accepted_at=now,
                challenge_deadline=now + timedelta(hours=1)))


def _books_db(url: str, *result_ids: str) -> tuple[Engine, Callable[[], Session]]:
    migrate(url)
    engine = make_engine(url)
    _seed(engine, *result_ids)
    return engine, session_factory(engine)


# --- what the orchestrator writes -------------------------------------------------------------


def _open(session: Session, result_id: str, *, stake: tuple[str, int],
          bond: tuple[str, str, int]) -> None:
    """What opening a dispute writes: the stake ``(provider, amount)`` when first disputed,
    then the bond ``(dispute_id, challenger, amount)``."""
    (provider, stake_amount), (dispute_id, challenger, bond_amount) = stake, bond
    ledger = load_ledger(session, result_id)
    known = len(ledger.entries())
    if ledger.stake(result_id) is None:
        ledger.deposit(provider, stake_amount)
        ledger.lock_stake(result_id, provider, stake_amount)
    ledger.deposit(challenger, bond_amount)
    ledger.post_bond(dispute_id, challenger, bond_amount, result_id=result_id)
    save_ledger(session, result_id, ledger, known)


def _settle(session: Session, result_id: str, dispute_id: str, verdict: str) -> None:
    """What resolving a dispute writes."""
    ledger = load_ledger(session, result_id)
    known = len(ledger.entries())
    ledger.settle(dispute_id, verdict, network_id="net_b", challenger_share_bps=5000,
                  provider_share_bps=5000)
    if verdict == "PROVIDER_FAULT":
        ledger.close_others(result_id)
    save_ledger(session, result_id, ledger, known)


# --- per-result books -------------------------------------------------------------------------


def test_each_result_keeps_its_own_books(database_url: str) -> None:
    engine, sessions = _books_db(database_url, "res_a", "res_b")
    with sessions() as s, s.begin():
        _open(s, "res_a", stake=(P1, 100), bond=("dsp_a1", C1, 10))
    with sessions() as s, s.begin():
        _open(s, "res_b", stake=(P2, 50), bond=("dsp_b1", C1, 4))  # C1 on another result
    with sessions() as s, s.begin():
        _open(s, "res_a", stake=(P1, 100), bond=("dsp_a2", C2, 7))  # stake already locked
    with sessions() as s, s.begin():
        _settle(s, "res_a", "dsp_a1", "PROVIDER_FAULT")
    with sessions() as s, s.begin():
        _settle(s, "res_b", "dsp_b1", "CHALLENGER_FAULT")

    with sessions() as s:
        a, b = load_ledger(s, "res_a"), load_ledger(s, "res_b")
        rows = s.execute(select(LedgerEntry.result_id, LedgerEntry.seq)
                         .order_by(LedgerEntry.result_id, LedgerEntry.seq)).all()
        books = all_books(s)
    # Numbered from 0 in each result, with no gap.
    assert [seq for rid, seq in rows if rid == "res_a"] == list(range(len(a.entries())))
    assert [seq for rid, seq in rows if rid == "res_b"] == list(range(len(b.entries())))
    assert [e.kind.value for e in b.entries()] == [
        "DEPOSIT", "STAKE_LOCKED", "DEPOSIT", "BOND_POSTED", "SETTLEMENT"]
    assert len(a.entries()) == 8  # 2 deposits + stake + 2 bonds + settlement + bond returned
    # Each balances on its own, and holds nothing of the other.
    for ledger, rid in ((a, "res_a"), (b, "res_b")):
        ledger.check()
        assert ledger.result_id == rid
        assert sum(ledger.balances().values()) == 0
    assert a.dispute("dsp_b1") is None and b.dispute("dsp_a1") is None
    assert b.stake("res_a") is None and a.stake("res_b") is None
    assert a.balance("available:chal1") == 10 + 50  # bond back + half the stake
    assert b.balance("available:chal1") == 0  # its bond there was slashed
    assert a.balance("available:chal2") == 7  # closed: bond returned
    # Across results: the sum of each result's books.
    assert set(books) == {"res_a", "res_b"}
    assert [e.to_json() for e in books["res_a"].entries()] == [e.to_json() for e in a.entries()]
    total = combined_balances(books.values())
    assert sum(total.values()) == 0
    assert total["available:chal1"] == 60
    assert total["external:chal1"] == -14
    assert total["treasury:net_b"] == 50 + 2
    assert total["available:prov2"] == 2
    engine.dispose()


def test_books_of_one_result_refuse_another(tmp_path: Path) -> None:
    _engine, sessions = _books_db(f"sqlite:///{tmp_path / 'r.db'}", "res_a", "res_b")
    ledger = Ledger(result_id="res_a")
    ledger.deposit(P1, 10)
    with pytest.raises(LedgerError, match="books of result res_a: result res_b keeps its own"):
        ledger.lock_stake("res_b", P1, 10)
    with sessions() as s, s.begin():
        with pytest.raises(LedgerError, match="cannot be saved as result res_b"):
            save_ledger(s, "res_b", ledger, 0)
        with pytest.raises(LedgerError, match="cannot be saved as result res_a"):
            save_ledger(s, "res_a", Ledger(), 0)  # unscoped books are not a result's
    _engine.dispose()


def test_a_dispute_reads_and_writes_its_own_result_only(tmp_path: Path) -> None:
    """Opening or resolving a dispute selects its result's rows only: another result's
    journal, however long (here even unreadable), is never read or replayed."""
    engine, sessions = _books_db(f"sqlite:///{tmp_path / 'r.db'}", "res_a", "res_b")
    with sessions() as s, s.begin():
        for i in range(30):
            _open(s, "res_a", stake=(P1, 100), bond=(f"dsp_a{i}", f"chal{i}", 5))
        s.add(LedgerEntry(result_id="res_a", seq=62, entry={"not": "an entry"}))
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
             _executemany: bool) -> None:
        if "ledger_entries" in statement:
            statements.append((" ".join(statement.split()), parameters))

    event.listen(engine, "before_cursor_execute", seen)
    with sessions() as s, s.begin():
        _open(s, "res_b", stake=(P2, 50), bond=("dsp_b1", C1, 4))
    with sessions() as s, s.begin():
        _settle(s, "res_b", "dsp_b1", "ABORTED")
    event.remove(engine, "before_cursor_execute", seen)
    selects = [(sql, params) for sql, params in statements if sql.startswith("SELECT")]
    assert len(selects) == 2, statements  # one read per transaction
    for sql, params in selects:
        assert "WHERE ledger_entries.result_id = ?" in sql and tuple(params) == ("res_b",)
    inserted = [row for sql, params in statements if sql.startswith("INSERT")
                for row in (params if isinstance(params, list) else [params])]
    assert len(inserted) == 5 and {row[0] for row in inserted} == {"res_b"}
    with sessions() as s:
        assert len(load_ledger(s, "res_b").entries()) == 5
        with pytest.raises(LedgerError, match="journal entry"):
            all_books(s)  # the audit reads everything, and finds the bad row
    engine.dispose()


def test_concurrent_disputes_on_different_results_both_commit(pg_server: str) -> None:
    """Two transactions append to two results' journals at the same time on PostgreSQL:
    neither waits for the other nor collides (the old global journal's seq did both)."""
    engine, sessions = _books_db(_fresh_pg(pg_server, "books_concurrent"), "res_a", "res_b")
    with sessions() as s, s.begin():  # both journals already have entries
        _open(s, "res_a", stake=(P1, 100), bond=("dsp_a0", C3, 5))
        _open(s, "res_b", stake=(P2, 50), bond=("dsp_b0", C3, 5))
    first, second = sessions(), sessions()
    with first, second:
        first.begin()
        second.begin()
        for s in (first, second):  # a regression would block on the other's row: fail fast
            s.execute(text("SET LOCAL lock_timeout = '5s'"))
        _open(first, "res_a", stake=(P1, 100), bond=("dsp_a1", C1, 10))
        first.flush()  # inserted, not committed
        _open(second, "res_b", stake=(P2, 50), bond=("dsp_b1", C2, 10))
        second.flush()
        first.commit()
        second.commit()
    with sessions() as s:
        books = all_books(s)
    assert [e.seq for e in books["res_a"].entries()][-2:] == [4, 5]
    assert [e.seq for e in books["res_b"].entries()][-2:] == [4, 5]
    assert books["res_a"].dispute("dsp_a1") is not None
    assert books["res_b"].dispute("dsp_b1") is not None
    engine.dispose()


# --- migration 0005 ---------------------------------------------------------------------------


def _global_journal() -> Ledger:
    """An old global journal, interleaving two results (as the service wrote it)."""
    ledger = Ledger()
    ledger.deposit(P1, 100)
    ledger.lock_stake("res_a", P1, 100)
    ledger.deposit(C1, 10)
    ledger.post_bond("dsp_a1", C1, 10, result_id="res_a")
    ledger.deposit(P2, 50)
    ledger.lock_stake("res_b", P2, 50)
    ledger.deposit(C2, 5)
    ledger.post_bond("dsp_b1", C2, 5, result_id="res_b")
    ledger.deposit(C3, 7)
    ledger.post_bond("dsp_a2", C3, 7, result_id="res_a")
    ledger.deposit(C1, 4)  # the same challenger, now on the other result
    ledger.post_bond("dsp_b2", C1, 4, result_id="res_b")
    ledger.settle("dsp_a1", "PROVIDER_FAULT", network_id="net_b", challenger_share_bps=5000,
                  provider_share_bps=5000)
    ledger.close_others("res_a")
    ledger.settle("dsp_b1", "CHALLENGER_FAULT", network_id="net_b", challenger_share_bps=5000,
                  provider_share_bps=5000)
    return ledger


def _per_result() -> dict[str, list[dict[str, object]]]:
    """The same operations, as each result's own books."""
    a, b = Ledger("res_a"), Ledger("res_b")
    a.deposit(P1, 100)
    a.lock_stake("res_a", P1, 100)
    a.deposit(C1, 10)
    a.post_bond("dsp_a1", C1, 10, result_id="res_a")
    b.deposit(P2, 50)
    b.lock_stake("res_b", P2, 50)
    b.deposit(C2, 5)
    b.post_bond("dsp_b1", C2, 5, result_id="res_b")
    a.deposit(C3, 7)
    a.post_bond("dsp_a2", C3, 7, result_id="res_a")
    b.deposit(C1, 4)
    b.post_bond("dsp_b2", C1, 4, result_id="res_b")
    a.settle("dsp_a1", "PROVIDER_FAULT", network_id="net_b", challenger_share_bps=5000,
             provider_share_bps=5000)
    a.close_others("res_a")
    b.settle("dsp_b1", "CHALLENGER_FAULT", network_id="net_b", challenger_share_bps=5000,
             provider_share_bps=5000)
    return {"res_a": a.to_json()["entries"], "res_b": b.to_json()["entries"]}  # type: ignore[dict-item]


def _old_database(url: str, entries: list[dict[str, object]], *result_ids: str) -> Engine:
    """A database at revision 0004 holding ``entries`` as its global journal."""
    migrate(url, "0004")
    engine = make_engine(url)
    _seed(engine, *result_ids)
    with engine.begin() as conn:
        for entry in entries:
            conn.execute(sa.insert(_old_journal).values(seq=entry["seq"], entry=entry))
    return engine


def _revision(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


def test_migration_splits_the_global_journal_and_back(database_url: str) -> None:
    old = _global_journal()
    entries: list[dict[str, object]] = old.to_json()["entries"]  # type: ignore[assignment]
    engine = _old_database(database_url, entries, "res_a", "res_b")
    migrate(database_url, "0005")
    assert _revision(engine) == "0005"
    sessions = session_factory(engine)
    with sessions() as s:
        books = all_books(s)
    expected = _per_result()
    assert {rid: [e.to_json() for e in b.entries()] for rid, b in books.items()} == expected
    assert combined_balances(books.values()) == old.balances()
    # The books keep working after the split: the next dispute appends at the right seq.
    with sessions() as s, s.begin():
        _settle(s, "res_b", "dsp_b2", "ABORTED")
    with sessions() as s:
        assert [e.seq for e in load_ledger(s, "res_b").entries()] == list(range(8))
    old.settle("dsp_b2", "ABORTED", network_id="net_b", challenger_share_bps=5000,
               provider_share_bps=5000)

    command.downgrade(alembic_config(database_url), "0004")
    assert _revision(engine) == "0004"
    with engine.connect() as conn:
        rows = conn.execute(select(_old_journal.c.seq, _old_journal.c.entry)
                            .order_by(_old_journal.c.seq)).all()
    assert [seq for seq, _ in rows] == list(range(len(entries) + 1))
    merged = Ledger.from_json({"format": LEDGER_FORMAT, "entries": [e for _, e in rows]})
    assert merged.balances() == old.balances()  # one journal again, replaying to the same
    migrate(database_url, "0005")  # and up again
    with sessions() as s:
        again = all_books(s)
    assert combined_balances(again.values()) == old.balances()
    engine.dispose()


def _bad_journal(case: str) -> tuple[list[dict[str, object]], str]:
    ledger = Ledger()
    ledger.deposit(P1, 100)
    ledger.lock_stake("res_a", P1, 100)
    if case == "withdrawal":
        ledger.deposit(C1, 10)
        ledger.withdraw(C1, 3)
        ledger.post_bond("dsp_a1", C1, 7, result_id="res_a")
        match = r"entry 3 \(WITHDRAWAL\) names no result"
    elif case == "trailing deposit":
        ledger.deposit(C1, 10)
        ledger.deposit(C2, 10)
        match = "deposit entries 2, 3 are followed by no stake or bond"
    elif case == "money across results":
        ledger.deposit(P2, 50)
        ledger.lock_stake("res_b", P2, 50)
        ledger.deposit(C1, 20)  # pays for bonds on both results
        ledger.post_bond("dsp_a1", C1, 10, result_id="res_a")
        ledger.post_bond("dsp_b1", C1, 10, result_id="res_b")
        match = "the books of result res_b do not replay: .*chal1 cannot bond 10: only 0"
    else:
        ledger.deposit(P2, 50)
        ledger.lock_stake("res_x", P2, 50)
        match = "result res_x has ledger entries but no results row"
    return ledger.to_json()["entries"], match  # type: ignore[return-value]


@pytest.mark.parametrize("case", ["withdrawal", "trailing deposit", "money across results",
                                  "unknown result"])
def test_migration_refuses_what_it_cannot_attribute(case: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    entries, match = _bad_journal(case)
    engine = _old_database(url, entries, "res_a", "res_b")
    with pytest.raises(LedgerError, match="migration 0005 cannot split the bonds ledger") as info:
        migrate(url, "0005")
    assert info.match(match)
    # Refused before the schema was touched: still revision 0004, the journal as it was.
    assert _revision(engine) == "0004"
    with engine.connect() as conn:
        rows = conn.execute(select(_old_journal.c.entry).order_by(_old_journal.c.seq)).all()
    assert [r.entry for r in rows] == entries
    engine.dispose()


def test_migration_refuses_a_settlement_without_its_bond(tmp_path: Path) -> None:
    entries, _ = _bad_journal("withdrawal")
    settle = {"seq": len(entries), "kind": "SETTLEMENT", "reference": "dsp_zz", "memo": "",
              "params": {"dispute_id": "dsp_zz"}, "postings": []}
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = _old_database(url, [*entries[:2], {**settle, "seq": 2}], "res_a")
    with pytest.raises(LedgerError, match="dispute dsp_zz has no bond earlier in the journal"):
        migrate(url, "0005")
    assert _revision(engine) == "0004"
    engine.dispose()
