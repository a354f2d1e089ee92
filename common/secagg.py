"""Secure aggregation, the pure core: the coordinator learns the sum of the sites' inputs, never
one site's input. No Flower and no network here; the round loop carries the bytes.

The protocol is SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017) on the full graph: every site agrees a pairwise mask with every other.
The primitives come from ``cryptography`` through :mod:`fedpeft.common.crypto`; what is written
here is the protocol, Shamir sharing and the fixed-point ring.

One :class:`SiteSecAgg` per site and round, four steps (U1 ⊇ U2 ⊇ U3 ⊇ U4 are the sites still
answering after each):

0. :meth:`SiteSecAgg.advertise`: two fresh X25519 public keys, ``c`` (to encrypt key shares to
   other sites) and ``s`` (to agree pairwise masks). The integration signs them with the site's
   identity key; the coordinator relays every site's pair to all (the roster, U1).
1. :meth:`SiteSecAgg.share_keys`: the site draws its self-mask seed ``b_u``, splits ``b_u`` and
   its ``s`` private key into Shamir shares (threshold t of n = |U1|), and encrypts to each other
   site its two shares (AES-256-GCM, key from HKDF of the ``c`` agreement). U2: the sites whose
   shares the coordinator received and relays.
2. :meth:`SiteSecAgg.masked_input`: the site decrypts the shares addressed to it (U2 is whoever
   sent some) and uploads ``y = x + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)`` mod
   2**32 over v in U2. U3: the sites whose masked input arrived.
3. :meth:`SiteSecAgg.unmask`: told U3 (survivors) and U2 \\ U3 (dropped), the site reveals its
   share of ``b_v`` for each survivor and of ``s_sk_v`` for each dropped site. With t of them
   (U4), :func:`unmask_sum` rebuilds those secrets, removes the self masks of the survivors and
   the pairwise masks they added for the dropped, and returns the sum over U3.

Why a site never reveals both shares of one site: ``b_v`` removes v's self mask, ``s_sk_v`` all
of v's pairwise masks; with both, ``y_v`` opens to ``x_v``. A survivor's pairwise masks cancel in
the sum and a dropped site's self mask never entered it, so the coordinator needs one or the
other, never both. :meth:`SiteSecAgg.unmask` refuses a site listed in both sets, lists that are
not the U2 it masked against, and a second call (two calls with different lists would reveal
both). A coordinator that tells different sites different lists is not caught here: the paper's
consistency check (every survivor signs U3 and sees the others' signatures before unmasking) is
the round loop's to add. The threshold is more than half the roster, so two disjoint groups of
sites cannot each hold t shares; it is at least 2, so the sum never has fewer than 2 inputs.

What this does not give: integrity against a malicious site. A site can mask any ring element,
so the ring bounds each coordinate of an honest input only; norm and finite checks happen at the
site, before encoding.

Randomness comes from ``os.urandom``; :class:`SiteSecAgg` takes another source for tests only
(fixed seeds make the statistical tests reproducible).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpeft.common.crypto import (
    NONCE_BYTES,
    X25519_BYTES,
    aes_gcm_decrypt,
    aes_gcm_encrypt,
    framed,
    hkdf_sha256,
    raw_public,
    x25519_shared,
)
from fedpeft.common.errors import FedpeftError

_CONTEXT_DOMAIN = b"fedpeft/v1 secagg-round\x00"
_SHARE_KEY_INFO = b"fedpeft/v1 secagg share-key\x00"
_SHARE_AAD = b"fedpeft/v1 secagg shares\x00"
_MASK_INFO = b"fedpeft/v1 secagg pairwise-mask\x00"

#: The Shamir field: the Mersenne prime 2**521 - 1, larger than any 32-byte secret.
PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SEED_BYTES = 32
#: The ring of masked inputs is Z_{2**32}, as numpy uint32 with wrapping arithmetic.
RING_BITS = 32

#: The public keys a site advertises: (c public key, s public key), raw X25519.
PublicKeys = tuple[bytes, bytes]
#: A flattened state's layout: (name, shape) in sorted name order.
Layout = tuple[tuple[str, tuple[int, ...]], ...]


class SecAggError(FedpeftError):
    """A step of secure aggregation was refused. ``site`` names the site at fault, if one is."""

    def __init__(self, message: str, site: str | None = None):
        self.site = site
        super().__init__(message)


class BelowThreshold(SecAggError):
    """Too few sites or shares to go on: the round is refused (never a wrong sum)."""


def round_context(run_token: str, round_: int) -> bytes:
    """The bytes that bind one run's round: in every HKDF info and associated data here."""
    return framed(_CONTEXT_DOMAIN, (run_token.encode(), str(round_).encode()))


# -- fixed point ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPoint:
    """Reals in [-bound, bound] as integers in [0, L], so that up to ``max_sites`` of them add up
    in Z_{2**32} without wrapping: L is the largest even number with ``max_sites * L < 2**32``.

    A coordinate x (clipped) encodes as ``round(x * L / (2 * bound)) + L / 2``. The resolution
    is ``step = 2 * bound / L``, about ``2 * bound * max_sites / 2**32`` (bound 1 and 100 sites:
    4.7e-8); each encoding is within ``step / 2`` of its clipped input, so a decoded sum of
    ``count`` encodings is within ``count * step / 2`` of the sum of the clipped inputs.
    """

    bound: float
    max_sites: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"the fixed-point bound must be positive and finite, not {self.bound}")
        if not 1 <= self.max_sites <= 2**30:
            raise ValueError(f"max_sites must be in 1..2**30, not {self.max_sites}")

    @property
    def levels(self) -> int:
        """L: an encoding lies in [0, L]."""
        return 2 * ((2**RING_BITS - 1) // (2 * self.max_sites))

    @property
    def step(self) -> float:
        """The real value of one integer step."""
        return 2 * self.bound / self.levels

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Clip each coordinate to [-bound, bound] and map it into [0, L] (uint32, same shape).
        Refuses NaN (clipping has no answer for it); infinities clip to the bound."""
        values = np.asarray(x, dtype=np.float64)
        if np.isnan(values).any():
            raise ValueError("cannot encode NaN: check the update is finite before encoding")
        half = self.levels // 2
        scaled = np.rint(np.clip(values, -self.bound, self.bound) / self.step)
        # rint of |x| / step <= L/2 can round to half + 1 only through float error: clip again.
        return (np.clip(scaled, -half, half) + half).astype(np.uint32)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The real sum (float64) of ``count`` encodings whose ring sum is ``total``. Refuses a
        total no ``count`` encodings can reach: some input was not an encoding."""
        if not 1 <= count <= self.max_sites:
            raise ValueError(
                f"a sum of {count} encodings; this encoding allows 1..{self.max_sites}"
            )
        integers = np.asarray(total, dtype=np.uint32).astype(np.int64)
        if (integers > count * self.levels).any():
            raise SecAggError(
                f"the sum is out of range for {count} encodings: an input was not an encoding"
            )
        return (integers - count * (self.levels // 2)).astype(np.float64) * self.step


def encode_input(fixed: FixedPoint, update: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """A site's input to the sum: its (flattened) update in fixed point, then, when given,
    ``counts`` as they are (whole numbers from 0 up; a sum of them is exact in the ring while it
    stays below 2**32): the score histograms of its evaluation."""
    encoded = fixed.encode(update)
    if counts is None:
        return encoded
    values = np.asarray(counts)
    if values.ndim != 1 or (values.size and (values.min() < 0 or values.max() >= 2**RING_BITS)):
        raise ValueError("counts are whole numbers in 0..2**32 - 1, one vector")
    return np.concatenate([encoded, values.astype(np.uint32)])


def decode_parts(
    fixed: FixedPoint, total: np.ndarray, count: int, update_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """The sum of ``count`` inputs of :func:`encode_input`, split: the real sum of their updates
    (the first ``update_length`` entries, float64) and the integer sum of their counts (the
    rest, int64)."""
    ring = np.asarray(total, dtype=np.uint32)
    if not 0 <= update_length <= ring.size:
        raise ValueError(f"an update of {update_length} entries in a sum of {ring.size}")
    update = fixed.decode_sum(ring[:update_length], count)
    return update, ring[update_length:].astype(np.int64)


def flatten(state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """One float32 vector of every tensor, in sorted name order, and the layout to undo it."""
    names = sorted(state)
    layout = tuple((name, tuple(int(n) for n in np.shape(state[name]))) for name in names)
    if not names:
        return np.zeros(0, dtype=np.float32), layout
    vector = np.concatenate([np.asarray(state[n], dtype=np.float32).ravel() for n in names])
    return vector, layout


def unflatten(vector: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """The name -> array map of :func:`flatten` (the vector's dtype kept)."""
    sizes = [math.prod(shape) for _, shape in layout]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(f"a vector of {vector.size} values for a layout of {sum(sizes)}")
    out: dict[str, np.ndarray] = {}
    start = 0
    for (name, shape), size in zip(layout, sizes, strict=True):
        out[name] = vector[start : start + size].reshape(shape)
        start += size
    return out


# -- Shamir secret sharing over GF(PRIME) -------------------------------------------------------


def shamir_split(
    secret: int, threshold: int, xs: Collection[int], random_bytes: Callable[[int], bytes]
) -> dict[int, int]:
    """Shares of ``secret`` at each x in ``xs``: any ``threshold`` of them give it back, fewer
    give nothing (a random polynomial of degree threshold - 1 with the secret at 0)."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must lie in the field")
    coefficients = [secret] + [
        int.from_bytes(random_bytes(SHARE_BYTES + 16), "big") % PRIME for _ in range(threshold - 1)
    ]
    shares = {}
    for x in xs:
        if not 0 < x < PRIME:
            raise ValueError(f"share x-coordinate {x} is outside 1..p-1")
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights w_i with f(0) = sum w_i f(x_i) for any polynomial of degree < len(xs)."""
    if len(set(xs)) != len(xs):
        raise ValueError("repeated x-coordinate")
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def shamir_combine(shares: Mapping[int, int]) -> int:
    """The secret from shares x -> y (all of them used; pass exactly ``threshold``)."""
    xs = tuple(sorted(shares))
    weights = lagrange_at_zero(xs)
    return sum(w * shares[x] for w, x in zip(weights, xs, strict=True)) % PRIME


# -- primitives of the protocol -------------------------------------------------------------------


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of ChaCha20 keystream (key ``seed``, nonce and counter 0), little
    endian. Each seed here is fresh per round and purpose, so the all-zero nonce never repeats
    under one key."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed is {SEED_BYTES} bytes")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def pairwise_seed(
    s_private: x25519.X25519PrivateKey, peer_public: bytes, context: bytes, a: str, b: str
) -> bytes:
    """s_uv: the same for (u, v) and (v, u): HKDF of the X25519 agreement, bound to the round
    and to the pair in sorted order."""
    shared = x25519_shared(s_private, peer_public)
    if shared is None:
        raise SecAggError(f"site {b!r}'s mask key is not a usable X25519 key", site=b)
    low, high = sorted((a, b))
    return hkdf_sha256(
        shared, None, framed(_MASK_INFO, (context, low.encode(), high.encode())), SEED_BYTES
    )


def _share_key(shared: bytes, context: bytes, sender: str, recipient: str) -> bytes:
    info = framed(_SHARE_KEY_INFO, (context, sender.encode(), recipient.encode()))
    return hkdf_sha256(shared, None, info, 32)


def _share_aad(context: bytes, sender: str, recipient: str) -> bytes:
    return framed(_SHARE_AAD, (context, sender.encode(), recipient.encode()))


def share_xs(roster: Collection[str]) -> dict[str, int]:
    """Each site's Shamir x-coordinate: its index in the sorted roster, plus one."""
    return {site: i + 1 for i, site in enumerate(sorted(roster))}


def check_threshold(threshold: int, n_sites: int) -> None:
    """A threshold t of n is more than half of n (two disjoint groups of sites never both reach
    t), at least 2 (no sum of one input) and at most n."""
    if not (threshold >= 2 and 2 * threshold > n_sites and threshold <= n_sites):
        raise SecAggError(
            f"threshold {threshold} of {n_sites} sites: it must be at least 2, more than half "
            f"of the sites and at most all of them"
        )


def _masks(
    s_private: x25519.X25519PrivateKey,
    site: str,
    peers: Collection[str],
    roster: Mapping[str, PublicKeys],
    context: bytes,
    length: int,
) -> np.ndarray:
    """sum_{v > site} PRG(s_uv) - sum_{v < site} PRG(s_uv) over ``peers``, mod 2**32."""
    total = np.zeros(length, dtype=np.uint32)
    for peer in sorted(peers):
        mask = prg(pairwise_seed(s_private, roster[peer][1], context, site, peer), length)
        if peer > site:
            total += mask
        else:
            total -= mask
    return total


# -- the site's side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revealed:
    """What one site reveals in round 3: its share of each survivor's self-mask seed (``seeds``)
    and of each dropped site's mask key (``keys``), site -> share in GF(PRIME). The share's
    x-coordinate is the revealing site's (:func:`share_xs`)."""

    seeds: Mapping[str, int]
    keys: Mapping[str, int]


class SiteSecAgg:
    """One site's state for one round of secure aggregation. Each step runs once, in order, and
    a refused step ends the site's round (no retry with other arguments); secrets never leave
    the object except as the encrypted shares and the reveal of round 3.

    ``context`` binds the run and round (:func:`round_context`); ``random_bytes`` is
    ``os.urandom`` except in tests."""

    def __init__(
        self,
        site_id: str,
        context: bytes,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ):
        if not site_id:
            raise ValueError("a site id cannot be empty")
        self.site_id = site_id
        self.context = context
        self._random = random_bytes
        self._step = 0
        self._c_key: x25519.X25519PrivateKey | None = None
        self._s_key: x25519.X25519PrivateKey | None = None
        self._roster: dict[str, PublicKeys] = {}
        self._threshold = 0
        self._seed = b""
        self._u2: frozenset[str] = frozenset()
        # Shares other sites dealt to this one (and its own): site -> (share of b, share of s_sk).
        self._held: dict[str, tuple[int, int]] = {}

    def _advance(self, step: int, name: str) -> None:
        if self._step != step:
            raise SecAggError(
                f"site {self.site_id!r}: {name} out of order (step {self._step}, expected {step})"
            )
        self._step = step + 1

    def advertise(self) -> PublicKeys:
        """Round 0: fresh (c public key, s public key), raw X25519, for the integration to sign."""
        self._advance(0, "advertise")
        self._c_key = x25519.X25519PrivateKey.from_private_bytes(self._random(X25519_BYTES))
        self._s_key = x25519.X25519PrivateKey.from_private_bytes(self._random(X25519_BYTES))
        return raw_public(self._c_key), raw_public(self._s_key)

    def share_keys(self, roster: Mapping[str, PublicKeys], threshold: int) -> dict[str, bytes]:
        """Round 1: the encrypted shares for each other site of ``roster`` (every advertised
        site's keys, this one's included), recipient -> nonce || AES-GCM ciphertext."""
        self._advance(1, "share_keys")
        assert self._c_key is not None and self._s_key is not None
        mine = (raw_public(self._c_key), raw_public(self._s_key))
        if roster.get(self.site_id) != mine:
            raise SecAggError(f"the roster does not carry site {self.site_id!r}'s own keys")
        check_threshold(threshold, len(roster))
        seen: set[bytes] = set()
        for site, keys in roster.items():
            if not site or len(keys) != 2 or any(len(k) != X25519_BYTES for k in keys):
                raise SecAggError(f"site {site!r}'s advertised keys are malformed", site=site)
            if seen & set(keys):
                raise SecAggError(f"site {site!r} advertised another site's key", site=site)
            seen.update(keys)
        self._roster = dict(roster)
        self._threshold = threshold
        self._seed = self._random(SEED_BYTES)
        xs = share_xs(roster)
        s_raw = self._s_key.private_bytes_raw()
        seed_shares = shamir_split(
            int.from_bytes(self._seed, "big"), threshold, xs.values(), self._random
        )
        key_shares = shamir_split(
            int.from_bytes(s_raw, "big"), threshold, xs.values(), self._random
        )
        out = {}
        for site in sorted(roster):
            pair = (seed_shares[xs[site]], key_shares[xs[site]])
            if site == self.site_id:
                self._held[site] = pair
                continue
            shared = x25519_shared(self._c_key, roster[site][0])
            if shared is None:
                raise SecAggError(f"site {site!r}'s encryption key is not usable", site=site)
            nonce = self._random(NONCE_BYTES)
            plaintext = b"".join(v.to_bytes(SHARE_BYTES, "big") for v in pair)
            out[site] = nonce + aes_gcm_encrypt(
                _share_key(shared, self.context, self.site_id, site),
                nonce,
                plaintext,
                _share_aad(self.context, self.site_id, site),
            )
        return out

    def masked_input(self, x: np.ndarray, ciphertexts: Mapping[str, bytes]) -> np.ndarray:
        """Round 2: ``x`` (uint32, one dimension) masked. ``ciphertexts`` are the shares other
        sites addressed to this one, sender -> bytes; their senders and this site are U2, the
        sites whose pairwise masks this input carries. Refuses (naming the sender) a ciphertext
        that does not decrypt, so a site never masks against a set it cannot help unmask."""
        self._advance(2, "masked_input")
        assert self._c_key is not None and self._s_key is not None
        x = np.asarray(x)
        if x.dtype != np.uint32 or x.ndim != 1:
            raise ValueError(f"the input must be a 1-D uint32 vector, not {x.dtype} {x.shape}")
        for sender, blob in sorted(ciphertexts.items()):
            if sender == self.site_id or sender not in self._roster:
                raise SecAggError(f"shares from {sender!r}, not another site of the roster", sender)
            shared = x25519_shared(self._c_key, self._roster[sender][0])
            plaintext = None
            if shared is not None:
                plaintext = aes_gcm_decrypt(
                    _share_key(shared, self.context, sender, self.site_id),
                    blob[:NONCE_BYTES],
                    blob[NONCE_BYTES:],
                    _share_aad(self.context, sender, self.site_id),
                )
            if plaintext is None or len(plaintext) != 2 * SHARE_BYTES:
                raise SecAggError(
                    f"the key shares from site {sender!r} do not decrypt: altered, or sealed for "
                    f"another site or round",
                    site=sender,
                )
            self._held[sender] = (
                int.from_bytes(plaintext[:SHARE_BYTES], "big"),
                int.from_bytes(plaintext[SHARE_BYTES:], "big"),
            )
        self._u2 = frozenset(ciphertexts) | {self.site_id}
        if len(self._u2) < self._threshold:
            raise BelowThreshold(
                f"{len(self._u2)} sites shared keys, fewer than the threshold {self._threshold}"
            )
        peers = self._u2 - {self.site_id}
        mask = prg(self._seed, x.size) + _masks(
            self._s_key, self.site_id, peers, self._roster, self.context, x.size
        )
        return x + mask

    def unmask(self, survivors: Collection[str], dropped: Collection[str]) -> Revealed:
        """Round 3: this site's shares of ``b_v`` for each survivor v (U3, masked input received)
        and of ``s_sk_v`` for each dropped v (U2 \\ U3). Refuses, revealing nothing, unless the
        two sets are disjoint, together the U2 this site masked against, ``survivors`` includes
        this site and reaches the threshold; and refuses any second call."""
        self._advance(3, "unmask")
        alive, gone = frozenset(survivors), frozenset(dropped)
        both = alive & gone
        if both:
            raise SecAggError(
                f"site {self.site_id!r} will not reveal both shares of {sorted(both)}: "
                f"listed as survivors and as dropped",
                site=min(both),
            )
        if alive | gone != self._u2:
            raise SecAggError(
                f"survivors and dropped ({sorted(alive | gone)}) are not the sites site "
                f"{self.site_id!r} masked against ({sorted(self._u2)})"
            )
        if self.site_id not in alive:
            raise SecAggError(f"site {self.site_id!r} is answering but listed as dropped")
        if len(alive) < self._threshold:
            raise BelowThreshold(
                f"{len(alive)} survivors, fewer than the threshold {self._threshold}"
            )
        return Revealed(
            seeds={v: self._held[v][0] for v in sorted(alive)},
            keys={v: self._held[v][1] for v in sorted(gone)},
        )


# -- the coordinator's side -----------------------------------------------------------------------


def _reconstruct(
    secret_of: str, kind: str, shares: Mapping[str, int], xs: Mapping[str, int], threshold: int
) -> bytes:
    """The 32-byte secret from ``threshold`` of its shares (holder -> share)."""
    if len(shares) < threshold:
        raise BelowThreshold(
            f"{len(shares)} share(s) of site {secret_of!r}'s {kind}, fewer than the threshold "
            f"{threshold}: the round is refused",
            site=secret_of,
        )
    holders = sorted(shares)[:threshold]
    value = shamir_combine({xs[h]: shares[h] for h in holders})
    if value >= 2 ** (8 * SEED_BYTES):
        raise SecAggError(f"the shares of site {secret_of!r}'s {kind} are inconsistent", secret_of)
    return value.to_bytes(SEED_BYTES, "big")


def unmask_sum(
    masked: Mapping[str, np.ndarray],
    revealed: Mapping[str, Revealed],
    roster: Mapping[str, PublicKeys],
    masked_against: Collection[str],
    threshold: int,
    context: bytes,
) -> np.ndarray:
    """The sum over the survivors U3 (the keys of ``masked``: site -> masked input) of their
    inputs, mod 2**32. ``revealed`` is what the sites that answered round 3 revealed (U4, a
    subset of U3), ``roster`` every advertised site's keys (U1), ``masked_against`` the sites
    whose shares were relayed (U2).

    Raises :class:`BelowThreshold` when fewer than ``threshold`` sites survived or a secret has
    fewer than ``threshold`` shares, and :class:`SecAggError` naming the site for anything
    malformed, or shares that do not rebuild a dropped site's advertised key."""
    check_threshold(threshold, len(roster))
    u2 = frozenset(masked_against)
    u3 = frozenset(masked)
    for strays, what in (
        (u2 - set(roster), "shared keys without advertising any"),
        (u3 - u2, "sent a masked input without sharing keys"),
        (set(revealed) - u3, "revealed shares without a masked input"),
    ):
        if strays:
            raise SecAggError(f"site {min(strays)!r} {what}", site=min(strays))
    if len(u3) < threshold:
        raise BelowThreshold(
            f"{len(u3)} masked input(s), fewer than the threshold {threshold}: the round is refused"
        )
    length = None
    for site in sorted(u3):
        y = np.asarray(masked[site])
        if y.dtype != np.uint32 or y.ndim != 1 or (length is not None and y.size != length):
            raise SecAggError(
                f"site {site!r}'s masked input is {y.dtype} {y.shape}, not a uint32 vector"
                + (f" of {length}" if length is not None else ""),
                site=site,
            )
        length = y.size
    assert length is not None
    xs = share_xs(roster)
    total = np.zeros(length, dtype=np.uint32)
    for site in sorted(u3):
        total += masked[site]
    for site in sorted(u3):
        shares = {h: r.seeds[site] for h, r in revealed.items() if site in r.seeds}
        total -= prg(_reconstruct(site, "mask seed", shares, xs, threshold), length)
    for gone in sorted(u2 - u3):
        shares = {h: r.keys[gone] for h, r in revealed.items() if gone in r.keys}
        raw = _reconstruct(gone, "mask key", shares, xs, threshold)
        key = x25519.X25519PrivateKey.from_private_bytes(raw)
        if raw_public(key) != roster[gone][1]:
            raise SecAggError(
                f"the shares of dropped site {gone!r}'s mask key do not rebuild its advertised key",
                site=gone,
            )
        # Survivor u added +PRG(s_uv) when v > u and -PRG(s_uv) when v < u: the dropped site's
        # own masks towards the survivors, negated, are exactly what to add back.
        total += _masks(key, gone, u3, roster, context, length)
    return total
