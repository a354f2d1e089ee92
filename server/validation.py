"""Validation of a site's update before it may touch the global state.

:func:`fedpeft.common.envelope.open_delta` already fixes the update's layout: exactly the global
state's tensor names, in its order, with its shapes, decoded to float32 (else it rejects with
``names``, ``shape`` or ``dtype``). What is left is the values: every check here raises
:class:`DeltaRejected` with a stable reason code, recorded in the store for that site and round;
the round goes on without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedpeft.common import keys
from fedpeft.common.errors import DeltaRejected, Reason
from fedpeft.common.methods.lora import nonzero_beyond
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.state import State

#: The largest example count a site may sign: beyond it a count is no longer exact as a float
#: (nor fits every store's integer column); capping its weight is federation.max_examples's job.
MAX_SIGNED_EXAMPLES = 2**53


def validate_rank(delta: State, declared: float | None, run_rank: int) -> int:
    """The LoRA rank a site trained at, checked: ``declared`` (its reply's ``lora-rank``; None:
    the run's) must be a whole number in 1..``run_rank`` and the delta zero beyond it, else
    :class:`DeltaRejected` (``rank``). ``run_rank`` 0: not a LoRA run, nothing to check."""
    if run_rank == 0 or declared is None:
        return run_rank
    if not (np.isfinite(declared) and float(declared).is_integer() and 1 <= declared <= run_rank):
        raise DeltaRejected(Reason.RANK, f"LoRA rank {declared!r} outside 1..{run_rank}")
    rank = int(declared)
    beyond = nonzero_beyond(delta, rank)
    if beyond is not None:
        raise DeltaRejected(Reason.RANK, f"{beyond} is not zero beyond the rank {rank} sent")
    return rank


def validate_delta(delta: State, n_examples: float, max_norm: float | None = None) -> None:
    """Check an opened delta's values: finite everywhere, a positive whole example count of at
    most :data:`MAX_SIGNED_EXAMPLES`, and (when ``max_norm`` is set) an L2 norm over all tensors
    no larger than ``max_norm``."""
    for name, value in delta.items():
        if not np.isfinite(value).all():
            raise DeltaRejected(Reason.NON_FINITE, f"{name} holds NaN or Inf")
    if not (1 <= n_examples <= MAX_SIGNED_EXAMPLES and float(n_examples).is_integer()):
        raise DeltaRejected(Reason.EXAMPLES, f"example count {n_examples!r}")
    if max_norm is not None:
        norm = float(
            np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))
        )
        if norm > max_norm:
            raise DeltaRejected(Reason.NORM, f"update norm {norm:.3g} above bound {max_norm:.3g}")


#: What an evaluation must report (common/metrics.py; client/app.py handle_evaluate).
REQUIRED_EVALUATION = (keys.N_TEST, keys.LOSS, keys.AUC, keys.VAL_LOSS, keys.N_VAL)
#: Metrics that are a share, in [0, 1], or NaN where undefined (a test set of one class).
_SHARES = (keys.AUC, keys.AUC_LOW, keys.AUC_HIGH, keys.AUPRC, keys.ACCURACY, keys.BRIER)


def validate_evaluation(
    metrics: Mapping[str, float],
    hist_pos: Sequence[int],
    hist_neg: Sequence[int],
    max_rows: int,
    histograms: bool = True,
    bins: int = HIST_BINS,
) -> None:
    """Check an opened evaluation's values; :class:`DeltaRejected` (``evaluation``) otherwise:
    the required metrics present, row counts whole and at most ``max_rows``, the histograms of
    ``bins`` bins (the run's ``histogram_bins``) holding exactly the test rows (none at all
    without ``histograms``: under secure aggregation they travel masked), losses finite and
    non-negative, shares in [0, 1] or NaN, everything else finite."""

    def bad(detail: str) -> DeltaRejected:
        return DeltaRejected(Reason.EVALUATION, detail)

    missing = [k for k in REQUIRED_EVALUATION if k not in metrics]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    for key in (keys.N_TEST, keys.N_VAL):
        n = metrics[key]
        if not (np.isfinite(n) and float(n).is_integer() and 0 <= n <= max_rows):
            raise bad(f"{key} {n!r} is not a row count of at most {max_rows:,}")
    if not histograms:
        if hist_pos or hist_neg:
            raise bad("score histograms sent in the clear under secure aggregation")
    elif len(hist_pos) != bins or len(hist_neg) != bins:
        raise bad(f"histograms of {len(hist_pos)} and {len(hist_neg)} bins, not {bins}")
    elif sum(hist_pos) + sum(hist_neg) != metrics[keys.N_TEST]:
        total = sum(hist_pos) + sum(hist_neg)
        raise bad(f"histograms of {total} rows, {keys.N_TEST} {metrics[keys.N_TEST]:.0f}")
    for key, value in metrics.items():
        if key in _SHARES:
            if not (np.isnan(value) or 0.0 <= value <= 1.0):
                raise bad(f"{key} {value!r} outside [0, 1]")
        elif not np.isfinite(value) or (key in (keys.LOSS, keys.VAL_LOSS) and value < 0):
            raise bad(f"{key} {value!r}")
