"""The run store: runs, rounds, per-site results, global states and baselines."""

from fedpeft.server.store.base import (
    ALL_TEST_ROWS,
    BaselineResult,
    InterruptedRun,
    LrCandidate,
    ReplyStatus,
    Resumption,
    RoundResult,
    RunInfo,
    RunOwner,
    RunStatus,
    RunStore,
    SiteResult,
    pid_alive,
)
from fedpeft.server.store.sql import SqlRunStore, open_store

__all__ = [
    "ALL_TEST_ROWS",
    "BaselineResult",
    "InterruptedRun",
    "ReplyStatus",
    "Resumption",
    "RoundResult",
    "LrCandidate",
    "RunInfo",
    "RunOwner",
    "RunStatus",
    "RunStore",
    "SiteResult",
    "SqlRunStore",
    "open_store",
    "pid_alive",
]
