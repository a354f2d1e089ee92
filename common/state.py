"""Shared state as data: name -> fp32 array maps, and their bytes at rest.

Parameters always travel by name with their shapes, never as ordered lists. This module needs
numpy and safetensors only, so that the pure parts (aggregation, validation, the wire codecs,
the envelope) take ``State`` from here without importing torch; the conversion to and from
torch tensors is in :mod:`fedpeft.common.tensors`.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

State = dict[str, np.ndarray]


def state_to_bytes(state: State) -> bytes:
    """Serialize with safetensors (no pickle)."""
    return st_save({k: np.ascontiguousarray(v) for k, v in state.items()})


def state_from_bytes(data: bytes) -> State:
    return dict(st_load(data))
