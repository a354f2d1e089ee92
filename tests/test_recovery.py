"""fedpeft/recovery.py: a stopped coordinator stops the ServerApps its SuperLink left running,
and only those, and their runs become resumable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpeft.recovery import is_serverapp, stop_serverapps
from fedpeft.server.store import RunOwner, open_store, pid_alive
from fedpeft.server.store.base import utcnow

#: Stands in for Flower's flwr-serverapp: a script of that name that ignores SIGTERM (as a
#: ServerApp waiting on a gone SuperLink did), so only SIGKILL ends it.
SERVERAPP = """\
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def _start(procs: list[subprocess.Popen[str]], script: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _running_run(db: str, pid: int, host: str | None = None) -> int:
    store = open_store(db)
    try:
        return store.create_run(
            config_json='{"seed": 0}',
            dataset="heart",
            method="lora",
            model_name="m",
            model_fingerprint="sha256:abc",
            trainable_params=10,
            total_params=1000,
            seed=0,
            owner=RunOwner(host or socket.gethostname(), pid),
        )
    finally:
        store.close()


def test_a_stopped_coordinator_kills_its_left_serverapps_and_marks_their_runs(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    (tmp_path / "flwr-serverapp").write_text(SERVERAPP)
    (tmp_path / "other-program").write_text(SERVERAPP)
    serverapp = _start(started, tmp_path / "flwr-serverapp")
    other = _start(started, tmp_path / "other-program")  # a PID reused by something else
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    left = _running_run(db, serverapp.pid)
    reused = _running_run(db, other.pid)
    elsewhere = _running_run(db, serverapp.pid, host="another-host")
    assert is_serverapp(serverapp.pid) and not is_serverapp(other.pid)
    assert not is_serverapp(os.getpid())

    said: list[str] = []
    marked = stop_serverapps(db, said.append, grace_s=1.0)

    assert serverapp.wait(timeout=10) != 0  # SIGTERM ignored, then SIGKILLed
    time.sleep(0.2)
    assert other.poll() is None and pid_alive(socket.gethostname(), other.pid)
    assert [m.run_id for m in marked] == [left]
    assert (
        said[0] == f"stopping the ServerApp (process {serverapp.pid}) of a run its SuperLink left"
    )
    assert f"run {left} was left running by process {serverapp.pid}" in said[1]
    store = open_store(db)
    statuses = {r.id: r.status for r in store.list_runs()}
    store.close()
    assert statuses == {left: "interrupted", reused: "running", elsewhere: "running"}


def test_a_serverapp_that_marked_its_own_run_is_waited_for_and_stopped_too(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    """Flower signals a ServerApp when its SuperLink goes: it marks its run interrupted itself,
    then takes a while to exit. The coordinator stops it too (the CI run where it was still
    alive after the coordinator had exited), but not the ServerApp of a run marked interrupted
    before this coordinator started (its PID may be another ServerApp's by now)."""
    (tmp_path / "flwr-serverapp").write_text(SERVERAPP)
    exiting = _start(started, tmp_path / "flwr-serverapp")
    older = _start(started, tmp_path / "flwr-serverapp")
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    before = _running_run(db, older.pid)
    store = open_store(db)
    store.finish_run(before, status="interrupted", error="stopped", wall_seconds=1.0)
    store.close()
    time.sleep(0.01)
    since = utcnow()
    marked_itself = _running_run(db, exiting.pid)
    store = open_store(db)
    store.finish_run(marked_itself, status="interrupted", error="stopped", wall_seconds=1.0)
    store.close()

    said: list[str] = []
    assert stop_serverapps(db, said.append, grace_s=1.0, since=since) == []  # already marked

    assert exiting.wait(timeout=10) != 0
    assert older.poll() is None
    assert said == [f"stopping the ServerApp (process {exiting.pid}) of a run its SuperLink left"]


def test_no_store_no_action(tmp_path: Path) -> None:
    assert stop_serverapps(f"sqlite:///{tmp_path / 'none.db'}", print) == []
    assert not (tmp_path / "none.db").exists()


class _Stopped:
    """A grid whose first call finds the ServerApp signalled to stop (Flower raises SIGINT in it
    when its parent, the SuperExec of a stopping SuperLink, is gone)."""

    def get_node_ids(self) -> list[int]:
        raise KeyboardInterrupt


def test_a_serverapp_stopped_from_outside_leaves_its_run_interrupted_not_failed(
    tmp_path: Path,
) -> None:
    from fedpeft.common import crypto
    from fedpeft.common.config import load_config
    from fedpeft.common.trust import CoordinatorTrust
    from fedpeft.server.app import run_federation

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    cfg = load_config(overrides={"db": db, "model.max_length": 32})
    trust = CoordinatorTrust(crypto.new_identity(), {})
    with pytest.raises(KeyboardInterrupt):
        run_federation(_Stopped(), cfg, trust, os.urandom(32), lambda _: None)
    store = open_store(db)
    (run,) = store.list_runs()
    store.close()
    assert run.status == "interrupted"
    assert run.error == (
        "the ServerApp was stopped (KeyboardInterrupt) after round 0; nothing recorded is lost"
    )
