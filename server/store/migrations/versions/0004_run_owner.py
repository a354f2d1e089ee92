"""Runs record their owner: the host name and PID of the process that runs their rounds.

A run left ``running`` by a process that died (SIGKILL, out of memory) is then recognised by a
later process on the same host, and marked ``interrupted``. Both columns are nullable: a run
recorded before this revision has no known owner and is never marked. The host name is at
most 255 characters (a DNS name); the PID is 64-bit like every other count (0003).
SQLite batch mode, as 0003 (``upgrade_schema`` turns foreign keys off around it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("owner_host", sa.String(255), nullable=True))
        batch.add_column(sa.Column("owner_pid", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("owner_pid")
        batch.drop_column("owner_host")
