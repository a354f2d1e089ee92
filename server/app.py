"""The Flower ServerApp: set up the run, hand it to the round loop, record how it ended.

The same app runs under Flower's simulation engine (``fedpeft simulate``) and its deployment
engine. In simulation the caller hands the config in; in deployment it comes from the run
config that Flower passes in ``context.run_config`` (dotted keys, e.g. ``federation.rounds``),
and the store from the coordinator's environment (``FEDPEFT_STORE``, coordinator.toml
``store``): a run config that names a ``db`` is refused, so that a store URL (which may carry a
password) never travels in an app bundle or a run config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedpeft.common.config import RunConfig, load_config
from fedpeft.common.dp import resolve_noise_multiplier
from fedpeft.common.environment import STORE_ENV
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import build_model, count_parameters, shared_state
from fedpeft.common.model import DEFAULT_MODEL_NAME, model_fingerprint, resolve_model_path
from fedpeft.common.state import State
from fedpeft.common.tensors import to_numpy
from fedpeft.common.trust import CoordinatorTrust, coordinator_trust_from_env
from fedpeft.server.checkpoints import open_checkpoint, open_state, resolve_store_key
from fedpeft.server.rounds import select_round
from fedpeft.server.store import RunStatus, RunStore, open_store
from fedpeft.server.strategy import FederatedRun, Resume

log = logging.getLogger("fedpeft.server")


@dataclass
class RunHandle:
    """Filled in by the ServerApp so the caller can find the run it started."""

    run_id: int | None = None
    error: str | None = None


def run_federation(
    grid: object,
    cfg: RunConfig,
    trust: CoordinatorTrust,
    store_key: bytes,
    progress: Callable[[str], None] | None = None,
    handle: RunHandle | None = None,
    resume: int | None = None,
) -> int:
    """Create the run in the store (or, with ``resume``, take up that interrupted or failed
    run: :func:`resume_point`), run every round left, mark the run finished (or failed).

    The run's owner is this process: the one whose death leaves the run ``interrupted``."""
    handle = handle or RunHandle()
    say = progress or log.info
    started = time.perf_counter()
    model_path = resolve_model_path(cfg.model)
    fingerprint = model_fingerprint(model_path)
    model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed)
    counts = count_parameters(model)
    initial = to_numpy(shared_state(model))
    del model
    store = open_store(cfg.db)
    try:
        teacher = distill_teacher(store, cfg, fingerprint, store_key, say)
        if resume is None:
            cfg = with_calibrated_noise(cfg, len(trust.sites), say)
            run_id, point = (
                store.create_run(
                    config_json=cfg.to_json(),
                    dataset=cfg.data.dataset,
                    method=cfg.method.name,
                    model_name=cfg.model.name_or_path or DEFAULT_MODEL_NAME,
                    model_fingerprint=fingerprint,
                    trainable_params=counts.trainable,
                    total_params=counts.total,
                    seed=cfg.seed,
                ),
                None,
            )
        else:
            run_id, point = resume, resume_point(store, resume, cfg, fingerprint, store_key)
        handle.run_id = run_id
        say(
            f"run {run_id}: method {cfg.method.name}, {counts.trainable:,} of {counts.total:,} "
            f"parameters shared ({100 * counts.fraction:.2f} %), {cfg.federation.rounds} rounds"
        )
        if point is not None:
            say(
                f"run {run_id} resumes after round {point.round} of {cfg.federation.rounds} "
                "(a new run key and token; the sites need nothing)"
            )
        try:
            run = FederatedRun(
                cfg,
                store,
                run_id,
                initial,
                fingerprint,
                trust,
                store_key,
                progress,
                teacher=teacher,
            )
            run.start(grid, point if point is not None and point.round else None)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Stopped from outside (its coordinator stopping: Flower signals the ServerApp when
            # its parent goes): the run did not fail, it can be taken up again.
            last = max((r.round for r in store.rounds(run_id)), default=0)
            handle.error = (
                f"the ServerApp was stopped ({exc.__class__.__name__}) after round {last}; "
                "nothing recorded is lost"
            )
            store.finish_run(
                run_id,
                status=RunStatus.INTERRUPTED,
                error=handle.error,
                wall_seconds=time.perf_counter() - started,
            )
            raise
        except BaseException as exc:
            handle.error = f"{exc.__class__.__name__}: {exc}"
            store.finish_run(
                run_id,
                status=RunStatus.FAILED,
                error=handle.error,
                wall_seconds=time.perf_counter() - started,
            )
            raise
        store.finish_run(
            run_id, status=RunStatus.FINISHED, wall_seconds=time.perf_counter() - started
        )
        return run_id
    finally:
        store.close()


def distill_teacher(
    store: RunStore,
    cfg: RunConfig,
    fingerprint: str,
    store_key: bytes,
    say: Callable[[str], None] = log.info,
) -> State | None:
    """A distillation run's teacher (``cfg.distill``): the delivered round's global state of its
    ``teacher_run``, a finished run of this store on the same base model, whose method and
    layers are the ones ``cfg.distill`` names; None without distillation. ``ConfigError``
    naming what does not fit."""
    d = cfg.distill
    if not d.enabled:
        return None
    info = store.get_run(d.teacher_run)
    where = f"distill.teacher_run {d.teacher_run}"
    if info.status != RunStatus.FINISHED:
        raise ConfigError(f"{where}: the run is {info.status}, not finished")
    if info.model_fingerprint != fingerprint:
        raise ConfigError(f"{where}: trained on another base model ({info.model_fingerprint})")
    taught = RunConfig.from_json(info.config_json)
    if taught.method != d.teacher_method or taught.model.layers != d.teacher_layers:
        raise ConfigError(
            f"{where}: its method ({taught.method.name}) or layers ({taught.model.layers}) are "
            "not distill.teacher_method / teacher_layers"
        )
    chosen = select_round(store.rounds(info.id))
    if chosen is None:
        raise ConfigError(f"{where}: the run has no stored round")
    round_, blob = store.global_state(info.id, chosen)
    say(f"distilling run {info.id}'s round {round_} ({taught.method.name}) into the student")
    return open_state(store_key, info.id, round_, blob)


def with_calibrated_noise(cfg: RunConfig, n_sites: int, say: Callable[[str], None]) -> RunConfig:
    """``cfg`` with the σ of its DP run set: as configured, or calibrated to reach
    ``federation.dp.target_epsilon`` after ``federation.rounds`` rounds at the expected sampling
    rate (``sites_per_round`` of the ``n_sites`` registered; all of them by default). The run
    is stored with it, so a resumed run and the sites' signed config use the same σ."""
    fed = cfg.federation
    if not fed.dp.enabled or fed.dp.noise_multiplier > 0:
        return cfg
    rate = min(1.0, fed.sites_per_round / n_sites) if fed.sites_per_round and n_sites else 1.0
    sigma = resolve_noise_multiplier(fed.dp, fed.rounds, rate)
    say(
        f"differential privacy: noise multiplier {sigma:.4f}, calibrated to reach epsilon "
        f"{fed.dp.target_epsilon:g} at delta {fed.dp.delta:g} after {fed.rounds} rounds at "
        f"sampling rate {rate:.3f}"
    )
    return cfg.with_noise_multiplier(sigma)


def resume_point(
    store: RunStore, run_id: int, cfg: RunConfig, fingerprint: str, store_key: bytes
) -> Resume:
    """Take up run ``run_id`` again: it must have been run with ``cfg`` (its stored config) on
    the same base model; it is set running, owned by this process, and the resumption recorded
    (``RunStore.resume_run``: only an interrupted or failed run resumes). Returns its last
    recorded round, that round's global state (opened from the encrypted checkpoint) and the
    rounds so far."""
    info = store.get_run(run_id)
    # As this version reads the stored config: a setting added since takes its default.
    if RunConfig.from_json(info.config_json).to_json() != cfg.to_json():
        raise ConfigError(
            f"run {run_id} was run with another config: a resumed run keeps its own (`fedpeft "
            "run resume` and `fedpeft simulate --resume` read it from the store)"
        )
    if info.model_fingerprint != fingerprint:
        raise ConfigError(
            f"run {run_id} used base model {info.model_fingerprint[:19]}..., this coordinator "
            f"holds {fingerprint[:19]}..."
        )
    history = store.rounds(run_id)
    last = history[-1].round if history else 0
    reason = (info.error or info.status).splitlines()[0][:500]
    after = store.resume_run(run_id, f"resumed from {info.status}: {reason}")
    if after != last:  # another process recorded a round in between
        raise ConfigError(f"run {run_id} changed while it was being resumed; try again")
    if not last:
        return Resume(0, {}, [])
    _, blob = store.global_state(run_id, last)
    state, moments = open_checkpoint(store_key, run_id, last, blob)
    return Resume(last, state, history, moments)


#: Flower run-config key holding a whole fedpeft run config as JSON (``fedpeft run start``).
CONFIG_KEY = "fedpeft-config"
#: Flower run-config key naming the run a ServerApp resumes (``fedpeft run resume``).
RESUME_KEY = "fedpeft-resume"


def config_from_flower(run_config: dict[str, Any]) -> RunConfig:
    """The run config from Flower's: one JSON value (``fedpeft run start``), or dotted keys;
    its store is the coordinator's (:func:`store_from_env`). ``ConfigError`` if it names a
    ``db``: the store is not a run setting."""
    if CONFIG_KEY in run_config:
        values = json.loads(str(run_config[CONFIG_KEY]))
        if "db" in values:
            raise ConfigError(_NO_DB)
        cfg = RunConfig.from_json(json.dumps(values))
    else:
        if "db" in run_config:
            raise ConfigError(_NO_DB)
        cfg = load_config(overrides=run_config)
    return dataclasses.replace(cfg, db=store_from_env())


_NO_DB = (
    "db: the store is the coordinator's (coordinator.toml store), not a run setting; remove "
    "db from the run config"
)


def store_from_env() -> str:
    """The coordinator's store URL, from its environment (:data:`STORE_ENV`)."""
    url = os.environ.get(STORE_ENV)
    if not url:
        raise ConfigError(
            f"{STORE_ENV} is not set: start the coordinator with `fedpeft coordinator start`, "
            "which passes coordinator.toml's store"
        )
    return url


def _stream(text: str) -> None:
    """Progress in deployment: the ServerApp's output is what `flwr run --stream` shows."""
    print(f"[fedpeft {time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_server_app(
    cfg: RunConfig | None = None,
    progress: Callable[[str], None] | None = None,
    handle: RunHandle | None = None,
    trust: CoordinatorTrust | None = None,
    store_key: bytes | None = None,
    resume: int | None = None,
) -> Any:
    """A ServerApp for ``cfg``; with None, the config is read from Flower's run config. Without
    ``trust``, the coordinator's key and the registered sites come from the environment
    (:func:`coordinator_trust_from_env`); without ``store_key``, the checkpoint key is resolved
    as server/checkpoints.py says."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        run_config = dict(context.run_config)
        run_cfg = cfg if cfg is not None else config_from_flower(run_config)
        key = store_key or resolve_store_key(run_cfg.db, create=True)[0]
        resumed = resume if resume is not None else run_config.get(RESUME_KEY)
        run_federation(
            grid,
            run_cfg,
            trust or coordinator_trust_from_env(),
            key,
            progress or _stream,
            handle,
            None if resumed is None else int(resumed),
        )

    return app


#: Entry point for Flower's deployment engine (``serverapp = "fedpeft.server.app:app"``).
app = build_server_app()
