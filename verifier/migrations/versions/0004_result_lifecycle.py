"""result lifecycle hardening: owed spot-checks written at acceptance, disclosure of sampled
states, per-network minimum bond, one shared proof per disputed step; no UPHELD status

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("min_bond", sa.String(length=78), nullable=False,
                                      server_default="1"))
        batch_op.add_column(sa.Column("disclosure_window_s", sa.Integer(), nullable=False,
                                      server_default="600"))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spot_segments", sa.JSON(), nullable=False,
                                      server_default="[]"))
        batch_op.add_column(sa.Column("spot_pending", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.create_index(batch_op.f("ix_results_spot_pending"), ["spot_pending"],
                              unique=False)
        batch_op.add_column(sa.Column("spot_queued_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("disclosure_deadline", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.create_index(batch_op.f("ix_results_disclosure_deadline"),
                              ["disclosure_deadline"], unique=False)
    # A lost challenge no longer upholds a result: it stays open until its window closes.
    op.execute("UPDATE results SET status = 'ACCEPTED' WHERE status = 'UPHELD'")
    op.create_table(
        "disclosed_states",
        sa.Column("result_id", sa.String(length=40), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("blob", sa.String(length=64), nullable=False),
        sa.Column("disclosed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"],
                                name=op.f("fk_disclosed_states_result_id_results")),
        sa.PrimaryKeyConstraint("result_id", "state", name=op.f("pk_disclosed_states")),
    )
    op.create_table(
        "shared_proofs",
        sa.Column("result_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"],
                                name=op.f("fk_shared_proofs_result_id_results")),
        sa.PrimaryKeyConstraint("result_id", "kind", "index", name=op.f("pk_shared_proofs")),
    )


def downgrade() -> None:
    """Revert this revision (results that a lost dispute left ACCEPTED stay ACCEPTED)."""
    op.drop_table("shared_proofs")
    op.drop_table("disclosed_states")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_results_disclosure_deadline"))
        batch_op.drop_column("disclosure_deadline")
        batch_op.drop_column("spot_queued_at")
        batch_op.drop_index(batch_op.f("ix_results_spot_pending"))
        batch_op.drop_column("spot_pending")
        batch_op.drop_column("spot_segments")
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.drop_column("disclosure_window_s")
        batch_op.drop_column("min_bond")
