"""Hybrid fine-tuning: LoRA on the lower encoder layers plus the top N layers trained fully
(``method.lora.full_layers``), shared as one state and exported for peft's own loader."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.client.trainer import Encoded, predict
from fedpeft.common.config import RunConfig, build_config, load_config
from fedpeft.common.errors import ConfigError, ModelError
from fedpeft.common.export import export_state, load_export
from fedpeft.common.methods import build_model, count_parameters, load_shared_state, shared_state
from fedpeft.common.model import default_model_dir, model_fingerprint

CPU = torch.device("cpu")
LAYER = 1_774_464  # one MiniLM encoder layer: attention, feed-forward, both LayerNorms
LORA_PER_MODULE = 8 * 384 * 2  # rank 8: A (8 x 384) and B (384 x 8)
HEAD = 384 * 2 + 2


def _cfg(full_layers: int) -> RunConfig:
    return build_config({"seed": 3, "method": {"lora": {"full_layers": full_layers}}})


def test_the_top_layer_trains_fully_and_lora_the_rest() -> None:
    model = build_model(_cfg(1).model, _cfg(1).method, dropout=0.0, seed=3)
    state = shared_state(model)
    # query and value of layers 0-4 by LoRA, layer 5 whole, the head.
    assert count_parameters(model).trainable == LAYER + 10 * LORA_PER_MODULE + HEAD
    assert not any(".layer.5." in k and "lora_" in k for k in state)
    assert sum(v.numel() for k, v in state.items() if ".layer.5." in k) == LAYER
    two = build_model(_cfg(2).model, _cfg(2).method, dropout=0.0, seed=3)
    assert count_parameters(two).trainable == 2 * LAYER + 8 * LORA_PER_MODULE + HEAD


def test_training_moves_the_trained_copy_and_never_the_base() -> None:
    cfg = _cfg(1)
    model = build_model(cfg.model, cfg.method, dropout=0.0, seed=3)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = shared_state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]] * 2)
    for _ in range(2):
        loss = model(input_ids=ids, labels=torch.tensor([1, 0])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = shared_state(model)
    layer5 = [k for k in after if ".layer.5." in k and k.endswith(".weight")]
    assert layer5 and all(not torch.equal(after[k], before[k]) for k in layer5)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_hybrid_export_loads_with_peft_and_predicts_the_same(
    tmp_path: Path, rows: Encoded
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = _cfg(1)
    model = build_model(cfg.model, cfg.method, dropout=0.0, seed=3)
    gen = torch.Generator().manual_seed(0)
    state = {
        k: t + 0.02 * torch.randn(t.shape, generator=gen) for k, t in shared_state(model).items()
    }
    load_shared_state(model, state)
    expected = predict(model, rows, CPU)[0]
    fingerprint = model_fingerprint(str(default_model_dir()))
    export_state(cfg, state, tmp_path, run_id=1, round=1, fingerprint=fingerprint)
    base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=2)
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    assert np.allclose(predict(loaded, rows, CPU)[0], expected, atol=1e-6)
    assert np.allclose(predict(load_export(tmp_path), rows, CPU)[0], expected, atol=1e-6)


def test_full_layers_are_checked() -> None:
    with pytest.raises(ConfigError, match="method.lora.full_layers: must be 0"):
        _cfg(-1)
    cfg = load_config()
    every = replace(cfg.method, lora=replace(cfg.method.lora, full_layers=6))
    with pytest.raises(ModelError, match="6 leaves none of the base model's 6 layers to LoRA"):
        build_model(cfg.model, every, dropout=0.0, seed=0)
