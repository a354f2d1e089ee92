"""PEFT method registry: name -> builder returning the model with exactly the shared parameters
trainable.

The shared state of a method is the set of its trainable parameters, by name: what a site
uploads (as a delta) and what the coordinator aggregates. The classification head is always part
of it. Every base weight stays frozen and bit-identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedpeft.common.config import MethodConfig, ModelConfig
from fedpeft.common.errors import ConfigError
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
    from peft import LoraConfig, TaskType, get_peft_model

    lora = cfg.lora
    peft_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
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
    from peft import IA3Config, TaskType, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, IA3Config(task_type=TaskType.SEQ_CLS))


@register("bitfit")
def _bitfit(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """BitFit: only the bias terms train, plus the classification head."""
    for name, p in base.named_parameters():
        p.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    return base
