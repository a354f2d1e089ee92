"""Sealed deltas and signed global states (proto/fedpeft/v1/envelope.proto).

A site seals its delta: encode the tensors (fp32, fp16 or int8 with per-row scales), encrypt
them with AES-256-GCM under a key agreed between a one-time X25519 key and the run's X25519 key
(HKDF bound to run, round and site), with the serialized header as associated data, and sign
header, key, nonce and ciphertext with the site's identity key.

The coordinator opens it with :func:`open_delta`, which returns the decoded tensors or raises
exactly one :class:`DeltaRejected` with a reason code. Checks, cheapest first: size, parse,
schema, known site, run, round, base-model fingerprint, method, tensor names and shapes, then
decryption (``tampered``), then the signature (``bad-signature``: intact bytes, wrong signer),
then the payload's layout. Finite values and the norm bound are checked on the decoded tensors
by the caller (``server/validation.py``), as for any update.

The coordinator's global state goes down signed (:func:`sign_global` / :func:`open_global`) so
that a relay cannot hand sites a forged model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from google.protobuf.message import DecodeError

from fedpeft.common import crypto
from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb
from fedpeft.common.codec import State
from fedpeft.common.errors import (
    BAD_SIGNATURE,
    DTYPE,
    FINGERPRINT,
    MALFORMED,
    METHOD,
    NAMES,
    SCHEMA,
    SHAPE,
    TAMPERED,
    TOO_LARGE,
    UNKNOWN_SITE,
    WRONG_ROUND,
    WRONG_RUN,
    DeltaRejected,
    FedpeftError,
)

SCHEMA_VERSION = 1
CODECS = {"fp32": pb.CODEC_FP32, "fp16": pb.CODEC_FP16, "int8": pb.CODEC_INT8}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}


# -- codecs ---------------------------------------------------------------------------------------


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
    if codec == "fp32":
        return 4 * n
    if codec == "fp16":
        return 2 * n
    return 4 * _rows(shape) + n


def encode(state: State, codec: str) -> bytes:
    """The tensors' values in ``state`` order under ``codec``."""
    parts: list[bytes | memoryview] = []
    for value in state.values():
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
    views into ``payload``, no copy)."""
    if len(payload) != sum(encoded_size(s, codec) for s in shapes.values()):
        raise DeltaRejected(MALFORMED, f"payload of {len(payload)} bytes does not fit the specs")
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
        else:
            rows = _rows(shape)
            scale = np.frombuffer(chunk[: 4 * rows], "<f4")
            q = np.frombuffer(chunk[4 * rows :], np.int8).astype(np.float32).reshape(rows, -1)
            out[name] = (q * scale[:, None]).astype(np.float32).reshape(shape)
    return out


# -- sealed deltas ----------------------------------------------------------------------------


def _specs(state: State) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=k, shape=list(v.shape)) for k, v in state.items()]


def _context(run_id: str, round_: int, site_id: str) -> bytes:
    return crypto.framed(b"", (run_id.encode(), str(round_).encode(), site_id.encode()))


def seal_delta(
    delta: State,
    *,
    run_id: str,
    round: int,
    site_id: str,
    method: str,
    fingerprint: str,
    num_examples: int,
    codec: str,
    run_public: bytes,
    identity: ec.EllipticCurvePrivateKey,
) -> bytes:
    """A site's upload: ``delta`` encoded, encrypted for ``run_public`` and signed."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    header = pb.DeltaHeader(
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        round=round,
        site_id=site_id,
        method=method,
        model_fingerprint=fingerprint,
        codec=CODECS[codec],
        tensors=_specs(delta),
        num_examples=num_examples,
    ).SerializeToString(deterministic=True)
    epk, nonce, ciphertext = crypto.seal(
        encode(delta, codec), header, run_public, _context(run_id, round, site_id)
    )
    signature = crypto.sign(identity, crypto.DOMAIN_DELTA, header, epk, nonce, ciphertext)
    return pb.SealedDelta(
        header=header,
        ephemeral_public_key=epk,
        nonce=nonce,
        ciphertext=ciphertext,
        signature=signature,
    ).SerializeToString(deterministic=True)


@dataclass(frozen=True)
class Expected:
    """What the coordinator accepts in one round of one run."""

    run_id: str
    round: int
    method: str
    fingerprint: str
    #: The shared tensors' names and shapes, in the order the global state lists them.
    shapes: Mapping[str, tuple[int, ...]]
    #: Largest sealed delta accepted, in bytes.
    max_bytes: int
    #: The run's codec: it fixes every tensor's wire dtype.
    codec: str = "fp32"


@dataclass(frozen=True)
class OpenedDelta:
    site_id: str
    num_examples: int
    codec: str
    delta: State


def open_delta(
    data: bytes,
    expected: Expected,
    run_key: x25519.X25519PrivateKey,
    sites: Mapping[str, ec.EllipticCurvePublicKey],
) -> OpenedDelta:
    """Open one upload; any fault raises :class:`DeltaRejected` (see the module docstring)."""
    if len(data) > expected.max_bytes:
        raise DeltaRejected(TOO_LARGE, f"{len(data):,} bytes, limit {expected.max_bytes:,}")
    sealed, header = pb.SealedDelta(), pb.DeltaHeader()
    try:
        sealed.ParseFromString(data)
        header.ParseFromString(sealed.header)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DeltaRejected(MALFORMED, f"not a sealed delta ({exc.__class__.__name__})") from None
    if header.schema_version != SCHEMA_VERSION:
        raise DeltaRejected(SCHEMA, f"schema version {header.schema_version}")
    site = sites.get(header.site_id)
    if site is None:
        raise DeltaRejected(UNKNOWN_SITE, f"site {header.site_id[:64]!r} is not registered")
    if header.run_id != expected.run_id:
        raise DeltaRejected(WRONG_RUN, f"sealed for run {header.run_id[:64]!r}")
    if header.round != expected.round:
        raise DeltaRejected(WRONG_ROUND, f"sealed for round {header.round}")
    if header.model_fingerprint != expected.fingerprint:
        raise DeltaRejected(FINGERPRINT, f"base model {header.model_fingerprint[:80]!r}")
    if header.method != expected.method:
        raise DeltaRejected(METHOD, f"method {header.method[:32]!r}, run uses {expected.method}")
    codec = _CODEC_NAMES.get(header.codec)
    if codec != expected.codec:
        raise DeltaRejected(DTYPE, f"codec {codec or header.codec}, run uses {expected.codec}")
    names = [t.name for t in header.tensors]
    if names != list(expected.shapes):
        missing = sorted(set(expected.shapes) - set(names))
        extra = sorted(set(names) - set(expected.shapes))
        raise DeltaRejected(
            NAMES,
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected "
            f"(e.g. {extra[:1]}) or out of order",
        )
    for spec in header.tensors:
        if tuple(spec.shape) != tuple(expected.shapes[spec.name]):
            raise DeltaRejected(
                SHAPE, f"{spec.name}: {tuple(spec.shape)} != {expected.shapes[spec.name]}"
            )
    payload = crypto.unseal(
        run_key,
        sealed.ephemeral_public_key,
        sealed.nonce,
        sealed.ciphertext,
        sealed.header,
        _context(header.run_id, header.round, header.site_id),
    )
    if payload is None:
        raise DeltaRejected(TAMPERED, "decryption failed: header or ciphertext altered")
    if not crypto.verify(
        site,
        sealed.signature,
        crypto.DOMAIN_DELTA,
        sealed.header,
        sealed.ephemeral_public_key,
        sealed.nonce,
        sealed.ciphertext,
    ):
        raise DeltaRejected(BAD_SIGNATURE, f"not signed by site {header.site_id!r}'s key")
    state = decode(payload, expected.shapes, codec)
    return OpenedDelta(header.site_id, header.num_examples, codec, state)


# -- signed global state ------------------------------------------------------------------------


class ForgedGlobalState(FedpeftError):
    """A global state whose coordinator signature or contents do not check out."""


@dataclass(frozen=True)
class GlobalState:
    run_id: str
    round: int
    method: str
    fingerprint: str
    run_public: bytes
    state: State


def sign_global(
    state: State,
    *,
    run_id: str,
    round: int,
    method: str,
    fingerprint: str,
    run_public: bytes,
    coordinator: ec.EllipticCurvePrivateKey,
) -> bytes:
    header = pb.GlobalStateHeader(
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        round=round,
        method=method,
        model_fingerprint=fingerprint,
        tensors=_specs(state),
        run_public_key=run_public,
    ).SerializeToString(deterministic=True)
    payload = encode(state, "fp32")
    signature = crypto.sign(coordinator, crypto.DOMAIN_GLOBAL, header, payload)
    return pb.SignedGlobalState(
        header=header, payload=payload, signature=signature
    ).SerializeToString(deterministic=True)


def open_global(data: bytes, coordinator: ec.EllipticCurvePublicKey) -> GlobalState:
    """The global state, after checking the coordinator's signature; else ForgedGlobalState."""
    signed, header = pb.SignedGlobalState(), pb.GlobalStateHeader()
    try:
        signed.ParseFromString(data)
        header.ParseFromString(signed.header)
    except (DecodeError, ValueError, RuntimeError):
        raise ForgedGlobalState("the global state is not a signed global state") from None
    if not crypto.verify(
        coordinator, signed.signature, crypto.DOMAIN_GLOBAL, signed.header, signed.payload
    ):
        raise ForgedGlobalState("the global state is not signed by the coordinator's key")
    if header.schema_version != SCHEMA_VERSION:
        raise ForgedGlobalState(f"global state schema version {header.schema_version}")
    shapes = {t.name: tuple(t.shape) for t in header.tensors}
    try:
        state = decode(signed.payload, shapes, "fp32")
    except DeltaRejected as exc:  # signed but inconsistent: the coordinator's bug, still refuse
        raise ForgedGlobalState(f"signed global state is inconsistent ({exc})") from None
    return GlobalState(
        header.run_id,
        header.round,
        header.method,
        header.model_fingerprint,
        bytes(header.run_public_key),
        state,
    )
