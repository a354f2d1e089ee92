"""BitFit: only the bias terms of the base model train."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.common.methods.spec import ExportFormat, MethodSpec

if TYPE_CHECKING:
    import torch


def build(settings: None, base: torch.nn.Module) -> torch.nn.Module:
    """Only the bias terms train, plus the classification head."""
    for name, p in base.named_parameters():
        p.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    return base


SPEC = MethodSpec(
    name="bitfit",
    shares="the bias terms of every layer",
    build=build,
    default_lr=5e-3,
    export=ExportFormat.STATE,
)
