#!/usr/bin/env python
"""How often a sound model is flagged degenerate by chance: the odds that a model of a given true
AUC scores below 0.5 on at least one site's test rows, with each packaged data set's real test
splits (rows and positives per site, as the run draws them for a seed).

    .venv/bin/python bench/degenerate_odds.py [--datasets heart pima medpar] [--seed 0]

A model's scores are drawn binormal (positives N(d, 1), negatives N(0, 1), d = sqrt(2)
Phi^-1(AUC)), scored with the Mann-Whitney AUC the report uses, many times over. The report flags
a cell below 0.5 as degenerate (common/metrics.py); this says how much of that a test set of this
size produces by itself, whatever the model.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import norm

from fedpeft.common.config import load_config
from fedpeft.common.data import load_sites, split_site

TRUE_AUCS = (0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85)


def test_sets(dataset: str, seed: int) -> list[tuple[str, int, int]]:
    """(site, test rows, positive test rows) of each site, split as a run with ``seed``."""
    cfg = load_config(overrides={"data.dataset": dataset, "seed": seed})
    out = []
    for site in load_sites(cfg.data):
        split = split_site(site, seed, cfg.data.test_fraction, cfg.train.val_fraction)
        labels = site.labels[split.test]
        out.append((site.name, len(labels), int(labels.sum())))
    return out


def odds_below_half(sizes: list[tuple[str, int, int]], true_auc: float, draws: int) -> float:
    """The share of ``draws`` in which at least one site's AUC is below 0.5."""
    rng = np.random.default_rng(0)
    d = np.sqrt(2) * norm.ppf(true_auc)
    below = np.zeros(draws, dtype=bool)
    for _, n, n_pos in sizes:
        pos = rng.normal(d, 1.0, (draws, n_pos))
        neg = rng.normal(0.0, 1.0, (draws, n - n_pos))
        auc = (pos[:, :, None] > neg[:, None, :]).mean(axis=(1, 2))
        below |= auc < 0.5
    return float(below.mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["heart", "pima", "medpar"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=20_000)
    args = p.parse_args()
    print(
        "| data set | sites | test rows (positives) per site | "
        + " | ".join(f"AUC {a:.2f}" for a in TRUE_AUCS)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(TRUE_AUCS))
    for dataset in args.datasets:
        sizes = test_sets(dataset, args.seed)
        shown = ", ".join(f"{n} ({k})" for _, n, k in sizes)
        odds = [odds_below_half(sizes, a, args.draws) for a in TRUE_AUCS]
        print(
            f"| {dataset} | {len(sizes)} | {shown} | " + " | ".join(f"{o:.2f}" for o in odds) + " |"
        )
    print(
        "\nP(a model of that true AUC is below 0.5 on at least one site's test rows), "
        f"{args.draws:,} draws, seed {args.seed}'s split"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
