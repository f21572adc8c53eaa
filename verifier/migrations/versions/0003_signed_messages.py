"""signed messages (replay protection of challenges and moves); when a trace was uploaded and
when a dispute's proof was last re-queued (crash recovery)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 18:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "signed_messages",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("signer", sa.String(length=42), nullable=False),
        sa.Column("nonce", sa.String(length=78), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("dispute_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_signed_messages")),
        sa.UniqueConstraint("signer", "nonce", name=op.f("uq_signed_messages_signer_nonce")),
    )
    with op.batch_alter_table("signed_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_signed_messages_dispute_id"), ["dispute_id"],
                              unique=False)
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trace_uploaded_at", sa.DateTime(timezone=True),
                                      nullable=True))
    with op.batch_alter_table("disputes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("proof_requeued_at", sa.Float(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("disputes", schema=None) as batch_op:
        batch_op.drop_column("proof_requeued_at")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("trace_uploaded_at")
    with op.batch_alter_table("signed_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_signed_messages_dispute_id"))
    op.drop_table("signed_messages")
