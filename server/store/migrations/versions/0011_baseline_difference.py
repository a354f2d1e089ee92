"""Alone and centralized baselines record the federated model's AUC minus theirs on the same
test rows, with its standard error (DeLong, paired); NULL for TF-IDF and for older baselines.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("baselines") as batch:
        batch.add_column(sa.Column("diff", sa.Float, nullable=True))
        batch.add_column(sa.Column("diff_se", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("baselines") as batch:
        batch.drop_column("diff_se")
        batch.drop_column("diff")
