"""Rounds record the privacy spent: the run's epsilon after the round and its sampling rate.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("epsilon", sa.Float, nullable=True))
        batch.add_column(sa.Column("sample_rate", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("sample_rate")
        batch.drop_column("epsilon")
