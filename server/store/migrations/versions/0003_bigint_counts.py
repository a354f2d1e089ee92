"""Counts are 64-bit: example counts a site signs, bytes, parameter counts, and the seed.

PostgreSQL's INTEGER ends at 2**31 - 1: a site signing more examples, or a model of more than
2**31 parameters, failed the whole run. SQLite keeps any integer in up to 8 bytes whatever
the declared type; batch mode recreates its tables with the declared type all the same, so
both back ends show one schema (``upgrade_schema`` turns foreign keys off around it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: table -> (column, nullable)
COUNTS = {
    "runs": (("trainable_params", False), ("total_params", False), ("seed", False)),
    "site_results": (("n", True), ("bytes_up", False), ("bytes_down", False)),
    "baselines": (("n_train", False), ("n_test", False)),
}


def _retype(old: type[sa.Integer], new: type[sa.Integer]) -> None:
    for table, columns in COUNTS.items():
        with op.batch_alter_table(table) as batch:
            for column, nullable in columns:
                batch.alter_column(
                    column, existing_type=old(), type_=new(), existing_nullable=nullable
                )


def upgrade() -> None:
    _retype(sa.Integer, sa.BigInteger)


def downgrade() -> None:
    _retype(sa.BigInteger, sa.Integer)
