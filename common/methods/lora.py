"""LoRA: a trained low-rank product A·B added to the chosen linear modules (the default method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpeft.common.methods._peft import peft_model
from fedpeft.common.methods.spec import ExportFormat, MethodSpec, failed

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation: A·B added to the chosen linear modules."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")


def check(lora: LoraConfig) -> list[str]:
    return failed(
        (lora.r >= 1, "method.lora.r: must be at least 1"),
        (lora.alpha >= 1, "method.lora.alpha: must be at least 1"),
        (0 <= lora.dropout < 1, "method.lora.dropout: must be in [0, 1)"),
        (len(lora.target_modules) > 0, "method.lora.target_modules: must not be empty"),
    )


def build(lora: LoraConfig, base: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    return peft_model(
        base,
        PeftLoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        ),
    )


SPEC = MethodSpec(
    name="lora",
    shares="low-rank A·B updates of the chosen linear modules (query and value by default)",
    build=build,
    default_lr=5e-3,
    export=ExportFormat.PEFT,
    config=LoraConfig,
    check=check,
)
