"""The references a federated run is judged against, trained without any federation.

``alone``: each site trains the same method with the same budget on its own rows only.
``centralized``: one model trains on the union of every site's training rows (the upper
reference that federation tries to reach without moving a record). Both use the same split,
model, method, trainer and epochs (``rounds × local_epochs``) as the federated run.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from fedpeft.common.config import RunConfig
from fedpeft.common.data import load_sites, split_site


@dataclass(frozen=True)
class BaselineTask:
    kind: str  # alone | centralized
    sites: tuple[str, ...]  # the sites whose training rows it uses


@dataclass(frozen=True)
class BaselineOutcome:
    kind: str
    site: str
    n_train: int
    n_test: int
    auc: float
    seconds: float


def run_task(cfg: RunConfig, task: BaselineTask, threads: int = 1) -> list[BaselineOutcome]:
    """Train one baseline model and evaluate it on the test rows of each site it covers."""
    import torch

    from fedpeft.client.trainer import Encoded, encode_site, evaluate, train_local
    from fedpeft.common.methods import build_model
    from fedpeft.common.model import load_tokenizer, resolve_device

    torch.set_num_threads(threads)
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    parts: dict[str, dict[str, Encoded]] = {}
    for site in load_sites(cfg.data):
        if site.name not in task.sites:
            continue
        split = split_site(site, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction)
        parts[site.name] = encode_site(tokenizer, site, split, cfg.model.max_length)

    def union(part: str) -> Encoded:
        rows = [parts[s][part] for s in task.sites]
        return Encoded(sum((r.ids for r in rows), ()), np.concatenate([r.labels for r in rows]))

    device = resolve_device(cfg.device)
    model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed).to(device)
    epochs = cfg.federation.rounds * cfg.train.local_epochs
    train_local(model, union("train"), union("val"), cfg.train, epochs, device, cfg.seed)
    seconds = time.perf_counter() - started
    n_train = len(union("train"))
    return [
        BaselineOutcome(
            task.kind,
            s,
            n_train,
            len(parts[s]["test"]),
            evaluate(model, parts[s]["test"], device).auc,
            seconds,
        )
        for s in task.sites
    ]


BASELINE_KINDS = ("centralized", "alone")


def run_baselines(
    cfg: RunConfig,
    workers: int = 2,
    progress: Callable[[str], None] = print,
    kinds: tuple[str, ...] = BASELINE_KINDS,
) -> list[BaselineOutcome]:
    """Alone for every site and/or centralized (``kinds``), spread over ``workers``
    single-thread processes."""
    names = tuple(s.name for s in load_sites(cfg.data))
    # Largest first, so the centralized model does not start last and leave a core idle.
    tasks = [BaselineTask("centralized", names)] if "centralized" in kinds else []
    if "alone" in kinds:
        tasks += [BaselineTask("alone", (n,)) for n in names]
    outcomes: list[BaselineOutcome] = []
    # A process pool that fails loudly (BrokenProcessPool) if a worker dies, instead of hanging.
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        futures = [pool.submit(run_task, cfg, t) for t in tasks]
        for future in as_completed(futures):
            result = future.result()
            outcomes.extend(result)
            first = result[0]
            what = first.site if first.kind == "alone" else "all sites"
            aucs = ", ".join(f"{o.site} {o.auc:.3f}" for o in result)
            progress(f"baseline {first.kind} ({what}) done in {first.seconds:.0f} s: AUC {aucs}")
    return outcomes
