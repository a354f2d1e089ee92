"""Export a run's global state in formats the ecosystem loads, and load it back.

An export directory always holds ``fedpeft-export.json`` (run, round, method, the run's site
config (what sites trained with: :class:`~fedpeft.common.config.SiteRunConfig`, no store, data
set or paths) with its hash, and the base model's fingerprint). Beside it:

* a method whose spec exports :attr:`ExportFormat.PEFT` (``fedpeft export --help`` names them):
  peft's own ``adapter_config.json`` + ``adapter_model.safetensors``, with the classification
  head saved as a module to save. Load it with::

      base = AutoModelForSequenceClassification.from_pretrained(BASE_DIR, num_labels=2)
      model = peft.PeftModel.from_pretrained(base, EXPORT_DIR)
      # prefix only, with transformers 5 + peft 0.21 (its spec's after_peft_load):
      fedpeft.common.methods.enable_prefix_tuning(model)

* a method with :attr:`ExportFormat.STATE`: ``fedpeft_state.safetensors``, the shared
  parameters by their names in the fedpeft model (the state that was federated), fp32. Load it
  with :func:`load_export`, which builds the base model, applies the method and copies the
  tensors.

* with ``quantize="int8"`` (``fedpeft export --quantize int8``), also ``fedpeft_int8.safetensors``:
  the whole model for inference, base and method, its base's linear layers and word embeddings
  in int8 (common/quantize.py), a quarter of the fp32 model's bytes. ``load_export(DIR,
  quantized=True)`` loads it (it reads the base model's architecture, not its weights' values).

:func:`load_export` loads every kind of export; it checks the base model's fingerprint first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedpeft.common.config import EXPORT_QUANTIZE, RunConfig, SiteRunConfig
from fedpeft.common.errors import FingerprintMismatch, ModelError
from fedpeft.common.methods import (
    ExportFormat,
    build_method,
    build_model,
    get_spec,
    load_shared_state,
)
from fedpeft.common.model import load_base_model, model_fingerprint, resolve_model_path
from fedpeft.common.quantize import quantize_base

MANIFEST = "fedpeft-export.json"
INT8_FILE = "fedpeft_int8.safetensors"
#: 2: ``config`` is the site config; 1 (read still): the whole run config.
FORMAT = 2
STATE_FILE = "fedpeft_state.safetensors"


def export_state(
    cfg: RunConfig,
    state: dict[str, torch.Tensor],
    out: Path,
    *,
    run_id: int,
    round: int,
    fingerprint: str,
    quantize: str = "none",
) -> list[Path]:
    """Write ``state`` (a global shared state of a run with ``cfg``) to ``out``; return the files
    written. Refuses a base model whose fingerprint differs from the run's. ``quantize`` int8:
    also the whole model with an int8 base, for inference (:data:`INT8_FILE`)."""
    if quantize not in EXPORT_QUANTIZE:
        raise ModelError(f"quantize {quantize!r} is not one of {', '.join(EXPORT_QUANTIZE)}")
    if quantize == "int8" and cfg.method.trains_base_weights():
        raise ModelError(
            f"method {cfg.method.name!r} trained base weights: an int8 export would hold them "
            "rounded; export it without --quantize"
        )
    local = model_fingerprint(resolve_model_path(cfg.model))
    if local != fingerprint:
        raise FingerprintMismatch(
            f"the base model here ({local}) is not the run's ({fingerprint}); export on a "
            "machine with the run's base model"
        )
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg.model, cfg.method, dropout=0.0, seed=cfg.seed)
    load_shared_state(model, state)
    if export_format(cfg) is ExportFormat.PEFT:
        model.save_pretrained(str(out))  # type: ignore[operator]
        files = [out / "adapter_config.json", out / "adapter_model.safetensors"]
    else:
        from safetensors.torch import save_file

        save_file(
            {name: t.contiguous() for name, t in state.items()},
            str(out / STATE_FILE),
            metadata={"fedpeft.method": cfg.method.name, "fedpeft.fingerprint": fingerprint},
        )
        files = [out / STATE_FILE]
    if quantize == "int8":
        files.append(_write_int8(cfg, state, out / INT8_FILE, fingerprint))
    site_config = cfg.for_sites()
    manifest = {
        "format": FORMAT,
        "run_id": run_id,
        "round": round,
        "method": cfg.method.name,
        "base_model": resolve_model_path(cfg.model),
        "base_model_fingerprint": fingerprint,
        "files": [f.name for f in files],
        "config": json.loads(site_config.to_json()),
        "config_hash": site_config.config_hash(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return [*files, out / MANIFEST]


def export_format(cfg: RunConfig | SiteRunConfig) -> ExportFormat:
    """How a run's state is exported: its method's format; fedpeft's state file for a model of
    several methods (``method.compose``), which no one peft adapter holds."""
    if cfg.method.compose:
        return ExportFormat.STATE
    return get_spec(cfg.method.name).export


def _int8_model(cfg: RunConfig | SiteRunConfig) -> torch.nn.Module:
    """The run's model on an int8 base (values still those of the base model as loaded)."""
    base = quantize_base(load_base_model(cfg.model, dropout=0.0, seed=cfg.seed))
    return build_method(cfg.method, base)


def _write_int8(
    cfg: RunConfig, state: dict[str, torch.Tensor], path: Path, fingerprint: str
) -> Path:
    from safetensors.torch import save_file

    model = _int8_model(cfg)
    load_shared_state(model, state)
    save_file(
        {k: t.contiguous() for k, t in model.state_dict().items()},
        str(path),
        metadata={"fedpeft.method": cfg.method.name, "fedpeft.fingerprint": fingerprint},
    )
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file; is {folder} a fedpeft export?") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    return manifest


def load_export(
    folder: Path, base_model: str | None = None, quantized: bool = False
) -> torch.nn.Module:
    """The exported model, ready for inference: the base model (``base_model``, else the one the
    run used) with the method applied and the exported state loaded. ``quantized``: the int8
    model of an export written with ``quantize="int8"`` instead (:data:`INT8_FILE`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    values = manifest["config"]
    if base_model is not None:
        values = {**values, "model": {**values["model"], "name_or_path": base_model}}
    text = json.dumps(values)
    cfg: RunConfig | SiteRunConfig = (
        RunConfig.from_json(text)
        if manifest.get("format") == 1
        else SiteRunConfig.from_json(text, complete=False)
    )
    path = resolve_model_path(cfg.model)
    if model_fingerprint(path) != manifest["base_model_fingerprint"]:
        raise FingerprintMismatch(
            f"{path} is not the base model this export was trained on "
            f"({manifest['base_model_fingerprint']})"
        )
    spec = get_spec(manifest["method"])
    if quantized:
        if INT8_FILE not in manifest.get("files", []):
            raise ModelError(f"{folder}: no int8 model; export with --quantize int8")
        from safetensors.torch import load_file

        model = _int8_model(cfg)
        model.load_state_dict(load_file(str(folder / INT8_FILE)), strict=True)
        return model.eval()
    if export_format(cfg) is ExportFormat.PEFT:
        from peft import PeftModel

        base = load_base_model(cfg.model, dropout=0.0, seed=cfg.seed)
        peft_model: torch.nn.Module = PeftModel.from_pretrained(base, str(folder))
        if spec.after_peft_load is not None:
            peft_model = spec.after_peft_load(peft_model)
        return peft_model
    from safetensors.torch import load_file

    model = build_model(cfg.model, cfg.method, dropout=0.0, seed=cfg.seed)
    load_shared_state(model, load_file(str(folder / STATE_FILE)))
    return model
