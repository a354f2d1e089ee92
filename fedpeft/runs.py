"""``fedpeft run start``: submit a federated run to a running coordinator and follow it.

The run config (the same TOML as ``fedpeft simulate --config``) travels inside a Flower app
made for this run (its ``pyproject.toml`` names fedpeft's ServerApp and ClientApp, which
coordinator and sites have installed), then ``flwr run --stream`` shows the ServerApp's
progress. Flower's own exit code can be 0 for a crashed ServerApp, so the result is read from
the run store: the command exits non-zero unless the run is recorded as finished.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

from fedpeft.common.config import RunConfig
from fedpeft.common.errors import FedpeftError
from fedpeft.deploy import BIN, CoordinatorConfig, _flower_cli_home, _quiet_env
from fedpeft.server.app import CONFIG_KEY
from fedpeft.server.store import RunInfo, open_store
from fedpeft.server.store.base import utcnow

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


def with_absolute_store(cfg: RunConfig, folder: Path) -> RunConfig:
    """A SQLite store path relative to the coordinator's folder, made absolute: the ServerApp
    process does not run in the folder the operator typed the command in."""
    url = make_url(cfg.db)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return cfg
    path = Path(url.database)
    if path.is_absolute():
        return cfg
    return dataclasses.replace(cfg, db=str(url.set(database=str(folder / path))))


def write_app(folder: Path, cfg: RunConfig) -> Path:
    (folder / "pyproject.toml").write_text(
        APP_TOML.format(key=json.dumps(CONFIG_KEY), value=json.dumps(cfg.to_json()))
    )
    return folder


def start_run(cfg: RunConfig, coordinator_toml: Path, coordinator: CoordinatorConfig) -> RunInfo:
    """Submit, stream, and return the run as the store recorded it; FedpeftError unless it
    finished."""
    started = utcnow()
    home = _flower_cli_home(coordinator_toml, coordinator)
    with tempfile.TemporaryDirectory(prefix="fedpeft-run-") as tmp:
        app = write_app(Path(tmp), cfg)
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "coordinator", "--stream"],
            env=_quiet_env(FLWR_HOME=str(home)),
        )
    store = open_store(cfg.db)
    try:
        runs = [r for r in store.list_runs() if r.created_at >= started]
    finally:
        store.close()
    if not runs:
        raise FedpeftError(
            f"the coordinator recorded no run in {make_url(cfg.db).render_as_string()} "
            f"(flwr run exited {done.returncode}); see the coordinator's log"
        )
    run = max(runs, key=lambda r: r.id)
    if run.status != "finished":
        raise FedpeftError(f"run {run.id} {run.status}: {run.error or 'no error recorded'}")
    return run
