"""What ``GET /v1/ready`` checks: each thing the API needs, ``"ok"`` or what is missing.

* ``database``: a connection opens;
* ``schema``: the database is at this release's migration head (else: run ``refute db upgrade``);
* ``broker``: Redis answers a ping (spot-checks, proofs and the watcher are queued there);
* ``blobs``: the blob folder exists or can be made, and a file can be written in it.

Answers name a failure by its kind (an exception's class), never with a URL or a path: the route
is open to anyone.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Collection
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine

from refute.errors import RefuteError
from refute.settings import Settings
from verifier.db import alembic_config

OK = "ok"
UPGRADE = "run `refute db upgrade`"


@functools.cache
def _migrations() -> ScriptDirectory:
    """The packaged migrations (read once per process)."""
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def migration_heads() -> frozenset[str]:
    """The head revisions of the packaged migrations (what ``refute db upgrade`` reaches)."""
    return frozenset(_migrations().get_heads())


def database_checks(engine: Engine) -> dict[str, str]:
    """``database`` and ``schema``: the database answers, and its schema is at the head of the
    packaged migrations."""
    try:
        with engine.connect() as connection:
            current = frozenset(MigrationContext.configure(connection).get_current_heads())
    except Exception as exc:  # any driver failure: not ready
        return {"database": f"unreachable ({type(exc).__name__})",
                "schema": "unknown: the database is unreachable"}
    wanted = migration_heads()
    if current == wanted:
        return {"database": OK, "schema": OK}
    if not current:
        return {"database": OK, "schema": f"no schema: {UPGRADE}"}
    return {"database": OK, "schema": f"at revision {', '.join(sorted(current))}, not at "
                                      f"{', '.join(sorted(wanted))}: {_advice(current)}"}


def _advice(current: Collection[str]) -> str:
    """What to do about a schema at ``current``: upgrade, unless a newer release migrated it."""
    try:
        for revision in current:
            _migrations().get_revision(revision)
    except CommandError:  # a revision these migrations do not have
        return "a newer release migrated it; run that release"
    return UPGRADE


def broker_check(redis_url: str, timeout_s: float = 2.0) -> str:
    """``broker``: Redis at ``redis_url`` answers a ping within ``timeout_s``."""
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any client failure: not ready
        return f"unreachable ({type(exc).__name__})"
    return OK


def blobs_check(root: Path) -> str:
    """``blobs``: a file can be written in ``root`` (made if missing, as the store would)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".ready-"):
            pass
    except OSError as exc:
        return f"not writable ({type(exc).__name__}): check REFUTE_BLOB_DIR"
    return OK


def spot_key_check(settings: Settings) -> str:
    """``spot_key``: the secret of spot-check sampling is set (results are refused without)."""
    try:
        settings.spot_key_bytes()
    except RefuteError as exc:
        return exc.reason
    return OK


def readiness(engine: Engine, settings: Settings) -> dict[str, str]:
    """Every check, by name: ``"ok"`` or what is missing."""
    return {**database_checks(engine), "broker": broker_check(settings.redis_url),
            "blobs": blobs_check(settings.blob_dir), "spot_key": spot_key_check(settings)}
