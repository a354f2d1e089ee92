"""Rounds record the pooled AUC's 95 % interval (DeLong, from the pooled score histograms).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("pooled_low", sa.Float, nullable=True))
        batch.add_column(sa.Column("pooled_high", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("pooled_high")
        batch.drop_column("pooled_low")
