"""Migrations and constraints on SQLite and on a real PostgreSQL; the blob store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from challenge.blobs import BlobError, LocalBlobStore, MemoryBlobStore, blob_key
from challenge.records import (
    Base,
    CheckOutcome,
    Network,
    RegisteredModel,
    Result,
    ResultStatus,
    SpotCheck,
)
from tests.servers import postgres_server
from verifier.db import make_engine, migrate, session_factory


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'refute.db'}"
        return
    with postgres_server() as url:
        yield url


def _result(n: int, *, nonce: str = "1", message: str | None = None) -> Result:
    now = datetime.now(UTC)
    return Result(
        id=f"res_{n}", network_id="net_a", model_id="mdl_a",
        message_hash=message or f"{n:064x}", provider="0x" + "11" * 20, nonce=nonce,
        deadline=0, stake="10", input_hash="0x" + "00" * 32, output_hash="0x" + "00" * 32,
        trace_root="0x" + "22" * 32, leaves=["0x" + "33" * 32], signature="0x" + "44" * 65,
        status=ResultStatus.ACCEPTED, accepted_at=now,
        challenge_deadline=now + timedelta(hours=1),
    )


def test_migrations_create_the_schema_and_constraints_hold(database_url: str) -> None:
    migrate(database_url)
    migrate(database_url)  # idempotent
    engine = make_engine(database_url)
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    sessions = session_factory(engine)
    now = datetime.now(UTC)
    with sessions() as s:
        s.add(Network(id="net_a", name="A", created_at=now))
        s.add(RegisteredModel(id="mdl_a", network_id="net_a", model_sha256="a" * 64,
                              manifest_sha256="b" * 64, manifest={"format": "x"},
                              model_blob="c" * 64, created_at=now))
        s.add(_result(1))
        s.commit()
    # The same signed message twice is one row (idempotency), a reused nonce is refused.
    for duplicate in (_result(2, message=f"{1:064x}", nonce="2"), _result(3, nonce="1")):
        with sessions() as s, pytest.raises(IntegrityError):
            s.add(duplicate)
            s.commit()
    # A spot-check of one segment is recorded once.
    with sessions() as s:
        s.add(SpotCheck(result_id="res_1", segment=2, outcome=CheckOutcome.PASS,
                        maxdiff_units=0.5, tolerance=3, checked_at=now))
        s.commit()
    with sessions() as s, pytest.raises(IntegrityError):
        s.add(SpotCheck(result_id="res_1", segment=2, outcome=CheckOutcome.FAULT,
                        maxdiff_units=9.0, tolerance=3, checked_at=now))
        s.commit()
    # Foreign keys are enforced on both back ends.
    with sessions() as s, pytest.raises(IntegrityError):
        s.add(SpotCheck(result_id="res_missing", segment=1, outcome=CheckOutcome.PASS,
                        maxdiff_units=0, tolerance=1, checked_at=now))
        s.commit()
    with sessions() as s:
        row = s.scalars(select(Result)).one()
        assert row.status is ResultStatus.ACCEPTED and row.leaves == ["0x" + "33" * 32]
    engine.dispose()


def _insert_legacy(database_url: str, status: str) -> dict[str, object]:
    """At revision 0005: a network, a model with a refute.manifest/1 manifest, and one result
    in ``status`` committed with Poseidon leaves. Returns the old manifest."""
    import sqlalchemy as sa

    migrate(database_url, "0005")
    engine = make_engine(database_url)
    old = {"format": "refute.manifest/1", "scale": 7, "poseidon": "p"}
    now = datetime.now(UTC)
    row = {c.name: getattr(_result(1), c.name) for c in Result.__table__.columns
           if c.name != "leaf_format" and getattr(_result(1), c.name) is not None}
    with engine.begin() as db:
        db.execute(sa.text("INSERT INTO networks (id, name, spot_probability, spot_count, "
                           "challenge_window_s, created_at, min_bond, disclosure_window_s) "
                           "VALUES ('net_a', 'A', 0.1, 1, 60, :now, '1', 60)"), {"now": now})
        db.execute(sa.table("models", *(sa.column(c) for c in (
            "id", "network_id", "model_sha256", "manifest_sha256", "manifest", "model_blob",
            "created_at")), sa.column("manifest", sa.JSON)).insert().values(
            id="mdl_a", network_id="net_a", model_sha256="a" * 64, manifest_sha256="b" * 64,
            manifest=old, model_blob="c" * 64, created_at=now))
        row.update(status=status, spot_segments=[], spot_pending=False)
        db.execute(sa.table("results", *(sa.column(c) for c in row if c != "leaves"),
                            sa.column("leaves", sa.JSON),
                            sa.column("spot_segments", sa.JSON)).insert().values(**row))
    engine.dispose()
    return old


def test_migration_to_sha256_leaves_moves_manifests_and_marks_old_results(
        database_url: str) -> None:
    import hashlib

    from refute.leaves import LEAF_FORMAT
    from refute.manifest import canonical_json

    old = _insert_legacy(database_url, "FINALIZED")
    migrate(database_url)
    engine = make_engine(database_url)
    with session_factory(engine)() as s:
        model = s.get(RegisteredModel, "mdl_a")
        assert model is not None
        assert model.manifest == {**old, "format": "refute.manifest/2", "leaf": LEAF_FORMAT}
        assert model.manifest_sha256 == hashlib.sha256(canonical_json(model.manifest)).hexdigest()
        legacy = s.get(Result, "res_1")
        assert legacy is not None and legacy.leaf_format == "poseidon-keccak/1"
        s.add(_result(2, nonce="2"))
        s.commit()
        fresh = s.get(Result, "res_2")
        assert fresh is not None and fresh.leaf_format == LEAF_FORMAT
    engine.dispose()


def test_migration_to_sha256_leaves_refuses_while_old_results_are_open(
        database_url: str) -> None:
    _insert_legacy(database_url, "DISPUTED")
    with pytest.raises(RuntimeError, match=r"1 result\(s\) committed with Poseidon leaves are "
                                           r"still open \(e.g. res_1\)"):
        migrate(database_url)
    engine = make_engine(database_url)  # nothing changed: still at 0005, manifest untouched
    with session_factory(engine)() as s:
        model = s.get(RegisteredModel, "mdl_a")
        assert model is not None and model.manifest["format"] == "refute.manifest/1"
    assert "leaf_format" not in {c["name"] for c in inspect(engine).get_columns("results")}
    engine.dispose()


def test_migration_to_tile_proofs_keeps_whole_proofs_and_keys_tiles(database_url: str) -> None:
    """0007: a proof stored before tiles is of a whole step (tile -1); afterwards two tiles of
    one step are two proofs, and one tile is still proven once."""
    import sqlalchemy as sa

    from challenge.records import WHOLE_SEGMENT, SharedProof

    _insert_legacy(database_url, "FINALIZED")
    migrate(database_url, "0006")
    engine = make_engine(database_url)
    now = datetime.now(UTC)
    with engine.begin() as db:
        db.execute(sa.text('INSERT INTO shared_proofs (result_id, kind, "index", claimed_at) '
                           "VALUES ('res_1', 'step', 2, :now)"), {"now": now})
    engine.dispose()
    migrate(database_url)
    engine = make_engine(database_url)
    sessions = session_factory(engine)
    with sessions() as s:
        [old] = s.scalars(select(SharedProof)).all()
        assert (old.kind, old.index, old.tile) == ("step", 2, WHOLE_SEGMENT)
        s.add_all([SharedProof(result_id="res_1", kind="step", index=2, tile=t, claimed_at=now)
                   for t in (0, 1)])
        s.commit()
    with sessions() as s, pytest.raises(IntegrityError):
        s.add(SharedProof(result_id="res_1", kind="step", index=2, tile=1, claimed_at=now))
        s.commit()
    engine.dispose()


@pytest.mark.parametrize("store_kind", ["local", "memory"])
def test_blob_store(store_kind: str, tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs") if store_kind == "local" else MemoryBlobStore()
    key = store.put(b"model bytes")
    assert key == blob_key(b"model bytes") and store.put(b"model bytes") == key
    assert store.exists(key) and store.get(key) == b"model bytes"
    missing = blob_key(b"other")
    assert not store.exists(missing)
    with pytest.raises(BlobError, match="not stored"):
        store.get(missing)
    for bad in ("../../etc/passwd", "ABC", "0" * 63):
        with pytest.raises(BlobError, match="malformed"):
            store.get(bad)
    if isinstance(store, LocalBlobStore):
        (tmp_path / "blobs" / key[:2] / key[2:]).write_bytes(b"tampered")
        with pytest.raises(BlobError, match="corrupt"):
            store.get(key)
