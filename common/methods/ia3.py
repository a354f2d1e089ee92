"""(IA)³: learned scaling vectors on keys, values and the feed-forward inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpeft.common.methods._peft import peft_model
from fedpeft.common.methods.spec import ExportFormat, MethodSpec

if TYPE_CHECKING:
    import torch


def build(settings: None, base: torch.nn.Module) -> torch.nn.Module:
    """Scaling vectors where peft's defaults for the model type put them, plus the head."""
    return peft_model(base, peft_config())


def peft_config() -> Any:
    """peft's (IA)³ config of :func:`build`."""
    from peft import IA3Config, TaskType

    return IA3Config(task_type=TaskType.SEQ_CLS)


SPEC = MethodSpec(
    name="ia3",
    shares="learned scaling vectors on keys, values and the feed-forward inputs",
    build=build,
    default_lr=5e-3,
    export=ExportFormat.PEFT,
)
