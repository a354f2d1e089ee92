"""Aggregation: pure functions over name -> array maps, no network, no Flower."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpeft.common.state import State


def fedavg(deltas: Sequence[tuple[State, int]]) -> State:
    """Example-weighted mean of site deltas (FedAvg over updates).

    ``deltas`` holds (delta, n_examples) pairs with identical names and shapes (validated before).
    Sums run in float64 and in the given order; callers sort by site for reproducibility.
    """
    if not deltas:
        raise ValueError("fedavg needs at least one delta")
    weights = np.asarray([n for _, n in deltas], dtype=np.float64)
    if (weights <= 0).any():
        raise ValueError("every delta needs a positive example count")
    weights = weights / weights.sum()
    names = deltas[0][0].keys()
    return {
        name: sum(
            (w * d[name].astype(np.float64) for (d, _), w in zip(deltas, weights, strict=True)),
            start=np.zeros_like(deltas[0][0][name], dtype=np.float64),
        ).astype(np.float32)
        for name in names
    }


def apply_delta(state: State, delta: State) -> State:
    """``state + delta`` by name."""
    return {name: (value + delta[name]).astype(np.float32) for name, value in state.items()}
