"""SHA-256 chunked leaves replace Poseidon leaves (issue 12)

Leaves committed before this revision are keccak256 of per-tensor Poseidon hashes; this release
checks SHA-256 chunked roots (docs/FORMATS.md "Leaves"). The two cannot be mixed:

* every result gets ``leaf_format``; the results already stored keep their old leaves under
  ``poseidon-keccak/1``, new ones are ``sha256-chunk4k/1``;
* a stored result still open (ACCEPTED or DISPUTED) cannot be spot-checked, disclosed or disputed
  under the new leaves, and its provider signed the old ones: the upgrade refuses to run until
  every such result has closed under the previous release (drain, then migrate);
* every registered manifest becomes ``refute.manifest/2`` (it names its leaf format) and its
  ``manifest_sha256`` is recomputed.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

LEGACY = "poseidon-keccak/1"
CURRENT = "sha256-chunk4k/1"
_OPEN = ("ACCEPTED", "DISPUTED")


def _canonical_sha256(data: Any) -> str:
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(raw).hexdigest()


def _rewrite_manifests(bind: Any, old: str,
                       change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite every registered manifest of format ``old`` with ``change``, recomputing its
    ``manifest_sha256``."""
    models = sa.table("models", sa.column("id", sa.String), sa.column("manifest", sa.JSON),
                      sa.column("manifest_sha256", sa.String))
    for row in bind.execute(sa.select(models.c.id, models.c.manifest)).all():
        if dict(row.manifest).get("format") != old:
            continue
        manifest = change(dict(row.manifest))
        bind.execute(models.update().where(models.c.id == row.id).values(
            manifest=manifest, manifest_sha256=_canonical_sha256(manifest)))


def upgrade() -> None:
    """Apply this revision."""
    bind = op.get_bind()
    results = sa.table("results", sa.column("id", sa.String), sa.column("status", sa.String))
    still_open = bind.execute(
        sa.select(results.c.id).where(results.c.status.in_(_OPEN)).limit(5)).scalars().all()
    if still_open:
        total = bind.execute(sa.select(sa.func.count()).select_from(results)
                             .where(results.c.status.in_(_OPEN))).scalar_one()
        raise RuntimeError(
            f"{total} result(s) committed with Poseidon leaves are still open (e.g. "
            f"{', '.join(still_open)}): let them finalize or settle under the previous release, "
            "then run this migration (refute's SHA-256 leaves cannot check them)")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("leaf_format", sa.String(length=40), nullable=False,
                                      server_default=LEGACY))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.alter_column("leaf_format", server_default=CURRENT)
    _rewrite_manifests(bind, "refute.manifest/1",
                       lambda m: {**m, "format": "refute.manifest/2", "leaf": CURRENT})


def downgrade() -> None:
    """Revert this revision (refused once results were committed with SHA-256 leaves)."""
    bind = op.get_bind()
    results = sa.table("results", sa.column("leaf_format", sa.String))
    if bind.execute(sa.select(sa.func.count()).select_from(results)
                    .where(results.c.leaf_format == CURRENT)).scalar_one():
        raise RuntimeError("results committed with SHA-256 leaves exist: the previous release "
                           "cannot check them")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("leaf_format")
    _rewrite_manifests(bind, "refute.manifest/2", lambda m: {
        **{k: v for k, v in m.items() if k != "leaf"}, "format": "refute.manifest/1"})
