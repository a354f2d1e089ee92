"""Local training and evaluation of a PEFT model on one site's rows.

AdamW over the shared parameters only, gradient clipping, early stopping on a validation split
(the best epoch's state is kept), bf16 autocast on CUDA, deterministic under a seed on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.common.config import TrainConfig
from fedpeft.common.data import SiteData, SiteSplit
from fedpeft.common.methods import load_shared_state, shared_state
from fedpeft.common.metrics import HIST_BINS, Evaluation, evaluate_scores


@dataclass(frozen=True)
class Encoded:
    """Tokenized rows (unpadded id lists) with their labels."""

    ids: tuple[tuple[int, ...], ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class TrainResult:
    epochs_run: int
    steps: int
    seconds: float
    seconds_per_step: float
    #: The mean validation loss of the epoch kept (inf when ``val`` is empty).
    best_val_loss: float = float("inf")


@dataclass(frozen=True)
class Teacher:
    """What a student imitates in distillation: the teacher's logits on each training row (in
    the rows' order), the softmax temperature and the soft loss's weight (``[distill]``)."""

    logits: np.ndarray
    temperature: float
    alpha: float

    def loss(self, logits: torch.Tensor, idx: np.ndarray, hard: torch.Tensor) -> torch.Tensor:
        """``alpha`` times the KL divergence from the teacher's to the student's softened
        distribution (times T², Hinton et al. 2015, so that its gradients keep their size
        across temperatures) plus ``1 - alpha`` times ``hard``, the hard labels' loss."""
        t = self.temperature
        target = torch.as_tensor(self.logits[idx], dtype=torch.float32, device=logits.device)
        soft = torch.nn.functional.kl_div(
            torch.log_softmax(logits / t, dim=-1),
            torch.log_softmax(target / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        return self.alpha * t * t * soft + (1 - self.alpha) * hard


#: Positions a masked-language target ignores.
_IGNORE = -100


@dataclass(frozen=True)
class MaskedLm:
    """Masked-language modelling on a site's notes, a schedule's ``mlm`` stage (domain-adaptive
    pretraining): BERT's recipe (Devlin et al. 2019). Of each row's tokens but the special ones,
    ``rate`` are chosen; a chosen token is replaced by the mask token (80 %), a random token
    (10 %) or kept (10 %), and the model predicts the originals through its masked-language
    head (common/methods/mlm.py). The labels are not read."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    rate: float = 0.15

    @classmethod
    def of(cls, tokenizer: Any) -> MaskedLm | None:
        """The tokenizer's mask token and vocabulary; None when it has no mask token."""
        if tokenizer.mask_token_id is None:
            return None
        return cls(int(tokenizer.mask_token_id), len(tokenizer), tuple(tokenizer.all_special_ids))

    def masked(
        self, ids: torch.Tensor, attention: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` (CPU) with tokens chosen and replaced, and the targets: the chosen tokens'
        originals, :data:`_IGNORE` elsewhere."""
        special = torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype))
        chosen = (torch.rand(ids.shape, generator=generator) < self.rate) & attention.bool()
        chosen &= ~special
        targets = torch.where(chosen, ids, torch.full_like(ids, _IGNORE))
        roll = torch.rand(ids.shape, generator=generator)
        out = ids.clone()
        out[chosen & (roll < 0.8)] = self.mask_id
        swapped = chosen & (roll >= 0.8) & (roll < 0.9)
        out[swapped] = torch.randint(
            self.vocab_size, (int(swapped.sum()),), generator=generator, dtype=ids.dtype
        )
        return out, targets

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, int]:
        """The mean cross-entropy over the batch's chosen tokens, and how many there were."""
        from fedpeft.common.methods.mlm import vocabulary_logits

        device = batch["input_ids"].device
        attention = batch["attention_mask"]
        ids, targets = self.masked(batch["input_ids"].cpu(), attention.cpu(), generator)
        with _autocast(device):
            out = model(
                input_ids=ids.to(device),
                attention_mask=attention,
                output_hidden_states=True,
            )
            # The notes' own positions: prompt tuning puts its virtual tokens before them.
            hidden = out.hidden_states[-1][:, -ids.shape[1] :]
            chosen = (targets != _IGNORE).to(device)
            if not bool(chosen.any()):
                return hidden.sum() * 0.0, 0
            logits = vocabulary_logits(model, hidden[chosen])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets.to(device)[chosen])
        return loss, int(chosen.sum())

    def mean_loss(
        self, model: torch.nn.Module, rows: Encoded, device: torch.device, seed: int
    ) -> float:
        """The mean loss per chosen token over ``rows`` (eval mode, no gradient), the same
        tokens chosen for the same ``seed``: validation loss comparable across epochs."""
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        with torch.no_grad():
            for idx in _in_order(len(rows), 64):
                loss, n = self.loss(model, _batch(rows, idx, device), generator)
                total, count = total + float(loss) * n, count + n
        return total / count if count else float("inf")


def encode(tokenizer: Any, texts: list[str], labels: np.ndarray, max_length: int) -> Encoded:
    out = tokenizer(texts, truncation=True, max_length=max_length)
    return Encoded(tuple(tuple(x) for x in out["input_ids"]), np.asarray(labels, dtype=np.int64))


def encode_site(
    tokenizer: Any, site: SiteData, split: SiteSplit, max_length: int
) -> dict[str, Encoded]:
    """A site's train, val and test rows, tokenized."""
    return {
        part: encode(tokenizer, *site.subset(getattr(split, part)), max_length)
        for part in ("train", "val", "test")
    }


def _in_order(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """The row indices 0..n-1 in batches of ``batch_size``, in order (evaluation's batches)."""
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


def _batch(rows: Encoded, idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(rows.ids[i]) for i in idx)
    ids = torch.zeros((len(idx), width), dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for j, i in enumerate(idx):
        seq = rows.ids[i]
        ids[j, : len(seq)] = torch.tensor(seq)
        mask[j, : len(seq)] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": torch.as_tensor(rows.labels[idx]).to(device),
    }


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _logits(
    model: torch.nn.Module, rows: Encoded, device: torch.device, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Each batch of ``rows`` in order: its row indices and the model's fp32 logits (eval mode,
    no gradient)."""
    model.eval()
    with torch.no_grad():
        for idx in _in_order(len(rows), batch_size):
            batch = _batch(rows, idx, device)
            batch.pop("labels")
            with _autocast(device):
                logits = model(**batch).logits
            yield idx, logits.float()


def logits_of(
    model: torch.nn.Module, rows: Encoded, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """The model's logits on every row, in the rows' order (a teacher's, for distillation)."""
    out = [logits.cpu().numpy() for _, logits in _logits(model, rows, device, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)


def predict(
    model: torch.nn.Module, rows: Encoded, device: torch.device, batch_size: int = 64
) -> tuple[np.ndarray, float]:
    """Probabilities of the positive class and the mean cross-entropy loss."""
    scores, total_loss = [], 0.0
    for idx, logits in _logits(model, rows, device, batch_size):
        labels = torch.as_tensor(rows.labels[idx]).to(device)
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        scores.append(torch.softmax(logits, dim=-1)[:, 1].cpu().numpy())
    return np.concatenate(scores), total_loss / max(len(rows), 1)


def evaluate(
    model: torch.nn.Module,
    rows: Encoded,
    device: torch.device,
    batch_size: int = 64,
    bins: int = HIST_BINS,
) -> Evaluation:
    scores, loss = predict(model, rows, device, batch_size)
    return evaluate_scores(rows.labels, scores, loss, bins)


def class_weights(labels: np.ndarray, device: torch.device) -> torch.Tensor:
    """Loss weights of classes 0 and 1, n / (2 n_class) ("balanced"); both 1 when a class is
    absent from ``labels`` (nothing to balance)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)[:2].astype(np.float64)
    weights = counts.sum() / (2 * counts) if (counts > 0).all() else np.ones(2)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def lr_factor(progress: float, warmup: float, decay: str) -> float:
    """The share of ``train.lr`` a step takes at ``progress`` (0 to 1) through the training
    budget: linear warm-up over the first ``warmup`` of it, then ``decay`` toward 0 at its end."""
    warm = min(1.0, progress / warmup) if warmup > 0 else 1.0
    if decay == "linear":
        return warm * (1.0 - progress)
    if decay == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    return warm


def train_local(
    model: torch.nn.Module,
    train: Encoded,
    val: Encoded,
    cfg: TrainConfig,
    epochs: int,
    device: torch.device,
    seed: int,
    span: tuple[float, float] = (0.0, 1.0),
    teacher: Teacher | None = None,
    mlm: MaskedLm | None = None,
) -> TrainResult:
    """Train the model's shared parameters for up to ``epochs`` epochs; keep the best on ``val``.

    ``span`` is the part of the whole training budget these epochs are (round r of R at a site:
    ((r - 1) / R, r / R)); the learning-rate schedule (``train.warmup``, ``train.decay``) follows
    it, each step taking the rate at its midpoint, so that sites and baselines see the same rate
    at the same share of their budget. With a ``teacher`` (distillation), the loss is its
    :meth:`Teacher.loss`; early stopping still reads the hard labels' loss on ``val``. With
    ``mlm`` (a schedule's mlm stage), the loss and early stopping's are its masked-language
    loss on the rows' text (:class:`MaskedLm`); the labels are not read."""
    torch.manual_seed(seed)
    masking = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = -(-len(train) // cfg.batch_size)
    step_share = (span[1] - span[0]) / max(epochs * per_epoch, 1)
    scheduled = cfg.warmup > 0 or cfg.decay != "none"
    weight = class_weights(train.labels, device) if cfg.class_weight == "balanced" else None
    # FedProx's anchor: the shared parameters as this training found them (the global state).
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    best_loss, best_state, stale, steps, epochs_run = float("inf"), None, 0, 0, 0
    started = time.perf_counter()
    train_seconds = 0.0
    for _epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train))
        epoch_started = time.perf_counter()
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = _batch(train, idx, device)
            labels = batch.pop("labels")
            if mlm is not None:
                loss, _ = mlm.loss(model, batch, masking)
            else:
                with _autocast(device):
                    logits = model(**batch).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), labels, weight=weight)
                if teacher is not None:
                    loss = teacher.loss(logits.float(), idx, loss)
            if anchor is not None:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * cfg.prox_mu * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scheduled:
                middle = span[0] + (steps + 0.5) * step_share
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(middle, cfg.warmup, cfg.decay)
            optimizer.step()
            steps += 1
        train_seconds += time.perf_counter() - epoch_started
        epochs_run += 1
        if mlm is not None:
            val_loss = mlm.mean_loss(model, val, device, seed)
        else:
            _, val_loss = predict(model, val, device)
        if val_loss < best_loss:
            best_loss, best_state, stale = val_loss, shared_state(model), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        load_shared_state(model, best_state)
    return TrainResult(
        epochs_run=epochs_run,
        steps=steps,
        seconds=time.perf_counter() - started,
        seconds_per_step=train_seconds / max(steps, 1),
        best_val_loss=best_loss,
    )
