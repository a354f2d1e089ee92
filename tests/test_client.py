"""The ClientApp's message handling, called directly with real Flower messages (no network)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft.client.app import _handle
from fedpeft.common import crypto, keys
from fedpeft.common.config import RunConfig, load_config
from fedpeft.common.envelope import Expected, open_delta, sign_global
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.model import model_fingerprint, resolve_model_path
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.tensors import to_numpy

RUN_KEY = crypto.new_run_key()
COORDINATOR = crypto.new_identity()
SITE_KEY = crypto.new_identity()


def _site_file(folder: Path, rows: int = 40, bad_row: bool = False) -> Path:
    texts = [
        f"{50 + i % 20} y male. bp {120 + i}. {'asymptomatic' if i % 2 else 'no pain'}."
        for i in range(rows)
    ]
    if bad_row:
        texts[5] = " "
    path = folder / "site-x.csv"
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(rows)]}).to_csv(path, index=False)
    return path


def _state(cfg: RunConfig) -> dict:
    return to_numpy(shared_state(build_model(cfg.model, cfg.method, 0.0, cfg.seed)))


def _message(
    cfg: RunConfig, fingerprint: str, kind: str = "train", signer: object = COORDINATOR
) -> Message:
    signed = sign_global(
        _state(cfg),
        run_token="run-token",
        round=1,
        method=cfg.method.name,
        fingerprint=fingerprint,
        run_public=crypto.raw_public(RUN_KEY),
        coordinator=signer,  # type: ignore[arg-type]
    )
    config = ConfigRecord({keys.RUN_CONFIG_JSON: cfg.to_json(), keys.ROUND: 1})
    content = RecordDict({keys.GLOBAL: blob_record(signed), keys.CONFIG: config})
    return Message(content, dst_node_id=7, message_type=kind)


def _context(path: Path) -> Context:
    folder = path.parent / "keys"
    if not folder.exists():
        folder.mkdir()
        crypto.write_private_key(folder / "site.key", SITE_KEY)
        (folder / "coordinator.pub").write_text(crypto.public_openssh(COORDINATOR.public_key()))
    return Context(
        run_id=1,
        node_id=7,
        node_config={
            keys.NODE_DATA_PATH: str(path),
            keys.NODE_SITE: "site-x",
            keys.NODE_IDENTITY_KEY: str(folder / "site.key"),
            keys.NODE_COORDINATOR_KEY: str(folder / "coordinator.pub"),
        },
        state=RecordDict(),
        run_config={},
    )


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower stamps messages with the identity of the process's task; set one, as
    Flower's own in-process simulation does."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return load_config(
        overrides={"data.dataset": str(tmp_path), "model.max_length": 32, "device": "cpu"}
    )


def test_train_replies_with_a_sealed_delta_of_the_shared_state(
    tmp_path: Path, cfg: RunConfig
) -> None:
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = _handle(_message(cfg, fp), _context(path), "train")
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "ok" and info[keys.SITE] == "site-x"
    state = _state(cfg)
    expected = Expected(
        run_token="run-token",
        round=1,
        method="lora",
        fingerprint=fp,
        shapes={k: v.shape for k, v in state.items()},
        max_bytes=1 << 22,
    )
    sealed = from_blob_record(reply.content[keys.SEALED])
    opened = open_delta(sealed, expected, RUN_KEY, {"site-x": SITE_KEY.public_key()})
    delta = opened.delta
    assert opened.site_id == "site-x" and opened.num_examples > 0
    assert sum(v.size for v in delta.values()) == 74_498
    assert any(abs(v).max() > 0 for v in delta.values())
    metrics = reply.content[keys.METRICS]
    assert metrics[keys.N_TRAIN] > 0 and 0.0 <= metrics[keys.AUC] <= 1.0


def test_evaluate_replies_with_a_histogram_not_predictions(tmp_path: Path, cfg: RunConfig) -> None:
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = _handle(_message(cfg, fp, "evaluate"), _context(path), "evaluate")
    hist = reply.content[keys.HISTOGRAM]
    n_test = int(reply.content[keys.METRICS][keys.N_TEST])
    assert sum(hist[keys.HIST_POS]) + sum(hist[keys.HIST_NEG]) == n_test
    assert keys.SEALED not in reply.content


def test_a_global_state_not_signed_by_the_coordinator_is_refused(
    tmp_path: Path, cfg: RunConfig
) -> None:
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    forged = _message(cfg, fp, signer=crypto.new_identity())
    reply = _handle(forged, _context(path), "train")
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "error"
    assert "not signed by the coordinator's key" in info[keys.ERROR]
    assert keys.SEALED not in reply.content


def test_a_site_without_keys_is_a_clear_error(tmp_path: Path, cfg: RunConfig) -> None:
    path = _site_file(tmp_path)
    context = _context(path)
    del context.node_config[keys.NODE_IDENTITY_KEY]
    reply = _handle(_message(cfg, "sha256:x"), context, "train")
    assert reply.content[keys.CONFIG][keys.ERROR].startswith("KeyFileError")


def test_fingerprint_mismatch_is_refused(tmp_path: Path, cfg: RunConfig) -> None:
    path = _site_file(tmp_path)
    reply = _handle(_message(cfg, "sha256:" + "0" * 64), _context(path), "train")
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "error"
    assert "fingerprint mismatch" in info[keys.ERROR]
    assert keys.SEALED not in reply.content


def test_bad_site_data_reply_carries_no_local_detail(tmp_path: Path, cfg: RunConfig) -> None:
    path = _site_file(tmp_path, bad_row=True)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = _handle(_message(cfg, fp), _context(path), "train")
    error = reply.content[keys.CONFIG][keys.ERROR]
    assert error.startswith("DataError")
    assert str(tmp_path) not in error and "site-x.csv" not in error and "row" not in error
