"""Bottleneck adapters (Houlsby et al., 2019) after the chosen sublayers of every layer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpeft.common.errors import ModelError
from fedpeft.common.methods.spec import ExportFormat, MethodSpec, failed

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapters (down, GELU, up, residual) after the chosen sublayers of each layer."""

    bottleneck: int = 16
    #: ``attention`` (after the attention output projection) and/or ``ffn`` (after the
    #: feed-forward output projection).
    placement: tuple[str, ...] = ("attention", "ffn")


#: Where adapters go in a BERT-style encoder layer: the attention block's output projection and
#: the feed-forward block's output projection (before dropout, residual and LayerNorm).
ADAPTER_SITES = {
    "attention": re.compile(r"layer\.\d+\.attention\.output\.dense$"),
    "ffn": re.compile(r"layer\.\d+\.output\.dense$"),
}


def check(adapter: AdapterConfig) -> list[str]:
    return failed(
        (adapter.bottleneck >= 1, "method.adapter.bottleneck: must be at least 1"),
        (
            len(adapter.placement) > 0 and set(adapter.placement) <= set(ADAPTER_SITES),
            "method.adapter.placement: a non-empty list of attention and/or ffn",
        ),
    )


def build(adapter: AdapterConfig, base: torch.nn.Module) -> torch.nn.Module:
    """Bottleneck adapters after the attention and/or feed-forward output projection of every
    layer, plus the head; every base weight frozen."""
    import torch

    # The layers subclass torch.nn.Module: imported here so that the config stays torch-free.
    from fedpeft.common.methods.adapter_layers import Adapted

    for p in base.parameters():
        p.requires_grad_(False)
    targets = [
        name
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(ADAPTER_SITES[where].search(name) for where in adapter.placement)
    ]
    if not targets:
        raise ModelError(
            f"adapter: no {' or '.join(adapter.placement)} output projection found in model "
            f"type {getattr(base.config, 'model_type', '?')!r} (expected BERT-style layer names)"
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name)
        setattr(parent, child, Adapted(getattr(parent, child), adapter.bottleneck))
    for name, p in base.named_parameters():
        if ".adapter." in name or name.startswith("classifier."):
            p.requires_grad_(True)
    return base


SPEC = MethodSpec(
    name="adapter",
    shares="bottleneck adapters after each layer's attention and/or feed-forward output",
    build=build,
    default_lr=5e-3,
    export=ExportFormat.STATE,
    config=AdapterConfig,
    check=check,
)
