"""The cryptographic primitives fedpeft uses, all from the ``cryptography`` package, and the key
files they live in. Nothing here is home-made: this module only fixes choices and formats.

* Identity (a site's, the coordinator's): one ECDSA P-384 key in OpenSSH format, the key type
  Flower 1.39's SuperNode authentication requires. The same key signs fedpeft's messages, always
  behind a domain-separation prefix (:data:`DOMAIN_DELTA`, :data:`DOMAIN_GLOBAL`,
  :data:`DOMAIN_EVALUATION`) that no message Flower signs can start with, so a signature made
  for one purpose never verifies for another.
  One key per site means one enrollment, one registration and one revocation.
* Run key: an X25519 key pair per run; its private half stays in the coordinator's ServerApp.
* Delta key: a site's one-time X25519 key agreed with the run key, through HKDF-SHA256 bound to
  run, round, site and both public keys; the delta is sealed with AES-256-GCM under it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.common.errors import KeyFileError

DOMAIN_DELTA = b"fedpeft/v1 sealed-delta\x00"
DOMAIN_GLOBAL = b"fedpeft/v1 global-state\x00"
DOMAIN_EVALUATION = b"fedpeft/v1 sealed-evaluation\x00"
_HKDF_INFO = b"fedpeft/v1 delta-key\x00"
NONCE_BYTES = 12
TAG_BYTES = 16
X25519_BYTES = 32


# -- identity keys (ECDSA P-384, OpenSSH format) ---------------------------------------------------


def new_identity() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def write_private_key(
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    form: serialization.PrivateFormat = serialization.PrivateFormat.OpenSSH,
) -> None:
    """Write ``key`` unencrypted, PEM-armoured in ``form`` (OpenSSH for identity keys, PKCS8 for
    TLS keys), readable by its owner only (0600), never overwriting."""
    data = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    write_secret(path, data)


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (0600) and write ``data``; never overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def public_openssh(key: ec.EllipticCurvePublicKey) -> str:
    """The public key as one OpenSSH line (``ecdsa-sha2-nistp384 AAAA...``)."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_openssh(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an identity key; refuse one that others can read or that is not ECDSA P-384."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the private key ({exc.strerror})") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: private key is readable by others; chmod 600 {path}")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise KeyFileError(f"{path}: expected an ECDSA P-384 key (ssh-keygen -t ecdsa -b 384)")
    return key


def parse_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... [comment]``)."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, IndexError) as exc:
        raise KeyFileError(f"not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise KeyFileError("expected an ECDSA P-384 public key (ecdsa-sha2-nistp384 ...)")
    return key


# -- signatures -----------------------------------------------------------------------------------


def framed(domain: bytes, parts: tuple[bytes, ...]) -> bytes:
    """domain || (len || part)*: unambiguous, so no two part lists sign the same bytes."""
    return domain + b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def framed_digest(domain: bytes, parts: tuple[bytes, ...]) -> bytes:
    """SHA-256 of :func:`framed` ``(domain, parts)``, hashed part by part (no copy of a large
    ciphertext). SHA-256 rather than SHA-384 because it runs ~3x faster here (SHA extensions):
    the hash of a full-model ciphertext is the largest cost of sealing after the copies."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(domain)
    for part in parts:
        digest.update(struct.pack(">Q", len(part)))
        digest.update(part)
    return digest.finalize()


def ecdsa_verify_digest(public: ec.EllipticCurvePublicKey, signature: bytes, digest: bytes) -> bool:
    """ECDSA over a SHA-256 digest, DER signature: the primitive under :func:`verify`."""
    try:
        public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def sign(key: ec.EllipticCurvePrivateKey, domain: bytes, *parts: bytes) -> bytes:
    """ECDSA P-384 / SHA-256 over ``parts`` for one purpose (``domain``)."""
    return key.sign(framed_digest(domain, parts), ec.ECDSA(Prehashed(hashes.SHA256())))


def verify(
    public: ec.EllipticCurvePublicKey, signature: bytes, domain: bytes, *parts: bytes
) -> bool:
    return ecdsa_verify_digest(public, signature, framed_digest(domain, parts))


# -- key agreement and encryption ---------------------------------------------------------------


def new_run_key() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


def raw_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_shared(private: x25519.X25519PrivateKey, peer_public: bytes) -> bytes | None:
    """The X25519 shared secret; None for a malformed or low-order peer key."""
    if len(peer_public) != X25519_BYTES:
        return None
    try:
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # the all-zero shared secret of a low-order point
        return None


def hkdf_sha256(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def aes_gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ciphertext followed by the 16-byte tag."""
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when the tag does not verify."""
    if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        return None
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None


def delta_key(shared: bytes, context: bytes, ephemeral_public: bytes, run_public: bytes) -> bytes:
    """HKDF-SHA256 of an X25519 shared secret into a 32-byte AES key, bound to ``context``
    (run, round and site) and to both public keys."""
    info = framed(_HKDF_INFO, (context, ephemeral_public, run_public))
    return hkdf_sha256(shared, None, info, 32)


def seal(
    plaintext: bytes, aad: bytes, run_public: bytes, context: bytes
) -> tuple[bytes, bytes, bytes]:
    """Encrypt for the holder of the run key: (ephemeral public key, nonce, ciphertext+tag)."""
    ephemeral = x25519.X25519PrivateKey.generate()
    epk = raw_public(ephemeral)
    shared = x25519_shared(ephemeral, run_public)
    if shared is None:
        raise ValueError("the run public key is not a usable X25519 key")
    nonce = os.urandom(NONCE_BYTES)
    key = delta_key(shared, context, epk, run_public)
    return epk, nonce, aes_gcm_encrypt(key, nonce, plaintext, aad)


def unseal(
    run_key: x25519.X25519PrivateKey,
    epk: bytes,
    nonce: bytes,
    ciphertext: bytes,
    aad: bytes,
    context: bytes,
) -> bytes | None:
    """The plaintext, or None when anything was altered (or sealed for another key/context)."""
    shared = x25519_shared(run_key, epk)
    if shared is None:
        return None
    return aes_gcm_decrypt(
        delta_key(shared, context, epk, raw_public(run_key)), nonce, ciphertext, aad
    )


# -- checkpoints at rest --------------------------------------------------------------------------

_CHECKPOINT_MAGIC = b"FPCK1"
_CHECKPOINT_DOMAIN = b"fedpeft/v1 checkpoint\x00"


def seal_checkpoint(key: bytes, run_id: int, round_: int, data: bytes) -> bytes:
    """A stored global state, AES-256-GCM under the store key, bound to its run and round."""
    nonce = os.urandom(NONCE_BYTES)
    aad = framed(_CHECKPOINT_DOMAIN, (str(run_id).encode(), str(round_).encode()))
    return _CHECKPOINT_MAGIC + nonce + aes_gcm_encrypt(key, nonce, data, aad)


def open_checkpoint(key: bytes, run_id: int, round_: int, blob: bytes) -> bytes | None:
    """The stored state, or None for another key, run or round, or altered bytes."""
    if not blob.startswith(_CHECKPOINT_MAGIC):
        return None
    body = blob[len(_CHECKPOINT_MAGIC) :]
    aad = framed(_CHECKPOINT_DOMAIN, (str(run_id).encode(), str(round_).encode()))
    return aes_gcm_decrypt(key, body[:NONCE_BYTES], body[NONCE_BYTES:], aad)
