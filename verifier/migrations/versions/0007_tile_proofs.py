"""Proofs of one tile of a tiled segment (issue 13)

A segment too large to prove whole is proven on the tile the challenger names, and two disputes
of the same step may name different tiles: the one shared proof per disputed step becomes one
per (step, tile). ``shared_proofs`` gets ``tile`` (-1: the whole segment, or a range proof),
and its primary key becomes (result_id, kind, index, tile). Every proof stored so far is of a
whole segment or a range: it keeps -1.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: ``tile`` of a proof of a whole segment or of a range.
WHOLE = -1


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("shared_proofs", schema=None, recreate="always") as batch_op:
        batch_op.add_column(sa.Column("tile", sa.Integer(), nullable=False,
                                      server_default=str(WHOLE)))
        batch_op.drop_constraint("pk_shared_proofs", type_="primary")
        batch_op.create_primary_key("pk_shared_proofs", ["result_id", "kind", "index", "tile"])


def downgrade() -> None:
    """Revert this revision (refused while a tile's proof is stored)."""
    bind = op.get_bind()
    proofs = sa.table("shared_proofs", sa.column("tile", sa.Integer))
    if bind.execute(sa.select(sa.func.count()).select_from(proofs)
                    .where(proofs.c.tile != WHOLE)).scalar_one():
        raise RuntimeError("proofs of tiles are stored: the previous release cannot hold them")
    with op.batch_alter_table("shared_proofs", schema=None, recreate="always") as batch_op:
        batch_op.drop_constraint("pk_shared_proofs", type_="primary")
        batch_op.create_primary_key("pk_shared_proofs", ["result_id", "kind", "index"])
        batch_op.drop_column("tile")
