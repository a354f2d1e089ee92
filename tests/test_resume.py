"""Resuming a run after its coordinator dies (issue 12): a real ``fedpeft simulate`` killed with
SIGKILL after round 2 is in the store, then ``fedpeft simulate --resume``. Slow: three short
simulations of two small hospitals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from site_files import write_heart_sites

from fedpeft.common.errors import StoreError
from fedpeft.processes import BIN, child_env
from fedpeft.server.store import open_store

pytestmark = pytest.mark.slow

RUN_TOML = """seed = 0
device = "cpu"
[data]
dataset = "{folder}"
[model]
max_length = 64
[federation]
rounds = 4
[train]
batch_size = 16
"""


@pytest.fixture(scope="module")
def run_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_heart_sites(tmp_path_factory.mktemp("sites"), ("a-cleveland", "b-hungary"), 60)
    path = folder / "run.toml"
    path.write_text(RUN_TOML.format(folder=folder))
    return path


def _simulate(run_toml: Path, db: str, *extra: str) -> list[str]:
    return [
        str(BIN / "fedpeft"),
        "simulate",
        "--config",
        str(run_toml),
        "--db",
        db,
        "--no-baselines",
        "--cpus",
        "2",
        *extra,
    ]


def _aucs(db: str) -> tuple[str, list[tuple[int, str, float | None]]]:
    store = open_store(db, create=False)
    try:
        (run,) = store.list_runs()
        rows = [
            (r.round, r.site, None if r.auc is None else round(r.auc, 3))
            for r in store.site_results(run.id)
            if r.phase == "evaluate"
        ]
        return run.status, sorted(rows)
    finally:
        store.close()


def _rounds_recorded(db: str) -> int:
    try:
        store = open_store(db, create=False)
    except StoreError:
        return 0
    try:
        return sum(len(store.rounds(r.id)) for r in store.list_runs())
    finally:
        store.close()


def test_a_simulation_killed_after_round_2_and_resumed_ends_as_the_uninterrupted_run(
    run_toml: Path, tmp_path: Path
) -> None:
    whole = f"sqlite:///{tmp_path / 'whole.db'}"
    done = subprocess.run(
        _simulate(run_toml, whole), env=child_env(), capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    status, expected = _aucs(whole)
    assert status == "finished" and {r for r, _, _ in expected} == {1, 2, 3, 4}

    broken = f"sqlite:///{tmp_path / 'broken.db'}"
    with (tmp_path / "killed.log").open("wb") as log:
        proc = subprocess.Popen(
            _simulate(run_toml, broken),
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900
        while _rounds_recorded(broken) < 2:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 2 was not recorded in 900 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its virtual sites
        proc.wait()
    status, _ = _aucs(broken)
    assert status == "running"  # as a dead process leaves it
    recorded = _rounds_recorded(broken)
    assert recorded in (2, 3)

    resumed = subprocess.run(
        _simulate(run_toml, broken, "--resume", "1"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "marked interrupted" in resumed.stdout, resumed.stdout[-3000:]
    assert f"run 1 resumes after round {recorded} of 4" in resumed.stdout
    status, got = _aucs(broken)
    assert status == "finished"
    assert got == expected  # every round and site, to three decimals
    store = open_store(broken, create=False)
    try:
        (resumption,) = store.resumptions(1)
        assert resumption.after_round == recorded
        assert resumption.reason.startswith("resumed from interrupted: interrupted: process")
        assert [r.round for r in store.rounds(1)] == [1, 2, 3, 4]
    finally:
        store.close()
