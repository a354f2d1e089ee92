from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedpeft.common.metrics import (
    Z95,
    Difference,
    auc,
    auc_difference,
    auc_from_histograms,
    auc_interval,
    auc_interval_from_histograms,
    calibration_from_histograms,
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


def _delong_by_pairs(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong's interval from its definition, pair by pair (O(m n)): the reference."""
    x, y = scores[labels == 1], scores[labels == 0]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    theta = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = np.sqrt(v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(y))
    return max(0.0, theta - 1.959963984540054 * se), min(1.0, theta + 1.959963984540054 * se)


@pytest.mark.parametrize("seed", range(4))
def test_the_auc_interval_is_delongs(seed: int) -> None:
    """Against DeLong's definition pair by pair, with ties (scores rounded to one decimal);
    the histogram form gives the same for scores that equal their bin."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(np.clip(rng.normal(0.45 + 0.2 * labels, 0.2), 0, 0.999), 1)
    low, high = auc_interval(labels, scores)
    assert (low, high) == pytest.approx(_delong_by_pairs(labels, scores), abs=1e-12)
    assert low < auc(labels, scores) < high
    pos, neg = score_histograms(labels, scores, bins=1000)
    assert auc_interval_from_histograms(pos, neg) == pytest.approx((low, high), abs=1e-12)


def test_the_auc_interval_covers_the_true_auc_about_95_times_in_100() -> None:
    """Binormal scores with a known AUC (Phi(1 / sqrt 2) = 0.760): over 400 test sets of 40
    positives and 60 negatives the interval holds it in 92-98 % of them."""
    rng = np.random.default_rng(7)
    true_auc = 0.7602499389065233
    covered = 0
    for _ in range(400):
        labels = np.r_[np.ones(40, int), np.zeros(60, int)]
        scores = np.r_[rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 60)]
        low, high = auc_interval(labels, scores)
        covered += low <= true_auc <= high
    assert 0.92 <= covered / 400 <= 0.98


def test_no_interval_without_both_classes() -> None:
    low, high = auc_interval(np.ones(5, int), np.linspace(0, 1, 5))
    assert np.isnan(low) and np.isnan(high)
    ev = evaluate_scores(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.9]), 0.3)
    assert ev.auc_low <= ev.auc <= ev.auc_high


# -- paired differences ----------------------------------------------------------------------


def _two_models(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two correlated models' scores (a better than b), rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    a = np.round(1.2 * labels + shared + 0.5 * rng.normal(size=n), 1)
    b = np.round(0.8 * labels + shared + 0.5 * rng.normal(size=n), 1)
    return labels, a, b


def test_a_paired_difference_is_the_difference_of_the_aucs() -> None:
    labels, a, b = _two_models(300, 0)
    d = auc_difference(labels, a, b)
    assert d.value == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b))
    assert d.value > 0 and d.se > 0 and d.interval[0] < d.value < d.interval[1]
    same = auc_difference(labels, a, a)
    assert same.value == 0 and same.se == 0  # a model against itself: no doubt at all
    assert np.isnan(auc_difference(np.ones(5), a[:5], b[:5]).value)  # one class: undefined
    with pytest.raises(ValueError, match="5 labels but 4 and 5 scores"):
        auc_difference(labels[:5], a[:4], b[:5])


def test_against_a_constant_model_the_difference_has_the_single_auc_s_error() -> None:
    labels, a, _ = _two_models(200, 1)
    d = auc_difference(labels, a, np.full(len(a), 0.3))
    low, high = auc_interval(labels, a)
    assert 0 < low < high < 1  # not clipped: the half-width is Z95 times the standard error
    assert d.value == pytest.approx(roc_auc_score(labels, a) - 0.5)
    assert d.se * Z95 == pytest.approx((high - low) / 2)


def test_the_paired_error_matches_a_bootstrap_and_is_below_the_unpaired_one() -> None:
    labels, a, b = _two_models(400, 2)
    d = auc_difference(labels, a, b)
    rng = np.random.default_rng(3)
    boot = []
    for _ in range(1000):
        i = rng.integers(0, len(labels), len(labels))
        boot.append(roc_auc_score(labels[i], a[i]) - roc_auc_score(labels[i], b[i]))
    assert d.se == pytest.approx(np.std(boot), rel=0.15)
    # The two models share most of their noise: pairing removes it.
    unpaired = [
        (h - lo) / (2 * Z95) for lo, h in (auc_interval(labels, a), auc_interval(labels, b))
    ]
    assert d.se < 0.8 * np.hypot(*unpaired)


def test_the_macro_difference_of_independent_sites() -> None:
    parts = [Difference(0.02, 0.03), Difference(0.04, 0.04)]
    macro = Difference.mean(parts)
    assert macro.value == pytest.approx(0.03) and macro.se == pytest.approx(0.025)
    assert macro.interval == pytest.approx((0.03 - Z95 * 0.025, 0.03 + Z95 * 0.025))
    assert np.isnan(Difference.mean([]).value) and np.isnan(Difference.mean([]).interval[0])


# -- calibration from histograms -------------------------------------------------------------


def _ece(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    group = np.minimum((scores * bins).astype(int), bins - 1)
    return sum(
        (group == g).sum() * abs(labels[group == g].mean() - scores[group == g].mean())
        for g in range(bins)
        if (group == g).any()
    ) / len(scores)


@pytest.mark.parametrize("seed", range(3))
def test_calibration_from_histograms_matches_the_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.clip(rng.beta(2, 5, 500) + 0.3 * labels, 0, 1)  # over-confident in places
    cal = calibration_from_histograms(*score_histograms(labels, scores))
    assert cal.brier == pytest.approx(float(((scores - labels) ** 2).mean()), abs=1e-3)
    assert cal.ece == pytest.approx(_ece(labels, scores), abs=1e-3)
    assert sum(k for _, _, k in cal.curve) == 500
    for mean, observed, _ in cal.curve:
        assert 0 <= mean <= 1 and 0 <= observed <= 1


def test_a_calibrated_model_has_a_small_ece_and_a_diagonal_curve() -> None:
    rng = np.random.default_rng(7)
    scores = rng.uniform(0, 1, 20_000)
    labels = (rng.uniform(0, 1, 20_000) < scores).astype(int)  # P(positive | score) = score
    cal = calibration_from_histograms(*score_histograms(labels, scores))
    assert cal.ece < 0.02
    assert all(abs(observed - mean) < 0.04 for mean, observed, _ in cal.curve)
    flipped = calibration_from_histograms(*score_histograms(1 - labels, scores))
    assert flipped.ece > 0.4  # the same scores, reading the other label: badly calibrated
    assert np.isnan(calibration_from_histograms([0, 0], [0, 0]).brier)
