"""Bytes in Flower messages: opaque blobs as records, and a message's size as it travels.

Flower is imported inside the functions, so that importing this module does not load Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

BLOB = "bytes"


def blob_record(data: bytes) -> ArrayRecord:
    """Opaque bytes (a sealed delta, a signed global state) as an ArrayRecord of one uint8
    array: Flower chunks it, so it has no practical size limit (a ConfigRecord value does)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({BLOB: Array(np.frombuffer(data, dtype=np.uint8).copy())})


#: Most bytes a serialized blob may hold beyond its declared length: the ``.npy`` header Flower
#: wraps an array in (128 bytes for one of uint8; ``np.load`` refuses a header over 10,000).
NPY_HEADER_MAX = 10_000


def blob_nbytes(record: object) -> int:
    """The length of the bytes a :func:`blob_record` holds, read from what Flower already has in
    hand (the array's declared dtype and shape, and the length of its serialized data) without
    materializing or copying them: a caller checks its size limit before
    :func:`from_blob_record` copies the bytes out. ValueError on anything else, or on data that
    is not as long as the shape declares."""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord) or list(record.keys()) != [BLOB]:
        raise ValueError("expected an ArrayRecord holding one byte string")
    array = record[BLOB]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise ValueError(f"expected uint8 bytes, got {array.dtype} of shape {array.shape}")
    declared, held = int(array.shape[0]), len(array.data)
    if not 0 <= held - declared <= NPY_HEADER_MAX:
        raise ValueError(f"{held:,} bytes of data for {declared:,} bytes declared")
    return declared


def from_blob_record(record: object) -> bytes:
    """The bytes of :func:`blob_record`; ValueError on anything else."""
    blob_nbytes(record)  # the metadata first: no array is made of data that disagrees with it
    value = record[BLOB].numpy()  # type: ignore[index]
    if value.dtype != np.uint8 or value.ndim != 1:
        raise ValueError(f"expected uint8 bytes, got {value.dtype} of shape {value.shape}")
    return value.tobytes()


def message_nbytes(message: object) -> int:
    """Bytes of a Flower message as it travels: every object of its tree, serialized.

    Flower 1.39 ships a message as a tree of content-addressed objects (the message, its
    records, each array in chunks); this adds up their serialized sizes, framing and names
    included. Objects are keyed by content, so identical chunks count once, as Flower sends them.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(message)  # type: ignore[arg-type]
    return int(sum(len(obj.deflate()) for obj in objects.values()))
