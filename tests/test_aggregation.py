from __future__ import annotations

import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest

from fedpeft.common.errors import DeltaRejected
from fedpeft.server.aggregation import (
    CAPPED_EXAMPLES,
    CLIPPED_TO,
    NORM,
    TRIMMED,
    WEIGHT,
    Bounds,
    ServerOptimizer,
    aggregate,
    apply_delta,
    dp_aggregate,
    fedavg,
    server_step,
    trim_count,
    trimmed_mean,
    update_norm,
)
from fedpeft.server.rounds import select_round
from fedpeft.server.store import RoundResult
from fedpeft.server.validation import validate_delta


def _state(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 3), value, np.float32), "b": np.full(4, value, np.float32)}


def test_fedavg_weights_by_examples() -> None:
    out = fedavg([(_state(1.0), 30), (_state(4.0), 10)])
    assert np.allclose(out["a"], 1.75) and np.allclose(out["b"], 1.75)
    assert out["a"].dtype == np.float32 and out["a"].shape == (2, 3)


def test_fedavg_of_one_is_identity_and_refuses_empty() -> None:
    delta = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert np.array_equal(fedavg([(delta, 5)])["a"], delta["a"])
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        fedavg([(delta, 0)])


def test_apply_delta() -> None:
    out = apply_delta(_state(1.0), _state(0.5))
    assert np.allclose(out["a"], 1.5)


def test_the_server_step_of_fedavg_adds_the_update_times_its_rate() -> None:
    state, moments = server_step(_state(1.0), _state(0.5), {}, ServerOptimizer())
    assert np.allclose(state["a"], 1.5) and moments == {}
    state, _ = server_step(_state(1.0), _state(0.5), {}, ServerOptimizer(lr=0.2))
    assert np.allclose(state["b"], 1.1)


def test_fedadam_steps_by_the_updates_moments() -> None:
    # Reddi et al. 2021, Algorithm 2, by hand: Δ = 1 twice, β1 0.9, β2 0.99, τ 1e-3, η 0.1.
    opt = ServerOptimizer("fedadam", lr=0.1)
    one, moments = server_step(_state(0.0), _state(1.0), {}, opt)
    assert np.allclose(one["a"], 0.1 * 0.1 / (0.1 + 1e-3))  # m 0.1, v 0.01
    assert np.allclose(moments["m/a"], 0.1) and np.allclose(moments["v/b"], 0.01)
    two, moments = server_step(one, _state(1.0), moments, opt)
    assert np.allclose(two["a"] - one["a"], 0.1 * 0.19 / (np.sqrt(0.0199) + 1e-3))
    assert sorted(moments) == ["m/a", "m/b", "v/a", "v/b"]
    # A negative update moves the state down by the same rule.
    down, _ = server_step(_state(0.0), _state(-1.0), {}, opt)
    assert np.allclose(down["b"], -one["b"])


def test_fedyogi_grows_its_second_moment_additively() -> None:
    # Yogi: v − (1−β2)·Δ²·sign(v − Δ²): from v = 0.01 and Δ = 2 (Δ² > v), v grows by 0.04,
    # where Adam's would be 0.99·0.01 + 0.04.
    opt = ServerOptimizer("fedyogi", lr=0.1)
    _, moments = server_step(_state(0.0), _state(1.0), {}, opt)
    _, yogi = server_step(_state(0.0), _state(2.0), moments, opt)
    _, adam = server_step(_state(0.0), _state(2.0), moments, ServerOptimizer("fedadam", lr=0.1))
    assert np.allclose(yogi["v/a"], 0.01 + 0.04) and np.allclose(adam["v/a"], 0.0099 + 0.04)


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        ({"a": np.full((2, 3), np.nan, np.float32), "b": np.zeros(4, np.float32)}, "non-finite"),
        ({"a": np.full((2, 3), np.inf, np.float32), "b": np.zeros(4, np.float32)}, "non-finite"),
    ],
)
def test_validation_rejects_with_reason(delta: dict[str, np.ndarray], reason: str) -> None:
    # Names, shapes and dtype are open_delta's (tests/test_envelope.py); the values are ours.
    with pytest.raises(DeltaRejected) as info:
        validate_delta(delta, 10)
    assert info.value.reason == reason


def test_select_round_takes_lowest_validation_loss() -> None:
    def rnd(n: int, val: float | None) -> RoundResult:
        t = datetime(2026, 1, 1)
        return RoundResult(n, t, t, 1.0, None, None, None, 1, 0, True, val_loss=val)

    assert select_round([rnd(1, 0.5), rnd(2, 0.3), rnd(3, 0.4)]) == 2
    assert select_round([rnd(1, 0.3), rnd(2, 0.3)]) == 1  # ties: the earlier round
    assert select_round([rnd(1, None), rnd(2, None)]) == 2  # nothing to choose by: the last
    assert select_round([]) is None


def test_validation_example_count_and_norm() -> None:
    with pytest.raises(DeltaRejected) as info:
        validate_delta(_state(0.0), 0)
    assert info.value.reason == "examples"
    with pytest.raises(DeltaRejected) as info:
        validate_delta(_state(1.0), 3, max_norm=1.0)
    assert info.value.reason == "norm"
    validate_delta(_state(0.1), 3, max_norm=1.0)  # within the bound


def test_the_pure_parts_import_no_torch() -> None:
    """Aggregation, validation, reading replies, round rows and the envelope are functions of
    arrays and records: importing them (in a fresh interpreter, so nothing is loaded yet) must
    not load torch."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "    if 'torch' in sys.modules:\n"
        "        sys.exit(f'importing {name} loads torch')\n"
    )
    pure = (
        "fedpeft.server.aggregation",
        "fedpeft.server.validation",
        "fedpeft.server.replies",
        "fedpeft.server.rounds",
        "fedpeft.common.envelope",
    )
    done = subprocess.run([sys.executable, "-c", code, *pure], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_trimmed_mean_drops_the_extremes_of_every_coordinate() -> None:
    a = {"x": np.array([0.0, 10.0], np.float32)}
    b = {"x": np.array([1.0, -100.0], np.float32)}
    c = {"x": np.array([2.0, 20.0], np.float32)}
    mean, dropped = trimmed_mean([a, b, c], trim=1)
    np.testing.assert_array_equal(mean["x"], [1.0, 10.0])  # the median of three, per coordinate
    assert dropped == [0.5, 0.5, 1.0]  # c is the largest in both coordinates
    plain, none = trimmed_mean([a, b, c], trim=0)
    np.testing.assert_allclose(plain["x"], [1.0, -70.0 / 3], rtol=1e-6)
    assert none == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="cannot drop 1"):
        trimmed_mean([a, b], trim=1)


@pytest.mark.parametrize(("n", "trim"), [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (10, 2)])
def test_trim_count_rounds_up_and_keeps_one(n: int, trim: int) -> None:
    assert trim_count(n, 0.2) == trim


def test_aggregate_caps_counts_and_clips_norms_and_says_so() -> None:
    honest = [("A", _state(1.0), 100), ("B", _state(2.0), 120)]
    greedy = ("X", _state(40.0), 2**62)
    delta, notes = aggregate([*honest, greedy], Bounds(examples_factor=10.0, norm_factor=5.0))
    # X's count is capped at 10 x the median (120) and its update scaled to 5 x the median norm
    # (B's, 2 x the norm of ones).
    ones = update_norm(_state(1.0))
    assert notes["X"][CAPPED_EXAMPLES] == 1200
    assert notes["X"][CLIPPED_TO] == pytest.approx(5 * 2 * ones)
    assert notes["X"][NORM] == pytest.approx(40 * ones)
    assert CLIPPED_TO not in notes["A"] and CAPPED_EXAMPLES not in notes["B"]
    assert [notes[s][WEIGHT] for s in "ABX"] == pytest.approx([100 / 1420, 120 / 1420, 1200 / 1420])
    expected = (100 * 1.0 + 120 * 2.0 + 1200 * 10.0) / 1420
    for value in delta.values():
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    # Without bounds the greedy site is the aggregate.
    unbounded, _ = aggregate([*honest, greedy], Bounds())
    for value in unbounded.values():
        np.testing.assert_allclose(value, 40.0, rtol=1e-6)
    # With two updates a median says little: only the absolute cap applies.
    _, two = aggregate([honest[0], greedy], Bounds(max_examples=500, examples_factor=10.0))
    assert two["X"][CAPPED_EXAMPLES] == 500 and CLIPPED_TO not in two["X"]


def test_aggregate_with_a_trimmed_mean_records_what_each_site_lost() -> None:
    updates = [("A", _state(1.0), 10), ("B", _state(2.0), 10), ("X", _state(50.0), 10**6)]
    delta, notes = aggregate(updates, Bounds(aggregator="trimmed-mean"))
    for value in delta.values():  # X's extreme values dropped everywhere
        np.testing.assert_allclose(value, 2.0)
    assert [notes[s][TRIMMED] for s in "ABX"] == [1.0, 0.0, 1.0]
    assert all(WEIGHT not in n for n in notes.values())


def test_dp_aggregate_adds_noise_of_sigma_c_on_the_sum_then_divides_by_the_sites() -> None:
    """DP-FedAvg: two zero updates of 200,000 entries, σ·C = 0.5 on the sum, two sites: the
    aggregate's entries have standard deviation 0.25 (measured within 2 %) and mean 0."""
    zero = {"w": np.zeros(200_000, np.float32)}
    out, notes = dp_aggregate([("A", zero), ("B", zero)], 1.0, 0.5, np.random.default_rng(7))
    assert abs(float(out["w"].std()) - 0.25) < 0.25 * 0.02
    assert abs(float(out["w"].mean())) < 0.005
    assert notes == {
        "A": {"weight": 0.5, "update-norm": 0.0},
        "B": {"weight": 0.5, "update-norm": 0.0},
    }


def test_dp_aggregate_clips_what_a_site_sent_above_the_clip() -> None:
    big = {"w": np.full(4, 3.0, np.float32)}  # norm 6
    small = {"w": np.full(4, 0.25, np.float32)}  # norm 0.5
    out, notes = dp_aggregate([("A", big), ("B", small)], 1.0, 0.0, np.random.default_rng(0))
    np.testing.assert_allclose(out["w"], (0.5 + 0.25) / 2, rtol=1e-6)
    assert notes["A"] == {"weight": 0.5, "update-norm": 6.0, "clipped-to": 1.0}
    assert notes["B"] == {"weight": 0.5, "update-norm": 0.5}
