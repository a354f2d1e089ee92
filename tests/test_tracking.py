"""`--mlflow`: a run of a real store, exported with its store key, logged to MLflow's local
backends (a SQLite database, and the file store), and read back with MLflow's own client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient  # the dev extra installs the mlflow extra
from recorded_runs import add_round, create

from fedpeft.cli import main
from fedpeft.common.config import RunConfig
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.model import model_fingerprint, resolve_model_path
from fedpeft.common.tensors import to_numpy
from fedpeft.server.checkpoints import seal_state, write_store_key
from fedpeft.server.store import open_store

AUCS = {1: {"Cleveland": 0.72, "Hungary": 0.81}, 2: {"Cleveland": 0.80, "Hungary": 0.86}}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A finished run of two rounds with its global states sealed under a store key."""
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = RunConfig()
    state = to_numpy(shared_state(build_model(cfg.model, cfg.method, 0.0, cfg.seed)))
    key = write_store_key(tmp / "store.key")
    db = f"sqlite:///{tmp / 'runs.db'}"
    store = open_store(db)
    run = create(store, 2, 5e-3, fingerprint=model_fingerprint(resolve_model_path(cfg.model)))
    for rnd, pooled in ((1, 0.70), (2, 0.78)):
        add_round(store, run, rnd, pooled, AUCS[rnd], seal_state(key, run, rnd, state))
    store.finish_run(run, status="finished", wall_seconds=9.0)
    store.close()
    return db, tmp / "store.key"


@pytest.mark.parametrize("backend", ["sqlite", "file store"])
def test_export_logs_the_run_params_metrics_and_adapter(
    recorded: tuple[str, Path],
    tmp_path: Path,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the folder the command runs in
    db, key = recorded
    uri = (
        f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
        if backend == "sqlite"
        else (tmp_path / "tracking").as_uri()
    )
    (tmp_path / "tracking").mkdir()
    out = tmp_path / "adapter"
    args = ["export", "--db", db, "--out", str(out), "--store-key-file", str(key)]
    assert main([*args, "--mlflow", uri, "--mlflow-experiment", "heart-trials"]) == 0
    assert "logged run 1 to MLflow" in capsys.readouterr().out
    assert not (tmp_path / "mlruns").exists()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("heart-trials")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "fedpeft-run-1"
    assert run.data.tags["fedpeft.run_id"] == "1" and run.data.tags["fedpeft.method"] == "lora"
    params = run.data.params
    assert params["config.method.name"] == "lora" and params["config.train.lr"] == "0.005"
    assert params["delivered_round"] == "2" and "config.tuning.lr_grid" not in params
    pooled = client.get_metric_history(run.info.run_id, "pooled_auc")
    assert [(m.step, m.value) for m in sorted(pooled, key=lambda m: m.step)] == [
        (1, 0.70),
        (2, 0.78),
    ]
    test_loss = client.get_metric_history(run.info.run_id, "test_loss")
    assert sorted(m.value for m in test_loss) == [0.5, 0.5]  # RoundResult.loss, each round
    for site in ("Cleveland", "Hungary"):
        history = client.get_metric_history(run.info.run_id, f"auc/{site}")
        assert {m.step: m.value for m in history} == {r: AUCS[r][site] for r in (1, 2)}
    files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/README.md", "adapter/adapter_model.safetensors"} <= files
    assert "model_card.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_without_mlflow_installed_the_error_names_the_extra(
    recorded: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    db, key = recorded
    out = tmp_path / "adapter"
    args = ["export", "--db", db, "--out", str(out), "--store-key-file", str(key)]
    assert main([*args, "--mlflow", "sqlite:///x.db"]) == 2
    assert "pip install 'fedpeft[mlflow]'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
