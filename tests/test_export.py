"""`fedpeft export`: what it writes loads with peft's own loader (or ours) and predicts the same."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.cli import main
from fedpeft.client.trainer import Encoded, predict
from fedpeft.common.config import RunConfig, load_config
from fedpeft.common.errors import FingerprintMismatch, ModelError
from fedpeft.common.export import MANIFEST, export_state, load_export
from fedpeft.common.methods import (
    ExportFormat,
    build_model,
    enable_prefix_tuning,
    get_spec,
    load_shared_state,
    method_names,
    shared_state,
)
from fedpeft.common.model import default_model_dir, model_fingerprint
from fedpeft.common.tensors import to_numpy
from fedpeft.server.checkpoints import seal_state, write_store_key
from fedpeft.server.store import RoundResult, open_store

CPU = torch.device("cpu")


def _trained_state(cfg: RunConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A model whose shared state is far from its init, as after federated training."""
    model = build_model(cfg.model, cfg.method, dropout=0.0, seed=cfg.seed)
    gen = torch.Generator().manual_seed(0)
    state = {
        name: t + 0.05 * torch.randn(t.shape, generator=gen)
        for name, t in shared_state(model).items()
    }
    load_shared_state(model, state)
    return model, state


def _fingerprint() -> str:
    return model_fingerprint(str(default_model_dir()))


@pytest.mark.parametrize("method", method_names())
def test_export_loads_with_the_ecosystems_tools_and_predicts_the_same(
    tmp_path: Path, rows: Encoded, method: str
) -> None:
    cfg = load_config(overrides={"method.name": method, "seed": 3})
    model, state = _trained_state(cfg)
    expected = predict(model, rows, CPU)[0]
    out = tmp_path / "export"
    export_state(cfg, state, out, run_id=7, round=2, fingerprint=_fingerprint())
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["run_id"], manifest["round"], manifest["method"]) == (7, 2, method)
    if get_spec(method).export is ExportFormat.PEFT:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=2)
        loaded = PeftModel.from_pretrained(base, str(out))
        if method == "prefix":
            enable_prefix_tuning(loaded)
        assert np.allclose(predict(loaded, rows, CPU)[0], expected, atol=1e-6)
    else:
        assert not (out / "adapter_config.json").exists()
    # Our own loader gives the same predictions for every method.
    assert np.allclose(predict(load_export(out), rows, CPU)[0], expected, atol=1e-6)


def test_export_refuses_another_base_model(tmp_path: Path) -> None:
    db = "postgresql+psycopg://u:s3cret-pw@127.0.0.1/x"
    cfg = load_config(overrides={"method.name": "bitfit", "db": db})
    _, state = _trained_state(cfg)
    with pytest.raises(FingerprintMismatch, match="not the run's"):
        export_state(cfg, state, tmp_path / "x", run_id=1, round=1, fingerprint="sha256:other")
    out = tmp_path / "ok"
    export_state(cfg, state, out, run_id=1, round=1, fingerprint=_fingerprint())
    manifest = json.loads((out / MANIFEST).read_text())
    # The manifest holds the site config (what sites trained with) and its hash, no store.
    assert manifest["config"] == json.loads(cfg.for_sites().to_json())
    assert manifest["config_hash"] == cfg.for_sites().config_hash()
    assert all(b"s3cret-pw" not in p.read_bytes() for p in out.iterdir())
    (out / MANIFEST).write_text(json.dumps({**manifest, "base_model_fingerprint": "sha256:x"}))
    with pytest.raises(FingerprintMismatch, match="not the base model"):
        load_export(out)


def test_cli_exports_the_delivered_round(
    tmp_path: Path, rows: Encoded, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(overrides={"method.name": "lora", "seed": 3})
    model, good = _trained_state(cfg)
    expected = predict(model, rows, CPU)[0]
    worse = {name: t * 0 for name, t in good.items()}
    db = f"sqlite:///{tmp_path / 'r.db'}"
    store = open_store(db)
    run_id = store.create_run(
        config_json=cfg.to_json(),
        dataset="heart",
        method="lora",
        model_name="m",
        model_fingerprint=_fingerprint(),
        trainable_params=1,
        total_params=1,
        seed=3,
    )
    t = datetime(2026, 1, 1)
    key = write_store_key(tmp_path / "store.key")
    # Round 1 has the lower validation loss, so it is the delivered state, not the last one.
    for rnd, state, val_loss in ((1, good, 0.4), (2, worse, 0.9)):
        result = RoundResult(rnd, t, t, 1.0, 0.8, 0.8, 0.5, 1, 0, True, val_loss=val_loss)
        store.add_round(run_id, result, [], seal_state(key, run_id, rnd, to_numpy(state)))
    store.finish_run(run_id, status="finished", wall_seconds=1.0)
    store.close()

    out = tmp_path / "adapter"
    # Without the store key nothing can be exported (no DB.key beside it, none in the env).
    assert main(["export", "--db", db, "--out", str(out)]) == 2
    assert "no key for the checkpoints" in capsys.readouterr().err
    wrong = write_store_key(tmp_path / "wrong.key")
    assert wrong != key
    args = ["export", "--db", db, "--out", str(out), "--store-key-file"]
    assert main([*args, str(tmp_path / "wrong.key")]) == 2
    assert "does not open with this store key" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "store.key")]) == 0
    assert "global state of round 1" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["round"] == 1
    # The model card: Hugging Face metadata, and the round the export holds.
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-classification" in card
    assert "this card describes round 1" in card and _fingerprint() in card
    assert np.allclose(predict(load_export(out), rows, CPU)[0], expected, atol=1e-6)
    # An existing export is never overwritten.
    assert main([*args, str(tmp_path / "store.key")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    # --quantize int8 adds the int8 model for inference.
    small = tmp_path / "int8"
    quantized = ["export", "--db", db, "--out", str(small), "--quantize", "int8"]
    assert main([*quantized, "--store-key-file", str(tmp_path / "store.key")]) == 0
    assert "fedpeft_int8.safetensors" in capsys.readouterr().out
    assert np.abs(predict(load_export(small, quantized=True), rows, CPU)[0] - expected).max() < 0.05


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_an_int8_export_is_a_quarter_of_the_bytes_and_predicts_nearly_the_same(
    tmp_path: Path, rows: Encoded, method: str
) -> None:
    from fedpeft.common.export import INT8_FILE
    from fedpeft.common.quantize import Int8Linear

    cfg = load_config(overrides={"method.name": method, "seed": 3})
    model, state = _trained_state(cfg)
    out = tmp_path / "export"
    files = export_state(
        cfg, state, out, run_id=7, round=2, fingerprint=_fingerprint(), quantize="int8"
    )
    assert out / INT8_FILE in files
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert (out / INT8_FILE).stat().st_size < 0.3 * fp32_bytes
    loaded = load_export(out, quantized=True)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 37
    expected, got = predict(load_export(out), rows, CPU)[0], predict(loaded, rows, CPU)[0]
    assert np.abs(got - expected).max() < 0.05
    assert not np.array_equal(got, expected)  # it is the int8 model, not the fp32 one
    # An export without it says so; a method that trained the base weights is refused.
    plain = tmp_path / "plain"
    export_state(cfg, state, plain, run_id=7, round=2, fingerprint=_fingerprint())
    with pytest.raises(ModelError, match="no int8 model; export with --quantize int8"):
        load_export(plain, quantized=True)


def test_an_int8_export_of_full_fine_tuning_is_refused(tmp_path: Path) -> None:
    cfg = load_config(overrides={"method.name": "full"})
    with pytest.raises(ModelError, match="method 'full' trained base weights"):
        export_state(
            cfg, {}, tmp_path, run_id=1, round=1, fingerprint=_fingerprint(), quantize="int8"
        )
