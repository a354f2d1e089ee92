"""Runs a dead process left behind: found and marked when a coordinator or a simulation starts.

A run's rounds are run by one process (the ServerApp's in deployment, ``fedpeft simulate``'s in
simulation), recorded as the run's owner. If that process is killed or runs out of memory, the
run stays ``running`` in the store; the next ``fedpeft coordinator start`` or ``fedpeft
simulate`` on the same host sees its owner gone and marks it ``interrupted`` with its last
recorded round (:meth:`RunStore.mark_interrupted`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedpeft.common.errors import NoStore
from fedpeft.server.store import InterruptedRun, open_store, pid_alive


def mark_interrupted_runs(
    db: str,
    say: Callable[[str], None] = print,
    is_alive: Callable[[str, int], bool] = pid_alive,
) -> list[InterruptedRun]:
    """Mark the runs in store ``db`` left running by a dead process on this host, saying one
    line for each. A store that does not exist yet holds no runs: it is not created here."""
    try:
        store = open_store(db, create=False)
    except NoStore:
        return []
    try:
        marked = store.mark_interrupted(is_alive)
    finally:
        store.close()
    for run in marked:
        say(run.describe())
    return marked
