"""One site's reply, read: an accepted update or evaluation, or a typed rejection.

Pure: a function of the Flower message and of what the round accepts; no network, no store.
The round loop (server/strategy.py) reads every reply through here; tests call it with
hand-made messages.

A train reply is used only if each step passes, in this order:

1. Flower carries no error for it, and the site reports success (else ``failed``, with
   ``site-error``, or ``refused`` for a task the site refused);
2. its records are there and of the right types (else ``rejected``, ``malformed``);
3. its sealed delta opens for this run and round (:func:`open_delta`, which also fixes the
   tensors' names, shapes and dtype; its reason codes);
4. the site that signed it is the site the reply names, and no delta of that site has opened
   before in this round (else ``bad-signature``);
5. its values pass :func:`validate_delta` (``non-finite``, ``examples``, ``norm``).

An evaluate reply needs steps 1 and 2, with a score histogram. After round 1 a train reply
also carries the evaluation of the global state it trained from, read the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from fedpeft.common import keys
from fedpeft.common.envelope import Expected, open_delta
from fedpeft.common.errors import DeltaRejected, Reason
from fedpeft.common.keys import Phase, SiteStatus
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.records import from_blob_record
from fedpeft.common.state import State
from fedpeft.server.store.base import ReplyStatus
from fedpeft.server.validation import validate_delta

if TYPE_CHECKING:
    from flwr.app import Message


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
    #: A delta signed by this reply's site opened (whether or not its values then passed): a
    #: second one from the same site in this round is refused.
    opened: bool = False
    bytes_up: int = 0  # the whole reply as serialized by Flower
    bytes_down: int = 0  # the whole message sent to the site
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


def read_train(msg: Message, intake: Intake, opened: Set[str], name: str) -> Reply:
    """A train reply as an update to aggregate, or rejected with its reason.

    ``opened``: the sites whose delta has already opened in this round. ``name``: the site this
    node is known as, for a reply that does not say.
    """
    reply = _read(msg, name)
    if reply.status is not ReplyStatus.OK:
        return reply
    try:
        sealed = from_blob_record(msg.content[keys.SEALED])
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
    except DeltaRejected as exc:
        return replace(reply, status=ReplyStatus.REJECTED, reason=str(exc), code=exc.reason)
    except (KeyError, TypeError, ValueError) as exc:
        return _malformed(reply, exc)
    reply.delta = update.delta
    reply.metrics[keys.N_TRAIN] = float(update.num_examples)  # the signed count
    return reply


def read_evaluate(msg: Message, name: str, *, in_train: bool = False) -> Reply:
    """An evaluate reply as metrics and a score histogram to pool, or rejected with its reason.

    ``in_train``: read the evaluation a train reply carries after round 1 (its ``evaluation``
    record and histogram; a train reply that failed carries none and fails the same way)."""
    reply = _read(msg, name, keys.EVALUATION if in_train else keys.METRICS)
    if reply.status is not ReplyStatus.OK:
        return reply
    try:
        hist = msg.content[keys.HISTOGRAM]
        pos: list[int] = list(hist[keys.HIST_POS])  # type: ignore[arg-type]
        neg: list[int] = list(hist[keys.HIST_NEG])  # type: ignore[arg-type]
        if len(pos) != HIST_BINS or len(neg) != HIST_BINS:
            # Pooling sums the sites' histograms bin by bin: a ragged one would end the run.
            raise ValueError(f"histograms of {len(pos)} and {len(neg)} bins, not {HIST_BINS}")
    except (KeyError, TypeError, ValueError) as exc:
        return _malformed(reply, exc)
    reply.histogram = (pos, neg)
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
    return Reply(node, site, metrics=values)


def _refused(node: int, site: str, status: ReplyStatus, code: Reason, detail: str) -> Reply:
    return Reply(node, site, status, f"{code}: {detail}", code)


def _malformed(reply: Reply, exc: Exception) -> Reply:
    reason = f"{Reason.MALFORMED}: {exc!r}"
    return replace(reply, status=ReplyStatus.REJECTED, reason=reason, code=Reason.MALFORMED)
