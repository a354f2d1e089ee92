"""PEFT methods on the real packaged base model (all-MiniLM-L6-v2), on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.client.trainer import Encoded, encode, predict, train_local
from fedpeft.common.config import LoraConfig, MethodConfig, ModelConfig, TrainConfig
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import (
    build_model,
    count_parameters,
    load_shared_state,
    method_names,
    register,
    shared_state,
)
from fedpeft.common.model import load_tokenizer

CPU = torch.device("cpu")
TEXTS = [
    "63 y male. typical angina. bp 145. chol 233.",
    "41 y female. atypical angina. bp 130. chol 204.",
    "67 y male. asymptomatic. bp 160. chol 286. exercise angina.",
    "37 y male. non-anginal. bp 130. chol 250.",
] * 4
LABELS = np.array([0, 0, 1, 0] * 4)


@pytest.fixture(scope="module")
def rows() -> Encoded:
    return encode(load_tokenizer(ModelConfig()), TEXTS, LABELS, 64)


METHODS = ("lora", "ia3", "bitfit")


def _model(method: str = "lora", seed: int = 0) -> torch.nn.Module:
    return build_model(ModelConfig(), MethodConfig(name=method), dropout=0.0, seed=seed)


def test_registry_refuses_duplicates_and_unknown_names() -> None:
    assert set(METHODS) <= set(method_names())
    with pytest.raises(ValueError, match="already registered"):
        register("lora")(lambda cfg, base: base)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_model(ModelConfig(), MethodConfig(name="nope"), 0.0, 0)


def _expected_trainable(method: str, cfg: object) -> int:
    """The shared parameter count of each method, from the model's shape alone."""
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers  # type: ignore[attr-defined]
    inner = cfg.intermediate_size  # type: ignore[attr-defined]
    head = h * 2 + 2
    if method == "lora":  # A (r x h) and B (h x r) on query and value in every layer
        lora = LoraConfig()
        return n_layers * len(lora.target_modules) * lora.r * (h + h) + head
    if method == "ia3":  # key and value outputs; inputs of attention.output and output.dense
        return n_layers * (h + h + h + inner) + head
    # bitfit: per layer q, k, v, attention.output, 2 LayerNorms, output.dense (h each) and the
    # intermediate (inner); the embeddings' LayerNorm and the pooler; the head's weight and bias.
    return n_layers * (7 * h + inner) + h + h + head


@pytest.mark.parametrize("method", METHODS)
def test_only_the_shared_parameters_train_and_match_the_formula(method: str) -> None:
    model = _model(method)
    counts = count_parameters(model)
    assert counts.trainable == _expected_trainable(method, model.config)
    assert counts.fraction < 0.01
    names = shared_state(model).keys()
    marker = {"lora": "lora_", "ia3": "ia3_", "bitfit": ".bias"}[method]
    assert all(marker in n or "classifier" in n for n in names)
    assert any("classifier" in n for n in names)


def test_lora_default_count() -> None:
    assert count_parameters(_model("lora")).trainable == 74_498


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_outputs_and_leaves_base_weights(rows: Encoded, method: str) -> None:
    model = _model(method)
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    scores_before, _ = predict(model, rows, CPU)
    train_local(model, rows, rows, TrainConfig(lr=5e-3, batch_size=8), 2, CPU, seed=0)
    scores_after, _ = predict(model, rows, CPU)
    assert not np.allclose(scores_before, scores_after, atol=1e-4)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_shared_state_round_trips_into_a_fresh_model(rows: Encoded, method: str) -> None:
    trained = _model(method, seed=0)
    train_local(trained, rows, rows, TrainConfig(lr=5e-3, batch_size=8), 1, CPU, seed=1)
    fresh = _model(method, seed=123)  # another head init: only the shared state can match them
    assert not np.allclose(predict(fresh, rows, CPU)[0], predict(trained, rows, CPU)[0])
    load_shared_state(fresh, shared_state(trained))
    assert np.array_equal(predict(fresh, rows, CPU)[0], predict(trained, rows, CPU)[0])


def test_load_shared_state_refuses_mismatch() -> None:
    model = _model()
    state = shared_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_shared_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        load_shared_state(model, {**state, name: torch.zeros(1)})


def test_training_is_deterministic_on_cpu(rows: Encoded) -> None:
    outs = []
    for _ in range(2):
        model = _model()
        train_local(model, rows, rows, TrainConfig(lr=5e-3, batch_size=8), 1, CPU, seed=7)
        outs.append(predict(model, rows, CPU)[0])
    assert np.array_equal(outs[0], outs[1])
