"""The pooled AUC's error against what the score histograms tell, by number of bins.

A site sends, per evaluation, the counts of its test rows' scores in ``federation.histogram_bins``
equal bins on [0, 1], one histogram per label; the coordinator computes the pooled AUC from the
sums (pairs in one bin count half). Fewer bins tell the coordinator less of each row's score
(without secure aggregation it sees each site's histograms), and make the pooled AUC coarser.
This measures both on the shipped heart data, split as ``fedpeft simulate`` splits it, for each
seed: the scores are those of the pooled TF-IDF + logistic regression reference
(fedpeft/baselines.py) on every site's test rows, a stand-in for the language model's (it takes
seconds, not a federated run).

For each bin count it prints: the largest |pooled AUC from histograms - exact pooled AUC| over the
seeds (the exact AUC ranks every score), and, over sites and seeds, the share of a site's test
rows alone in their (bin, label) cell (a row the coordinator can place in a bin of 1/bins with
its label, no other row beside it) and the mean rows per occupied cell.

    .venv/bin/python bench/histogram_bins.py [--seeds 0 1 2] [--bins 1000 200 100 50 20 10]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np

from fedpeft.baselines import TextRows, fit_tfidf
from fedpeft.common.config import load_config
from fedpeft.common.data import load_sites, split_site
from fedpeft.common.metrics import auc, pooled_auc, score_histograms


def site_scores(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labels, scores) of each heart site's test rows under the pooled TF-IDF model."""
    cfg = load_config(overrides={"seed": seed})
    sites = load_sites(cfg.data)
    splits = {
        s.name: split_site(s, seed, cfg.data.test_fraction, cfg.train.val_fraction) for s in sites
    }
    train = TextRows.of([(s, splits[s.name].train) for s in sites])
    model = fit_tfidf(train, TextRows.of([(s, splits[s.name].val) for s in sites]), seed)
    out = []
    for s in sites:
        rows = TextRows.of([(s, splits[s.name].test)])
        out.append((rows.labels, model.scores(rows.texts)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bins", type=int, nargs="+", default=[1000, 200, 100, 50, 20, 10])
    args = p.parse_args()
    per_seed = {seed: site_scores(seed) for seed in args.seeds}
    rows = sum(len(labels) for labels, _ in per_seed[args.seeds[0]])
    print(
        f"{datetime.date.today()}, {platform.machine()} Python {platform.python_version()}; "
        f"heart, seeds {' '.join(map(str, args.seeds))}, {rows} test rows in "
        f"{len(per_seed[args.seeds[0]])} sites (seed {args.seeds[0]}); pooled TF-IDF + LR scores"
    )
    exact = {
        seed: auc(np.concatenate([y for y, _ in s]), np.concatenate([x for _, x in s]))
        for seed, s in per_seed.items()
    }
    print("exact pooled AUC by seed: " + ", ".join(f"{v:.4f}" for v in exact.values()))
    print()
    print(
        "| bins | max abs(pooled AUC error) | rows alone in their (bin, label) cell "
        "| rows per occupied cell |"
    )
    print("|---:|---:|---:|---:|")
    for bins in args.bins:
        errors, alone, per_cell = [], [], []
        for seed, sites in per_seed.items():
            histograms = [score_histograms(y, x, bins) for y, x in sites]
            errors.append(abs(pooled_auc(histograms) - exact[seed]))
            for pos, neg in histograms:
                cells = np.concatenate([pos, neg])
                occupied = cells[cells > 0]
                alone.append(float((occupied == 1).sum()) / max(int(cells.sum()), 1))
                per_cell.append(float(occupied.mean()))
        print(f"| {bins} | {max(errors):.4f} | {np.mean(alone):.0%} | {np.mean(per_cell):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
