"""Fine-tuning methods: a registry of :class:`MethodSpec`, one module per method, and what every
method shares (building the model, its shared state, counting parameters).

The shared state of a method is the set of its trainable parameters, by name: what a site
uploads (as a delta) and what the coordinator aggregates. The classification head is always part
of it. Every base weight stays frozen and bit-identical.

Importing this package registers the methods of :data:`BUILTIN` and imports no torch: the run
config and the CLI read the registry. The functions that need torch import it when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpeft.common.methods import adapter, bitfit, full, ia3, lora, prefix, prompt
from fedpeft.common.methods.prefix import enable_prefix_tuning
from fedpeft.common.methods.spec import (
    ExportFormat,
    MethodSpec,
    get_spec,
    method_names,
    register,
    specs,
)

if TYPE_CHECKING:
    import torch

    from fedpeft.common.config import MethodConfig, ModelConfig

__all__ = [
    "BUILTIN",
    "ExportFormat",
    "MethodSpec",
    "ParameterCount",
    "build_method",
    "build_model",
    "count_parameters",
    "enable_prefix_tuning",
    "get_spec",
    "load_shared_state",
    "method_names",
    "register",
    "shared_state",
    "specs",
]

#: The methods fedpeft ships, one module each, in the order the CLI, the docs and the
#: benchmarks list them. (Which one runs by default is ``MethodConfig.name``'s default.)
BUILTIN: tuple[MethodSpec[Any], ...] = (
    lora.SPEC,
    prefix.SPEC,
    prompt.SPEC,
    ia3.SPEC,
    adapter.SPEC,
    bitfit.SPEC,
    full.SPEC,
)
for _spec in BUILTIN:
    register(_spec)


def build_method(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``base`` with the configured method. Only the shared parameters require grad."""
    if cfg.mlm:  # a masked-language head beside the method, for an mlm stage
        from dataclasses import replace

        from fedpeft.common.methods import mlm

        return mlm.attach(build_method(replace(cfg, mlm=False), base))
    if cfg.compose:  # a staged run's methods, in one model
        from fedpeft.common.methods import compose

        return compose.build(cfg, base)
    spec = get_spec(cfg.name)
    settings = getattr(cfg, spec.name) if spec.config is not None else None
    return spec.build(settings, base)


def build_model(
    model_cfg: ModelConfig, method_cfg: MethodConfig, dropout: float, seed: int
) -> torch.nn.Module:
    """The base model with a fresh head (init fixed by ``seed``), wrapped by the PEFT method."""
    from fedpeft.common.model import load_base_model

    return build_method(method_cfg, load_base_model(model_cfg, dropout, seed))


def shared_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The shared (trainable) parameters by name, detached copies on the CPU in fp32."""
    import torch

    return {
        name: p.detach().to("cpu", torch.float32).clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_shared_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's shared parameters; names and shapes must match exactly."""
    import torch

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
