"""Validation of a site's update before it may touch the global state.

:func:`fedpeft.common.envelope.open_delta` already fixes the update's layout: exactly the global
state's tensor names, in its order, with its shapes, decoded to float32 (else it rejects with
``names``, ``shape`` or ``dtype``). What is left is the values: every check here raises
:class:`DeltaRejected` with a stable reason code, recorded in the store for that site and round;
the round goes on without it.
"""

from __future__ import annotations

import numpy as np

from fedpeft.common.errors import DeltaRejected, Reason
from fedpeft.common.state import State


def validate_delta(delta: State, n_examples: float, max_norm: float | None = None) -> None:
    """Check an opened delta's values: finite everywhere, a positive whole example count, and
    (when ``max_norm`` is set) an L2 norm over all tensors no larger than ``max_norm``."""
    for name, value in delta.items():
        if not np.isfinite(value).all():
            raise DeltaRejected(Reason.NON_FINITE, f"{name} holds NaN or Inf")
    if not (n_examples >= 1 and float(n_examples).is_integer()):
        raise DeltaRejected(Reason.EXAMPLES, f"example count {n_examples!r}")
    if max_norm is not None:
        norm = float(
            np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))
        )
        if norm > max_norm:
            raise DeltaRejected(Reason.NORM, f"update norm {norm:.3g} above bound {max_norm:.3g}")
