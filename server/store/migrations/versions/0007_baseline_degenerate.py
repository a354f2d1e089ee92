"""Baselines record whether their model is degenerate on a site's test rows (AUC below 0.5, or
constant scores): such a model is shown as such, never as a reference.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("baselines") as batch:
        batch.add_column(
            sa.Column("degenerate", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("baselines") as batch:
        batch.drop_column("degenerate")
