"""Runs a dead process left behind: found and marked when a coordinator or a simulation starts.

A run's rounds are run by one process (the ServerApp's in deployment, ``fedpeft simulate``'s in
simulation), recorded as the run's owner. If that process is killed or runs out of memory, the
run stays ``running`` in the store; the next ``fedpeft coordinator start`` or ``fedpeft
simulate`` on the same host sees its owner gone and marks it ``interrupted`` with its last
recorded round (:meth:`RunStore.mark_interrupted`).

A ServerApp outlives its SuperLink: Flower starts it in a session of its own, and once the
SuperLink is gone it waits on it for ever. ``fedpeft coordinator start`` therefore stops, when
its SuperLink has exited, the ServerApps of this host still running its runs
(:func:`stop_serverapps`), and marks those runs interrupted: a restarted coordinator then takes
them up with ``fedpeft run resume``.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from fedpeft.common.errors import NoStore
from fedpeft.server.store import InterruptedRun, RunInfo, RunStatus, open_store, pid_alive

#: What a ServerApp's command line holds (Flower's ``flwr-serverapp`` script).
SERVERAPP = b"flwr-serverapp"
#: How long a ServerApp has to exit on SIGTERM before it is killed.
STOP_GRACE_S = 10.0


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


def is_serverapp(pid: int) -> bool:
    """Whether process ``pid`` is a Flower ServerApp, as /proc says (Linux); False where it
    cannot tell: nothing is stopped on a guess."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(Path(os.fsdecode(arg)).name == SERVERAPP.decode() for arg in command.split(b"\0"))


def _left(run: RunInfo, since: datetime | None) -> bool:
    """Whether ``run`` may still have a ServerApp to stop: it is running, or it was marked
    interrupted after ``since`` (by its own ServerApp, which may still be exiting)."""
    if run.status == RunStatus.RUNNING:
        return True
    return (
        since is not None
        and run.status == RunStatus.INTERRUPTED
        and run.finished_at is not None
        and run.finished_at >= since
    )


def stop_serverapps(
    db: str,
    say: Callable[[str], None] = print,
    grace_s: float = STOP_GRACE_S,
    since: datetime | None = None,
) -> list[InterruptedRun]:
    """Stop the ServerApps of this host that still run a run of store ``db`` (SIGTERM, then
    SIGKILL after ``grace_s``), then mark their runs interrupted; called once the coordinator's
    SuperLink has exited. A ServerApp signalled by Flower marks its run interrupted itself and
    then takes a while to exit: one whose run was marked after ``since`` (when the coordinator
    started) is waited for, and stopped, too, so that no ServerApp of this coordinator outlives
    it. Only a process that is a ServerApp is signalled, never a PID another program has taken
    since."""
    try:
        store = open_store(db, create=False)
    except NoStore:
        return []
    try:
        runs = [r for r in store.list_runs() if _left(r, since)]
    finally:
        store.close()
    here = socket.gethostname()
    pids = {
        r.owner.pid
        for r in runs
        if r.owner is not None and r.owner.host == here and is_serverapp(r.owner.pid)
    }
    for pid in sorted(pids):
        say(f"stopping the ServerApp (process {pid}) of a run its SuperLink left")
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(pid_alive(here, pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in sorted(pids):
        if pid_alive(here, pid) and is_serverapp(pid):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while any(pid_alive(here, pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return mark_interrupted_runs(db, say)
