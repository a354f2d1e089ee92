"""A run whose learning rate was chosen from a grid (``fedpeft simulate --tune-lr``) records
the candidates: one run per rate, each with its validation loss (JSON; NULL for other runs).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("lr_candidates", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("lr_candidates")
