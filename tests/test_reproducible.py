"""A seed fixes every number a run reports (issue 14 item 5): the same short ``fedpeft simulate``,
baselines included, run twice in separate processes, records the same numbers and prints the
same report. Slow: two simulations of two small hospitals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from site_files import write_heart_sites

from fedpeft.processes import BIN, child_env
from fedpeft.server.store import open_store

pytestmark = pytest.mark.slow

RUN_TOML = """seed = 5
device = "cpu"
[data]
dataset = "{folder}"
[model]
max_length = 48
[federation]
rounds = 2
[train]
batch_size = 16
local_epochs = 1
[tuning]
lr_grid = [5e-3, 1e-3]
"""


@pytest.fixture(scope="module")
def run_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_heart_sites(
        tmp_path_factory.mktemp("sites"), ("b-hungary", "c-switzerland"), 50, seed=1, first=1
    )
    path = folder / "run.toml"
    path.write_text(RUN_TOML.format(folder=folder))
    return path


def _numbers(db: str) -> dict[str, object]:
    """Every number the run recorded that its seed should fix (no times, no run token)."""
    store = open_store(db, create=False)
    try:
        (run,) = store.list_runs()
        rounds = [
            (r.round, r.pooled_auc, r.pooled_low, r.pooled_high, r.macro_auc, r.loss, r.val_loss)
            + (r.pooled_brier, r.pooled_ece, r.pooled_reliability)
            for r in store.rounds(run.id)
        ]
        sites = [
            # Not the bytes: an ECDSA signature's DER length varies by a byte or two.
            (r.round, r.phase, r.site, r.status, r.n, r.loss, r.auc, r.auprc, r.brier)
            + tuple(sorted((k, v) for k, v in r.extra.items() if "seconds" not in k))
            for r in store.site_results(run.id)
        ]
        baselines = [
            (b.kind, b.site, b.n_train, b.n_test, b.auc, b.lr, b.diff, b.diff_se)
            for b in store.baselines(run.id)
        ]
        return {"rounds": rounds, "sites": sites, "baselines": baselines}
    finally:
        store.close()


def _report(db: str) -> list[str]:
    out = subprocess.run(
        [str(BIN / "fedpeft"), "report", "--db", db],
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if "wall time" not in line and "bytes up" not in line]


def test_the_same_seed_gives_the_same_numbers_in_another_process(
    run_toml: Path, tmp_path: Path
) -> None:
    dbs = [f"sqlite:///{tmp_path / f'run{i}.db'}" for i in (1, 2)]
    for db in dbs:
        done = subprocess.run(
            [str(BIN / "fedpeft"), "simulate", "--config", str(run_toml), "--db", db],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = (_numbers(db) for db in dbs)
    assert first["baselines"] and len(first["rounds"]) == 2  # alone, centralized and TF-IDF ran
    # Each language-model baseline was compared with the federated model on its test rows.
    compared = [b for b in first["baselines"] if b[0] in ("alone", "centralized")]
    assert len(compared) == 4 and all(b[6] is not None for b in compared)  # 2 sites x 2 kinds
    for key in first:
        assert first[key] == second[key], key
    assert _report(dbs[0]) == _report(dbs[1])
