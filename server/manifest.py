"""The coordinator's side of approved runs: a run's manifest (common/manifest.py), built from its
run config the way the ServerApp builds the run's initial state (server/app.py), so that the
tensor names, shapes and fingerprint are exactly those the sites will see.
"""

from __future__ import annotations

from fedpeft.common.config import RunConfig
from fedpeft.common.manifest import RunManifest, config_hash, sealed_size_bound
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.model import model_fingerprint, resolve_model_path


def site_config_json(cfg: RunConfig) -> str:
    """The run config exactly as the sites receive it, whose :func:`config_hash` names the run:
    the signed site config's canonical JSON (its hash is ``SiteRunConfig.config_hash()``, the
    ``config_hash`` of every global state a site opens)."""
    return cfg.for_sites().to_json()


def build_manifest(cfg: RunConfig) -> RunManifest:
    """The manifest of a run of ``cfg``: loads the base model (as the ServerApp does) to list
    the shared tensors and fingerprint it."""
    fingerprint = model_fingerprint(resolve_model_path(cfg.model))
    model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed)
    shapes = {name: tuple(t.shape) for name, t in shared_state(model).items()}
    del model
    codec = cfg.federation.codec
    return RunManifest(
        method=cfg.method.name,
        model_fingerprint=fingerprint,
        config_sha256=config_hash(site_config_json(cfg)),
        rounds=cfg.federation.rounds,
        local_epochs=cfg.train.local_epochs,
        codec=codec,
        tensors=tuple(shapes.items()),
        upload_bytes=sealed_size_bound(
            shapes, codec, method=cfg.method.name, fingerprint=fingerprint
        ),
        histogram_bins=cfg.federation.histogram_bins,
    )
