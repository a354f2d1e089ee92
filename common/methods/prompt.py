"""Prompt tuning: learned soft-prompt vectors prepended to the input embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpeft.common.methods._peft import peft_model
from fedpeft.common.methods.spec import ExportFormat, MethodSpec, failed

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PromptConfig:
    """Prompt tuning: learned soft-prompt vectors prepended to the input embeddings."""

    num_virtual_tokens: int = 20
    #: ``random``, or ``text`` to start from the embeddings of ``init_text``'s tokens.
    init: str = "text"
    init_text: str = "Patient findings: risk of disease:"


def check(prompt: PromptConfig) -> list[str]:
    return failed(
        (prompt.num_virtual_tokens >= 1, "method.prompt.num_virtual_tokens: must be >= 1"),
        (prompt.init in ("random", "text"), "method.prompt.init: must be random or text"),
        (
            prompt.init != "text" or bool(prompt.init_text.strip()),
            "method.prompt.init_text: must not be empty when method.prompt.init is text",
        ),
    )


def build(prompt: PromptConfig, base: torch.nn.Module) -> torch.nn.Module:
    """``num_virtual_tokens`` soft-prompt vectors prepended to the input embeddings, started
    from random vectors or from the embeddings of ``init_text``'s tokens."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    from_text = prompt.init == "text"
    return peft_model(
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


SPEC = MethodSpec(
    name="prompt",
    shares="learned soft-prompt vectors prepended to the input embeddings",
    build=build,
    # Soft prompts need the largest steps of all.
    default_lr=3e-2,
    export=ExportFormat.PEFT,
    config=PromptConfig,
    check=check,
)
