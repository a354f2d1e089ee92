"""The one call into peft's ``get_peft_model`` that every peft-backed method makes."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def peft_model(base: torch.nn.Module, peft_cfg: Any) -> torch.nn.Module:
    """``base`` wrapped by peft with ``peft_cfg``: only the method's parameters and the
    classification head (peft's modules to save for sequence classification) require grad."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        # transformers 5 deprecates is_gradient_checkpointing, which peft still calls.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, peft_cfg)
