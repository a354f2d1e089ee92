"""``fedpeft run start``: submit a federated run to a running coordinator and follow it.

The run config (the same TOML as ``fedpeft simulate --config``) travels inside a Flower app
made for this run (its ``pyproject.toml`` names fedpeft's ServerApp and ClientApp, which
coordinator and sites have installed), then ``flwr run --stream`` shows the ServerApp's
progress. Flower's own exit code can be 0 for a crashed ServerApp, so the result is read from
the run store: the command exits non-zero unless the run is recorded as finished.

The store is the coordinator's (coordinator.toml ``store``): the app carries no store URL (the
ServerApp gets it from the coordinator's environment), and the store is named on screen
without its password.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from fedpeft.allowlist import flower_cli_home
from fedpeft.common.config import RunConfig
from fedpeft.common.environment import FLWR_HOME_ENV
from fedpeft.common.errors import ConfigError, FedpeftError
from fedpeft.processes import BIN, child_env
from fedpeft.server.app import CONFIG_KEY, RESUME_KEY
from fedpeft.server.store import RunInfo, open_store, pid_alive
from fedpeft.server.store.base import utcnow
from fedpeft.settings import CoordinatorConfig, absolute_store, shown_url

APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedpeft-run"
version = "0.1.0"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedpeft"

[tool.flwr.app.components]
serverapp = "fedpeft.server.app:app"
clientapp = "fedpeft.client.app:app"

[tool.flwr.app.config]
{key} = {value}
"""


def write_app(folder: Path, cfg: RunConfig, resume: int | None = None) -> Path:
    """The app bundle's folder for a run of ``cfg``: the ServerApp's run config (no store URL:
    ``RunConfig.to_json`` leaves it out), with ``resume``, the run it takes up, and the
    references to fedpeft's installed apps."""
    text = APP_TOML.format(key=json.dumps(CONFIG_KEY), value=json.dumps(cfg.to_json()))
    if resume is not None:
        text += f"{json.dumps(RESUME_KEY)} = {int(resume)}\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(text)
    return folder


def start_run(
    cfg: RunConfig,
    coordinator_toml: Path,
    coordinator: CoordinatorConfig,
    say: Callable[[str], None] = print,
    resume: int | None = None,
) -> RunInfo:
    """Submit, stream, and return the run as the store recorded it; FedpeftError unless it
    finished. Flower's log stream can end before the run does (it did under load): the store is
    then followed until the run finishes or fails, within a bound set by the run's rounds and
    round timeout. ``resume``: the run taken up (followed by its id) instead of a new one."""
    started = utcnow()
    home = flower_cli_home(coordinator_toml, coordinator)
    with tempfile.TemporaryDirectory(prefix="fedpeft-run-") as tmp:
        app = write_app(Path(tmp), cfg, resume)
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "coordinator", "--stream"],
            env=child_env({FLWR_HOME_ENV: str(home)}),
        )
    fed, db = cfg.federation, coordinator.store
    deadline = time.monotonic() + fed.rounds * 2 * fed.round_timeout_s + 300
    seen_rounds, run = 0, None
    while True:
        run = _latest_run(db, started) if resume is None else _resumed_run(db, resume, started)
        if run is not None and run.status != "running":
            break
        if run is not None:
            seen_rounds = _report_new_rounds(db, run.id, seen_rounds, say)
            if _owner_gone(db, run, say):
                continue  # marked interrupted: read its status once more
        if time.monotonic() > deadline:
            break
        time.sleep(3)
    if run is None:
        raise FedpeftError(
            f"the coordinator recorded no run in {shown_url(db)} "
            f"(flwr run exited {done.returncode}); see the coordinator's log"
        )
    if run.status == "interrupted":
        raise FedpeftError(
            f"run {run.id} interrupted: {run.error}; take it up with `fedpeft run resume "
            f"{run.id} --coordinator {coordinator_toml}`"
        )
    if run.status != "finished":
        raise FedpeftError(f"run {run.id} {run.status}: {run.error or 'no error recorded'}")
    return run


def _owner_gone(db: str, run: RunInfo, say: Callable[[str], None]) -> bool:
    """Whether the ServerApp running ``run`` is a process of this host that is gone: it is
    then marked interrupted (with every other such run), and said so."""
    owner = run.owner
    if owner is None or owner.host != socket.gethostname() or pid_alive(owner.host, owner.pid):
        return False
    from fedpeft.recovery import mark_interrupted_runs

    return bool(mark_interrupted_runs(db, say))


def _latest_run(db: str, since: datetime) -> RunInfo | None:
    store = open_store(db)
    try:
        runs = [r for r in store.list_runs() if r.created_at >= since]
    finally:
        store.close()
    return max(runs, key=lambda r: r.id) if runs else None


def _resumed_run(db: str, run_id: int, since: datetime) -> RunInfo | None:
    """Run ``run_id`` once a ServerApp has taken it up (resumed it) since ``since``."""
    store = open_store(db)
    try:
        resumed = [r for r in store.resumptions(run_id) if r.resumed_at >= since]
        return store.get_run(run_id) if resumed else None
    finally:
        store.close()


def resume_and_report(
    run_id: int,
    coordinator_toml: Path,
    coordinator: CoordinatorConfig,
    say: Callable[[str], None],
) -> RunInfo:
    """``fedpeft run resume``: mark runs a dead ServerApp left running (as ``coordinator
    start`` does), then submit run ``run_id`` again with its own config from the coordinator's
    store; the ServerApp takes it up after its last recorded round (server/app.py
    ``resume_point``). Follow it and print its report table."""
    from fedpeft.common.errors import StoreError
    from fedpeft.recovery import mark_interrupted_runs
    from fedpeft.report import render_table, summarize

    mark_interrupted_runs(coordinator.store, say)
    store = open_store(coordinator.store, create=False)
    try:
        info = store.get_run(run_id)
        if info.status not in ("interrupted", "failed"):
            raise StoreError(
                f"run {run_id} is {info.status}: only an interrupted or failed run resumes"
            )
        last = max((r.round for r in store.rounds(run_id)), default=0)
    finally:
        store.close()
    cfg = dataclasses.replace(RunConfig.from_json(info.config_json), db=coordinator.store)
    say(
        f"resuming run {run_id} ({info.status}) after round {last} of {cfg.federation.rounds}, "
        f"store {shown_url(coordinator.store)}"
    )
    run = start_run(cfg, coordinator_toml, coordinator, say=say, resume=run_id)
    store = open_store(coordinator.store)
    try:
        print(render_table(summarize(store, run.id)), flush=True)
    finally:
        store.close()
    return run


def _report_new_rounds(db: str, run_id: int, seen: int, say: Callable[[str], None]) -> int:
    store = open_store(db)
    try:
        rounds = store.rounds(run_id)
    finally:
        store.close()
    for r in rounds[seen:]:
        auc = "n/a" if r.macro_auc is None else f"{r.macro_auc:.3f}"
        say(
            f"round {r.round}: macro AUC {auc}, {r.accepted} update(s) accepted, {r.rejected} "
            f"not, {r.seconds:.0f} s (from the store)"
        )
    return len(rounds)


def run_and_report(
    run_toml: Path,
    coordinator_toml: Path,
    coordinator: CoordinatorConfig,
    say: Callable[[str], None],
) -> RunInfo:
    """``fedpeft run start``: load the run config, start the run, follow it in the coordinator's
    store, then print its report table. A run config that names a ``db`` other than the
    coordinator's store is refused (it would be followed in the wrong place)."""
    from fedpeft.common.config import load_config
    from fedpeft.common.tomlfile import read_toml
    from fedpeft.report import render_table, summarize

    cfg = load_config(run_toml)
    named = read_toml(run_toml).get("db")
    if isinstance(named, str):
        folder = coordinator_toml.resolve().parent
        problems: list[str] = []
        if absolute_store(named, folder, problems, coordinator_toml) != coordinator.store:
            raise ConfigError(
                f"{run_toml}: db: runs are recorded in the coordinator's store "
                f"({shown_url(coordinator.store)}, coordinator.toml store); remove db from the "
                "run config"
            )
    cfg = dataclasses.replace(cfg, db=coordinator.store)
    say(
        f"starting a run: method {cfg.method.name}, {cfg.federation.rounds} rounds, "
        f"min sites {cfg.federation.min_sites}, store {shown_url(coordinator.store)}"
    )
    run = start_run(cfg, coordinator_toml, coordinator, say=say)
    store = open_store(coordinator.store)
    try:
        print(render_table(summarize(store, run.id)), flush=True)
    finally:
        store.close()
    return run
