"""Sealed deltas and signed global states (proto/fedpeft/v1/envelope.proto).

A site seals its delta: encode the tensors (fp32, fp16 or int8 with per-row scales: see
common/wire.py), encrypt them with AES-256-GCM under a key agreed between a one-time X25519 key
and the run's X25519 key (HKDF bound to the run's token, round and site), with the serialized
header as associated data, and sign header, key, nonce and ciphertext with the site's identity
key.

The coordinator opens it with :func:`open_delta`, which returns the decoded tensors or raises
exactly one :class:`DeltaRejected` with a reason code. Checks, cheapest first: size, parse,
schema, known site, run, round, base-model fingerprint, method, tensor names and shapes, then
the signature, then decryption, then the payload's layout. Nothing is decrypted that the named
site did not sign: a signature that does not verify is ``bad-signature`` when another registered
site's key made it (a site sending under another's name), else ``tampered`` (bytes altered on
the way, or forged); a signed envelope that does not decrypt under this run's key is
``tampered`` too. Finite values and the norm bound are checked on the decoded tensors by the
caller (``server/validation.py``), as for any update.

The coordinator's global state goes down signed (:func:`sign_global` / :func:`open_global`)
together with the run's site config (:class:`~fedpeft.common.config.SiteRunConfig`, canonical
JSON in the signed header), so that a relay can hand sites neither a forged model nor altered
settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, x25519
from google.protobuf.message import DecodeError

from fedpeft.common import crypto
from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb
from fedpeft.common.config import SiteRunConfig
from fedpeft.common.errors import ConfigError, DeltaRejected, FedpeftError, Reason
from fedpeft.common.state import State
from fedpeft.common.wire import CODECS, RING, decode, encode

SCHEMA_VERSION = 1
#: Where a distillation run's teacher state travels in the signed global state's payload.
TEACHER = "teacher/"
#: The wire codecs (common/wire.py) by their value in the header.
_CODEC_IDS = {
    "fp32": pb.CODEC_FP32,
    "fp16": pb.CODEC_FP16,
    "int8": pb.CODEC_INT8,
    RING: pb.CODEC_RING32,
}
_CODEC_NAMES = {v: k for k, v in _CODEC_IDS.items()}


# -- sealed deltas ----------------------------------------------------------------------------


def _specs(state: State) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=k, shape=list(v.shape)) for k, v in state.items()]


def _header_bytes(
    header: pb.DeltaHeader | pb.GlobalStateHeader,
    state: State,
    run_token: str,
    round_: int,
    method: str,
    fingerprint: str,
) -> bytes:
    """``header`` serialized, with the fields that both headers carry filled in: schema, run,
    round, method, base model and the tensors' names and shapes."""
    header.schema_version = SCHEMA_VERSION
    header.run_token = run_token
    header.round = round_
    header.method = method
    header.model_fingerprint = fingerprint
    header.tensors.extend(_specs(state))
    return header.SerializeToString(deterministic=True)


def _context(run_token: str, round_: int, site_id: str) -> bytes:
    return crypto.framed(b"", (run_token.encode(), str(round_).encode(), site_id.encode()))


def seal_delta(
    delta: State,
    *,
    run_token: str,
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
    if codec not in _CODEC_IDS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join((*CODECS, RING))}")
    header = _header_bytes(
        pb.DeltaHeader(site_id=site_id, codec=_CODEC_IDS[codec], num_examples=num_examples),
        delta,
        run_token,
        round,
        method,
        fingerprint,
    )
    return _seal(
        pb.SealedDelta,
        header,
        encode(delta, codec),
        crypto.DOMAIN_DELTA,
        _context(run_token, round, site_id),
        run_public,
        identity,
    )


def _seal(
    kind: type[pb.SealedDelta] | type[pb.SealedEvaluation],
    header: bytes,
    plaintext: bytes,
    domain: bytes,
    context: bytes,
    run_public: bytes,
    identity: ec.EllipticCurvePrivateKey,
) -> bytes:
    """``plaintext`` encrypted for ``run_public`` with ``header`` as associated data, and
    header, key, nonce and ciphertext signed by ``identity`` for ``domain``: a serialized
    ``kind`` (both sealed messages have these five fields)."""
    epk, nonce, ciphertext = crypto.seal(plaintext, header, run_public, context)
    signature = crypto.sign(identity, domain, header, epk, nonce, ciphertext)
    return kind(
        header=header,
        ephemeral_public_key=epk,
        nonce=nonce,
        ciphertext=ciphertext,
        signature=signature,
    ).SerializeToString(deterministic=True)


@dataclass(frozen=True)
class Expected:
    """What the coordinator accepts in one round of one run."""

    #: The run's random token, bound into every envelope (not the store's integer run id).
    run_token: str
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
    delta: State


def check_size(nbytes: int, limit: int) -> None:
    """``too-large`` for an upload of ``nbytes`` over ``limit``. The coordinator calls it on the
    size a reply's record declares (common/records.py ``blob_nbytes``) before the bytes are
    copied out of the message; :func:`open_delta` again on the bytes it is given."""
    if nbytes > limit:
        raise DeltaRejected(Reason.TOO_LARGE, f"{nbytes:,} bytes, limit {limit:,}")


def open_delta(
    data: bytes,
    expected: Expected,
    run_key: x25519.X25519PrivateKey,
    sites: Mapping[str, ec.EllipticCurvePublicKey],
) -> OpenedDelta:
    """Open one upload; any fault raises :class:`DeltaRejected` (see the module docstring)."""
    sealed, header = pb.SealedDelta(), pb.DeltaHeader()
    _parse(data, expected.max_bytes, sealed, header, "a sealed delta")
    _check_addressed(header, sites, expected.run_token, expected.round, expected.fingerprint)
    if header.method != expected.method:
        raise DeltaRejected(
            Reason.METHOD, f"method {header.method[:32]!r}, run uses {expected.method}"
        )
    codec = _CODEC_NAMES.get(header.codec)
    if codec != expected.codec:
        raise DeltaRejected(
            Reason.DTYPE, f"codec {codec or header.codec}, run uses {expected.codec}"
        )
    names = [t.name for t in header.tensors]
    if names != list(expected.shapes):
        missing = sorted(set(expected.shapes) - set(names))
        extra = sorted(set(names) - set(expected.shapes))
        raise DeltaRejected(
            Reason.NAMES,
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected "
            f"(e.g. {extra[:1]}) or out of order",
        )
    for spec in header.tensors:
        if tuple(spec.shape) != tuple(expected.shapes[spec.name]):
            raise DeltaRejected(
                Reason.SHAPE, f"{spec.name}: {tuple(spec.shape)} != {expected.shapes[spec.name]}"
            )
    payload = _unseal_signed(
        sealed,
        header.site_id,
        sites,
        crypto.DOMAIN_DELTA,
        run_key,
        _context(header.run_token, header.round, header.site_id),
    )
    state = decode(payload, expected.shapes, codec)
    return OpenedDelta(header.site_id, header.num_examples, state)


Sealed = pb.SealedDelta | pb.SealedEvaluation
Header = pb.DeltaHeader | pb.EvaluationHeader


def _parse(data: bytes, limit: int, sealed: Sealed, header: Header, what: str) -> None:
    """Size, parse and schema of a sealed message, read into ``sealed`` and ``header``."""
    check_size(len(data), limit)
    try:
        sealed.ParseFromString(data)
        header.ParseFromString(sealed.header)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DeltaRejected(Reason.MALFORMED, f"not {what} ({exc.__class__.__name__})") from None
    if header.schema_version != SCHEMA_VERSION:
        raise DeltaRejected(Reason.SCHEMA, f"schema version {header.schema_version}")


def _check_addressed(
    header: Header,
    sites: Mapping[str, ec.EllipticCurvePublicKey],
    run_token: str,
    round_: int,
    fingerprint: str,
) -> None:
    """The header names a registered site, this run, this round and this base model."""
    if header.site_id not in sites:
        raise DeltaRejected(Reason.UNKNOWN_SITE, f"site {header.site_id[:64]!r} is not registered")
    if header.run_token != run_token:
        raise DeltaRejected(Reason.WRONG_RUN, f"sealed for run {header.run_token[:64]!r}")
    if header.round != round_:
        raise DeltaRejected(Reason.WRONG_ROUND, f"sealed for round {header.round}")
    if header.model_fingerprint != fingerprint:
        raise DeltaRejected(Reason.FINGERPRINT, f"base model {header.model_fingerprint[:80]!r}")


def _unseal_signed(
    sealed: Sealed,
    site_id: str,
    sites: Mapping[str, ec.EllipticCurvePublicKey],
    domain: bytes,
    run_key: x25519.X25519PrivateKey,
    context: bytes,
) -> bytes:
    """The plaintext, once ``site_id``'s key is found to have signed header, key, nonce and
    ciphertext for ``domain``. The signature is checked before anything is decrypted: a forged
    envelope costs one hash of its bytes and no key agreement or AES work.

    Which code: the digest is made once; a registered site's key other than the named one that
    verifies it means intact bytes under another site's name (``bad-signature``); no key
    verifying means the bytes are not as any registered site signed them (``tampered``); a
    signed envelope that does not decrypt under this run's key is ``tampered`` too."""
    digest = crypto.framed_digest(
        domain, (sealed.header, sealed.ephemeral_public_key, sealed.nonce, sealed.ciphertext)
    )
    if not crypto.ecdsa_verify_digest(sites[site_id], sealed.signature, digest):
        if any(
            crypto.ecdsa_verify_digest(key, sealed.signature, digest)
            for name, key in sites.items()
            if name != site_id
        ):
            raise DeltaRejected(Reason.BAD_SIGNATURE, f"not signed by the key of site {site_id!r}")
        raise DeltaRejected(
            Reason.TAMPERED, "signature does not verify: header, key, nonce or ciphertext altered"
        )
    plaintext = crypto.unseal(
        run_key,
        sealed.ephemeral_public_key,
        sealed.nonce,
        sealed.ciphertext,
        sealed.header,
        context,
    )
    if plaintext is None:
        raise DeltaRejected(
            Reason.TAMPERED, "decryption failed: signed by the site but not sealed for this run"
        )
    return plaintext


# -- signed global state ------------------------------------------------------------------------


class ForgedGlobalState(FedpeftError):
    """A global state whose coordinator signature or contents do not check out."""


@dataclass(frozen=True)
class GlobalState:
    """A global state as a site opened it: everything in it was signed by the coordinator."""

    run_token: str
    round: int
    method: str
    fingerprint: str
    run_public: bytes
    state: State
    #: The run's site config: the only settings a site acts on.
    config: SiteRunConfig
    #: SHA-256 (hex) of the config's canonical JSON, as signed.
    config_hash: str
    #: A distillation run's teacher (its delivered state, names without :data:`TEACHER`),
    #: signed with the state; empty otherwise.
    teacher: State = field(default_factory=dict)


def sign_global(
    state: State,
    *,
    run_token: str,
    round: int,
    method: str,
    fingerprint: str,
    run_public: bytes,
    config: SiteRunConfig,
    coordinator: ec.EllipticCurvePrivateKey,
    teacher: State | None = None,
) -> bytes:
    """The coordinator's global state for one round: fp32 values and the run's site config,
    signed with its identity key. A distillation run's ``teacher`` travels in the same payload,
    its names under :data:`TEACHER`."""
    if config.method.name != method:
        raise ValueError(f"the site config's method {config.method.name!r} is not {method!r}")
    if bool(teacher) != config.distill.enabled:
        raise ValueError("a teacher state goes with a distillation config, and only with one")
    if teacher:
        state = {**state, **{TEACHER + name: value for name, value in teacher.items()}}
    header = _header_bytes(
        pb.GlobalStateHeader(run_public_key=run_public, site_config_json=config.to_json()),
        state,
        run_token,
        round,
        method,
        fingerprint,
    )
    payload = encode(state, "fp32")
    signature = crypto.sign(coordinator, crypto.DOMAIN_GLOBAL, header, payload)
    return pb.SignedGlobalState(
        header=header, payload=payload, signature=signature
    ).SerializeToString(deterministic=True)


def open_global(data: bytes, coordinator: ec.EllipticCurvePublicKey) -> GlobalState:
    """The global state, after checking the coordinator's signature; else ForgedGlobalState."""
    return open_global_signed_by(data, {"": coordinator})[0]


def open_global_signed_by(
    data: bytes, trusted: Mapping[str, ec.EllipticCurvePublicKey]
) -> tuple[GlobalState, str]:
    """The global state and the name (a site uses the fingerprint) of the one of ``trusted``
    coordinator keys whose signature it carries; else ForgedGlobalState."""
    if not trusted:
        raise ForgedGlobalState("the site trusts no coordinator key")
    signed, header = pb.SignedGlobalState(), pb.GlobalStateHeader()
    try:
        signed.ParseFromString(data)
        header.ParseFromString(signed.header)
    except (DecodeError, ValueError, RuntimeError):
        raise ForgedGlobalState("the global state is not a signed global state") from None
    signer = next(
        (
            name
            for name, key in trusted.items()
            if crypto.verify(
                key, signed.signature, crypto.DOMAIN_GLOBAL, signed.header, signed.payload
            )
        ),
        None,
    )
    if signer is None:
        raise ForgedGlobalState("the global state is not signed by the coordinator's key")
    if header.schema_version != SCHEMA_VERSION:
        raise ForgedGlobalState(f"global state schema version {header.schema_version}")
    # Signed but inconsistent: the coordinator's bug, still refused.
    try:
        config = SiteRunConfig.from_json(header.site_config_json)
    except ConfigError as exc:
        raise ForgedGlobalState(f"the signed site config is not valid ({exc})") from None
    if config.to_json() != header.site_config_json:  # its hash must name the bytes signed
        raise ForgedGlobalState("the signed site config is not in canonical form")
    if config.method.name != header.method:
        raise ForgedGlobalState(
            f"the signed site config's method {config.method.name!r} is not the global "
            f"state's {header.method!r}"
        )
    shapes = {t.name: tuple(t.shape) for t in header.tensors}
    try:
        state = decode(signed.payload, shapes, "fp32")
    except DeltaRejected as exc:
        raise ForgedGlobalState(f"signed global state is inconsistent ({exc})") from None
    teacher = {n[len(TEACHER) :]: v for n, v in state.items() if n.startswith(TEACHER)}
    if bool(teacher) != config.distill.enabled:
        raise ForgedGlobalState(
            "the signed global state's teacher does not match its config's distill"
        )
    state = {n: v for n, v in state.items() if not n.startswith(TEACHER)}
    return GlobalState(
        header.run_token,
        header.round,
        header.method,
        header.model_fingerprint,
        bytes(header.run_public_key),
        state,
        config,
        config.config_hash(),
        teacher,
    ), signer


# -- sealed evaluations -------------------------------------------------------------------------

#: Largest sealed evaluation accepted: a few metrics and two histograms of HIST_BINS counts.
MAX_EVALUATION_BYTES = 64 * 1024


def _evaluation_context(run_token: str, round_: int, site_id: str) -> bytes:
    return crypto.framed(
        b"evaluation", (run_token.encode(), str(round_).encode(), site_id.encode())
    )


def seal_evaluation(
    metrics: Mapping[str, float],
    hist_pos: Sequence[int],
    hist_neg: Sequence[int],
    *,
    run_token: str,
    round: int,
    site_id: str,
    fingerprint: str,
    run_public: bytes,
    identity: ec.EllipticCurvePrivateKey,
) -> bytes:
    """A site's evaluation of the global state of ``round``: its metrics and score histogram,
    encrypted for ``run_public`` and signed, as a delta is (only the coordinator reads it)."""
    header = pb.EvaluationHeader(
        schema_version=SCHEMA_VERSION,
        run_token=run_token,
        round=round,
        site_id=site_id,
        model_fingerprint=fingerprint,
    ).SerializeToString(deterministic=True)
    body = pb.EvaluationBody(
        metrics={k: float(v) for k, v in metrics.items()},
        hist_pos=[int(c) for c in hist_pos],
        hist_neg=[int(c) for c in hist_neg],
    ).SerializeToString(deterministic=True)
    return _seal(
        pb.SealedEvaluation,
        header,
        body,
        crypto.DOMAIN_EVALUATION,
        _evaluation_context(run_token, round, site_id),
        run_public,
        identity,
    )


@dataclass(frozen=True)
class OpenedEvaluation:
    site_id: str
    metrics: dict[str, float]
    hist_pos: list[int]
    hist_neg: list[int]


def open_evaluation(
    data: bytes,
    *,
    run_token: str,
    round: int,
    fingerprint: str,
    run_key: x25519.X25519PrivateKey,
    sites: Mapping[str, ec.EllipticCurvePublicKey],
) -> OpenedEvaluation:
    """Open one sealed evaluation of the global state of ``round``; any fault raises
    :class:`DeltaRejected`, checked as a delta's are (size, parse, schema, known site, run,
    round, base model, the site's signature before anything is decrypted, decryption). The
    values are checked by the caller (``server/validation.py: validate_evaluation``)."""
    sealed, header = pb.SealedEvaluation(), pb.EvaluationHeader()
    _parse(data, MAX_EVALUATION_BYTES, sealed, header, "a sealed evaluation")
    _check_addressed(header, sites, run_token, round, fingerprint)
    plaintext = _unseal_signed(
        sealed,
        header.site_id,
        sites,
        crypto.DOMAIN_EVALUATION,
        run_key,
        _evaluation_context(header.run_token, header.round, header.site_id),
    )
    body = pb.EvaluationBody()
    try:
        body.ParseFromString(plaintext)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DeltaRejected(
            Reason.MALFORMED, f"not an evaluation ({exc.__class__.__name__})"
        ) from None
    return OpenedEvaluation(
        header.site_id, dict(body.metrics), list(body.hist_pos), list(body.hist_neg)
    )
