"""SQLAlchemy models of the run store. Every schema change comes with a migration.

Counts (examples, bytes, parameters) and the seed are 64-bit (``BigInteger``, migration 0003):
a site signs its example count, and PostgreSQL's ``INTEGER`` ends at 2**31.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    config_json: Mapped[str] = mapped_column(Text)
    dataset: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(512))
    model_fingerprint: Mapped[str] = mapped_column(String(80))
    trainable_params: Mapped[int] = mapped_column(BigInteger)
    total_params: Mapped[int] = mapped_column(BigInteger)
    seed: Mapped[int] = mapped_column(BigInteger)
    wall_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The process that runs the run's rounds (migration 0004); NULL for older runs.
    owner_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    owner_pid: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The runs its learning rate was chosen from, JSON [[run, lr, val_loss], ...] (migration
    # 0010); NULL for a run that was not chosen from a grid.
    lr_candidates: Mapped[str | None] = mapped_column(Text, nullable=True)


class RoundRow(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    seconds: Mapped[float] = mapped_column(Float)
    pooled_auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    macro_auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    accepted: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[int] = mapped_column(Integer)
    applied: Mapped[int] = mapped_column(Integer)  # 1 when the aggregate became the new global
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)  # migration 0002
    # DP runs (migration 0006): the run's epsilon after the round, the round's sampling rate.
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The pooled AUC's 95 % interval (migration 0008).
    pooled_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    pooled_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Pooled calibration (migration 0012); the reliability curve as JSON [[mean, observed, n]].
    pooled_brier: Mapped[float | None] = mapped_column(Float, nullable=True)
    pooled_ece: Mapped[float | None] = mapped_column(Float, nullable=True)
    pooled_reliability: Mapped[str | None] = mapped_column(Text, nullable=True)


class SiteResultRow(Base):
    __tablename__ = "site_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(256))
    phase: Mapped[str] = mapped_column(String(16))  # train | evaluate
    status: Mapped[str] = mapped_column(String(16))  # ok | rejected | failed
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    n: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    auprc: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    brier: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    extra: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    data_fingerprint: Mapped[str | None] = mapped_column(String(80), nullable=True)


class GlobalStateRow(Base):
    __tablename__ = "global_states"
    __table_args__ = (UniqueConstraint("run_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class BaselineRow(Base):
    __tablename__ = "baselines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # alone | centralized | tfidf-alone | ...
    site: Mapped[str] = mapped_column(String(256))
    n_train: Mapped[int] = mapped_column(BigInteger)
    n_test: Mapped[int] = mapped_column(BigInteger)
    auc: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)
    degenerate: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The learning rate chosen from the run's grid (migration 0009); None for TF-IDF.
    lr: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Federated AUC minus this one on the same rows, and its standard error (migration 0011).
    diff: Mapped[float | None] = mapped_column(Float, nullable=True)
    diff_se: Mapped[float | None] = mapped_column(Float, nullable=True)


class RunResumeRow(Base):
    """One resumption of a run (migration 0005)."""

    __tablename__ = "run_resumes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    resumed_at: Mapped[datetime] = mapped_column(DateTime)
    after_round: Mapped[int] = mapped_column(Integer)  # 0: before any round was recorded
    reason: Mapped[str] = mapped_column(Text)
    owner_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    owner_pid: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
