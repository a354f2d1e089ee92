"""Two methods in one model, for a staged run whose stages train different methods
(``[[schedule]]`` ``method``; ``MethodConfig.compose``): e.g. prompt tuning for some rounds,
then LoRA.

At most one method that wraps the model (prompt or prefix tuning: peft's prompt-learning
wrapper, which also holds the classification head as a module to save) and at most one whose
layers are injected into the base model's modules (LoRA or (IA)³: peft's
``inject_adapter_in_model``, the same layers and settings as the method alone). The shared state
is every parameter of both, and the head: a stage trains its own method's part
(client/app.py ``stage_trains``, by :data:`MARKERS`) and the rest stays as it is, so the state
carries across stages. Such a model exports as fedpeft's state file (``load_export``
rebuilds it), not as one peft adapter.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from fedpeft.common.methods import ia3, lora

if TYPE_CHECKING:
    import torch

    from fedpeft.common.config import MethodConfig, SiteRunConfig

#: The methods a staged run composes, each with the substring that names its parameters.
MARKERS = {
    lora.SPEC.name: ".lora_",
    ia3.SPEC.name: ".ia3_l",
    "prompt": "prompt_encoder.",
    "prefix": "prompt_encoder.",
}
#: The masked-language head's parameters' names start with this (common/methods/mlm.py
#: ``attach``, which sets it).
MLM_HEAD = "mlm_head."
#: Methods that wrap the model (one at most) and methods injected into its layers (one at most).
WRAPPERS = ("prompt", "prefix")
INJECTED = (lora.SPEC.name, ia3.SPEC.name)
#: The classification head's parameters (always shared, in every method); peft's wrapper of
#: the head keeps the untrained original beside the trained copy, never shared.
HEAD = "classifier."
ORIGINAL = ".original_module."


def stage_marker(cfg: SiteRunConfig, rnd: int) -> str | None:
    """The substring naming the parameters of the method round ``rnd``'s stage trains, in a
    composed model; None in a model of one method."""
    return MARKERS[cfg.stage(rnd).method] if cfg.method.compose else None


def stage_trains_name(name: str, trains: str, marker: str | None) -> bool:
    """Whether a stage that trains ``trains`` (``[[schedule]]``: all, head, method) trains the
    shared parameter ``name``; ``marker``: in a composed model, the substring of the stage's
    method's parameters (:data:`MARKERS`), None: every parameter but the head is the method's.
    An ``mlm`` stage trains the method's parameters and the masked-language head
    (common/methods/mlm.py), which no other stage trains. One rule for the site that freezes and
    the coordinator that keeps the rest as it was."""
    if name.startswith(MLM_HEAD):
        return trains == "mlm"
    if HEAD in name:
        return trains in ("all", "head")
    return trains in ("all", "method", "mlm") and (marker is None or marker in name)


def problems(names: tuple[str, ...]) -> list[str]:
    """Why ``names`` (distinct methods) cannot be composed; empty when they can."""
    if len(names) < 2:
        return []
    out = []
    if unknown := [n for n in names if n not in MARKERS]:
        out.append(
            f"{', '.join(unknown)}: not composed with another method (stages of different "
            f"methods take one of {', '.join(WRAPPERS)} and one of {', '.join(INJECTED)})"
        )
    if len([n for n in names if n in WRAPPERS]) > 1 or len([n for n in names if n in INJECTED]) > 1:
        out.append(
            f"methods {', '.join(names)}: stages of different methods take at most one of "
            f"{', '.join(WRAPPERS)} and one of {', '.join(INJECTED)}"
        )
    return out


def build(cfg: MethodConfig, base: torch.nn.Module) -> torch.nn.Module:
    """``base`` with ``cfg.name`` and every method of ``cfg.compose``: the injected one's layers
    first, then the wrapper (or, without one, the head unfrozen); every parameter of both
    methods and the head requires grad, nothing else."""
    from peft import inject_adapter_in_model

    names = (cfg.name, *cfg.compose)
    for name in names:
        if name in INJECTED:
            config: Any = (
                lora.peft_config(cfg.lora, base) if name == lora.SPEC.name else ia3.peft_config()
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                inject_adapter_in_model(config, base)
    wrapper = next((n for n in names if n in WRAPPERS), None)
    if wrapper is not None:
        from dataclasses import replace

        from fedpeft.common.methods import build_method

        with warnings.catch_warnings():  # the injected layers are meant to stay
            warnings.filterwarnings("ignore", "You are trying to modify a model with PEFT")
            model = build_method(replace(cfg, name=wrapper, compose=()), base)
    else:
        model = base
    marks = {MARKERS[n] for n in names} | {HEAD}
    for name, param in model.named_parameters():
        param.requires_grad_(ORIGINAL not in name and any(m in name for m in marks))
    return model
