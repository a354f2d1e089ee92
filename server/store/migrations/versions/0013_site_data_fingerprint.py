"""Each train result records the data fingerprint its site stated beside its update (None for
results recorded before, and for replies without one).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("site_results") as batch:
        batch.add_column(sa.Column("data_fingerprint", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("site_results") as batch:
        batch.drop_column("data_fingerprint")
