"""The wire codecs: how a state's values are laid out as bytes in an envelope's payload.

``fp32`` and ``fp16`` are little-endian floats; ``int8`` stores float32 scales (one per row of a
tensor with long rows, else one per tensor) followed by the int8 values. Names, shapes and the
codec travel in the envelope's header (common/envelope.py); the payload holds only values, in
the header's order. Pure numpy: no torch, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedpeft.common.errors import DeltaRejected, Reason
from fedpeft.common.state import State

CODECS = ("fp32", "fp16", "int8")
#: The codec of a securely aggregated upload (common/secagg.py): one vector of little-endian
#: uint32 values, masked in Z_2^32. Not a ``federation.codec`` choice: the round loop uses it
#: when ``federation.secure_aggregation`` is on.
RING = "ring32"

#: Below this many values per row, a tensor gets one int8 scale (e.g. LoRA B, 384 x 8): a scale
#: per row of 8 would cost half as much again as the values.
MIN_ROW_FOR_SCALES = 64


def _rows(shape: tuple[int, ...]) -> int:
    """int8 scales per tensor: one per row (first axis) of a 2-D+ tensor with rows of at least
    :data:`MIN_ROW_FOR_SCALES` values, else one."""
    if len(shape) >= 2 and shape[0] > 0 and math.prod(shape[1:]) >= MIN_ROW_FOR_SCALES:
        return shape[0]
    return 1


def encoded_size(shape: tuple[int, ...], codec: str) -> int:
    n = math.prod(shape)
    if codec in ("fp32", RING):
        return 4 * n
    if codec == "fp16":
        return 2 * n
    return 4 * _rows(shape) + n


def encode(state: State, codec: str) -> bytes:
    """The tensors' values in ``state`` order under ``codec``."""
    parts: list[bytes | memoryview] = []
    for value in state.values():
        if codec == RING:
            parts.append(np.ascontiguousarray(value, dtype="<u4").data.cast("B"))
            continue
        x = np.asarray(value, dtype=np.float32)
        if codec == "fp32":  # one copy in all: the join
            parts.append(np.ascontiguousarray(x, dtype="<f4").data.cast("B"))
        elif codec == "fp16":
            parts.append(x.astype("<f2").tobytes())
        elif codec == "int8":
            rows = x.reshape(_rows(x.shape), -1)
            scale = (np.abs(rows).max(axis=1, initial=0.0) / 127.0).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0)[:, None]
            q = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
            parts.append(scale.astype("<f4").tobytes() + q.tobytes())
        else:
            raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    return b"".join(parts)


def decode(payload: bytes, shapes: Mapping[str, tuple[int, ...]], codec: str) -> State:
    """Inverse of :func:`encode` given the names and shapes; float32 out (for fp32, read-only
    views into ``payload``, no copy; uint32 for :data:`RING`). A payload of the wrong length is
    ``malformed``."""
    if len(payload) != sum(encoded_size(s, codec) for s in shapes.values()):
        raise DeltaRejected(
            Reason.MALFORMED, f"payload of {len(payload)} bytes does not fit the specs"
        )
    out: State = {}
    offset = 0
    for name, shape in shapes.items():
        size = encoded_size(shape, codec)
        offset += size
        chunk = payload[offset - size : offset] if codec != "fp32" else b""
        if codec == "fp32":
            out[name] = np.frombuffer(payload, "<f4", math.prod(shape), offset - size).reshape(
                shape
            )
        elif codec == "fp16":
            out[name] = np.frombuffer(chunk, "<f2").astype(np.float32).reshape(shape)
        elif codec == RING:
            out[name] = np.frombuffer(chunk, "<u4").astype(np.uint32).reshape(shape)
        else:
            rows = _rows(shape)
            scale = np.frombuffer(chunk[: 4 * rows], "<f4")
            q = np.frombuffer(chunk[4 * rows :], np.int8).astype(np.float32).reshape(rows, -1)
            out[name] = (q * scale[:, None]).astype(np.float32).reshape(shape)
    return out
