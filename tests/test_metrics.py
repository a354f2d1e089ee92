from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedpeft.common.metrics import (
    auc,
    auc_from_histograms,
    degenerate,
    evaluate_scores,
    pooled_auc,
    score_histograms,
)


@pytest.mark.parametrize("seed", range(5))
def test_pooled_auc_from_histograms_matches_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sites = []
    for n in (300, 120, 80, 40):
        labels = rng.integers(0, 2, n)
        shift = rng.uniform(0.0, 1.5)
        scores = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * labels - 0.5)))
        sites.append((labels, scores))
    all_labels = np.concatenate([s[0] for s in sites])
    all_scores = np.concatenate([s[1] for s in sites])
    exact = roc_auc_score(all_labels, all_scores)
    pooled = pooled_auc([score_histograms(lab, sc) for lab, sc in sites])
    assert abs(pooled - exact) <= 0.002


def test_uniform_random_scores() -> None:
    rng = np.random.default_rng(42)
    labels, scores = rng.integers(0, 2, 5000), rng.uniform(size=5000)
    pos, neg = score_histograms(labels, scores)
    assert abs(auc_from_histograms(pos, neg) - roc_auc_score(labels, scores)) <= 0.002


def test_auc_matches_sklearn_with_ties() -> None:
    labels = np.array([0, 1, 1, 0, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.4, 0.9, 0.2, 0.3])
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_single_class_gives_nan() -> None:
    assert np.isnan(auc(np.ones(4, dtype=int), np.linspace(0, 1, 4)))
    pos, neg = score_histograms(np.ones(4, dtype=int), np.linspace(0, 1, 4))
    assert np.isnan(auc_from_histograms(pos, neg))


def test_evaluate_scores_fields() -> None:
    labels = np.array([0, 0, 1, 1])
    ev = evaluate_scores(labels, np.array([0.1, 0.6, 0.4, 0.9]), loss=0.5)
    assert ev.n == 4
    assert ev.auc == pytest.approx(0.75)
    assert ev.accuracy == pytest.approx(0.5)
    assert ev.brier == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert sum(ev.hist_pos) == 2 and sum(ev.hist_neg) == 2


def test_a_model_below_chance_or_with_constant_scores_is_degenerate() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    good = np.array([0.1, 0.2, 0.8, 0.7, 0.3, 0.9])
    for scores, expected in (
        (good, False),
        (1 - good, True),  # every pair ranked the wrong way: AUC 0
        (np.full(6, 0.37), True),  # one score for every row: AUC 0.5, ranks nothing
        (np.array([0.5, 0.6, 0.55, 0.58, 0.52, 0.57]), False),  # weak but not below chance
    ):
        ev = evaluate_scores(labels, scores, 0.5)
        assert degenerate(ev.auc, ev.hist_pos, ev.hist_neg) is expected, scores
