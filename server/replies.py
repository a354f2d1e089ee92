"""One site's reply, read: an accepted update or evaluation, or a typed rejection.

Pure: a function of the Flower message and of what the round accepts; no network, no store.
The round loop (server/strategy.py) reads every reply through here; tests call it with
hand-made messages.

A train reply is used only if each step passes, in this order:

1. Flower carries no error for it, and the site reports success (else ``failed``, with
   ``site-error``, or ``refused`` for a task the site refused);
2. its records are there and of the right types (else ``rejected``, ``malformed``);
3. its sealed delta is within the round's size limit, read from the record's metadata before the
   bytes are copied out of the message (else ``too-large``);
4. its sealed delta opens for this run and round (:func:`open_delta`, which also fixes the
   tensors' names, shapes and dtype; its reason codes);
5. the site that signed it is the site the reply names, and no delta of that site has opened
   before in this round (else ``bad-signature``);
6. its values pass :func:`validate_delta` (``non-finite``, ``examples``, ``norm``);
7. in a LoRA run, the rank its reply says it trained at (``lora-rank``, a site of less capacity
   trains a lower one) is within the run's, and its delta is zero beyond it (:func:`validate_rank`,
   ``rank``).

An evaluation (an evaluate reply's, or the one a train reply carries after round 1, of the
global state it trained from) needs steps 1 and 2, then its sealed evaluation must be within
``MAX_EVALUATION_BYTES`` (read as in step 3) and open for this run and round, signed by the
site the reply names (the site's signature is checked before anything is decrypted), and its
values pass :func:`validate_evaluation` (``evaluation``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from fedpeft.common import keys
from fedpeft.common.envelope import (
    MAX_EVALUATION_BYTES,
    Expected,
    check_size,
    open_delta,
    open_evaluation,
)
from fedpeft.common.errors import DeltaRejected, Reason
from fedpeft.common.keys import Phase, SiteStatus
from fedpeft.common.methods.lora import state_rank
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.records import blob_nbytes, from_blob_record
from fedpeft.common.state import State
from fedpeft.server.store.base import ReplyStatus
from fedpeft.server.validation import validate_delta, validate_evaluation, validate_rank

if TYPE_CHECKING:
    from flwr.app import Message


_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass
class Reply:
    """One site's answer to one message, decoded, or the reason it could not be used."""

    node_id: int
    site: str
    status: ReplyStatus = ReplyStatus.OK
    #: Why the reply is not used, as the store records it: ``"<code>: <detail>"``.
    reason: str | None = None
    code: Reason | None = None
    delta: State | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    histogram: tuple[list[int], list[int]] | None = None
    #: A delta (or an evaluation) signed by this reply's site opened, whether or not its values
    #: then passed: a second delta from the same site in a round is refused, and the node is
    #: bound to that site.
    opened: bool = False
    bytes_up: int = 0  # the whole reply as serialized by Flower
    bytes_down: int = 0  # the whole message sent to the site
    #: The site's data fingerprint as it stated it beside its update (not signed); None when it
    #: sent none, or not one of the form ``sha256:<64 hex>``.
    data_fingerprint: str | None = None
    #: What the coordinator did with an accepted update (server/aggregation.py ``aggregate``:
    #: its weight, its norm, what was bounded); kept apart from what the site reported.
    notes: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Intake:
    """What the coordinator accepts as a train reply in one round."""

    #: The run, round, method, base model, tensor layout, size and codec the envelope must have.
    expected: Expected
    #: This run's private key: every delta is sealed for its public half.
    run_key: x25519.X25519PrivateKey
    #: The registered sites' public keys, by name.
    sites: Mapping[str, ec.EllipticCurvePublicKey]
    #: Largest L2 norm of an update (``federation.max_update_norm``); None: no bound.
    max_norm: float | None = None

    @property
    def lora_rank(self) -> int:
        """The run's LoRA rank, from the state's shapes; 0 when it is not a LoRA run."""
        return state_rank(self.expected.shapes)


def read_train(msg: Message, intake: Intake, opened: Set[str], name: str) -> Reply:
    """A train reply as an update to aggregate, or rejected with its reason.

    ``opened``: the sites whose delta has already opened in this round. ``name``: the site this
    node is known as, for a reply that does not say.
    """
    reply = _read(msg, name)
    # The rank a site says it trained is kept only once checked against its delta.
    declared = reply.metrics.pop(keys.LORA_RANK, None)
    if reply.status is not ReplyStatus.OK:
        return reply
    try:
        sealed = _sealed_bytes(msg.content[keys.SEALED], intake.expected.max_bytes)
        update = open_delta(sealed, intake.expected, intake.run_key, intake.sites)
        # The signature says who sealed the delta; the reply must be that site's, once a round.
        if update.site_id != reply.site or reply.site in opened:
            raise DeltaRejected(
                Reason.BAD_SIGNATURE,
                f"a delta signed by site {update.site_id!r} sent as site {reply.site!r}"
                + (" a second time this round" if reply.site in opened else ""),
            )
        reply.opened = True
        validate_delta(update.delta, update.num_examples, intake.max_norm)
        rank = validate_rank(update.delta, declared, intake.lora_rank)
    except DeltaRejected as exc:
        return replace(reply, status=ReplyStatus.REJECTED, reason=str(exc), code=exc.reason)
    except (KeyError, TypeError, ValueError) as exc:
        return _malformed(reply, exc)
    reply.delta = update.delta
    reply.metrics[keys.N_TRAIN] = float(update.num_examples)  # the signed count
    if rank:
        reply.metrics[keys.LORA_RANK] = float(rank)
    return reply


@dataclass(frozen=True)
class EvaluationIntake:
    """What the coordinator accepts as a site's evaluation of one global state."""

    run_token: str
    #: The round whose global state was evaluated.
    round: int
    fingerprint: str
    run_key: x25519.X25519PrivateKey
    sites: Mapping[str, ec.EllipticCurvePublicKey]
    #: Most test or validation rows an evaluation may count.
    max_rows: int
    #: The evaluation holds the score histograms (without: secure aggregation, where they
    #: travel in the masked vector and an evaluation holding any is refused).
    histograms: bool = True
    #: Bins of each histogram (the run's ``federation.histogram_bins``).
    bins: int = HIST_BINS


def read_evaluate(
    msg: Message, intake: EvaluationIntake, name: str, *, in_train: bool = False
) -> Reply:
    """A site's evaluation as metrics and a score histogram to pool, or rejected with its
    reason: its sealed evaluation must open for this run and round (common/envelope.py
    ``open_evaluation``: signed by the site the reply names, then decrypted) and its values pass
    ``validate_evaluation``.

    ``in_train``: the evaluation a train reply carries after round 1 (a train reply that failed
    carries none and fails the same way); its metrics are the evaluation's alone, not the local
    model's beside it."""
    reply = _read(msg, name)
    if reply.status is not ReplyStatus.OK:
        return reply
    if in_train:
        reply.metrics = {}
    try:
        opened = open_evaluation(
            _sealed_bytes(msg.content[keys.EVALUATION], MAX_EVALUATION_BYTES),
            run_token=intake.run_token,
            round=intake.round,
            fingerprint=intake.fingerprint,
            run_key=intake.run_key,
            sites=intake.sites,
        )
        if opened.site_id != reply.site:
            raise DeltaRejected(
                Reason.BAD_SIGNATURE,
                f"an evaluation signed by site {opened.site_id!r} sent as site {reply.site!r}",
            )
        reply.opened = True
        validate_evaluation(
            opened.metrics,
            opened.hist_pos,
            opened.hist_neg,
            intake.max_rows,
            intake.histograms,
            intake.bins,
        )
    except DeltaRejected as exc:
        return replace(reply, status=ReplyStatus.REJECTED, reason=str(exc), code=exc.reason)
    except (KeyError, TypeError, ValueError) as exc:
        return _malformed(reply, exc)
    reply.metrics.update(opened.metrics)
    if intake.histograms:
        reply.histogram = (opened.hist_pos, opened.hist_neg)
    return reply


def no_reply(node: int, name: str, phase: Phase, timeout_s: float) -> Reply:
    """The reply of a site that did not answer within the round's timeout."""
    return _refused(
        node,
        name,
        ReplyStatus.FAILED,
        Reason.NO_REPLY,
        f"no reply to the {phase} message (the site may be down; the round waits at most "
        f"{timeout_s:.0f} s)",
    )


def _read(msg: Message, name: str, metrics: str = keys.METRICS) -> Reply:
    """What every reply holds: the site's name, its status and its metrics (the record named
    ``metrics``)."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return _refused(node, name, ReplyStatus.FAILED, Reason.SITE_ERROR, str(msg.error.reason))
    site = name
    try:
        info = msg.content[keys.CONFIG]
        site = str(info[keys.SITE])
        status = info[keys.STATUS]
        if status != SiteStatus.OK:
            detail = str(info.get(keys.ERROR, ""))
            code = Reason.REFUSED if status == SiteStatus.REFUSED else Reason.SITE_ERROR
            return _refused(node, site, ReplyStatus.FAILED, code, detail)
        values = {k: float(v) for k, v in msg.content[metrics].items()}  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        return _malformed(Reply(node, site), exc)
    stated = info.get(keys.DATA_FINGERPRINT)
    fingerprint = stated if isinstance(stated, str) and _FINGERPRINT.fullmatch(stated) else None
    return Reply(node, site, metrics=values, data_fingerprint=fingerprint)


#: Largest signed answer to a secure-aggregation stage (a site's key shares for every other
#: site of the round take a few hundred bytes each).
MAX_ANSWER_BYTES = 4 * 1024 * 1024


def read_answer(msg: Message, name: str) -> tuple[Reply, bytes | None]:
    """A reply to a secure-aggregation stage: its status as any reply's (steps 1 and 2), and the
    site's signed answer (common/secagg_messages.py ``open_answer`` checks it), once the size
    its record declares is within :data:`MAX_ANSWER_BYTES`."""
    reply = _read(msg, name)
    if reply.status is not ReplyStatus.OK:
        return reply, None
    try:
        return reply, _sealed_bytes(msg.content[keys.SECAGG], MAX_ANSWER_BYTES)
    except DeltaRejected as exc:
        return replace(reply, status=ReplyStatus.REJECTED, reason=str(exc), code=exc.reason), None
    except (KeyError, TypeError, ValueError) as exc:
        return _malformed(reply, exc), None


def _sealed_bytes(record: object, limit: int) -> bytes:
    """The bytes of a sealed record, once the size its metadata declares is within ``limit``
    (``too-large``): an oversized reply is refused before any copy of its bytes is made."""
    check_size(blob_nbytes(record), limit)
    return from_blob_record(record)


def _refused(node: int, site: str, status: ReplyStatus, code: Reason, detail: str) -> Reply:
    return Reply(node, site, status, f"{code}: {detail}", code)


def _malformed(reply: Reply, exc: Exception) -> Reply:
    reason = f"{Reason.MALFORMED}: {exc!r}"
    return replace(reply, status=ReplyStatus.REJECTED, reason=reason, code=Reason.MALFORMED)
