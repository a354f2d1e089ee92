"""PEFT method registry: name -> builder returning the model with exactly the shared parameters
trainable.

The shared state of a method is the set of its trainable parameters, by name: what a site
uploads (as a delta) and what the coordinator aggregates. The classification head is always part
of it. Every base weight stays frozen and bit-identical.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.common.config import MethodConfig, ModelConfig
from fedpeft.common.errors import ConfigError, ModelError
from fedpeft.common.model import load_base_model

Builder = Callable[[MethodConfig, torch.nn.Module], torch.nn.Module]

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register a method builder under ``name``; a second registration of a name is refused."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"PEFT method {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def build_method(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``base`` with the configured method. Only the shared parameters require grad."""
    try:
        builder = _REGISTRY[cfg.name]
    except KeyError:
        raise ConfigError(
            f"method.name: unknown method {cfg.name!r}; known: {', '.join(method_names())}"
        ) from None
    return builder(cfg, base)


def shared_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The shared (trainable) parameters by name, detached copies on the CPU in fp32."""
    return {
        name: p.detach().to("cpu", torch.float32).clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_shared_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's shared parameters; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"shared state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"shared state {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}"
                )
            p.copy_(state[name].to(p.device, p.dtype))


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParameterCount(trainable, total)


# -- methods -------------------------------------------------------------------------------------


@register("lora")
def _lora(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, TaskType

    lora = cfg.lora
    peft_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    return _peft(base, peft_cfg)


def _peft(base: torch.nn.Module, peft_cfg: Any) -> torch.nn.Module:
    from peft import get_peft_model

    with warnings.catch_warnings():
        # transformers 5 deprecates is_gradient_checkpointing, which peft still calls.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, peft_cfg)


def build_model(
    model_cfg: ModelConfig, method_cfg: MethodConfig, dropout: float, seed: int
) -> torch.nn.Module:
    """The base model with a fresh head (init fixed by ``seed``), wrapped by the PEFT method."""
    return build_method(method_cfg, load_base_model(model_cfg, dropout, seed))


@register("ia3")
def _ia3(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """(IA)³: learned scaling vectors on keys, values and the feed-forward inputs (peft's
    defaults for the model type), plus the head."""
    from peft import IA3Config, TaskType

    return _peft(base, IA3Config(task_type=TaskType.SEQ_CLS))


@register("bitfit")
def _bitfit(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """BitFit: only the bias terms train, plus the classification head."""
    for name, p in base.named_parameters():
        p.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    return base


@register("full")
def _full(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Full fine-tuning: every parameter trains and travels. The baseline PEFT is measured
    against; never the default."""
    for p in base.parameters():
        p.requires_grad_(True)
    return base


@register("prompt")
def _prompt(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Prompt tuning: ``num_virtual_tokens`` soft-prompt vectors prepended to the input
    embeddings, started from random vectors or from the embeddings of ``init_text``'s tokens."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    prompt = cfg.prompt
    from_text = prompt.init == "text"
    return _peft(
        base,
        PromptTuningConfig(
            task_type=TaskType.SEQ_CLS,
            num_virtual_tokens=prompt.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=prompt.init_text if from_text else None,
            # The tokenizer sits next to the weights: the packaged model dir or the user's own.
            tokenizer_name_or_path=str(getattr(base, "name_or_path", "")) if from_text else None,
        ),
    )


@register("prefix")
def _prefix(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Prefix tuning: ``num_virtual_tokens`` learned key and value vectors prepended in every
    attention layer (peft's prefix encoder), made to reach the attention under transformers 5
    and checked to change the model's output (see :func:`enable_prefix_tuning`)."""
    from peft import PrefixTuningConfig, TaskType

    model = _peft(
        base,
        PrefixTuningConfig(
            task_type=TaskType.SEQ_CLS, num_virtual_tokens=cfg.prefix.num_virtual_tokens
        ),
    )
    enable_prefix_tuning(model)
    return model


def enable_prefix_tuning(model: torch.nn.Module) -> torch.nn.Module:
    """Make a peft prefix-tuning model really use its prefix; refuse a model that ignores it.

    peft 0.21 hands the prefix to the transformers model as ``past_key_values`` and refuses to
    run ("Model does not support past key values") when the model's ``forward`` does not name
    that argument. transformers 5 renamed it ``cache`` (the old name still works through a
    deprecation shim that ``inspect.signature`` does not show). This gives the wrapped model a
    ``forward`` that takes ``past_key_values`` and passes it on as ``cache``; it does nothing
    when the model already takes ``past_key_values``. Because a model without a key/value cache
    (MPNet, for one) would then silently drop the prefix, the prefix is perturbed once on a
    probe input and the output must change, or :class:`ModelError` is raised.

    Call it on a model loaded with ``peft.PeftModel.from_pretrained`` too (``fedpeft export``
    says so). Returns ``model``.
    """
    top: Any = model.base_model
    if "past_key_values" not in inspect.signature(top.forward).parameters:
        inner = top.forward

        def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
            return inner(*args, cache=past_key_values, **kwargs)

        top.forward = forward
    _require_prefix_effect(model)
    return model


def _require_prefix_effect(model: Any) -> None:
    embedding = model.prompt_encoder[model.active_adapter].embedding.weight
    ids = torch.arange(1, 6, device=embedding.device).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            embedding.add_(1.0)
            after = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            embedding.sub_(1.0)
    finally:
        model.train(was_training)
    if torch.allclose(before, after):
        kind = getattr(model.config, "model_type", type(model.base_model).__name__)
        raise ModelError(
            f"prefix tuning has no effect on model type {kind!r}: its attention does not take "
            "the prefix keys and values (no key/value cache); choose another method"
        )


class BottleneckAdapter(torch.nn.Module):
    """x + up(GELU(down(x))), with ``up`` zero-initialized so that a new adapter is the
    identity and the adapted model starts equal to the base model (Houlsby et al., 2019)."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(width, bottleneck)
        self.up = torch.nn.Linear(bottleneck, width)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.nn.functional.gelu(self.down(x)))


class Adapted(torch.nn.Module):
    """A frozen output projection followed by its bottleneck adapter."""

    def __init__(self, projection: torch.nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.projection = projection
        self.adapter = BottleneckAdapter(projection.out_features, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.projection(x))


#: Where adapters go in a BERT-style encoder layer: the attention block's output projection and
#: the feed-forward block's output projection (before dropout, residual and LayerNorm).
ADAPTER_SITES = {
    "attention": re.compile(r"layer\.\d+\.attention\.output\.dense$"),
    "ffn": re.compile(r"layer\.\d+\.output\.dense$"),
}


@register("adapter")
def _adapter(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Bottleneck adapters after the attention and/or feed-forward output projection of every
    layer, plus the head; every base weight frozen."""
    for p in base.parameters():
        p.requires_grad_(False)
    targets = [
        name
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(ADAPTER_SITES[where].search(name) for where in cfg.adapter.placement)
    ]
    if not targets:
        raise ModelError(
            f"adapter: no {' or '.join(cfg.adapter.placement)} output projection found in model "
            f"type {getattr(base.config, 'model_type', '?')!r} (expected BERT-style layer names)"
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name)
        setattr(parent, child, Adapted(getattr(parent, child), cfg.adapter.bottleneck))
    for name, p in base.named_parameters():
        if ".adapter." in name or name.startswith("classifier."):
            p.requires_grad_(True)
    return base
