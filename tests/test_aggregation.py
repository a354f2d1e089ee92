from __future__ import annotations

import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest

from fedpeft.common.errors import DeltaRejected
from fedpeft.server.aggregation import apply_delta, fedavg
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
