"""A site's part in secure aggregation: its answer to each stage, and its masked update.

The protocol is common/secagg.py's (SecAgg, Bonawitz et al. 2017), its messages
common/secagg_messages.py's. A site keeps no protocol state between the messages of a round: its
keys, self-mask seed and Shamir polynomials for a round are drawn from a stream that its identity
key and the round's context (run token and round) determine, so each message rebuilds the same
:class:`SiteSecAgg` and runs its steps up to the one asked. Hence a site answers each kind of
message once per run and round (:func:`answer_once`, remembered in the process and the site's
ledger): a second train message (another update under the same masks), shares stage (shares
for a roster of the coordinator's own keys) or unmasking (other lists) could open its update.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpeft.client.ledger import Ledger
from fedpeft.common.config import SecureAggregationConfig, SitePrivacy
from fedpeft.common.crypto import hkdf_sha256
from fedpeft.common.dp import noise_std_per_site
from fedpeft.common.secagg import FixedPoint, SecAggError, SiteSecAgg, encode_input, flatten
from fedpeft.common.secagg_messages import (
    KEYS,
    MASKED,
    SHARES,
    UNMASK,
    StageTask,
    keys_answer,
    shares_answer,
    sign_answer,
    unmask_answer,
)
from fedpeft.common.state import State

_RANDOMNESS_INFO = b"fedpeft/v1 secagg-site-randomness\x00"

# (site, context) -> the (survivors, dropped) lists the site revealed shares for, in this
# process. Keyed by site: in simulation one process answers for several sites.
_revealed: dict[tuple[str, bytes], tuple[frozenset[str], frozenset[str]]] = {}
# (site, run token, round, message type) of every secure-aggregation message answered here.
_answered: set[tuple[str, str, int, str]] = set()
_lock = threading.Lock()


def answer_once(
    site: str,
    run_token: str,
    rnd: int,
    kind: str,
    ledger: Ledger | None,
    threshold: float,
    task: StageTask,
) -> None:
    """Refuse a secure-aggregation message site ``site`` has answered before in this run and round
    (:class:`SecAggError`), and one whose threshold is not the one the signed run config gives
    for its roster. A site's secrets for a round are the same at every message of it: a second
    train message (a retrained update under the same masks), a second shares stage (shares for a
    roster of the coordinator's own keys) or a second unmasking (other lists) could open its
    update. Remembered in this process and, at a deployed site, in its ledger (every answer
    that left is an ``upload`` line there), which outlives a restart."""
    if kind != KEYS and task.threshold != _shares_needed(threshold, len(task.roster)):
        raise SecAggError(
            f"a threshold of {task.threshold} for {len(task.roster)} sites; the run's config "
            f"gives {_shares_needed(threshold, len(task.roster))}: refused"
        )
    key = (site, run_token, rnd, kind)
    with _lock:
        if key in _answered or (ledger is not None and _in_ledger(ledger, key[1:])):
            raise SecAggError(
                f"a second {kind} message for round {rnd} of this run: refused (the site's "
                "secrets for a round serve one answer to each message)"
            )
        _answered.add(key)


def _in_ledger(ledger: Ledger, key: tuple[str, int, str]) -> bool:
    return any(
        (r.entry.run_token, r.entry.round, r.entry.message_type) == key
        and r.entry.event == "upload"
        for r in ledger.entries()
    )


def _shares_needed(threshold: float, n: int) -> int:
    return SecureAggregationConfig(True, threshold).shares_needed(n)


def site_randomness(identity: ec.EllipticCurvePrivateKey, context: bytes) -> Callable[[int], bytes]:
    """The site's random bytes for one round: a ChaCha20 stream keyed by HKDF of its identity
    key and the round's context, the same at every message of the round and unknown to anyone
    without the site's private key."""
    secret = identity.private_numbers().private_value.to_bytes(48, "big")
    key = hkdf_sha256(secret, None, _RANDOMNESS_INFO + context, 32)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def read(n: int) -> bytes:
        return stream.update(bytes(n))

    return read


def _protocol(
    site: str, identity: ec.EllipticCurvePrivateKey, context: bytes, task: StageTask
) -> SiteSecAgg:
    """The round's protocol state rebuilt through key sharing (a roster and threshold given)."""
    protocol = SiteSecAgg(site, context, site_randomness(identity, context))
    protocol.advertise()
    protocol.share_keys(task.roster, task.threshold)
    return protocol


def answer_stage(
    task: StageTask,
    site: str,
    identity: ec.EllipticCurvePrivateKey,
    context: bytes,
    examples: int,
) -> bytes:
    """The site's signed answer to a stage other than training (``examples``: its training
    example count, stated with its keys)."""
    if task.stage == KEYS:
        keys = SiteSecAgg(site, context, site_randomness(identity, context)).advertise()
        return sign_answer(identity, context, site, KEYS, keys_answer(keys, examples))
    if task.stage == SHARES:
        protocol = SiteSecAgg(site, context, site_randomness(identity, context))
        protocol.advertise()
        shares = protocol.share_keys(task.roster, task.threshold)
        return sign_answer(identity, context, site, SHARES, shares_answer(shares))
    if task.stage == UNMASK:
        lists = (frozenset(task.survivors), frozenset(task.dropped))
        with _lock:
            before = _revealed.get((site, context))
            if before is not None and before != lists:
                raise SecAggError(
                    f"site {site!r}: asked to unmask this round again with other lists; refused "
                    "(the two answers together could open a site's update)"
                )
            protocol = _protocol(site, identity, context, task)
            # Rebuilt up to masking for the shares it holds and the set it masked against; the
            # masked vector itself is not needed again (a zero-length one costs no expansion).
            protocol.masked_input(np.zeros(0, np.uint32), task.ciphertexts)
            revealed = protocol.unmask(task.survivors, task.dropped)
            _revealed[site, context] = lists
        return sign_answer(identity, context, site, UNMASK, unmask_answer(revealed))
    raise SecAggError(f"unknown secure aggregation stage {task.stage[:32]!r}")


#: A site's score histograms of one evaluation: positives' and negatives' counts per bin.
Histograms = tuple[Sequence[int], Sequence[int]]


def masked_update(
    delta: State | None,
    histograms: Histograms | None,
    privacy: SitePrivacy,
    task: StageTask,
    site: str,
    identity: ec.EllipticCurvePrivateKey,
    context: bytes,
) -> State:
    """What leaves with secure aggregation, one masked vector: the (clipped) update times the
    task's weight (in (0, 1]: its norm stays within the clip; an evaluate task's update is
    zeros of the task's length), with distributed DP plus this site's share of the round's
    noise (``noise_std_per_site`` over the threshold t, so that the sum of any t or more carries
    at least sigma * clip; drawn from the OS's entropy), fixed-point encoded in
    ``privacy.fixed_point_range``; then, when the task asks, the score histograms of the site's
    evaluation as counts; all of it masked. The coordinator can open the seal, and sees only
    this."""
    if delta is not None and not 0.0 < task.weight <= 1.0:
        raise SecAggError(f"a weight of {task.weight!r}; a site's weight lies in (0, 1]: refused")
    if task.histograms != (histograms is not None):
        raise SecAggError("the task and the site disagree on sending score histograms")
    if histograms is not None and {len(h) for h in histograms} != {task.bins}:
        raise SecAggError(
            f"a task for histograms of {task.bins} bins; the signed config gives "
            f"{len(histograms[0])}: refused"
        )
    if delta is None:
        vector = np.zeros(task.length, dtype=np.float64)
    else:
        vector = flatten(delta)[0].astype(np.float64) * task.weight
    if vector.size != task.length:
        raise SecAggError(f"an update of {vector.size} entries for a task of {task.length}")
    if privacy.distributed_noise and vector.size:
        std = noise_std_per_site(privacy.noise_multiplier, privacy.clip, task.threshold)
        vector = vector + np.random.default_rng().normal(0.0, std, vector.size)
    counts = None
    if histograms is not None:
        counts = np.concatenate([np.asarray(h, dtype=np.int64) for h in histograms])
    fixed = FixedPoint(privacy.fixed_point_range, max_sites=len(task.roster))
    x = encode_input(fixed, vector, counts)
    masked = _protocol(site, identity, context, task).masked_input(x, task.ciphertexts)
    return {MASKED: masked}
