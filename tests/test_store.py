"""One suite, every back end: in-memory SQLite, a SQLite file and PostgreSQL (when CI sets
FEDPEFT_TEST_POSTGRES_URL)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from fedpeft.common.errors import StoreError
from fedpeft.common.keys import SITE_EPSILON, Phase
from fedpeft.server.store import (
    ALL_TEST_ROWS,
    BaselineResult,
    InterruptedRun,
    LrCandidate,
    ReplyStatus,
    RoundResult,
    RunInfo,
    RunOwner,
    RunStore,
    SiteResult,
    SqlRunStore,
    open_store,
    pid_alive,
)
from fedpeft.server.store.sql import MIGRATIONS

T0 = datetime(2026, 11, 27, 12, 0, 0)


@pytest.fixture
def store(store_url: str) -> Iterator[RunStore]:
    if store_url.startswith("postgresql"):
        engine = create_engine(store_url)
        with engine.begin() as conn:  # a clean schema for every test
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()
    s = open_store(store_url)
    yield s
    s.close()


def _run(store: RunStore, seed: int = 0, owner: RunOwner | None = None) -> int:
    return store.create_run(
        config_json='{"seed": 0}',
        dataset="heart",
        method="lora",
        model_name="m",
        model_fingerprint="sha256:abc",
        trainable_params=10,
        total_params=1000,
        seed=seed,
        owner=owner,
    )


def _round(n: int, pooled: float = 0.8) -> RoundResult:
    return RoundResult(
        n, T0, T0, 1.5, pooled, 0.75, 0.4, accepted=2, rejected=1, applied=True, val_loss=0.5 / n
    )


def _sites(n: int) -> list[SiteResult]:
    return [
        SiteResult(
            n,
            "A",
            "train",
            "ok",
            n=10,
            loss=0.3,
            auc=0.9,
            bytes_up=400,
            bytes_down=400,
            extra={"steps": 3.0},
        ),
        SiteResult(n, "B", "train", "rejected", reason="shape: x", bytes_up=400),
        SiteResult(n, "A", "evaluate", "ok", n=5, auc=float("nan"), loss=0.2),
    ]


def test_a_round_is_written_in_statements_that_do_not_grow_with_its_sites(
    store: RunStore,
) -> None:
    # 100 sites a round: one INSERT for all their rows, not one per row (nor per pattern of
    # empty fields), and one commit, whatever the number of sites.
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    run_id = _run(store)
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("INSERT"):
            statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        written = {}
        for rnd, n_sites in ((1, 2), (2, 100)):
            statements.clear()
            many = [
                dataclasses.replace(row, site=f"{row.site}{i}")
                for i in range(n_sites // 2)
                for row in _sites(rnd)
            ]
            store.add_round(run_id, _round(rnd), many, b"state")
            written[n_sites] = len(statements)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert written[2] == written[100] == 3  # the round, its state, its sites
    assert len(store.site_results(run_id)) == 3 * (1 + 50)
    stored = {(r.round, r.site, r.phase): r for r in store.site_results(run_id)}
    assert stored[(2, "B49", "train")].reason == "shape: x"
    assert stored[(2, "A0", "train")].extra == {"steps": 3.0}
    assert stored[(2, "A7", "evaluate")].auc is None


def test_run_lifecycle(store: RunStore) -> None:
    run_id = _run(store)
    info = store.get_run(run_id)
    assert info.status == "running" and info.method == "lora" and info.total_params == 1000
    store.finish_run(run_id, status="finished", wall_seconds=12.5)
    info = store.get_run()
    assert info.id == run_id and info.status == "finished" and info.wall_seconds == 12.5
    assert info.finished_at is not None


def test_a_run_is_owned_by_the_process_that_creates_it(store: RunStore) -> None:
    run_id = _run(store)
    assert store.get_run(run_id).owner == RunOwner(socket.gethostname(), os.getpid())
    other = _run(store, owner=RunOwner("coordinator-2", 2**22))
    assert store.list_runs()[-1].owner == RunOwner("coordinator-2", 2**22)
    assert store.get_run(other).status == "running"


def test_an_interrupted_or_failed_run_resumes_and_the_resumption_is_recorded(
    store: RunStore,
) -> None:
    run_id = _run(store, owner=RunOwner("coordinator-1", 101))
    for n in (1, 2):
        store.add_round(run_id, _round(n), _sites(n), state=bytes([n]))
    with pytest.raises(StoreError, match="is running: only an interrupted or failed run resumes"):
        store.resume_run(run_id, "too early")
    store.mark_interrupted(lambda _host, _pid: False, host="coordinator-1")
    now = RunOwner("coordinator-2", 7)
    assert store.resume_run(run_id, "after the crash", owner=now) == 2
    info = store.get_run(run_id)
    assert (info.status, info.error, info.finished_at, info.owner) == ("running", None, None, now)
    store.finish_run(run_id, status="failed", error="E", wall_seconds=1.0)
    assert store.resume_run(run_id, "again", owner=now) == 2
    store.finish_run(run_id, status="finished", wall_seconds=1.0)
    with pytest.raises(StoreError, match="is finished"):
        store.resume_run(run_id, "nothing left")
    got = store.resumptions(run_id)
    assert [(r.after_round, r.reason, r.owner) for r in got] == [
        (2, "after the crash", now),
        (2, "again", now),
    ]
    assert got[0].resumed_at <= got[1].resumed_at
    with pytest.raises(StoreError, match="no run 99"):
        store.resume_run(99, "x")


def test_runs_left_running_by_a_dead_process_on_this_host_are_marked_interrupted(
    store: RunStore,
) -> None:
    here = "coordinator-1"
    dead = _run(store, owner=RunOwner(here, 101))
    for n in (1, 2, 3):
        store.add_round(dead, _round(n), _sites(n), state=bytes([n]))
    dead_early = _run(store, owner=RunOwner(here, 102))  # died before its first round
    alive = _run(store, owner=RunOwner(here, 200))
    store.add_round(alive, _round(1), _sites(1), state=b"a")
    elsewhere = _run(store, owner=RunOwner("coordinator-2", 101))
    finished = _run(store, owner=RunOwner(here, 103))
    store.finish_run(finished, status="finished", wall_seconds=1.0)
    asked: list[tuple[str, int]] = []

    def is_alive(host: str, pid: int) -> bool:
        asked.append((host, pid))
        return pid == 200

    marked = store.mark_interrupted(is_alive, host=here)
    assert marked == [
        InterruptedRun(dead, RunOwner(here, 101), last_round=3),
        InterruptedRun(dead_early, RunOwner(here, 102), last_round=None),
    ]
    assert sorted(asked) == [(here, 101), (here, 102), (here, 200)]  # this host's running runs
    assert marked[0].describe() == (
        f"run {dead} was left running by process 101 on host {here}, which is gone: marked "
        "interrupted after round 3"
    )
    info = store.get_run(dead)
    assert info.status == "interrupted" and info.finished_at is not None
    assert info.error is not None
    assert "process 101 on host coordinator-1" in info.error
    assert f"last recorded round 3 (at {T0:%Y-%m-%d %H:%M:%S} UTC)" in info.error
    assert "no round was recorded" in (store.get_run(dead_early).error or "")
    # Its rounds and states stay, for a resume.
    assert [r.round for r in store.rounds(dead)] == [1, 2, 3]
    assert store.global_state(dead) == (3, bytes([3]))
    statuses = {r.id: r.status for r in store.list_runs()}
    assert statuses[alive] == statuses[elsewhere] == "running"
    assert statuses[finished] == "finished"
    # Marking again finds nothing more and changes nothing.
    before = store.list_runs()
    assert store.mark_interrupted(lambda host, pid: False, host=here) == [
        InterruptedRun(alive, RunOwner(here, 200), last_round=1)
    ]
    after = {r.id: r for r in store.list_runs()}
    assert [after[r.id] for r in before if r.id != alive] == [r for r in before if r.id != alive]
    assert store.mark_interrupted(lambda host, pid: False, host=here) == []


def test_the_default_liveness_check_sees_this_process_alive_and_a_reaped_one_gone() -> None:
    host = socket.gethostname()
    assert pid_alive(host, os.getpid())
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert not pid_alive(host, int(child.stdout))  # exited and reaped
    assert not pid_alive(host, 0)


def test_a_killed_process_its_parent_has_not_reaped_is_gone() -> None:
    """A SIGKILLed ServerApp stays a zombie until its SuperLink waits for it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(socket.gethostname(), child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not pid_alive(socket.gethostname(), child.pid)  # a zombie: not yet reaped
    finally:
        child.kill()
        child.wait()


def test_rounds_sites_and_state(store: RunStore) -> None:
    run_id = _run(store)
    for n in (1, 2):
        store.add_round(run_id, _round(n, 0.8 + n / 100), _sites(n), state=bytes([n]) * 100)
    rounds = store.rounds(run_id)
    assert [r.round for r in rounds] == [1, 2]
    assert rounds[1].pooled_auc == pytest.approx(0.82) and rounds[1].applied is True
    assert rounds[1].val_loss == pytest.approx(0.25)
    sites = store.site_results(run_id)
    assert len(sites) == 6
    rejected = [s for s in sites if s.status == "rejected"]
    assert [(s.round, s.site, s.reason) for s in rejected] == [
        (1, "B", "shape: x"),
        (2, "B", "shape: x"),
    ]
    ev = [s for s in sites if s.phase == "evaluate"][0]
    assert ev.auc is None  # NaN is stored as "undefined"
    assert [s for s in sites if s.site == "A" and s.phase == "train"][0].extra == {"steps": 3.0}
    assert store.global_state(run_id) == (2, bytes([2]) * 100)
    assert store.global_state(run_id, 1) == (1, bytes([1]) * 100)


def test_site_results_outside_a_round_row_are_kept_beside_its_own(store: RunStore) -> None:
    run_id = _run(store)
    store.add_round(run_id, _round(1), _sites(1), state=b"x")
    personal = [
        SiteResult(1, "A", Phase.PERSONALIZE, ReplyStatus.OK, n=9, auc=0.91, extra={"x": 2.0}),
        SiteResult(1, "B", Phase.PERSONALIZE, ReplyStatus.FAILED, reason="no-reply: gone"),
    ]
    store.add_site_results(run_id, personal)
    assert [r.round for r in store.rounds(run_id)] == [1]  # no round row of its own
    kept = [s for s in store.site_results(run_id) if s.phase == Phase.PERSONALIZE]
    assert kept == personal
    assert len(store.site_results(run_id)) == len(_sites(1)) + 2


def test_a_dp_run_s_epsilon_and_sampling_rate_are_kept_per_round(store: RunStore) -> None:
    run_id = _run(store)
    for n, eps in ((1, 0.61), (2, 0.87)):
        result = dataclasses.replace(_round(n), epsilon=eps, sample_rate=0.5)
        train = SiteResult(n, "A", Phase.TRAIN, ReplyStatus.OK, extra={SITE_EPSILON: eps + 0.1})
        store.add_round(run_id, result, [train], state=None)
    store.add_round(run_id, _round(3), _sites(3), state=None)  # a round without DP
    rounds = store.rounds(run_id)
    assert [(r.epsilon, r.sample_rate) for r in rounds] == [(0.61, 0.5), (0.87, 0.5), (None, None)]
    trains = [s for s in store.site_results(run_id) if s.site == "A" and s.phase == "train"]
    assert [s.extra.get(SITE_EPSILON) for s in trains] == [pytest.approx(0.71), 0.97, None]


def test_round_is_atomic(store: RunStore) -> None:
    run_id = _run(store)
    store.add_round(run_id, _round(1), _sites(1), state=b"x")
    with pytest.raises(StoreError):
        store.add_round(run_id, _round(1), _sites(1), state=b"y")  # same round twice
    assert len(store.site_results(run_id)) == 3  # nothing of the failed write remains
    assert store.global_state(run_id) == (1, b"x")


def test_baselines(store: RunStore) -> None:
    run_id = _run(store)
    store.add_baselines(
        run_id,
        [
            BaselineResult("alone", "A", 10, 5, 0.7, 3.0, lr=1.67e-3, diff=0.05, diff_se=0.02),
            BaselineResult("centralized", "A", 30, 5, float("nan"), 9.0),
            BaselineResult("centralized", "B", 30, 5, 0.46, 9.0, degenerate=True),
            BaselineResult("tfidf-pooled", ALL_TEST_ROWS, 30, 15, 0.8, 0.1),
        ],
    )
    got = store.baselines(run_id)
    assert [(b.kind, b.site, b.auc, b.degenerate) for b in got] == [
        ("alone", "A", 0.7, False),
        ("centralized", "A", None, False),
        ("centralized", "B", 0.46, True),
        ("tfidf-pooled", ALL_TEST_ROWS, 0.8, False),
    ]
    assert [b.lr for b in got] == [1.67e-3, None, None, None]  # TF-IDF has no learning rate
    assert [(b.diff, b.diff_se) for b in got] == [(0.05, 0.02)] + [(None, None)] * 3


def test_a_run_records_the_runs_its_learning_rate_was_chosen_from(store: RunStore) -> None:
    first, second = _run(store), _run(store)
    assert store.get_run(first).lr_candidates == ()  # not chosen from a grid
    candidates = [LrCandidate(first, 5e-3, 0.41), LrCandidate(second, 5e-4, None)]
    store.record_lr_choice(first, candidates)
    assert store.get_run(first).lr_candidates == tuple(candidates)
    assert store.get_run(second).lr_candidates == ()
    with pytest.raises(StoreError, match="not among the candidates"):
        store.record_lr_choice(second + 1, candidates)


def test_missing_things_are_store_errors(store: RunStore) -> None:
    with pytest.raises(StoreError, match="holds no runs"):
        store.get_run()
    with pytest.raises(StoreError, match="no run 99"):
        store.get_run(99)
    run_id = _run(store)
    with pytest.raises(StoreError, match="no stored global state"):
        store.global_state(run_id)


def test_runs_are_listed_in_order(store: RunStore) -> None:
    ids = [_run(store, seed) for seed in range(3)]
    assert [r.id for r in store.list_runs()] == ids
    assert [r.seed for r in store.list_runs()] == [0, 1, 2]


def test_schema_comes_from_the_migration(store_url: str, store: RunStore) -> None:
    engine = create_engine(store_url) if store_url != "sqlite://" else store.engine  # type: ignore[attr-defined]
    tables = set(inspect(engine).get_table_names())
    assert {
        "runs",
        "rounds",
        "site_results",
        "global_states",
        "baselines",
        "run_resumes",
        "alembic_version",
    } <= tables
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version == ScriptDirectory(str(MIGRATIONS)).get_current_head() == "0013"


def test_reopening_keeps_data(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'x.db'}"
    first = open_store(url)
    run_id = _run(first)
    first.close()
    second = open_store(url)
    assert second.get_run(run_id).dataset == "heart"
    second.close()


def _revision(url: str) -> str:
    engine = create_engine(url)
    with engine.connect() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    return str(revision)


def test_a_store_written_at_revision_0001_upgrades_to_head_with_its_rows(tmp_path: Path) -> None:
    # tests/data/store-0001.db was written at the first revision of the schema by
    # tests/data/make_store_0001.py; opening a copy upgrades it in place.
    path = tmp_path / "old.db"
    shutil.copyfile(Path(__file__).parent / "data" / "store-0001.db", path)
    url = f"sqlite:///{path}"
    assert _revision(url) == "0001"
    store = open_store(url)
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head != "0001" and _revision(url) == head
    t0, t1 = datetime(2026, 11, 27, 10, 0, 0), datetime(2026, 11, 27, 10, 1, 30, 500000)
    assert store.list_runs() == [
        RunInfo(
            id=1,
            created_at=t0,
            finished_at=t1,
            status="finished",
            error=None,
            config_json='{"seed": 0, "method": {"name": "lora"}}',
            dataset="heart",
            method="lora",
            model_name="sentence-transformers/all-MiniLM-L6-v2",
            model_fingerprint="sha256:" + 64 * "0",
            trainable_params=74498,
            total_params=22787970,
            seed=0,
            wall_seconds=90.5,
        )
    ]
    # val_loss came with revision 0002, epsilon and sample_rate with 0006: unknown for a
    # round recorded before them.
    assert store.rounds(1) == [
        RoundResult(
            1,
            t0,
            t1,
            90.5,
            0.81,
            0.79,
            0.52,
            1,
            1,
            applied=True,
            val_loss=None,
            epsilon=None,
            sample_rate=None,
        )
    ]
    assert store.site_results(1) == [
        SiteResult(
            1,
            "Cleveland",
            "train",
            "ok",
            n=180,
            loss=0.48,
            auc=0.83,
            auprc=0.8,
            accuracy=0.77,
            brier=0.16,
            bytes_up=299815,
            bytes_down=300411,
            seconds=41.0,
            extra={"steps": 36.0},
        ),
        SiteResult(
            1,
            "Hungary",
            "train",
            "rejected",
            reason="non-finite: 1 tensor(s)",
            bytes_up=299815,
            bytes_down=300411,
        ),
    ]
    assert store.global_state(1) == (1, b"sealed global state of round 1 (opaque to the store)")
    assert store.baselines(1) == [BaselineResult("alone", "Cleveland", 180, 61, 0.8, 12.0)]
    # The upgraded store takes new rounds with the new column, and 64-bit counts (0003).
    store.add_round(1, dataclasses.replace(_round(2), epsilon=1.5), _sites(2), b"state 2")
    assert [r.val_loss for r in store.rounds(1)] == [None, 0.25]
    assert [r.epsilon for r in store.rounds(1)] == [None, 1.5]
    store.add_baselines(1, [BaselineResult("alone", "Hungary", 2**40, 2**33, 0.7, 1.0)])
    assert store.baselines(1)[-1].n_train == 2**40
    # A run recorded before owners were (0004) has none, and is never marked interrupted,
    # even if left running: nothing can tell whether its process lives.
    assert store.get_run(1).owner is None
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE runs SET status = 'running', finished_at = NULL"))
    engine.dispose()
    assert store.mark_interrupted(lambda host, pid: False, host=socket.gethostname()) == []
    assert store.get_run(1).status == "running"
    store.close()


def test_bad_url_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StoreError, match="cannot"):
        open_store("nosuchdb://x")
    with pytest.raises(StoreError, match="cannot open store"):
        open_store(f"sqlite:///{tmp_path}/missing-dir/x.db")


def test_counts_are_64_bit(store: RunStore) -> None:
    # A site signs its example count; PostgreSQL's INTEGER column ended at 2**31 (migration 0003).
    big = 2**40
    run_id = store.create_run(
        config_json="{}",
        dataset="heart",
        method="lora",
        model_name="m",
        model_fingerprint="f",
        trainable_params=big,
        total_params=big + 1,
        seed=2**40,
    )
    site = SiteResult(1, "A", "train", "ok", n=big, bytes_up=big + 2, bytes_down=big + 3)
    store.add_round(run_id, _round(1), [site], state=None)
    store.add_baselines(run_id, [BaselineResult("alone", "A", big, big + 4, 0.5, 1.0)])
    assert store.site_results(run_id) == [site]
    assert (store.get_run(run_id).trainable_params, store.get_run(run_id).total_params) == (
        big,
        big + 1,
    )
    assert store.baselines(run_id)[0].n_test == big + 4


def test_what_a_column_cannot_hold_is_refused_before_anything_is_written(store: RunStore) -> None:
    with pytest.raises(StoreError, match=r"runs\.method is 33 characters long.*at most 32"):
        store.create_run(
            config_json="{}",
            dataset="heart",
            method="x" * 33,
            model_name="m",
            model_fingerprint="f",
            trainable_params=1,
            total_params=1,
            seed=0,
        )
    assert store.list_runs() == []
    run_id = _run(store)
    long_site = SiteResult(1, "S" * 257, "evaluate", "ok", n=3)
    with pytest.raises(StoreError, match=r"site_results\.site is 257 characters long.*at most 256"):
        store.add_round(run_id, _round(1), [*_sites(1), long_site], state=b"x")
    too_many = SiteResult(1, "A", "train", "ok", n=2**64 - 1)
    with pytest.raises(StoreError, match=r"site_results\.n = 18446744073709551615 does not fit"):
        store.add_round(run_id, _round(1), [too_many], state=b"x")
    with pytest.raises(StoreError, match=r"baselines\.site is 300 characters"):
        store.add_baselines(run_id, [BaselineResult("alone", "B" * 300, 1, 1, 0.5, 1.0)])
    with pytest.raises(StoreError, match=r"runs\.status is 17 characters"):
        store.finish_run(run_id, status="s" * 17, wall_seconds=1.0)
    # Nothing of the refused writes is there; the store goes on.
    assert store.rounds(run_id) == [] and store.site_results(run_id) == []
    assert store.baselines(run_id) == [] and store.get_run(run_id).status == "running"
    store.add_round(run_id, _round(1), _sites(1), state=b"x")
    assert len(store.site_results(run_id)) == 3


def test_a_sqlite_store_is_in_wal_mode_and_its_new_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    old_umask = os.umask(0)  # what the process allows must not matter
    try:
        store = open_store(f"sqlite:///{path}")
        run_id = _run(store)
        store.add_round(run_id, _round(1), _sites(1), state=b"x")
        files = [tmp_path / f"new.db{suffix}" for suffix in ("", "-wal", "-shm")]
        assert all(f.exists() for f in files)  # WAL mode keeps both beside the database
        assert [oct(f.stat().st_mode & 0o777) for f in files] == ["0o600"] * 3
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        store.close()
    finally:
        os.umask(old_umask)


class _Retries(logging.Handler):
    """Counts the store's retry warnings; sets ``enough`` at the ``after``-th."""

    def __init__(self, after: int) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.after, self.enough = after, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if len(self.messages) >= self.after:
            self.enough.set()


def test_a_round_written_while_another_connection_locks_the_store_waits_and_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    store = SqlRunStore(f"sqlite:///{path}", busy_timeout=0.05)  # fail fast, then retry
    run_id = _run(store)
    retries = _Retries(after=2)
    locked = threading.Event()

    def hold_the_lock() -> None:  # another process's connection: its own thread and handle
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        retries.enough.wait(timeout=60)  # until the store has tried, failed and retried twice
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_the_lock)
    logger = logging.getLogger("fedpeft.server.store")
    logger.addHandler(retries)
    try:
        holder.start()
        assert locked.wait(timeout=60)
        store.add_round(run_id, _round(1), _sites(1), state=b"state 1")
    finally:
        logger.removeHandler(retries)
        holder.join()
    assert len(retries.messages) >= 2
    assert all(f"store sqlite:///{path} is locked" in m for m in retries.messages)
    assert [r.round for r in store.rounds(run_id)] == [1]
    assert len(store.site_results(run_id)) == 3
    assert store.global_state(run_id) == (1, b"state 1")
    store.close()


def test_a_lock_held_past_the_retry_budget_is_a_store_error_naming_the_store(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stuck.db"
    store = SqlRunStore(f"sqlite:///{path}", busy_timeout=0.05, lock_retry_seconds=0.5)
    run_id = _run(store)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="stayed locked by another connection") as caught:
            store.add_round(run_id, _round(1), _sites(1), state=b"x")
        assert f"sqlite:///{path}" in str(caught.value)
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert store.rounds(run_id) == [] and store.site_results(run_id) == []
    store.close()


def test_opening_an_existing_store_only_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    with pytest.raises(StoreError, match=f"no store at {missing}"):
        open_store(f"sqlite:///{missing}", create=False)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match="holds no fedpeft store"):
        open_store(f"sqlite:///{empty}", create=False)
    assert empty.stat().st_size == 0  # no schema written into it
    with pytest.raises(StoreError, match="holds no fedpeft store"):
        open_store("sqlite://", create=False)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    writer = open_store(url)
    run_id = _run(writer)
    writer.close()
    reader = open_store(url, create=False)
    assert reader.get_run().id == run_id
    reader.close()


def _open_at(url: str, start: float) -> str:
    """Open (and so create) the store at ``url`` at time ``start``; what went wrong, or ""."""
    time.sleep(max(0.0, start - time.time()))
    try:
        open_store(url).close()
    except StoreError as exc:
        return str(exc)
    return ""


def test_processes_that_create_one_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    """A ServerApp and `fedpeft run start`'s follower can open a new SQLite store at the same
    moment: the schema is created once, and every opener gets the store."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        for attempt in range(3):
            url = f"sqlite:///{tmp_path / f'runs-{attempt}.db'}"
            start = time.time() + 3.0  # after the workers have imported the store
            errors = pool.starmap(_open_at, [(url, start)] * 4)
            assert errors == [""] * 4, errors
            store = open_store(url)
            assert store.list_runs() == []
            store.close()
