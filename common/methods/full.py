"""Full fine-tuning: every parameter trains and travels. The baseline that PEFT is measured
against; never the default."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.common.methods.spec import ExportFormat, MethodSpec

if TYPE_CHECKING:
    import torch


def build(settings: None, base: torch.nn.Module) -> torch.nn.Module:
    for p in base.parameters():
        p.requires_grad_(True)
    return base


SPEC = MethodSpec(
    name="full",
    shares="every weight of the model (the baseline, never the default)",
    build=build,
    # Every weight moves: far smaller steps than any PEFT method.
    default_lr=5e-5,
    export=ExportFormat.STATE,
)
