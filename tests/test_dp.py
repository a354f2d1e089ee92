"""Client-level DP (common/dp.py): clipping, noise, DP-FedAvg's average and the accountant, whose
numbers are checked against values the accounting libraries publish in their own tests."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from fedpeft.common.config import DPConfig
from fedpeft.common.dp import (
    Accountant,
    clip_update,
    dp_average,
    gaussian_noise_like,
    l2_norm,
    noise_std_central,
    noise_std_per_site,
    resolve_noise_multiplier,
    sum_updates,
)
from fedpeft.common.errors import ConfigError
from fedpeft.common.state import State

#: Opacus' default Rényi orders (opacus/accountants/rdp.py, RDPAccountant.DEFAULT_ALPHAS).
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _state(rng: np.random.Generator, scale: float = 1.0) -> State:
    return {
        "a.weight": (rng.standard_normal((64, 8)) * scale).astype(np.float32),
        "b.bias": (rng.standard_normal(8) * scale * 1e-3).astype(np.float32),
        "head": (rng.standard_normal((3, 5, 7)) * scale * 50).astype(np.float32),
    }


def _flat(state: State) -> np.ndarray:
    return np.concatenate([v.astype(np.float64).ravel() for v in state.values()])


# -- clipping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_clipping_scales_a_large_update_to_the_bound_and_never_above_it(seed: int) -> None:
    rng = np.random.default_rng(seed)
    delta = _state(rng, scale=10.0 ** rng.uniform(-2, 4))
    clip = float(10.0 ** rng.uniform(-3, 0))
    norm = float(np.linalg.norm(_flat(delta)))
    assert norm > clip
    clipped, reported = clip_update(delta, clip)
    assert reported == pytest.approx(norm, rel=1e-12)
    after = float(np.linalg.norm(_flat(clipped)))
    assert clip * (1 - 2.0**-21) <= after <= clip  # never above, float32 rounding included
    assert list(clipped) == list(delta) and all(v.dtype == np.float32 for v in clipped.values())
    # One factor for every tensor: the direction is kept.
    ratios = _flat(clipped)[_flat(delta) != 0] / _flat(delta)[_flat(delta) != 0]
    np.testing.assert_allclose(ratios, clip / norm, rtol=1e-6)


def test_an_update_within_the_bound_comes_back_unchanged_as_a_copy() -> None:
    delta = _state(np.random.default_rng(1), scale=1e-3)
    norm = l2_norm(delta)
    clipped, reported = clip_update(delta, clip=norm * 1.5)
    assert reported == norm
    for name in delta:
        np.testing.assert_array_equal(clipped[name], delta[name])
    clipped["head"][...] = 7.0
    assert not (delta["head"] == 7.0).any()
    exact, _ = clip_update(delta, clip=norm)  # at the bound: unchanged too
    np.testing.assert_array_equal(exact["a.weight"], delta["a.weight"])


def test_clipping_refuses_a_bad_bound_or_a_non_finite_update() -> None:
    delta = _state(np.random.default_rng(2))
    for clip in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip must be positive"):
            clip_update(delta, clip)
    delta["b.bias"][0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_update(delta, 1.0)


# -- noise and the average ---------------------------------------------------------------------


def test_gaussian_noise_has_the_asked_standard_deviation() -> None:
    like = {"x": np.zeros((400, 500), dtype=np.float32), "y": np.zeros(3, dtype=np.float32)}
    noise = gaussian_noise_like(like, 0.7, np.random.default_rng(3))
    assert {k: (v.shape, v.dtype) for k, v in noise.items()} == {
        "x": ((400, 500), np.float32),
        "y": ((3,), np.float32),
    }
    values = _flat(noise)
    n = values.size  # 200,003: the std of the sample std is 0.7 / sqrt(2n), about 0.16 %
    assert np.std(values) == pytest.approx(0.7, rel=0.01)
    assert abs(np.mean(values)) < 5 * 0.7 / math.sqrt(n)
    assert not _flat(gaussian_noise_like(like, 0.0, np.random.default_rng(3))).any()
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_noise_like(like, -1.0, np.random.default_rng(3))


def test_the_sites_noise_shares_sum_to_the_central_noise() -> None:
    sigma, clip, n = 1.3, 0.5, 7
    assert noise_std_central(sigma, clip) == pytest.approx(0.65)
    share = noise_std_per_site(sigma, clip, n)
    assert share == pytest.approx(0.65 / math.sqrt(7))
    like = {"x": np.zeros(100_000, dtype=np.float32)}
    rng = np.random.default_rng(4)
    total = sum_updates([gaussian_noise_like(like, share, rng) for _ in range(n)])
    assert np.std(total["x"]) == pytest.approx(noise_std_central(sigma, clip), rel=0.01)
    with pytest.raises(ValueError, match="at least one input"):
        noise_std_per_site(sigma, clip, 0)


def test_dp_average_is_the_noisy_sum_over_the_participants() -> None:
    rng = np.random.default_rng(5)
    updates = [_state(rng) for _ in range(4)]
    total = sum_updates(updates)
    np.testing.assert_allclose(
        total["head"], sum(u["head"].astype(np.float64) for u in updates), rtol=1e-6
    )
    # Without noise: the plain uniform mean.
    mean = dp_average(total, 4, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(mean["a.weight"], total["a.weight"] / 4, rtol=1e-6)
    # With noise std s on the sum, the average carries s / n.
    zeros = {"x": np.zeros(200_000, dtype=np.float32)}
    noisy = dp_average(zeros, 4, 2.0, np.random.default_rng(6))
    assert np.std(noisy["x"]) == pytest.approx(0.5, rel=0.01)
    with pytest.raises(ValueError, match="at least one participant"):
        dp_average(zeros, 0, 1.0, np.random.default_rng(6))


# -- the accountant ----------------------------------------------------------------------------


def test_the_run_s_epsilon_matches_opacus_published_value() -> None:
    # opacus/tests/accountants_test.py (pytorch/opacus), test_rdp_accountant: noise multiplier
    # 1.5, sample rate 0.04, int(90 / 0.04) = 2250 steps, delta 1e-5 -> epsilon 7.32911117143.
    accountant = Accountant(1.5, 1e-5)
    for _ in range(2250):
        accountant.record_round(0.04, [])
    assert accountant.rounds == 2250
    assert accountant.epsilon() == pytest.approx(7.32911117143, abs=1e-7)
    # fedpeft's larger orders only add candidates: here the best order is Opacus' own.
    opacus_orders = Accountant(1.5, 1e-5, orders=OPACUS_ORDERS)
    for _ in range(2250):
        opacus_orders.record_round(0.04, [])
    assert opacus_orders.epsilon() == pytest.approx(accountant.epsilon(), abs=1e-12)


def test_the_composed_rdp_matches_the_published_sampled_gaussian_values() -> None:
    # google/differential-privacy, python/dp_accounting/dp_accounting/rdp/
    # rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian (as first
    # published; TF Privacy's rdp_accountant_test.py had the same): q = 0.01, sigma = 2.5,
    # 50 steps, at orders 1.5, 2.5, 5, 50, 100, inf, within rtol 1e-4. (A later revision of
    # that test changed the two fractional orders' values, 6.7058e-04 and 1.0855e-03, with a
    # revised computation for fractional orders; Opacus 1.6 gives the first ones.)
    orders = [1.5, 2.5, 5, 50, 100, math.inf]
    accountant = Accountant(2.5, 1e-5, orders=orders)
    for _ in range(50):
        accountant.record_round(0.01, [])
    expected = [6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e02, math.inf]
    np.testing.assert_allclose(accountant.rdp(), expected, rtol=1e-4)


def test_every_site_in_every_round_is_the_plain_gaussian_and_known_in_closed_form() -> None:
    # q = 1: T rounds of the Gaussian mechanism have RDP T * alpha / (2 sigma^2) exactly
    # (Mironov 2017, Proposition 7), whatever the library.
    accountant = Accountant(2.0, 1e-5)
    for _ in range(5):
        accountant.record_round(1.0, ["A", "B"])
    np.testing.assert_allclose(
        accountant.rdp(), [5 * a / (2 * 2.0**2) for a in accountant.orders], rtol=1e-12
    )


@pytest.mark.parametrize(
    ("target", "sample_rate", "rounds"), [(1.0, 1.0, 5), (3.0, 0.5, 20), (8.0, 0.04, 2250)]
)
def test_a_calibrated_noise_multiplier_spends_at_most_the_target(
    target: float, sample_rate: float, rounds: int
) -> None:
    sigma = Accountant.calibrate(target, 1e-5, sample_rate, rounds)
    accountant = Accountant(sigma, 1e-5)
    for _ in range(rounds):
        accountant.record_round(sample_rate, [])
    assert target - 0.01 <= accountant.epsilon() <= target  # Opacus' search: within 0.01
    # A little less noise overshoots it: the search did not return a needlessly large sigma.
    looser = Accountant(sigma * 0.97, 1e-5)
    for _ in range(rounds):
        looser.record_round(sample_rate, [])
    assert looser.epsilon() > target


def test_a_site_s_epsilon_counts_only_its_rounds_each_unamplified() -> None:
    every = Accountant(1.2, 1e-5)
    for r in range(6):
        every.record_round(1.0, ["A", "B"] if r % 2 else ["A", "B", "C"])
    eps = every.epsilon()
    sites = every.site_epsilons()
    assert list(sites) == ["A", "B", "C"]
    # q = 1 in every round: a site in every round spends the run's epsilon, others less.
    assert sites["A"] == sites["B"] == pytest.approx(eps, rel=1e-12)
    assert 0 < sites["C"] < eps
    assert every.site_epsilon("D") == 0.0

    # q < 1: the run's epsilon is amplified by sampling; a site's, which the coordinator's
    # knowledge of who took part voids, is not, and can exceed the run's.
    sampled = Accountant(1.2, 1e-5)
    history: list[float] = []
    for r in range(10):
        sampled.record_round(0.2, ["A"] if r < 2 else ["B"])
        history.append(sampled.site_epsilon("A"))
    assert sampled.site_epsilon("A") > sampled.epsilon()
    assert history == sorted(history)  # never decreases
    # Never more than q = 1 for every round.
    full = Accountant(1.2, 1e-5)
    for _ in range(10):
        full.record_round(1.0, ["B"])
    assert sampled.site_epsilon("B") <= full.epsilon()


def test_peek_gives_the_next_round_s_epsilon_without_recording_it() -> None:
    accountant = Accountant(1.0, 1e-5)
    assert accountant.epsilon() == 0.0
    accountant.record_round(0.5, ["A"])
    ahead = accountant.peek(0.5)
    assert accountant.rounds == 1 and ahead > accountant.epsilon()
    accountant.record_round(0.5, ["B"])
    assert accountant.epsilon() == pytest.approx(ahead, rel=1e-12)


def test_bad_accounting_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="noise_multiplier must be positive"):
        Accountant(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        Accountant(1.0, 1.0)
    accountant = Accountant(1.0, 1e-5)
    for q in (0.0, 1.5):
        with pytest.raises(ValueError, match="sample_rate"):
            accountant.record_round(q, ["A"])
    with pytest.raises(ValueError, match="once"):
        accountant.record_round(1.0, ["A", "A"])
    with pytest.raises(ValueError, match="target_epsilon"):
        Accountant.calibrate(0.0, 1e-5, 1.0, 5)


def test_the_noise_multiplier_is_the_configured_one_or_calibrated_from_the_target() -> None:
    assert resolve_noise_multiplier(DPConfig(), rounds=5, sample_rate=1.0) == 0.0
    assert resolve_noise_multiplier(DPConfig(enabled=True, noise_multiplier=1.1), 5, 1.0) == 1.1
    target = DPConfig(enabled=True, target_epsilon=3.0)
    assert resolve_noise_multiplier(target, 5, 1.0) == Accountant.calibrate(3.0, 1e-5, 1.0, 5)
    with pytest.raises(ConfigError, match=r"federation.dp.target_epsilon: 1e-09 cannot be"):
        resolve_noise_multiplier(DPConfig(enabled=True, target_epsilon=1e-9), 5, 1.0)


def test_importing_dp_loads_neither_torch_nor_opacus_and_opacus_leaves_logging_alone() -> None:
    """The clipping and noise are numpy only (a site's or the coordinator's pure path); Opacus,
    which loads torch, comes with the accountant's first use, and its import-time
    ``logging.basicConfig`` handler does not stay on the root logger."""
    code = (
        "import logging, sys\n"
        "import fedpeft.common.dp as dp\n"
        "assert 'torch' not in sys.modules and 'opacus' not in sys.modules\n"
        "dp.Accountant(1.0, 1e-5).record_round(1.0, ['A'])\n"
        "a = dp.Accountant(1.0, 1e-5); a.record_round(1.0, ['A']); a.epsilon()\n"
        "assert 'opacus' in sys.modules\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
