"""Between a model's torch tensors and a :data:`~fedpeft.common.state.State`.

Kept apart from :mod:`fedpeft.common.state` because it imports torch: only code that runs a
model (the site's trainer, the ServerApp's initial state, export) needs it.
"""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.common.state import State


def to_numpy(state: dict[str, torch.Tensor]) -> State:
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}


def to_torch(state: State) -> dict[str, torch.Tensor]:
    """Tensors sharing memory with the arrays; read-only arrays (views into a received message)
    are copied, as torch cannot wrap them."""
    return {
        k: torch.from_numpy(v if v.flags.writeable and v.flags.c_contiguous else np.array(v))
        for k, v in state.items()
    }
