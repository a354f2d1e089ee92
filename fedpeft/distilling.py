"""``fedpeft distill``: a smaller student of a finished run, trained across the sites.

The student is the base model with fewer encoder layers (common/model.py ``kept_layers``:
evenly spaced, the top one kept, each initialized from the base's own), wrapped by a PEFT
method and trained as a federated run whose config names the teacher (``[distill]``): each site
computes the teacher's logits on its own training rows and trains the student on soft labels at
a temperature plus the hard labels (client/trainer.py ``Teacher``). Nothing else changes: the
student's delta is sealed and aggregated like any round's, and the run is an ordinary run of the
store (``report``, ``export``, the dashboard).

After the run, :func:`compare` sets the student beside its teacher: layers, parameters, the
delivered round's macro AUC and the share of it retained, and inference time per batch measured
side by side on this machine (:func:`inference_ms`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

from fedpeft.common.config import DistillConfig, RunConfig
from fedpeft.common.errors import ConfigError
from fedpeft.server.rounds import delivered_round
from fedpeft.server.store import RunStatus, RunStore


def base_layers(cfg: RunConfig) -> int:
    """The encoder layers of the run's base model, from its config (no weights loaded)."""
    from transformers import AutoConfig

    from fedpeft.common.model import resolve_model_path

    return int(AutoConfig.from_pretrained(resolve_model_path(cfg.model)).num_hidden_layers)


def student_config(
    teacher: RunConfig,
    teacher_run: int,
    *,
    layers: int,
    temperature: float,
    alpha: float,
    overrides: dict[str, Any],
) -> RunConfig:
    """The student's run config: the teacher's (data, seed, method, federation), with the
    student's ``model.layers`` and ``[distill]``, no personalization, and ``overrides`` (dotted
    keys; None changes nothing) on top. ``ConfigError`` naming every problem."""
    from fedpeft.common.config import apply_overrides, build_config

    values = json.loads(teacher.to_json())
    values["model"]["layers"] = layers
    values["federation"]["personalize"] = "none"
    # One method, every round: a staged teacher's stages (and pretraining) are not the student's.
    values["schedule"] = []
    values["method"]["compose"] = []
    values["method"]["mlm"] = False
    if overrides.get("method.name") not in (None, teacher.method.name):
        values["train"]["lr"] = 0.0  # the student's method's own rate, unless --lr
        values["site_lora_ranks"] = []  # LoRA's alone
    values["tuning"]["lr_grid"] = []  # resolved anew from the student's rate
    if overrides.get("federation.rounds") is not None:
        values["federation"]["patience"] = 0  # rounds given alone run every one, as simulate's
    values["distill"] = dataclasses.asdict(
        DistillConfig(
            teacher_run=teacher_run,
            teacher_method=teacher.method,
            teacher_layers=teacher.model.layers,
            temperature=temperature,
            alpha=alpha,
        )
    )
    cfg = build_config(apply_overrides(values, overrides))
    return dataclasses.replace(cfg, db=teacher.db)


def teacher_config(store: RunStore, run_id: int) -> RunConfig:
    """A finished run's config, to distill it; ``ConfigError`` for a run not finished."""
    info = store.get_run(run_id)
    if info.status != RunStatus.FINISHED:
        raise ConfigError(f"run {run_id} is {info.status}: only a finished run can be distilled")
    return RunConfig.from_json(info.config_json)


@dataclass(frozen=True)
class Side:
    """One of the two models compared."""

    run_id: int
    layers: int
    total_params: int
    macro_auc: float | None
    #: Milliseconds per batch of inference, the median of the timed repeats; None: not timed.
    ms_per_batch: float | None = None


@dataclass(frozen=True)
class Comparison:
    teacher: Side
    student: Side
    #: The batch timed: rows of ``tokens`` tokens each.
    batch: int = 0
    tokens: int = 0

    @property
    def retained(self) -> float | None:
        t, s = self.teacher.macro_auc, self.student.macro_auc
        return None if t is None or s is None or t == 0 else s / t

    @property
    def speedup(self) -> float | None:
        t, s = self.teacher.ms_per_batch, self.student.ms_per_batch
        return None if t is None or s is None or s == 0 else t / s


def side(store: RunStore, run_id: int, ms: float | None = None) -> Side:
    """Run ``run_id`` as the store holds it: layers, parameters, delivered macro AUC."""
    info = store.get_run(run_id)
    cfg = RunConfig.from_json(info.config_json)
    delivered = delivered_round(store.rounds(run_id))
    return Side(
        run_id=run_id,
        layers=cfg.model.layers or base_layers(cfg),
        total_params=info.total_params,
        macro_auc=delivered.macro_auc if delivered else None,
        ms_per_batch=ms,
    )


def inference_ms(
    models: list[Any], *, batch: int, tokens: int, repeats: int = 10, seed: int = 0
) -> list[float]:
    """Milliseconds per forward pass of each model on one batch of ``batch`` rows of ``tokens``
    random token ids, timed side by side: after a warm-up, each repeat runs every model once in
    turn (so drift on a shared machine touches them alike); the median repeat of each."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, tokens), generator=gen)
    mask = torch.ones_like(ids)
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            model.eval()
            model(input_ids=ids, attention_mask=mask)
        for _ in range(repeats):
            for i, model in enumerate(models):
                started = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                times[i].append(1000 * (time.perf_counter() - started))
    return [statistics.median(t) for t in times]


def delivered_model(cfg: RunConfig, state: dict[str, Any]) -> Any:
    """The run's model (base, its layers and method) with its delivered ``state``."""
    from fedpeft.common.methods import build_model, load_shared_state

    model = build_model(cfg.model, cfg.method, dropout=0.0, seed=cfg.seed)
    load_shared_state(model, state)
    return model


def render(c: Comparison) -> str:
    def auc(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    rows = [
        ("", "teacher", "student"),
        ("run", str(c.teacher.run_id), str(c.student.run_id)),
        ("encoder layers", str(c.teacher.layers), str(c.student.layers)),
        ("parameters", f"{c.teacher.total_params:,}", f"{c.student.total_params:,}"),
        ("macro AUC", auc(c.teacher.macro_auc), auc(c.student.macro_auc)),
        (
            f"ms per batch of {c.batch} x {c.tokens} tokens",
            ms(c.teacher.ms_per_batch),
            ms(c.student.ms_per_batch),
        ),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    share = c.student.total_params / c.teacher.total_params if c.teacher.total_params else 0
    lines.append(f"parameters: {100 * share:.0f} % of the teacher's")
    if c.retained is not None:
        lines.append(f"AUC retained: {100 * c.retained:.1f} % of the teacher's macro AUC")
    if c.speedup is not None:
        lines.append(f"inference speed-up: {c.speedup:.2f}x (measured side by side, this machine)")
    return "\n".join(lines)
