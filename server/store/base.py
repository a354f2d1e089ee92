"""The store contract, independent of any database.

A :class:`RunStore` records one federated run as it happens: the run (config, base model,
method, parameter counts), one row per round, one row per site and phase in each round (with
the rejection reason when a site's update was refused), the global shared state after each
round, and the alone / centralized baselines computed beside the run. Every write is its own
transaction: it commits whole or not at all (a round with its site rows and state in one), and
database errors surface as ``StoreError``. A value its column cannot hold (a name longer than
the column, a count beyond 64 bits) is a ``StoreError`` naming the field before anything is
written. A write that finds the database locked by another connection is retried for a
bounded time, then fails naming the store. Reads return plain frozen dataclasses, never live
ORM objects.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from fedpeft.common.keys import Phase


def utcnow() -> datetime:
    """Naive UTC timestamp, as every store timestamp is kept."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class RunInfo:
    id: int
    created_at: datetime
    finished_at: datetime | None
    status: str
    error: str | None
    config_json: str
    dataset: str
    method: str
    model_name: str
    model_fingerprint: str
    trainable_params: int
    total_params: int
    seed: int
    wall_seconds: float | None


@dataclass(frozen=True)
class RoundResult:
    round: int
    started_at: datetime
    finished_at: datetime
    seconds: float
    pooled_auc: float | None
    macro_auc: float | None
    loss: float | None
    accepted: int
    rejected: int
    applied: bool
    #: Loss of the global state after this round on the sites' validation rows, weighted by n.
    val_loss: float | None = None


class ReplyStatus(StrEnum):
    """What became of one site's reply in one phase of a round."""

    OK = "ok"  # used: its update aggregated, or its evaluation pooled
    REJECTED = "rejected"  # refused by the coordinator's checks (reason says which)
    FAILED = "failed"  # the site reported an error, or did not answer in time


@dataclass(frozen=True)
class SiteResult:
    round: int
    site: str
    phase: Phase
    status: ReplyStatus
    reason: str | None = None
    n: int | None = None
    loss: float | None = None
    auc: float | None = None
    auprc: float | None = None
    accuracy: float | None = None
    brier: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BaselineResult:
    kind: str  # "alone" | "centralized"
    site: str
    n_train: int
    n_test: int
    auc: float | None
    seconds: float


class RunStore(abc.ABC):
    """Where runs are recorded. Implementations must pass ``tests/test_store.py``."""

    @abc.abstractmethod
    def create_run(
        self,
        *,
        config_json: str,
        dataset: str,
        method: str,
        model_name: str,
        model_fingerprint: str,
        trainable_params: int,
        total_params: int,
        seed: int,
    ) -> int:
        """Record a new run with status ``running``; return its id."""

    @abc.abstractmethod
    def finish_run(
        self, run_id: int, *, status: str, error: str | None = None, wall_seconds: float | None
    ) -> None:
        """Mark a run ``finished`` or ``failed``."""

    @abc.abstractmethod
    def add_round(
        self, run_id: int, result: RoundResult, sites: list[SiteResult], state: bytes | None
    ) -> None:
        """Record one round, its per-site results and the global state after it, atomically."""

    @abc.abstractmethod
    def add_baselines(self, run_id: int, results: list[BaselineResult]) -> None:
        """Record baseline results computed beside the run."""

    @abc.abstractmethod
    def get_run(self, run_id: int | None = None) -> RunInfo:
        """A run by id; the latest run when ``run_id`` is None. ``StoreError`` if none."""

    @abc.abstractmethod
    def list_runs(self) -> list[RunInfo]:
        """Every run, oldest first."""

    @abc.abstractmethod
    def rounds(self, run_id: int) -> list[RoundResult]:
        """The run's rounds in order."""

    @abc.abstractmethod
    def site_results(self, run_id: int) -> list[SiteResult]:
        """The run's per-site results, by round, phase and site."""

    @abc.abstractmethod
    def baselines(self, run_id: int) -> list[BaselineResult]:
        """The run's baseline results."""

    @abc.abstractmethod
    def global_state(self, run_id: int, round: int | None = None) -> tuple[int, bytes]:
        """The global state after ``round`` (the last stored round when None) and its round."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""
