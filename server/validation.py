"""Validation of a site's update before it may touch the global state.

Every check raises :class:`DeltaRejected` with a stable reason code, recorded in the store for
that site and round; the round goes on without it.
"""

from __future__ import annotations

import numpy as np

from fedpeft.common.errors import DeltaRejected, Reason
from fedpeft.common.state import State


def validate_delta(
    delta: State, reference: State, n_examples: float, max_norm: float | None = None
) -> None:
    """Check a delta against the global state it claims to update.

    Same names, same shapes, float32, finite everywhere, a positive whole example count, and
    (when ``max_norm`` is set) an L2 norm over all tensors no larger than ``max_norm``.
    """
    missing = sorted(set(reference) - set(delta))
    extra = sorted(set(delta) - set(reference))
    if missing or extra:
        raise DeltaRejected(
            Reason.NAMES,
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected "
            f"(e.g. {extra[:1]})",
        )
    for name, ref in reference.items():
        value = delta[name]
        if value.shape != ref.shape:
            raise DeltaRejected(Reason.SHAPE, f"{name}: {value.shape} != {ref.shape}")
        if value.dtype != np.float32:
            raise DeltaRejected(Reason.DTYPE, f"{name}: {value.dtype}, expected float32")
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
