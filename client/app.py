"""The Flower ClientApp: what runs at a hospital site for each message from the coordinator.

``train``: verify the coordinator's signature on the global state, check the base-model
fingerprint, train locally on the site's own rows, evaluate, and reply with
``delta = local - global`` over the shared parameters, sealed for the run's key and signed with
the site's identity key (common/envelope.py), plus metrics. ``evaluate``: score the global
state on the site's held-out rows and reply with metrics and a score histogram by label (for
the pooled AUC), never individual predictions.

A failure at the site becomes a reply with status ``error`` and a short reason free of local
detail (no paths, no rows); the detail goes to the site's own log.
"""

from __future__ import annotations

import copy
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.client.trainer import Encoded, encode_site, evaluate, predict, train_local
from fedpeft.common import keys
from fedpeft.common.config import RunConfig
from fedpeft.common.data import SiteData, load_site_file, load_sites, split_site
from fedpeft.common.envelope import ForgedGlobalState, GlobalState, open_global, seal_delta
from fedpeft.common.environment import SIMULATION_KEYS_ENV
from fedpeft.common.errors import DataError, FedpeftError, FingerprintMismatch, KeyFileError
from fedpeft.common.keys import Phase
from fedpeft.common.methods import build_method, load_shared_state, shared_state
from fedpeft.common.metrics import Evaluation
from fedpeft.common.model import (
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    resolve_device,
    resolve_model_path,
)
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.state import State
from fedpeft.common.tensors import to_numpy, to_torch
from fedpeft.common.trust import SiteTrust, site_trust

log = logging.getLogger("fedpeft.client")


@dataclass
class SiteSession:
    """What a site keeps between messages in one process: its rows, tokenized, and the model."""

    site: str
    train: Encoded
    val: Encoded
    test: Encoded
    base: torch.nn.Module
    fingerprint: str
    device: torch.device


# One process may serve many messages (simulation keeps its actors, each serving any site);
# loading the model and tokenizing a site's rows once per process keeps a round cheap.
_SESSIONS: dict[tuple[str, str], SiteSession] = {}
_MAX_SESSIONS = 8  # ~100 MB each with the default model


def _site_data(cfg: RunConfig, node_config: dict[str, Any]) -> SiteData:
    if keys.NODE_DATA_PATH in node_config:
        path = Path(str(node_config[keys.NODE_DATA_PATH]))
        return load_site_file(
            path, cfg.data, name=str(node_config.get(keys.NODE_SITE) or path.stem)
        )
    if keys.PARTITION_ID in node_config:
        sites = load_sites(cfg.data)
        pid = int(node_config[keys.PARTITION_ID])
        if pid >= len(sites):
            raise DataError(f"virtual site {pid} has no data: the data set has {len(sites)} sites")
        return sites[pid]
    raise DataError(f"node config names no data: set {keys.NODE_DATA_PATH!r}")


def site_session(cfg: RunConfig, node_config: dict[str, Any]) -> SiteSession:
    """The cached session for this site and config, built on first use."""
    node_key = repr(sorted((str(k), str(v)) for k, v in node_config.items()))
    cfg_key = repr(
        (cfg.model, cfg.data, cfg.seed, cfg.train.val_fraction, cfg.train.dropout, cfg.device)
    )
    cache_key = (node_key, cfg_key)
    if cache_key in _SESSIONS:
        return _SESSIONS[cache_key]
    site = _site_data(cfg, node_config)
    split = split_site(site, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction)
    tokenizer = load_tokenizer(cfg.model)
    rows = encode_site(tokenizer, site, split, cfg.model.max_length)
    device = resolve_device(cfg.device)
    session = SiteSession(
        site=site.name,
        base=load_base_model(cfg.model, cfg.train.dropout, cfg.seed).to(device),
        fingerprint=model_fingerprint(resolve_model_path(cfg.model)),
        device=device,
        **rows,
    )
    if site.skipped_rows:
        log.warning("site %s: skipped %d bad rows", site.name, site.skipped_rows)
    if len(_SESSIONS) >= _MAX_SESSIONS:
        _SESSIONS.pop(next(iter(_SESSIONS)))  # oldest first
    _SESSIONS[cache_key] = session
    return session


_TRUST: dict[str, SiteTrust] = {}


def load_site_trust(node_config: dict[str, Any]) -> SiteTrust:
    """The site's identity key and the coordinator's public key, from the node config
    (``identity-key``, ``coordinator-key``) or, for a virtual site, the simulation's key folder."""
    if keys.NODE_IDENTITY_KEY in node_config:
        identity = Path(str(node_config[keys.NODE_IDENTITY_KEY]))
        coordinator = Path(str(node_config.get(keys.NODE_COORDINATOR_KEY, "")))
    elif keys.PARTITION_ID in node_config and os.environ.get(SIMULATION_KEYS_ENV):
        folder = Path(os.environ[SIMULATION_KEYS_ENV])
        identity = folder / f"partition-{int(node_config[keys.PARTITION_ID])}.key"
        coordinator = folder / "coordinator.pub"
    else:
        raise KeyFileError(
            f"node config names no identity key: set {keys.NODE_IDENTITY_KEY!r} and "
            f"{keys.NODE_COORDINATOR_KEY!r} (fedpeft site enroll makes them)"
        )
    cache_key = f"{identity}|{coordinator}"
    if cache_key not in _TRUST:
        _TRUST[cache_key] = site_trust(identity, coordinator)
    return _TRUST[cache_key]


def site_seed(seed: int, rnd: int, site: str) -> int:
    """Per site and round, stable across processes (``hash()`` is salted per process)."""
    return (seed * 1_000_003 + rnd * 10_007 + zlib.crc32(site.encode())) % (2**31)


def _model_with(session: SiteSession, cfg: RunConfig, state: State) -> torch.nn.Module:
    model = build_method(cfg.method, copy.deepcopy(session.base))
    load_shared_state(model, to_torch(state))
    return model.to(session.device)


def _metrics(ev: Evaluation) -> dict[str, float]:
    return {
        keys.N_TEST: ev.n,
        keys.LOSS: ev.loss,
        keys.AUC: ev.auc,
        keys.AUPRC: ev.auprc,
        keys.ACCURACY: ev.accuracy,
        keys.BRIER: ev.brier,
    }


def handle_train(
    cfg: RunConfig, rnd: int, fingerprint: str, global_state: State, session: SiteSession
) -> tuple[State, dict[str, float]]:
    """Local training from the global state; returns the delta and the reply metrics."""
    if fingerprint != session.fingerprint:
        raise FingerprintMismatch(
            f"base-model fingerprint mismatch: the run uses {fingerprint[:19]}..., this site "
            f"holds {session.fingerprint[:19]}..."
        )
    model = _model_with(session, cfg, global_state)
    result = train_local(
        model,
        session.train,
        session.val,
        cfg.train,
        cfg.train.local_epochs,
        session.device,
        site_seed(cfg.seed, rnd, session.site),
    )
    local = to_numpy(shared_state(model))
    delta = {name: (local[name] - global_state[name]).astype(np.float32) for name in global_state}
    metrics = _metrics(evaluate(model, session.test, session.device))
    metrics.update(
        {
            keys.N_TRAIN: len(session.train),
            keys.TRAIN_SECONDS: result.seconds,
            keys.STEPS: result.steps,
            keys.EPOCHS_RUN: result.epochs_run,
            "seconds-per-step": result.seconds_per_step,
        }
    )
    return delta, metrics


def handle_evaluate(
    cfg: RunConfig, global_state: State, session: SiteSession
) -> tuple[Evaluation, dict[str, float]]:
    """The global state on the test rows (reported) and its loss on the validation rows (for
    choosing the round, as early stopping does in local training)."""
    model = _model_with(session, cfg, global_state)
    test = evaluate(model, session.test, session.device)
    _, val_loss = predict(model, session.val, session.device)
    return test, {**_metrics(test), keys.VAL_LOSS: val_loss, keys.N_VAL: len(session.val)}


def _reply(
    msg: Any,
    site: str,
    error: str | None = None,
    sealed: bytes | None = None,
    metrics: dict[str, float] | None = None,
    ev: Evaluation | None = None,
) -> Any:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict(
        {
            keys.CONFIG: ConfigRecord(
                {
                    keys.SITE: site,
                    keys.STATUS: "error" if error else "ok",
                    keys.ERROR: error or "",
                }
            ),
        }
    )
    if sealed is not None:
        content[keys.SEALED] = blob_record(sealed)
    if metrics is not None:
        content[keys.METRICS] = MetricRecord({k: float(v) for k, v in metrics.items()})
    if ev is not None:
        content[keys.HISTOGRAM] = MetricRecord(
            {keys.HIST_POS: list(ev.hist_pos), keys.HIST_NEG: list(ev.hist_neg)}
        )
    return Message(content, reply_to=msg)


def error_reply(msg: Any, site: str, error: str) -> Any:
    """The reply of a site that does not answer ``msg``: status ``error`` and a short public
    reason (no local detail); the coordinator records it per site and round."""
    return _reply(msg, site, error=error)


def _handle(msg: Any, context: Any, kind: Phase) -> Any:
    node_config = dict(context.node_config)
    site = str(node_config.get(keys.NODE_SITE, f"partition-{node_config.get(keys.PARTITION_ID)}"))
    try:
        info = msg.content[keys.CONFIG]
        cfg = RunConfig.from_json(str(info[keys.RUN_CONFIG_JSON]))
        rnd = int(info[keys.ROUND])
        trust = load_site_trust(node_config)
        signed = open_global(from_blob_record(msg.content[keys.GLOBAL]), trust.coordinator)
        _check_global(signed, cfg, rnd)
        session = site_session(cfg, node_config)
        site = session.site
        if kind == Phase.TRAIN:
            delta, metrics = handle_train(cfg, rnd, signed.fingerprint, signed.state, session)
            log.info("site %s round %d: local AUC %.3f", site, rnd, metrics[keys.AUC])
            sealed = seal_delta(
                delta,
                run_token=signed.run_token,
                round=rnd,
                site_id=site,
                method=cfg.method.name,
                fingerprint=signed.fingerprint,
                num_examples=len(session.train),
                codec=cfg.federation.codec,
                run_public=signed.run_public,
                identity=trust.identity,
            )
            return _reply(msg, site, sealed=sealed, metrics=metrics)
        ev, metrics = handle_evaluate(cfg, signed.state, session)
        return _reply(msg, site, metrics=metrics, ev=ev)
    except FedpeftError as exc:
        log.error("site %s: %s", site, exc)
        # The coordinator sees the kind of failure, not local detail (paths, rows).
        shown = (FingerprintMismatch, ForgedGlobalState)
        public = str(exc) if isinstance(exc, shown) else "failed its checks"
        return _reply(msg, site, error=f"{exc.__class__.__name__}: {public}")
    except Exception:
        log.exception("site %s: %s failed", site, kind)
        return _reply(msg, site, error="internal error at the site (see the site's log)")


def _check_global(signed: GlobalState, cfg: RunConfig, rnd: int) -> None:
    """The signed global state must be the one this message is about."""
    if signed.round != rnd or signed.method != cfg.method.name:
        raise ForgedGlobalState(
            f"the signed global state is for round {signed.round} ({signed.method}), the message "
            f"for round {rnd} ({cfg.method.name})"
        )


def build_client_app() -> Any:
    from flwr.clientapp import ClientApp

    client = ClientApp()

    @client.train()
    def train(msg: Any, context: Any) -> Any:
        return _handle(msg, context, Phase.TRAIN)

    @client.evaluate()
    def evaluate_(msg: Any, context: Any) -> Any:
        return _handle(msg, context, Phase.EVALUATE)

    return client


#: Entry point for Flower (``clientapp = "fedpeft.client.app:app"``).
app = build_client_app()
