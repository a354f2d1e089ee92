"""The run store: runs, rounds, per-site results, global states and baselines."""

from fedpeft.server.store.base import (
    BaselineResult,
    ReplyStatus,
    RoundResult,
    RunInfo,
    RunStore,
    SiteResult,
)
from fedpeft.server.store.sql import SqlRunStore, open_store

__all__ = [
    "BaselineResult",
    "ReplyStatus",
    "RoundResult",
    "RunInfo",
    "RunStore",
    "SiteResult",
    "SqlRunStore",
    "open_store",
]
