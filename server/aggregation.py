"""Aggregation: pure functions over name -> array maps, no network, no Flower."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedpeft.common.dp import clip_update, dp_average, sum_updates
from fedpeft.common.methods.lora import rank_weights
from fedpeft.common.state import State


def fedavg(deltas: Sequence[tuple[State, int]], ranks: Sequence[int] | None = None) -> State:
    """Example-weighted mean of site deltas (FedAvg over updates).

    ``deltas`` holds (delta, n_examples) pairs with identical names and shapes (validated before).
    Sums run in float64 and in the given order; callers sort by site for reproducibility.
    ``ranks``: the LoRA rank each site trained at, for sites of different capacity: each LoRA
    component is then the mean over the sites that trained it (common/methods/lora.py
    ``rank_weights``); without it every site weighs in every coordinate.
    """
    if not deltas:
        raise ValueError("fedavg needs at least one delta")
    weights = np.asarray([n for _, n in deltas], dtype=np.float64)
    if (weights <= 0).any():
        raise ValueError("every delta needs a positive example count")
    weights = weights / weights.sum()
    names = deltas[0][0].keys()
    out: State = {}
    for name in names:
        shape = deltas[0][0][name].shape
        site_weights = (
            list(weights)
            if ranks is None
            else list(rank_weights(name, shape, weights, np.asarray(ranks, dtype=np.int64)))
        )
        out[name] = sum(
            (
                w * d[name].astype(np.float64)
                for (d, _), w in zip(deltas, site_weights, strict=True)
            ),
            start=np.zeros(shape, dtype=np.float64),
        ).astype(np.float32)
    return out


def apply_delta(state: State, delta: State) -> State:
    """``state + delta`` by name."""
    return {name: (value + delta[name]).astype(np.float32) for name, value in state.items()}


@dataclass(frozen=True)
class ServerOptimizer:
    """``federation.server_optimizer`` and its settings (common/config.py)."""

    name: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


def server_step(
    state: State, delta: State, moments: State, opt: ServerOptimizer
) -> tuple[State, State]:
    """The next global state from the round's aggregated update ``delta``, and the optimizer's
    moments after the step (``m/NAME``, ``v/NAME``; empty for fedavg). Pure.

    fedavg: ``x + lr·Δ``. fedadam / fedyogi (Reddi et al. 2021, Algorithm 2): ``m = β1·m +
    (1−β1)·Δ``; Adam ``v = β2·v + (1−β2)·Δ²``, Yogi ``v = v − (1−β2)·Δ²·sign(v − Δ²)``;
    ``x + lr·m / (√v + τ)``. The moments start at zero (as Flower's FedAdam and FedYogi
    do)."""
    if opt.name == "fedavg":
        if opt.lr == 1.0:
            return apply_delta(state, delta), {}
        return apply_delta(state, scale(delta, opt.lr)), {}
    new_state, new_moments = {}, {}
    for name, value in state.items():
        d = delta[name].astype(np.float64)
        m = moments.get(f"m/{name}", np.zeros_like(value)).astype(np.float64)
        v = moments.get(f"v/{name}", np.zeros_like(value)).astype(np.float64)
        m = opt.beta1 * m + (1 - opt.beta1) * d
        if opt.name == "fedadam":
            v = opt.beta2 * v + (1 - opt.beta2) * d * d
        else:
            v = v - (1 - opt.beta2) * d * d * np.sign(v - d * d)
        step = opt.lr * m / (np.sqrt(v) + opt.tau)
        new_state[name] = (value.astype(np.float64) + step).astype(np.float32)
        new_moments[f"m/{name}"] = m.astype(np.float32)
        new_moments[f"v/{name}"] = v.astype(np.float32)
    return new_state, new_moments


def update_norm(delta: State) -> float:
    """The L2 norm of an update over all its tensors (float64)."""
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values())))


def scale(delta: State, factor: float) -> State:
    """``delta * factor`` by name, in float32."""
    return {
        name: (value.astype(np.float64) * factor).astype(np.float32)
        for name, value in delta.items()
    }


def trimmed_mean(deltas: Sequence[State], trim: int) -> tuple[State, list[float]]:
    """Coordinate-wise trimmed mean: in every coordinate the ``trim`` largest and ``trim``
    smallest values are dropped and the rest averaged (unweighted), which bounds what any
    ``trim`` sites can do to a coordinate. Also returns, per delta, the share of its coordinates
    that were dropped.

    Needs more than ``2 * trim`` deltas with identical names and shapes."""
    n = len(deltas)
    if trim < 0 or n <= 2 * trim:
        raise ValueError(f"a trimmed mean of {n} update(s) cannot drop {trim} from each end")
    dropped = np.zeros(n, dtype=np.int64)
    size = 0
    out: State = {}
    for name in deltas[0]:
        stacked = np.stack([d[name].astype(np.float64).ravel() for d in deltas])  # (n, k)
        order = np.argsort(stacked, axis=0, kind="stable")
        kept = np.take_along_axis(stacked, order[trim : n - trim], axis=0)
        out[name] = kept.mean(axis=0).reshape(deltas[0][name].shape).astype(np.float32)
        if trim:
            gone = np.concatenate([order[:trim], order[n - trim :]]).ravel()
            dropped += np.bincount(gone, minlength=n)
        size += stacked.shape[1]
    return out, [float(d) / max(size, 1) for d in dropped]


#: What :func:`aggregate` records of each site's update (a site result's ``extra``): its weight
#: in the aggregate (FedAvg) or the share of its coordinates dropped (trimmed mean), its norm as
#: sent, and what was bounded.
WEIGHT, NORM, CLIPPED_TO, CAPPED_EXAMPLES, TRIMMED = (
    "weight",
    "update-norm",
    "clipped-to",
    "examples-capped-to",
    "trimmed-share",
)


@dataclass(frozen=True)
class Bounds:
    """How far one site's update may move the global state (``[federation]``)."""

    #: Largest example count an update is weighted by; 0: no cap.
    max_examples: int = 0
    #: Counts above this many times the round's median count are capped to it (with at least 3
    #: updates); 0: off.
    examples_factor: float = 0.0
    #: Updates with a norm above this many times the round's median norm are scaled down to it
    #: (with at least 3 updates); 0: off.
    norm_factor: float = 0.0
    #: ``fedavg`` (example-weighted) or ``trimmed-mean`` (coordinate-wise, unweighted).
    aggregator: str = "fedavg"
    #: Trimmed mean: the share of updates dropped at each end of every coordinate (rounded up,
    #: leaving at least one).
    trim_fraction: float = 0.2


def trim_count(n: int, fraction: float) -> int:
    """Updates dropped at each end by a trimmed mean of ``n``: ``ceil(fraction * n)``, at most
    ``(n - 1) // 2`` (so at least one is kept)."""
    return min(math.ceil(fraction * n), (n - 1) // 2)


def capped_counts(signed: Sequence[int], bounds: Bounds) -> list[int]:
    """The example counts updates are weighted by: each capped at ``max_examples``, then, with
    3 or more, at ``examples_factor`` times the median of the capped counts."""
    counts = [min(n, bounds.max_examples or n) for n in signed]
    if bounds.examples_factor and len(counts) >= 3:
        relative = bounds.examples_factor * float(np.median(counts))
        counts = [min(n, max(1, math.floor(relative))) for n in counts]
    return counts


def secure_scales(signed: Mapping[str, int], bounds: Bounds) -> dict[str, float]:
    """Secure aggregation's weights: the factor in (0, 1] each site multiplies its update by
    before masking, its capped example count (:func:`capped_counts`) over the roster's largest.
    The unmasked sum divided by the survivors' factors' sum is then their FedAvg (no site's
    scaled update leaves the fixed-point range its clipped one had)."""
    sites = sorted(signed)
    counts = capped_counts([signed[s] for s in sites], bounds)
    top = max(counts, default=1)
    return {s: n / top for s, n in zip(sites, counts, strict=True)}


def aggregate(
    updates: Sequence[tuple[str, State, int]],
    bounds: Bounds,
    ranks: Mapping[str, int] | None = None,
) -> tuple[State, dict[str, dict[str, float]]]:
    """The round's aggregate of ``(site, delta, signed example count)`` updates (validated, in
    site order), bounded: counts capped at ``max_examples``, norms above ``norm_factor`` times
    the median scaled down to it, then FedAvg or a trimmed mean. Returns the aggregate and, per
    site, what :data:`WEIGHT` ... :data:`TRIMMED` say of its update.

    ``ranks``: the LoRA rank each site trained at (by site), when some trained below the run's.
    FedAvg then averages each LoRA component over the sites that trained it; a trimmed mean
    takes the others' zeros as values (it has no weights to renormalize)."""
    if not updates:
        raise ValueError("aggregate needs at least one update")
    notes: dict[str, dict[str, float]] = {site: {} for site, _, _ in updates}
    counts = capped_counts([n for _, _, n in updates], bounds)
    for (site, _, signed), n in zip(updates, counts, strict=True):
        if n < signed:
            notes[site][CAPPED_EXAMPLES] = float(n)
    norms = [update_norm(delta) for _, delta, _ in updates]
    deltas = [delta for _, delta, _ in updates]
    if bounds.norm_factor and len(updates) >= 3:
        bound = bounds.norm_factor * float(np.median(norms))
        for i, (site, delta, _) in enumerate(updates):
            if norms[i] > bound > 0:
                deltas[i] = scale(delta, bound / norms[i])
                notes[site][CLIPPED_TO] = bound
    for (site, _, _), norm in zip(updates, norms, strict=True):
        notes[site][NORM] = norm
    if bounds.aggregator == "trimmed-mean":
        mean, dropped = trimmed_mean(deltas, trim_count(len(deltas), bounds.trim_fraction))
        for (site, _, _), share in zip(updates, dropped, strict=True):
            notes[site][TRIMMED] = share
        return mean, notes
    total = float(sum(counts))
    for (site, _, _), n in zip(updates, counts, strict=True):
        notes[site][WEIGHT] = n / total
    pairs = list(zip(deltas, counts, strict=True))
    if ranks is not None:
        return fedavg(pairs, [ranks[site] for site, _, _ in updates]), notes
    return fedavg(pairs), notes


def dp_aggregate(
    updates: Sequence[tuple[str, State]], clip: float, noise_std: float, rng: np.random.Generator
) -> tuple[State, dict[str, dict[str, float]]]:
    """DP-FedAvg (McMahan et al. 2018; ``[federation.dp]``, central mode): each update clipped
    to L2 norm ``clip`` (sites clip before sealing; this holds whatever a site sent), summed,
    Gaussian noise of standard deviation ``noise_std`` added to the sum, divided by the number
    of updates: uniform weights, so that one site moves the sum by at most ``clip``. Example
    counts and the median-relative bounds play no part. Returns the aggregate and, per site,
    its :data:`WEIGHT`, :data:`NORM` as sent and, when it was scaled down, :data:`CLIPPED_TO`."""
    if not updates:
        raise ValueError("dp_aggregate needs at least one update")
    notes: dict[str, dict[str, float]] = {}
    clipped = []
    for site, delta in updates:
        bounded, norm = clip_update(delta, clip)
        clipped.append(bounded)
        notes[site] = {WEIGHT: 1.0 / len(updates), NORM: norm}
        if norm > clip:
            notes[site][CLIPPED_TO] = clip
    return dp_average(sum_updates(clipped), len(updates), noise_std, rng), notes
