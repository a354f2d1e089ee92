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

#: The largest example count a site may sign: beyond it a count is no longer exact as a float
#: (nor fits every store's integer column); capping its weight is federation.max_examples's job.
MAX_SIGNED_EXAMPLES = 2**53


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
