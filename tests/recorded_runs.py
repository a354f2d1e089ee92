"""Runs recorded through the store's own API, for the tests of what reads the store (the
dashboard, the model card): a finished run of two sites over two rounds, with a refused update
and baselines, and a running run after its first round."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from fedpeft.common.config import RunConfig
from fedpeft.common.keys import AUC_HIGH, AUC_LOW
from fedpeft.server.store import BaselineResult, RoundResult, RunStore, SiteResult

TOKEN = "s3cret-token-0123456789"
#: Each site's data fingerprint, as it states it beside its updates.
DATA = {"Cleveland": "sha256:" + "c1" * 32, "Hungary": "sha256:" + "4b" * 32}

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def config(rounds: int, lr: float, personalize: str = "none", patience: int = 0) -> str:
    cfg = RunConfig()
    data = json.loads(cfg.to_json())
    data["federation"]["rounds"] = rounds
    data["federation"]["patience"] = patience
    data["federation"]["personalize"] = personalize
    data["train"]["lr"] = lr
    return json.dumps(data)


def create(
    store: RunStore,
    rounds: int,
    lr: float,
    fingerprint: str = "sha256:" + "ab" * 32,
    personalize: str = "none",
    patience: int = 0,
) -> int:
    return store.create_run(
        config_json=config(rounds, lr, personalize, patience),
        dataset="heart",
        method="lora",
        model_name="all-MiniLM-L6-v2",
        model_fingerprint=fingerprint,
        trainable_params=74_498,
        total_params=22_788_484,
        seed=0,
    )


def add_round(
    store: RunStore,
    run: int,
    n: int,
    pooled: float,
    site_aucs: dict[str, float],
    state: bytes | None = None,
) -> None:
    sites = []
    for i, (site, auc) in enumerate(sorted(site_aucs.items())):
        rejected = n == 2 and site == "Hungary"  # its update, uploaded, is refused
        sites.append(
            SiteResult(
                n,
                site,
                "train",
                "rejected" if rejected else "ok",
                reason="update norm 91.2 above 50" if rejected else None,
                n=100,
                loss=0.5,
                bytes_up=300_000 + 10 * n + i,
                data_fingerprint=DATA.get(site),
            )
        )
        sites.append(
            SiteResult(
                n,
                site,
                "evaluate",
                "ok",
                n=40,
                auc=auc,
                loss=0.45,
                brier=0.2,
                extra={AUC_LOW: auc - 0.08, AUC_HIGH: min(1.0, auc + 0.07)},
            )
        )
    store.add_round(
        run,
        RoundResult(
            n,
            T0,
            T0,
            2.5,
            pooled,
            sum(site_aucs.values()) / len(site_aucs),
            0.5,
            accepted=len(site_aucs) - int(n == 2),
            rejected=int(n == 2),
            applied=True,
            val_loss=0.6 - 0.05 * n,
            pooled_low=pooled - 0.05,
            pooled_high=pooled + 0.04,
        ),
        sites,
        state,
    )


def record_runs(s: RunStore) -> tuple[int, int]:
    """The finished run and the running one; their ids."""
    finished = create(s, rounds=2, lr=5e-3)
    add_round(s, finished, 1, 0.70, {"Cleveland": 0.72, "Hungary": 0.81})
    add_round(s, finished, 2, 0.78, {"Cleveland": 0.80, "Hungary": 0.86})
    s.add_baselines(
        finished,
        [
            BaselineResult("alone", "Cleveland", 200, 40, 0.70, 1.0, lr=5e-3),
            BaselineResult("alone", "Hungary", 200, 40, 0.76, 1.0, lr=5e-4),
            BaselineResult("centralized", "Cleveland", 400, 40, 0.79, 1.0),
            BaselineResult("centralized", "Hungary", 400, 40, 0.83, 1.0),
        ],
    )
    s.finish_run(finished, status="finished", wall_seconds=42.0)
    running = create(s, rounds=5, lr=1e-3)
    add_round(s, running, 1, 0.66, {"Cleveland": 0.61, "Hungary": 0.74})
    return finished, running
