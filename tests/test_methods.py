"""PEFT methods on the real packaged base model (all-MiniLM-L6-v2), on the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.client.trainer import Encoded, class_weights, lr_factor, predict, train_local
from fedpeft.common.config import (
    AdapterConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    PrefixConfig,
    PromptConfig,
    TrainConfig,
)
from fedpeft.common.errors import ConfigError, ModelError
from fedpeft.common.methods import (
    build_method,
    build_model,
    count_parameters,
    load_shared_state,
    method_names,
    shared_state,
)
from fedpeft.common.model import load_tokenizer

CPU = torch.device("cpu")
#: Every method, named here because each has its own expected parameter count below.
METHODS = ("lora", "prefix", "prompt", "ia3", "adapter", "bitfit", "full")


def _model(method: str = "lora", seed: int = 0) -> torch.nn.Module:
    return build_model(ModelConfig(), MethodConfig(name=method), dropout=0.0, seed=seed)


def test_every_method_is_tested_and_unknown_names_are_refused() -> None:
    assert sorted(METHODS) == sorted(method_names())
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_model(ModelConfig(), MethodConfig(name="nope"), 0.0, 0)


def _expected_trainable(method: str, cfg: object) -> int:
    """The shared parameter count of each method, from the model's shape alone."""
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers  # type: ignore[attr-defined]
    inner = cfg.intermediate_size  # type: ignore[attr-defined]
    head = h * 2 + 2
    if method == "prefix":  # a key and a value vector per virtual token in every layer
        return PrefixConfig().num_virtual_tokens * n_layers * 2 * h + head
    if method == "prompt":  # one input embedding per virtual token
        return PromptConfig().num_virtual_tokens * h + head
    if method == "adapter":  # down (h -> b, bias b) and up (b -> h, bias h) per placement
        b, places = AdapterConfig().bottleneck, len(AdapterConfig().placement)
        return n_layers * places * (2 * h * b + b + h) + head
    if method == "full":  # embeddings, layers (4 attention projections, FFN, 2 LayerNorms), pooler
        vocab, positions = cfg.vocab_size, cfg.max_position_embeddings  # type: ignore[attr-defined]
        types = cfg.type_vocab_size  # type: ignore[attr-defined]
        embeddings = (vocab + positions + types) * h + 2 * h
        layer = 4 * (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h
        return embeddings + n_layers * layer + (h * h + h) + head
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
    if method == "full":
        assert counts.trainable == counts.total
        return
    assert counts.fraction < 0.01
    names = shared_state(model).keys()
    marker = {
        "lora": "lora_",
        "prefix": "prompt_encoder",
        "prompt": "prompt_encoder",
        "ia3": "ia3_",
        "adapter": ".adapter.",
        "bitfit": ".bias",
    }[method]
    assert all(marker in n or "classifier" in n for n in names)
    assert any("classifier" in n for n in names) and any(marker in n for n in names)


def test_lora_default_count() -> None:
    assert count_parameters(_model("lora")).trainable == 74_498


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_outputs_and_leaves_base_weights(rows: Encoded, method: str) -> None:
    model = _model(method)
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    assert (len(base_before) == 0) == (method == "full")
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


def _scores_without_method(seed: int, rows: Encoded) -> np.ndarray:
    """The same base model and head init, with no method applied."""
    from fedpeft.common.model import load_base_model

    return predict(load_base_model(ModelConfig(), 0.0, seed), rows, CPU)[0]


def test_adapter_starts_as_the_base_model(rows: Encoded) -> None:
    # The zero-initialized up-projection makes every new adapter the identity.
    assert np.allclose(predict(_model("adapter"), rows, CPU)[0], _scores_without_method(0, rows))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_are_not_silently_ignored(rows: Encoded, method: str) -> None:
    """Before any training, the learned vectors already change the output: they reach the
    attention (prefix) or the input (prompt). Then a loss gradient reaches them."""
    model = _model(method)
    assert not np.allclose(predict(model, rows, CPU)[0], _scores_without_method(0, rows))
    batch = {
        "input_ids": torch.tensor([rows.ids[0]]),
        "attention_mask": torch.ones(1, len(rows.ids[0]), dtype=torch.long),
        "labels": torch.tensor([1]),
    }
    model.train()
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "prompt_encoder" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _tiny(architecture: str, **extra: int) -> torch.nn.Module:
    """A small classifier of a transformers ``architecture`` (``Llama``, ``MPNet``) with random
    weights: no download."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{architecture}Config")(
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=100,
        num_labels=2,
        **extra,
    )
    return getattr(transformers, f"{architecture}ForSequenceClassification")(config)


def _tiny_decoder() -> torch.nn.Module:
    """Prefix tuning must also work on a decoder, whose cache holds grouped key/value heads."""
    return _tiny("Llama", num_key_value_heads=2, pad_token_id=0)


def test_prefix_works_on_a_decoder() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = (ids != 0).long()
    base = _tiny_decoder().eval()
    with torch.no_grad():
        without = base(input_ids=ids, attention_mask=mask).logits
    model = build_method(MethodConfig(name="prefix"), base)
    model.eval()
    with_prefix = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(with_prefix, without)
    # Padding does not leak into the result: the short row alone scores the same.
    alone = model(input_ids=ids[1:, :2], attention_mask=mask[1:, :2]).logits
    assert torch.allclose(alone, with_prefix[1:], atol=1e-5)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss
    loss.backward()
    (prefix,) = [p for n, p in model.named_parameters() if "prompt_encoder" in n]
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_prefix_refuses_a_model_that_would_ignore_it() -> None:
    """MPNet's attention has no key/value cache: the prefix would silently do nothing."""
    with pytest.raises(ModelError, match="no effect on model type 'mpnet'"):
        build_method(MethodConfig(name="prefix"), _tiny("MPNet"))


def test_adapter_refuses_a_model_without_its_projections() -> None:
    with pytest.raises(
        ModelError, match="no attention or ffn output projection found in model type .llama."
    ):
        build_method(MethodConfig(name="adapter"), _tiny_decoder())


def test_prompt_init_from_text_uses_the_texts_token_embeddings() -> None:
    model = build_model(
        ModelConfig(),
        MethodConfig(
            name="prompt", prompt=PromptConfig(num_virtual_tokens=6, init_text="chest pain")
        ),
        dropout=0.0,
        seed=0,
    )
    tokenizer = load_tokenizer(ModelConfig())
    ids = tokenizer("chest pain")["input_ids"]  # [CLS] chest pain [SEP]
    words = model.get_input_embeddings().weight  # type: ignore[operator]
    prompt = next(p for n, p in model.named_parameters() if "prompt_encoder" in n)
    # peft repeats the text's tokens to fill the virtual tokens.
    expected = words[[ids[i % len(ids)] for i in range(6)]]
    assert torch.equal(prompt.detach(), expected.detach())


def test_balanced_class_weights_are_n_over_twice_the_class_count() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), CPU)
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2])
    assert class_weights(np.array([0, 0]), CPU).tolist() == pytest.approx([1.0, 1.0])  # no 1s


def _moved(
    rows: Encoded, span: tuple[float, float] = (0.0, 1.0), **train: object
) -> tuple[float, np.ndarray]:
    """The trained shared state's distance from where it started, and the trained scores."""
    model = _model("lora")
    start = {n: t.clone() for n, t in shared_state(model).items()}
    cfg = TrainConfig(lr=5e-3, batch_size=8, **train)  # type: ignore[arg-type]
    train_local(model, rows, rows, cfg, 2, CPU, seed=0, span=span)
    end = shared_state(model)
    distance = float(sum(((end[n] - start[n]) ** 2).sum() for n in start) ** 0.5)
    return distance, predict(model, rows, CPU)[0]


def test_fedprox_keeps_the_update_near_the_global_state(rows: Encoded) -> None:
    plain, _ = _moved(rows)
    prox, _ = _moved(rows, prox_mu=10.0)
    assert prox < 0.8 * plain, (prox, plain)


def test_balanced_weighting_raises_the_rare_class_s_scores(rows: Encoded) -> None:
    rare = Encoded(rows.ids, np.where(np.arange(len(rows)) % 5 == 0, 1, 0))  # 1 in 5 positive
    _, plain = _moved(rare)
    _, balanced = _moved(rare, class_weight="balanced")
    assert balanced.mean() > plain.mean() + 0.02, (balanced.mean(), plain.mean())


def test_the_rate_schedule_warms_up_then_decays_over_the_budget() -> None:
    assert lr_factor(0.3, 0.0, "none") == 1.0
    assert lr_factor(0.05, 0.1, "none") == pytest.approx(0.5)  # halfway through the warm-up
    assert lr_factor(0.5, 0.1, "none") == 1.0
    assert lr_factor(0.25, 0.0, "linear") == pytest.approx(0.75)
    assert lr_factor(0.5, 0.0, "cosine") == pytest.approx(0.5)
    assert lr_factor(1.0, 0.0, "cosine") == pytest.approx(0.0)
    assert lr_factor(0.05, 0.1, "cosine") == pytest.approx(0.5 * 0.5 * (1 + np.cos(np.pi * 0.05)))


def test_training_takes_the_scheduled_rate_for_its_share_of_the_budget(rows: Encoded) -> None:
    plain, _ = _moved(rows)
    # The last 2 % of a linearly decayed budget, and the first 2 % of a long warm-up: each step
    # takes at most 2 % of the rate, so the state barely moves; the same span undecayed moves
    # as far as the whole budget does.
    late, _ = _moved(rows, span=(0.98, 1.0), decay="linear")
    early, _ = _moved(rows, span=(0.0, 0.02), warmup=0.5)
    undecayed, _ = _moved(rows, span=(0.98, 1.0))
    assert late < 0.2 * plain and early < 0.2 * plain, (late, early, plain)
    assert undecayed == pytest.approx(plain)


@pytest.mark.parametrize("decay", ["none", "linear"])
def test_a_site_s_round_trains_at_its_round_s_share_of_the_schedule(
    rows: Encoded, decay: str
) -> None:
    import copy

    from fedpeft.client.app import SiteSession, _base_model, handle_train
    from fedpeft.common.config import load_config
    from fedpeft.common.tensors import to_numpy

    cfg = load_config(overrides={"train.decay": decay, "federation.rounds": 10}).for_sites()
    base = _base_model(cfg, CPU)
    session = SiteSession("A", rows, rows, rows, base, fingerprint="f", device=CPU)
    state = to_numpy(shared_state(build_method(cfg.method, copy.deepcopy(base))))

    def moved(rnd: int) -> float:
        delta, _ = handle_train(cfg, rnd, "f", state, session)
        return float(np.sqrt(sum(float((d**2).sum()) for d in delta.values())))

    # Round 10 of 10 is the last tenth of the budget: a linear decay gives it at most a tenth
    # of the rate round 1 had; without one, both rounds step alike.
    ratio = moved(10) / moved(1)
    assert ratio < 0.2 if decay == "linear" else ratio > 0.5, ratio


def _session_and_state(rows: Encoded, val: Encoded, **federation: object) -> tuple[Any, Any, Any]:
    import copy

    from fedpeft.client.app import SiteSession, _base_model
    from fedpeft.common.config import load_config
    from fedpeft.common.tensors import to_numpy

    overrides = {f"federation.{k}": v for k, v in federation.items()}
    cfg = load_config(overrides={"train.dropout": 0.0, **overrides}).for_sites()
    base = _base_model(cfg, CPU)
    session = SiteSession("A", rows, val, rows, base, fingerprint="f", device=CPU)
    trained = build_method(cfg.method, copy.deepcopy(base))
    train_local(trained, rows, rows, TrainConfig(lr=5e-3, batch_size=8), 1, CPU, seed=0)
    return cfg, session, to_numpy(shared_state(trained))


@pytest.mark.parametrize("part", ["head", "lora-b"])
def test_personalizing_trains_only_its_part_and_lowers_the_validation_loss(
    rows: Encoded, part: str
) -> None:
    from fedpeft.client.app import _model_with, personalize
    from fedpeft.common.config import PERSONAL_MARKERS
    from fedpeft.common.tensors import to_numpy

    cfg, session, state = _session_and_state(rows, rows, personalize=part)
    model = _model_with(session, cfg, state)
    _, before = predict(model, rows, CPU)
    epochs = personalize(model, cfg, session)
    _, after = predict(model, rows, CPU)
    for p in model.parameters():
        p.requires_grad_(True)
    now = to_numpy({n: p.detach() for n, p in model.named_parameters() if n in state})
    changed = {n for n in state if not np.array_equal(now[n], state[n])}
    assert epochs >= 1 and after < before, (epochs, after, before)
    assert changed and all(PERSONAL_MARKERS[part] in n for n in changed), sorted(changed)[:3]


def test_personalizing_keeps_the_global_part_when_no_epoch_helps_on_validation(
    rows: Encoded,
) -> None:
    from fedpeft.client.app import _model_with, personalize
    from fedpeft.common.tensors import to_numpy

    flipped = Encoded(rows.ids, 1 - rows.labels)  # what training learns, validation punishes
    cfg, session, state = _session_and_state(rows, flipped, personalize="head")
    model = _model_with(session, cfg, state)
    assert personalize(model, cfg, session) == 0
    for p in model.parameters():
        p.requires_grad_(True)
    now = to_numpy({n: p.detach() for n, p in model.named_parameters() if n in state})
    assert all(np.array_equal(now[n], state[n]) for n in state)
