"""``fedpeft simulate``: many virtual sites on one machine with Flower's simulation engine.

Runs the same ServerApp and ClientApp as a deployment, one virtual SuperNode per site, then the
baselines (TF-IDF alone and pooled, alone, centralized), and records everything in the store.
Deltas are sealed and signed as in a deployment: the simulation makes fresh keys for the
coordinator and every virtual site in a private temporary folder and deletes it when the
simulation ends. The virtual sites
take their own settings (data set, columns, bad-row rule, device) from this simulation's config,
through the environment, as a deployed site takes them from its site.toml; the run's settings
reach them only inside the signed global state.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.client.setup import simulation_sites_env
from fedpeft.common.config import RunConfig
from fedpeft.common.data import load_sites, split_site
from fedpeft.common.environment import SIMULATION_KEYS_ENV, SIMULATION_SITES_ENV
from fedpeft.common.errors import FedpeftError
from fedpeft.common.model import resolve_device
from fedpeft.common.trust import make_simulation_keys
from fedpeft.server.app import RunHandle, build_server_app
from fedpeft.server.checkpoints import resolve_store_key
from fedpeft.server.store import BaselineResult, open_store


@dataclass(frozen=True)
class SimulationResult:
    run_id: int
    seconds: float


def check_sites(cfg: RunConfig) -> list[str]:
    """Load and split every site up front, so bad data fails before any training starts."""
    names = []
    for site in load_sites(cfg.data):
        split_site(site, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction)
        names.append(site.name)
    return names


def run_simulation(
    cfg: RunConfig,
    *,
    client_app: object | None = None,
    cpus: int | None = None,
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    store_key_file: Path | None = None,
    resume: int | None = None,
    ray_address: str | None = None,
) -> SimulationResult:
    """Run the federated part with Flower's Ray simulation engine; return the run's id.

    Each virtual site gets one CPU (Flower's default of two would serialize them here).
    ``client_app`` replaces the ClientApp (tests use it to plant a faulty site). ``resume``:
    the interrupted or failed run of ``cfg``'s store to take up (``cfg`` must be its config).
    ``ray_address``: run the virtual sites on that running Ray cluster (``ray start``) instead
    of a private one on this machine; ``cpus`` is then the cluster's.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedpeft.client.app import app as default_client_app

    sites = check_sites(cfg)
    if ray_address is not None:
        check_ray_address(ray_address)
    cpus = cpus or os.cpu_count() or 1
    use_gpu = resolve_device(cfg.device).type == "cuda"  # fails here, clearly, without CUDA
    resources: dict[str, float] = {"num_cpus": 1, "num_gpus": (1 / len(sites)) if use_gpu else 0}
    backend = {
        "client_resources": resources,
        "init_args": {
            # A private Ray of this process's, always: without it Ray joins whatever cluster
            # RAY_ADDRESS or a `ray start` on this machine (even a stopped one) points to.
            "address": "local",
            "num_cpus": cpus,
            "num_gpus": 1 if use_gpu else 0,
            "include_dashboard": False,
        },
    }
    store_key, key_source = resolve_store_key(cfg.db, store_key_file, create=True)
    progress(f"checkpoints in the store are encrypted with the store key from {key_source}")
    handle = RunHandle()
    started = time.perf_counter()
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    if not verbose:
        # Flower 1.39 marks run_simulation deprecated in favour of `flwr run`, which needs an
        # app directory and a SuperLink; fedpeft drives the same engine in-process on purpose.
        flower_log.setLevel(logging.ERROR)
    # mkdtemp makes the folder 0700; the virtual sites (Ray workers, started from this process)
    # find their keys through the environment.
    with tempfile.TemporaryDirectory(prefix="fedpeft-keys-") as folder:
        trust = make_simulation_keys(Path(folder), sites)
        site_env = {
            SIMULATION_KEYS_ENV: folder,
            SIMULATION_SITES_ENV: simulation_sites_env(
                cfg.data, cfg.device, cfg.site_lora_ranks, cfg.site_quantize
            ),
        }
        previous = {name: os.environ.get(name) for name in site_env}
        os.environ.update(site_env)
        try:
            if ray_address is not None:
                _join_ray_cluster(ray_address, site_env)
                del backend["init_args"]  # the cluster has its own resources
            flwr_run_simulation(
                server_app=build_server_app(cfg, progress, handle, trust, store_key, resume),
                client_app=client_app or default_client_app,  # type: ignore[arg-type]
                num_supernodes=len(sites),
                backend_config=backend,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
        finally:
            if ray_address is not None:
                _leave_ray_cluster()  # Flower does at its end; not if it failed to start
            flower_log.setLevel(level)
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    if handle.run_id is None:
        raise FedpeftError("the simulation ended before the run was created (see the log above)")
    if handle.error is not None:
        raise FedpeftError(f"run {handle.run_id} failed: {handle.error}")
    return SimulationResult(handle.run_id, time.perf_counter() - started)


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A clear error for a Ray address nothing answers at: ``ray.init`` would retry for
    minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        raise FedpeftError(
            f"--ray-address {address!r}: expected HOST:PORT of a Ray head (`ray start --head "
            "--port PORT`)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise FedpeftError(
            f"--ray-address {address}: no Ray head answers there ({exc.strerror or exc}); start "
            "one with `ray start --head --port PORT`"
        ) from None


def _join_ray_cluster(address: str, site_env: dict[str, str]) -> None:
    """Connect this process to the Ray cluster at ``address`` before Flower does (it then keeps
    the connection, and closes it at the end). The cluster's workers are not children of this
    process: the virtual sites' settings and fedpeft's quiet environment reach them as the
    job's environment, with this process's module path as Flower gives its own workers."""
    import ray

    from fedpeft.common.environment import QUIET

    pythonpath = os.pathsep.join(p for p in (*sys.path, os.environ.get("PYTHONPATH", "")) if p)
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": {**QUIET, **site_env, "PYTHONPATH": pythonpath}},
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FedpeftError(f"--ray-address {address}: cannot join the Ray cluster: {exc}") from exc


def _leave_ray_cluster() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def record_baselines(
    cfg: RunConfig,
    run_id: int,
    progress: Callable[[str], None] = print,
    kinds: tuple[str, ...] | None = None,
    store_key_file: Path | None = None,
) -> None:
    """Train the baselines of ``kinds`` (default all: ``BASELINE_KINDS``), compare the run's
    delivered global state with each alone and centralized model on the same test rows
    (``baselines.with_differences``), and store them."""
    from fedpeft.baselines import BASELINE_KINDS, run_baselines, with_differences

    kinds = BASELINE_KINDS if kinds is None else kinds

    outcomes = run_baselines(
        cfg, workers=min(2, os.cpu_count() or 1), progress=progress, kinds=kinds
    )
    if any(o.scores for o in outcomes):
        try:  # the trained baselines are stored whatever happens here
            state = delivered_state(cfg.db, run_id, store_key_file)
            if state is not None:
                outcomes = with_differences(cfg, state, outcomes)
        except (FedpeftError, OSError) as exc:
            progress(
                f"warning: no federated − baseline differences for run {run_id} (the baselines "
                f"are stored without them): {exc}"
            )
    store = open_store(cfg.db)
    try:
        store.add_baselines(
            run_id,
            [
                BaselineResult(
                    o.kind,
                    o.site,
                    o.n_train,
                    o.n_test,
                    o.auc,
                    o.seconds,
                    o.degenerate,
                    o.lr,
                    o.diff,
                    o.diff_se,
                )
                for o in outcomes
            ],
        )
    finally:
        store.close()


def delivered_state(
    db: str, run_id: int, store_key_file: Path | None = None
) -> dict[str, Any] | None:
    """The global state (torch tensors by name) of the round run ``run_id`` delivers (the
    lowest validation loss), opened with the store key; None when no round was stored."""
    from fedpeft.common.tensors import to_torch
    from fedpeft.server.checkpoints import open_state
    from fedpeft.server.rounds import select_round

    store = open_store(db, create=False)
    try:
        chosen = select_round(store.rounds(run_id))
        if chosen is None:
            return None
        round_, data = store.global_state(run_id, chosen)
    finally:
        store.close()
    key, _ = resolve_store_key(db, store_key_file)
    return dict(to_torch(open_state(key, run_id, round_, data)))
