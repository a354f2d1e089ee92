"""Rounds record the pooled calibration of their global state, from the pooled score histograms:
Brier score, expected calibration error and the reliability curve (JSON).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("pooled_brier", sa.Float, nullable=True))
        batch.add_column(sa.Column("pooled_ece", sa.Float, nullable=True))
        batch.add_column(sa.Column("pooled_reliability", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("pooled_reliability")
        batch.drop_column("pooled_ece")
        batch.drop_column("pooled_brier")
