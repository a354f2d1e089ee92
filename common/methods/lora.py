"""LoRA: a trained low-rank product A·B added to the chosen linear modules (the default method)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.common.errors import ModelError
from fedpeft.common.methods._peft import peft_model
from fedpeft.common.methods.spec import ExportFormat, MethodSpec, failed

if TYPE_CHECKING:
    import torch

    from fedpeft.common.state import State


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation: A·B added to the chosen linear modules."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    #: Hybrid fine-tuning: the top N encoder layers train fully (every weight, shared as the
    #: layer's delta; LoRA leaves them), the rest by LoRA. 0: LoRA alone. A layer of MiniLM is
    #: 1.77 M values, 7.1 MB of fp32 upload a round: sites' upload limits (8 MiB by default)
    #: bound it.
    full_layers: int = 0


def check(lora: LoraConfig) -> list[str]:
    return failed(
        (lora.r >= 1, "method.lora.r: must be at least 1"),
        (lora.alpha >= 1, "method.lora.alpha: must be at least 1"),
        (0 <= lora.dropout < 1, "method.lora.dropout: must be in [0, 1)"),
        (len(lora.target_modules) > 0, "method.lora.target_modules: must not be empty"),
        (lora.full_layers >= 0, "method.lora.full_layers: must be 0 (none) or more"),
    )


def build(lora: LoraConfig, base: torch.nn.Module) -> torch.nn.Module:
    return build_at_rank(lora, base, lora.r)


def build_at_rank(lora: LoraConfig, base: torch.nn.Module, rank: int) -> torch.nn.Module:
    """LoRA of rank ``rank`` (at most ``lora.r``) that computes what the run's rank-``lora.r``
    LoRA computes from its first ``rank`` components: the same scaling, ``alpha / r`` of the
    run, so that a component means the same at every site whatever rank it trains."""
    return peft_model(base, peft_config(lora, base, rank))


def peft_config(lora: LoraConfig, base: torch.nn.Module, rank: int | None = None) -> Any:
    """peft's LoRA config of :func:`build_at_rank` (``rank`` None: the run's)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    rank = lora.r if rank is None else rank
    if not 1 <= rank <= lora.r:
        raise ValueError(f"LoRA rank {rank} outside 1..{lora.r}")
    targets: list[str] | str = list(lora.target_modules)
    full: list[str] | None = None
    if lora.full_layers:
        top = _top_layers(base, lora.full_layers)
        full = [f"encoder.layer.{i}" for i in top]
        # LoRA on the target modules outside the fully trained layers (peft full-matches a
        # string against each module's name).
        names = "|".join(re.escape(t) for t in lora.target_modules)
        layers = "|".join(str(i) for i in top)
        targets = rf"(?!.*\.encoder\.layer\.({layers})\.)(.*\.)?({names})"
    return PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        # peft types it int, and only divides it by r: a float keeps alpha / r exact.
        lora_alpha=lora.alpha if rank == lora.r else lora.alpha * rank / lora.r,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=full,  # trained and saved whole, beside the classification head
    )


def _top_layers(base: torch.nn.Module, n: int) -> list[int]:
    """The indices of the top ``n`` encoder layers; :class:`ModelError` when there are fewer."""
    total = int(getattr(base.config, "num_hidden_layers", 0))
    if not any(name.endswith(f"encoder.layer.{total - 1}") for name, _ in base.named_modules()):
        raise ModelError("method.lora.full_layers: the base model has no encoder.layer.N modules")
    if n >= total:
        raise ModelError(
            f"method.lora.full_layers: {n} leaves none of the base model's {total} layers to "
            f"LoRA; at most {total - 1} (or method full)"
        )
    return list(range(total - n, total))


# -- sites of different capacity: a lower rank, zero-padded (HetLoRA) --------------------------
#
# A site may train the run's LoRA at a lower rank k (its own setting). It trains the first k
# components of each A (rows) and B (columns) of the global state and sends a delta of the
# global shapes, zero beyond k: the wire format, the size bound, clipping and secure aggregation
# stay those of the run. The coordinator averages each component over the sites that trained it
# (:func:`rank_weights`); the global state keeps the run's rank.


def rank_axis(name: str) -> int | None:
    """The axis of a shared tensor along which LoRA's components lie: A is (rank, in), B is
    (out, rank); None for any other tensor (the head)."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def state_rank(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The LoRA rank of a shared state of these shapes; 0 when it holds no LoRA tensor."""
    ranks = {shape[axis] for name, shape in shapes.items() if (axis := rank_axis(name)) is not None}
    if len(ranks) > 1:
        raise ValueError(f"LoRA tensors of different ranks: {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def truncate(state: State, rank: int) -> State:
    """The first ``rank`` components of every LoRA tensor; other tensors, and LoRA tensors of
    no more than ``rank`` components, as they are (not copied)."""
    out = {}
    for name, value in state.items():
        axis = rank_axis(name)
        cut = axis is not None and value.shape[axis] > rank
        out[name] = np.take(value, np.arange(rank), axis=axis) if cut else value
    return out


def pad(state: State, shapes: Mapping[str, tuple[int, ...]]) -> State:
    """``state`` (LoRA tensors of a lower rank) zero-padded to ``shapes`` along the rank."""
    out = {}
    for name, value in state.items():
        axis = rank_axis(name)
        if axis is None or value.shape == tuple(shapes[name]):
            out[name] = value
            continue
        full = np.zeros(shapes[name], dtype=value.dtype)
        index = [slice(None)] * value.ndim
        index[axis] = slice(0, value.shape[axis])
        full[tuple(index)] = value
        out[name] = full
    return out


def nonzero_beyond(delta: State, rank: int) -> str | None:
    """The first LoRA tensor of ``delta`` with a non-zero value beyond component ``rank``
    (what a site that trained at ``rank`` cannot have sent); None when there is none."""
    for name, value in delta.items():
        axis = rank_axis(name)
        if axis is not None and np.take(value, np.arange(rank, value.shape[axis]), axis=axis).any():
            return name
    return None


def rank_weights(
    name: str, shape: tuple[int, ...], weights: np.ndarray, ranks: np.ndarray
) -> np.ndarray:
    """Each site's weight in each coordinate of tensor ``name`` (shape ``(sites, *shape)``,
    broadcastable): its weight ``weights`` (summing to 1 over sites) where it trained the
    component, renormalized over the sites that did (HetLoRA's rank-aware averaging); 0 in a
    component no site trained, which then keeps its global value."""
    axis = rank_axis(name)
    if axis is None:
        return weights.reshape(-1, *([1] * len(shape)))
    components = np.arange(shape[axis])
    trained = components[None, :] < ranks[:, None]  # (sites, rank)
    w = weights[:, None] * trained
    total = w.sum(axis=0, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return w.reshape(-1, *view)


SPEC = MethodSpec(
    name="lora",
    shares="low-rank A·B updates of the chosen linear modules (query and value by default)",
    build=build,
    default_lr=5e-3,
    export=ExportFormat.PEFT,
    config=LoraConfig,
    check=check,
)
