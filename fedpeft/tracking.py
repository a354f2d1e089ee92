"""Experiment tracking: a run of the store logged to MLflow (the ``mlflow`` extra), after the
fact and from the store alone, so that a tracking server that is down or slow never touches a
round. What is logged is what the coordinator holds: the run's config as the sites received it
(params), each round's pooled and macro AUC, losses, calibration, ε and each site's AUC and
upload size (metrics, step = round), the exported adapter with its model card (artifacts).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedpeft.card import build_card, flatten, site_config_json
from fedpeft.common.errors import FedpeftError
from fedpeft.common.keys import Phase
from fedpeft.server.store import RunStore

#: MLflow's limits: a param key of 250 characters, a value of 6000; 100 params a batch.
_KEY_CHARS, _VALUE_CHARS, _BATCH = 250, 6000, 100


def require_mlflow() -> Any:
    """The ``mlflow`` module, or a clear error naming the extra to install."""
    try:
        import mlflow
    except ImportError:
        raise FedpeftError(
            "--mlflow needs MLflow: pip install 'fedpeft[mlflow]' (mlflow-skinny)"
        ) from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return mlflow


def _leaves(value: Any) -> Iterator[tuple[str, str]]:
    """Params: each leaf as MLflow keeps it, a string as itself, anything else as JSON."""
    for key, leaf in flatten(value):
        yield key, leaf if isinstance(leaf, str) else json.dumps(leaf)


def _file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite tracking database (MLflow
    would use ./mlruns of whatever folder the command ran in); the server's or the file
    store's own choice otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and len(uri) > 10:
        database = Path(uri[len("sqlite:///") :])
        return (database.parent.resolve() / "mlflow-artifacts").as_uri()
    return None


def log_run(
    store: RunStore,
    run_id: int,
    uri: str,
    *,
    export_dir: Path | None = None,
    experiment: str = "fedpeft",
) -> str:
    """Log run ``run_id`` of ``store`` to the MLflow tracking ``uri`` as one new MLflow run of
    ``experiment`` (created if missing); return the MLflow run's id."""
    require_mlflow()
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    if _file_store(uri):
        # MLflow 3 keeps its file store in maintenance mode and asks for this opt-in: the user
        # chose a folder.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    card = build_card(store, run_id)
    info = store.get_run(run_id)
    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(experiment, artifact_location=_artifact_location(uri))
        )
        run = client.create_run(
            experiment_id,
            run_name=f"fedpeft-run-{run_id}",
            tags={
                "fedpeft.run_id": str(run_id),
                "fedpeft.dataset": info.dataset,
                "fedpeft.method": info.method,
                "fedpeft.status": info.status,
                "fedpeft.model_fingerprint": info.model_fingerprint,
            },
        )
        mlflow_id = run.info.run_id
        params = [
            Param(key[:_KEY_CHARS], value[:_VALUE_CHARS])
            for key, value in _leaves(
                {
                    "config": json.loads(site_config_json(info.config_json) or info.config_json),
                    "dataset": info.dataset,
                    "method": info.method,
                    "base_model": info.model_name,
                    "trainable_params": info.trainable_params,
                    "delivered_round": card["run"]["delivered_round"],
                    "site_config_sha256": card["site_config_sha256"],
                }
            )
        ]
        for i in range(0, len(params), _BATCH):
            client.log_batch(mlflow_id, params=params[i : i + _BATCH])
        metrics = _metrics(store, run_id)
        for i in range(0, len(metrics), 1000):
            client.log_batch(
                mlflow_id,
                metrics=[Metric(k, v, t, s) for k, v, t, s in metrics[i : i + 1000]],
            )
        client.log_text(mlflow_id, json.dumps(card, indent=2), "model_card.json")
        if export_dir is not None:
            client.log_artifacts(mlflow_id, str(export_dir), artifact_path="adapter")
        # A snapshot of a run still going, or interrupted, is KILLED there: its fedpeft.status
        # tag says which.
        status = {"finished": "FINISHED", "failed": "FAILED"}.get(info.status, "KILLED")
        client.set_terminated(mlflow_id, status=status)
    except FedpeftError:
        raise
    except Exception as exc:  # MLflow raises its own and the transport's errors
        raise FedpeftError(f"MLflow at {uri}: could not log run {run_id}: {exc}") from exc
    return str(mlflow_id)


def _metrics(store: RunStore, run_id: int) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp in ms, step) of every finite number each round recorded."""
    out: list[tuple[str, float, int, int]] = []

    def add(key: str, value: float | None, when: int, step: int) -> None:
        if value is not None and value == value and abs(value) != float("inf"):
            out.append((key, float(value), when, step))

    for r in store.rounds(run_id):
        when = int(r.finished_at.timestamp() * 1000)
        for key in ("pooled_auc", "macro_auc", "val_loss", "epsilon"):
            add(key, getattr(r, key), when, r.round)
        add("test_loss", r.loss, when, r.round)  # the global state's, on the sites' test rows
        add("pooled_brier", r.pooled_brier, when, r.round)
        add("pooled_ece", r.pooled_ece, when, r.round)
        add("accepted", float(r.accepted), when, r.round)
        add("rejected", float(r.rejected), when, r.round)
    rounds = {r.round: int(r.finished_at.timestamp() * 1000) for r in store.rounds(run_id)}
    for s in store.site_results(run_id):
        when = rounds.get(s.round, 0)
        if s.phase == Phase.EVALUATE and s.status == "ok":
            add(f"auc/{s.site}", s.auc, when, s.round)
        if s.phase == Phase.TRAIN:
            add(f"bytes_up/{s.site}", float(s.bytes_up), when, s.round)
    return out
