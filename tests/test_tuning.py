"""Each mode picks its learning rate (issue 14 item 2): ``fedpeft simulate --tune-lr`` runs the
federated loop once per rate of the grid and keeps the run whose delivered round has the lowest
validation loss. Slow: two short simulations of two small hospitals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from site_files import write_heart_sites

from fedpeft.processes import BIN, child_env
from fedpeft.server.rounds import select_round
from fedpeft.server.store import open_store

pytestmark = pytest.mark.slow

RUN_TOML = """seed = 3
device = "cpu"
[data]
dataset = "{folder}"
[model]
max_length = 48
[federation]
rounds = 2
[tuning]
lr_grid = [5e-3, 2e-4]
"""


def test_tune_lr_runs_each_rate_and_keeps_the_lowest_validation_loss(tmp_path: Path) -> None:
    folder = write_heart_sites(tmp_path, ("a-cleveland", "b-hungary"), 40, seed=2)
    (tmp_path / "run.toml").write_text(RUN_TOML.format(folder=folder))
    db = f"sqlite:///{tmp_path / 'tune.db'}"
    done = subprocess.run(
        [str(BIN / "fedpeft"), "simulate", "--config", str(tmp_path / "run.toml"), "--db", db]
        + ["--tune-lr", "--baselines", "none", "--plot", str(tmp_path / "p.png")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = open_store(db, create=False)
    try:
        runs = store.list_runs()
        assert [r.status for r in runs] == ["finished", "finished"]
        losses = {}
        for run in runs:
            rounds = store.rounds(run.id)
            chosen = select_round(rounds)
            losses[run.id] = next(r.val_loss for r in rounds if r.round == chosen)
        (tuned,) = [r for r in runs if r.lr_candidates]
        assert [(c.run, c.lr, c.val_loss) for c in tuned.lr_candidates] == [
            (runs[0].id, 5e-3, losses[runs[0].id]),
            (runs[1].id, 2e-4, losses[runs[1].id]),
        ]
        assert tuned.id == min(losses, key=lambda i: losses[i])  # the lowest validation loss
        rate = dict((c.run, c.lr) for c in tuned.lr_candidates)[tuned.id]
        assert f"federated: run {tuned.id} at lr {rate:g} chosen by validation loss" in done.stdout
    finally:
        store.close()
    # The report printed is the chosen run's, and says where its rate came from.
    assert f"run {tuned.id} (finished)" in done.stdout
    assert "chosen by the validation loss of each run's delivered round from run" in done.stdout
