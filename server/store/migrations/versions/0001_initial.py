"""Initial schema: runs, rounds, site results, global states, baselines.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("config_json", sa.Text, nullable=False),
        sa.Column("dataset", sa.String(512), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("model_name", sa.String(512), nullable=False),
        sa.Column("model_fingerprint", sa.String(80), nullable=False),
        sa.Column("trainable_params", sa.Integer, nullable=False),
        sa.Column("total_params", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("wall_seconds", sa.Float, nullable=True),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("pooled_auc", sa.Float, nullable=True),
        sa.Column("macro_auc", sa.Float, nullable=True),
        sa.Column("loss", sa.Float, nullable=True),
        sa.Column("accepted", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
        sa.Column("applied", sa.Integer, nullable=False),
        sa.UniqueConstraint("run_id", "round"),
    )
    op.create_index("ix_rounds_run_id", "rounds", ["run_id"])
    op.create_table(
        "site_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("site", sa.String(256), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("n", sa.Integer, nullable=True),
        sa.Column("loss", sa.Float, nullable=True),
        sa.Column("auc", sa.Float, nullable=True),
        sa.Column("auprc", sa.Float, nullable=True),
        sa.Column("accuracy", sa.Float, nullable=True),
        sa.Column("brier", sa.Float, nullable=True),
        sa.Column("bytes_up", sa.Integer, nullable=False),
        sa.Column("bytes_down", sa.Integer, nullable=False),
        sa.Column("seconds", sa.Float, nullable=True),
        sa.Column("extra", sa.JSON, nullable=False),
    )
    op.create_index("ix_site_results_run_id", "site_results", ["run_id"])
    op.create_table(
        "global_states",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("run_id", "round"),
    )
    op.create_index("ix_global_states_run_id", "global_states", ["run_id"])
    op.create_table(
        "baselines",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("site", sa.String(256), nullable=False),
        sa.Column("n_train", sa.Integer, nullable=False),
        sa.Column("n_test", sa.Integer, nullable=False),
        sa.Column("auc", sa.Float, nullable=True),
        sa.Column("seconds", sa.Float, nullable=False),
    )
    op.create_index("ix_baselines_run_id", "baselines", ["run_id"])


def downgrade() -> None:
    for table in ("baselines", "global_states", "site_results", "rounds", "runs"):
        op.drop_table(table)
