"""Prefix tuning: learned key and value vectors prepended in every attention layer."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpeft.common.errors import ModelError
from fedpeft.common.methods._peft import peft_model
from fedpeft.common.methods.spec import ExportFormat, MethodSpec, failed

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: learned key/value vectors prepended in every attention layer."""

    num_virtual_tokens: int = 20


def check(prefix: PrefixConfig) -> list[str]:
    return failed(
        (prefix.num_virtual_tokens >= 1, "method.prefix.num_virtual_tokens: must be >= 1"),
    )


def build(prefix: PrefixConfig, base: torch.nn.Module) -> torch.nn.Module:
    """``num_virtual_tokens`` learned key and value vectors prepended in every attention layer
    (peft's prefix encoder), made to reach the attention under transformers 5 and checked to
    change the model's output (see :func:`enable_prefix_tuning`)."""
    from peft import PrefixTuningConfig, TaskType

    model = peft_model(
        base,
        PrefixTuningConfig(
            task_type=TaskType.SEQ_CLS, num_virtual_tokens=prefix.num_virtual_tokens
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
    import torch

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


SPEC = MethodSpec(
    name="prefix",
    shares="learned key and value vectors prepended in every attention layer",
    build=build,
    # Prefixes need larger steps than low-rank or bias updates.
    default_lr=1e-2,
    export=ExportFormat.PEFT,
    config=PrefixConfig,
    check=check,
    after_peft_load=enable_prefix_tuning,
)
