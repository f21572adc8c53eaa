"""What each proof cost, and spot-checks by outcome (issue 14, metrics)

``shared_proofs`` gets ``prove_seconds`` and ``peak_bytes``: the prover's wall-clock time and
its proving process's peak resident memory, recorded with the proof for the metrics (proofs
stored before this revision have neither). ``spot_checks.outcome`` is indexed: ``/metrics``
counts checks by outcome at every scrape.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("shared_proofs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prove_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("peak_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("spot_checks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_spot_checks_outcome"), ["outcome"], unique=False)


def downgrade() -> None:
    """Revert this revision (the recorded costs are dropped)."""
    with op.batch_alter_table("spot_checks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_spot_checks_outcome"))
    with op.batch_alter_table("shared_proofs", schema=None) as batch_op:
        batch_op.drop_column("peak_bytes")
        batch_op.drop_column("prove_seconds")
