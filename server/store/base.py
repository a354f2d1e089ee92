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

A run records its owner, the host and PID of the process that runs its rounds. A run still
``running`` whose owner is on this host and no longer alive was left behind by a dead process
(killed, out of memory): :meth:`RunStore.mark_interrupted` marks it ``interrupted`` with its
last recorded round.
"""

from __future__ import annotations

import abc
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from fedpeft.common.keys import Phase


def utcnow() -> datetime:
    """Naive UTC timestamp, as every store timestamp is kept."""
    return datetime.now(UTC).replace(tzinfo=None)


class RunStatus(StrEnum):
    """Where a run stands."""

    RUNNING = "running"  # its rounds are being run by its owner
    FINISHED = "finished"  # every round ran
    FAILED = "failed"  # it ended on an error (``error`` says which)
    INTERRUPTED = "interrupted"  # its owner died while it was running (``error`` says when)


@dataclass(frozen=True)
class RunOwner:
    """The process that runs a run's rounds: in deployment the ServerApp's, in simulation the
    ``fedpeft simulate`` process."""

    host: str
    pid: int

    @classmethod
    def current(cls) -> RunOwner:
        return cls(socket.gethostname(), os.getpid())


def pid_alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` exists on this host (``host`` is this one: only its processes
    can be checked). A PID taken over by another process since reads as alive, so a run is
    never marked interrupted while something may still run it; permission to signal is not
    needed to know the process exists. A zombie (dead, not yet reaped by its parent: a
    SIGKILLed ServerApp whose SuperLink has not waited for it) is dead."""
    del host
    if pid <= 0:
        return False  # os.kill(0 or negative) signals a process group, not one process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` is a zombie, where /proc says (Linux); False where it cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (command) state ...": the command may hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].startswith("Z")


@dataclass(frozen=True)
class Resumption:
    """One resumption of a run: when, after which recorded round, why, by which process."""

    resumed_at: datetime
    after_round: int  # 0: no round had been recorded
    reason: str
    owner: RunOwner | None


#: Statuses a run may be resumed from.
RESUMABLE = (RunStatus.INTERRUPTED, RunStatus.FAILED)


@dataclass(frozen=True)
class InterruptedRun:
    """A run :meth:`RunStore.mark_interrupted` found left ``running`` by a dead owner."""

    run_id: int
    owner: RunOwner
    last_round: int | None  # the last round recorded in the store; None before round 1

    def describe(self) -> str:
        after = (
            "before its first round"
            if self.last_round is None
            else (f"after round {self.last_round}")
        )
        return (
            f"run {self.run_id} was left running by process {self.owner.pid} on host "
            f"{self.owner.host}, which is gone: marked interrupted {after}"
        )


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
    #: None for a run recorded before owners were (migration 0004).
    owner: RunOwner | None = None
    #: The runs this run's learning rate was chosen from, (run, lr, validation loss) each, in
    #: grid order (``simulate --tune-lr``; migration 0010); empty when it was not chosen.
    lr_candidates: tuple[LrCandidate, ...] = ()


@dataclass(frozen=True)
class LrCandidate:
    run: int
    lr: float
    #: The weighted validation loss of the run's delivered round (None: it recorded none).
    val_loss: float | None


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
    #: A DP run's epsilon after this round, at the run's ``federation.dp.delta``
    #: (``common.dp.Accountant.epsilon``); None without DP, and for rounds recorded before
    #: migration 0006. Each site's, over the rounds it took part in, is in its train result's
    #: ``extra`` under ``keys.SITE_EPSILON``.
    epsilon: float | None = None
    #: The share of the available sites sampled for this round, as the accountant composed it
    #: (so that a resumed run accounts its past rounds again); None when not recorded.
    sample_rate: float | None = None
    #: The pooled AUC's 95 % interval (DeLong, from the pooled score histograms; migration
    #: 0008); None where there is no pooled AUC, and for rounds recorded before.
    pooled_low: float | None = None
    pooled_high: float | None = None
    #: The pooled calibration, from the pooled score histograms (migration 0012;
    #: ``common.metrics.calibration_from_histograms``): Brier score, expected calibration error
    #: and the reliability curve, (mean score, share of positives, rows) per bin holding rows.
    pooled_brier: float | None = None
    pooled_ece: float | None = None
    pooled_reliability: tuple[tuple[float, float, int], ...] = ()


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
    #: The data fingerprint the site stated beside its update (a train reply; migration 0013):
    #: ``sha256:`` and the hex digest of its rows (common/data.py ``data_fingerprint``).
    data_fingerprint: str | None = None


#: ``BaselineResult.site`` of an AUC over every site's test rows together. No site can have
#: this name: a site is named after its file's stem, and a stem is never empty.
ALL_TEST_ROWS = ""


@dataclass(frozen=True)
class BaselineResult:
    kind: str  # "alone" | "centralized" | "tfidf-alone" | "tfidf-pooled" (at most 16 chars)
    site: str  # or ALL_TEST_ROWS
    n_train: int
    n_test: int
    auc: float | None
    seconds: float
    #: AUC below 0.5 or constant scores on this site's test rows (common/metrics.py
    #: ``degenerate``): shown as such, never as a reference (migration 0007).
    degenerate: bool = False
    #: The learning rate it chose from ``tuning.lr_grid`` by validation loss (migration 0009);
    #: None for TF-IDF and for baselines recorded before.
    lr: float | None = None
    #: The federated model's AUC minus this one's on the same test rows, and the standard error
    #: of that difference (DeLong, paired: ``common.metrics.auc_difference``; migration 0011).
    #: None for TF-IDF, for baselines recorded before, and where it is undefined.
    diff: float | None = None
    diff_se: float | None = None


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
        owner: RunOwner | None = None,
    ) -> int:
        """Record a new run with status ``running``, owned by ``owner`` (this process when
        None); return its id."""

    @abc.abstractmethod
    def finish_run(
        self, run_id: int, *, status: str, error: str | None = None, wall_seconds: float | None
    ) -> None:
        """Mark a run ``finished`` or ``failed`` (a :class:`RunStatus`)."""

    @abc.abstractmethod
    def record_lr_choice(self, run_id: int, candidates: Sequence[LrCandidate]) -> None:
        """Record that run ``run_id``'s learning rate was chosen from ``candidates`` (one run
        per rate of the grid, ``run_id`` among them)."""

    @abc.abstractmethod
    def resume_run(self, run_id: int, reason: str, owner: RunOwner | None = None) -> int:
        """Set an ``interrupted`` or ``failed`` run ``running`` again, owned by ``owner`` (this
        process when None), and record the resumption; return the last recorded round (0:
        none). ``StoreError`` for a run in any other status: a run still running is not
        taken over, a finished one has nothing left to run."""

    @abc.abstractmethod
    def resumptions(self, run_id: int) -> list[Resumption]:
        """The run's resumptions, oldest first."""

    @abc.abstractmethod
    def mark_interrupted(
        self,
        is_alive: Callable[[str, int], bool] = pid_alive,
        host: str | None = None,
    ) -> list[InterruptedRun]:
        """Mark ``interrupted`` every run still ``running`` whose owner is on ``host`` (this
        host when None) and not ``is_alive(host, pid)``, in one transaction; return them.

        Each marked run keeps its rounds; its ``error`` names the dead owner, the last
        recorded round and when it was recorded, and ``finished_at`` when it was marked. Runs
        of another host, or with no owner (recorded before migration 0004), are left alone: no
        process here can tell whether their owner lives. Marking twice marks nothing more.
        """

    @abc.abstractmethod
    def add_round(
        self, run_id: int, result: RoundResult, sites: list[SiteResult], state: bytes | None
    ) -> None:
        """Record one round, its per-site results and the global state after it, atomically."""

    @abc.abstractmethod
    def add_site_results(self, run_id: int, sites: list[SiteResult]) -> None:
        """Record site results outside a round's row (the sites' personalized models after the
        run, ``Phase.PERSONALIZE``), in one commit."""

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
