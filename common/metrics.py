"""Evaluation metrics, and pooled AUC from per-site score histograms.

A site never sends its predictions. It sends two histograms of its scores (one per label) over
fixed bins on [0, 1]; the coordinator sums them across sites and computes the pooled AUC from
the sums. Pairs whose scores fall in the same bin count as half-correct, exactly as ties do in
the Mann-Whitney form of AUC, so the error is bounded by the share of pairs that share a bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HIST_BINS = 1000


#: Two-sided 95 % normal quantile, for the AUC intervals.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model on one set of labelled rows."""

    n: int
    loss: float
    auc: float
    auprc: float
    accuracy: float
    brier: float
    hist_pos: tuple[int, ...]
    hist_neg: tuple[int, ...]
    #: The AUC's 95 % interval (DeLong), NaN where the AUC is.
    auc_low: float = float("nan")
    auc_high: float = float("nan")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula with ties counted half; NaN when a class is absent."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step-wise)."""
    from sklearn.metrics import average_precision_score

    if len(set(np.asarray(labels).tolist())) < 2:
        return float("nan")
    return float(average_precision_score(labels, scores))


def score_histograms(
    labels: np.ndarray, scores: np.ndarray, bins: int = HIST_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of scores in ``bins`` equal bins on [0, 1], for positives and for negatives."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    labels = np.asarray(labels)
    pos = np.bincount(index[labels == 1], minlength=bins)
    neg = np.bincount(index[labels == 0], minlength=bins)
    return pos, neg


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from score histograms by label: P(score+ > score-) + 0.5 P(same bin)."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def degenerate(
    auc_: float, hist_pos: Sequence[int] | np.ndarray, hist_neg: Sequence[int] | np.ndarray
) -> bool:
    """Whether a model is degenerate on some test rows: AUC below 0.5 (worse than chance), or
    every score in one histogram bin (constant scores: it ranks nothing). Such a model is no
    reference to compare a federated model with."""
    occupied = int(np.count_nonzero(np.asarray(hist_pos) + np.asarray(hist_neg)))
    return bool(auc_ < 0.5) or occupied == 1


def auc_interval(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The AUC's 95 % interval by DeLong's method (DeLong et al. 1988; ties count half, as in
    :func:`auc`), clipped to [0, 1]; NaN without both classes. The variance is built from each
    row's structural component: for a positive, the share of negatives it outranks; for a
    negative, the share of positives that outrank it."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse[labels == 1], minlength=values.size)
    neg = np.bincount(inverse[labels == 0], minlength=values.size)
    return auc_interval_from_histograms(pos, neg)


def auc_interval_from_histograms(
    pos: Sequence[int] | np.ndarray, neg: Sequence[int] | np.ndarray
) -> tuple[float, float]:
    """DeLong's 95 % interval of the AUC of score histograms by label (bins in score order, a
    bin's rows tied): what :func:`auc_interval` gives for scores that equal their bin. NaN
    without both classes."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    m, n = pos.sum(), neg.sum()
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    # A positive in bin i outranks the negatives below i and half of those in i; a negative in
    # bin j is outranked by the positives above j and half of those in j.
    v10 = (np.cumsum(neg) - neg + 0.5 * neg) / n
    v01 = (pos.sum() - np.cumsum(pos) + 0.5 * pos) / m
    theta = float((pos * v10).sum() / m)
    var10 = float((pos * (v10 - theta) ** 2).sum() / (m - 1)) if m > 1 else 0.0
    var01 = float((neg * (v01 - theta) ** 2).sum() / (n - 1)) if n > 1 else 0.0
    half = Z95 * math.sqrt(var10 / m + var01 / n)
    return max(0.0, theta - half), min(1.0, theta + half)


@dataclass(frozen=True)
class Difference:
    """AUC(a) − AUC(b) on one set of rows, with its standard error (DeLong, paired)."""

    value: float
    se: float

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % interval, clipped to [−1, 1]; NaN where the difference is."""
        if not (math.isfinite(self.value) and math.isfinite(self.se)):
            return float("nan"), float("nan")
        half = Z95 * self.se
        return max(-1.0, self.value - half), min(1.0, self.value + half)

    @staticmethod
    def mean(parts: Sequence[Difference]) -> Difference:
        """The mean of differences on disjoint, independent rows (the macro over sites): its
        variance is the sum of theirs over the count squared."""
        k = len(parts)
        if k == 0:
            return Difference(float("nan"), float("nan"))
        return Difference(
            sum(d.value for d in parts) / k, math.sqrt(sum(d.se**2 for d in parts)) / k
        )


def _components(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of one model's scores: for each positive, the share of
    negatives it outranks; for each negative, the share of positives that outrank it (ties
    count half)."""
    pos, neg = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    below = np.searchsorted(neg, scores[labels == 1], "left")
    tied = np.searchsorted(neg, scores[labels == 1], "right") - below
    v10 = (below + 0.5 * tied) / neg.size
    at_most = np.searchsorted(pos, scores[labels == 0], "right")
    tied = at_most - np.searchsorted(pos, scores[labels == 0], "left")
    v01 = (pos.size - at_most + 0.5 * tied) / pos.size
    return v10, v01


def auc_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> Difference:
    """AUC(a) − AUC(b) for two models' scores on the same rows, with the standard error of
    DeLong's paired test (DeLong et al. 1988): the two AUCs' covariance, from each row's
    structural components under both models, is taken out. NaN without both classes."""
    labels = np.asarray(labels)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(labels) or len(b) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(a)} and {len(b)} scores")
    m, n = int((labels == 1).sum()), int((labels == 0).sum())
    if m == 0 or n == 0:
        return Difference(float("nan"), float("nan"))
    (a10, a01), (b10, b01) = _components(labels, a), _components(labels, b)
    # The variance of the difference of the components' means, positives' and negatives'.
    d10, d01 = a10 - b10, a01 - b01
    var = (float(d10.var(ddof=1)) / m if m > 1 else 0.0) + (
        float(d01.var(ddof=1)) / n if n > 1 else 0.0
    )
    return Difference(float(a10.mean() - b10.mean()), math.sqrt(max(var, 0.0)))


#: Equal-width bins of the reliability curve and the expected calibration error.
CALIBRATION_BINS = 10


@dataclass(frozen=True)
class Calibration:
    """How well scores read as probabilities, from score histograms by label."""

    brier: float
    #: Expected calibration error: the row-weighted mean gap between the mean score and the
    #: share of positives over :data:`CALIBRATION_BINS` equal bins.
    ece: float
    #: The reliability curve: (mean score, share of positives, rows) of each bin holding rows.
    curve: tuple[tuple[float, float, int], ...]


def calibration_from_histograms(
    pos: Sequence[int] | np.ndarray, neg: Sequence[int] | np.ndarray, bins: int = CALIBRATION_BINS
) -> Calibration:
    """Brier score, ECE and reliability curve of score histograms by label (each row's score
    taken at its bin's middle: within half a bin, 0.0005 at 1,000 bins; with fewer histogram
    bins than ``bins``, or a count not a multiple of it, the curve's bins are those histogram
    bins grouped as evenly as they go); NaN without rows.
    What a coordinator can compute from the pooled histograms alone, no score leaving a site."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    total = pos + neg
    n = total.sum()
    if n == 0:
        return Calibration(float("nan"), float("nan"), ())
    middle = (np.arange(total.size) + 0.5) / total.size
    brier = float((pos * (1 - middle) ** 2 + neg * middle**2).sum() / n)
    group = np.minimum((middle * bins).astype(np.int64), bins - 1)
    rows = np.bincount(group, weights=total, minlength=bins)
    scored = np.bincount(group, weights=total * middle, minlength=bins)
    positives = np.bincount(group, weights=pos, minlength=bins)
    curve = tuple(
        (float(scored[g] / rows[g]), float(positives[g] / rows[g]), int(rows[g]))
        for g in range(bins)
        if rows[g] > 0
    )
    ece = sum(k * abs(observed - mean) for mean, observed, k in curve) / n
    return Calibration(brier, float(ece), curve)


def pool_histograms(
    histograms: Sequence[tuple[Sequence[int], Sequence[int]]],
) -> tuple[np.ndarray, np.ndarray]:
    """Several sites' score histograms summed, positives' and negatives' (at least one)."""
    pos = np.sum([np.asarray(h[0]) for h in histograms], axis=0)
    neg = np.sum([np.asarray(h[1]) for h in histograms], axis=0)
    return pos, neg


def pooled_auc(histograms: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """AUC over the union of several sites' rows, from their histograms alone."""
    if not histograms:
        return float("nan")
    return auc_from_histograms(*pool_histograms(histograms))


def evaluate_scores(
    labels: np.ndarray, scores: np.ndarray, loss: float, bins: int = HIST_BINS
) -> Evaluation:
    """All reported metrics for probabilities ``scores`` of the positive class (the score
    histograms in ``bins`` bins)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = score_histograms(labels, scores, bins)
    low, high = auc_interval(labels, scores)
    return Evaluation(
        n=len(labels),
        loss=float(loss),
        auc=auc(labels, scores),
        auprc=auprc(labels, scores),
        accuracy=float(((scores >= 0.5).astype(int) == labels).mean()),
        brier=float(((scores - labels) ** 2).mean()),
        hist_pos=tuple(int(x) for x in pos),
        hist_neg=tuple(int(x) for x in neg),
        auc_low=low,
        auc_high=high,
    )
