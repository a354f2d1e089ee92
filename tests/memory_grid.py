"""An in-memory Flower Grid, and scripted sites to answer it, for fast tests of the round loop.

The grid has what the round loop uses of Flower's ``Grid``: node ids and ``send_and_receive``.
Each node is a function from the message it gets to its reply (None: it does not answer in
time): the real ClientApp (:func:`client_app_site`) or a :class:`ScriptedSite` that seals a
given delta with the real envelope. Messages and records are the real ``flwr.app`` objects; no
SuperLink, no network, no model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpeft.client.secagg import answer_stage, masked_update
from fedpeft.common import keys
from fedpeft.common.dp import clip_update
from fedpeft.common.envelope import GlobalState, open_global, seal_delta, seal_evaluation
from fedpeft.common.keys import Phase
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.secagg import round_context
from fedpeft.common.secagg_messages import STAGES, StageTask
from fedpeft.common.state import State
from fedpeft.common.wire import RING

#: One node: its reply to a message, or None when it does not answer.
Node = Callable[[Message], Message | None]


class MemoryGrid:
    """Delivers each message to its node's function, in the order given, and keeps them all."""

    def __init__(self, nodes: Mapping[int, Node]):
        from flwr.supercore.task_identity import TaskIdentity

        # Flower stamps each new message with its process's task identity, which it sets before
        # it hands the ServerApp a Grid; set one here, as its in-process simulation does.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.nodes = dict(nodes)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.nodes[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies

    def sent_to(self, phase: Phase, rnd: int) -> list[int]:
        """The nodes that got a ``phase`` message in round ``rnd``."""
        return [
            m.metadata.dst_node_id
            for m in self.sent
            if m.metadata.message_type == phase and m.metadata.group_id == str(rnd)
        ]


def client_app_site(app: Any, node_id: int, node_config: dict[str, Any]) -> Node:
    """A node that answers with a real ClientApp, as a SuperNode with ``node_config`` would."""

    def answer(msg: Message) -> Message:
        context = Context(
            run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
        )
        return app(msg, context)  # type: ignore[no-any-return]

    return answer


#: An evaluation as a site reports it: metrics, and the score histograms of positives and
#: negatives.
Evaluation = tuple[dict[str, float], list[int], list[int]]


def evaluation(_rnd: int) -> Evaluation:
    """A valid evaluation of any round: 7 test rows, a few positives scored high, negatives low."""
    pos, neg = [0] * HIST_BINS, [0] * HIST_BINS
    pos[900], neg[100] = 3, 4
    metrics = {keys.N_TEST: 7, keys.AUC: 0.75, keys.LOSS: 0.5, keys.VAL_LOSS: 0.6, keys.N_VAL: 3}
    return metrics, pos, neg


@dataclass
class ScriptedSite:
    """A site that answers as the real one does, with a delta chosen by the test.

    ``update(round, global_state)`` gives the delta it seals (None: it does not answer the train
    message), ``evaluate(round)`` the evaluation of a round's global state it seals (in an
    evaluate reply, and in a train reply after round 1). It seals as ``seal_as`` (default: its
    own ``name``) and signs with ``key``; the test may then alter the reply's records with
    ``tamper(phase, round, records)``.
    """

    name: str
    key: ec.EllipticCurvePrivateKey
    coordinator: ec.EllipticCurvePublicKey
    update: Callable[[int, State], State | None]
    n_train: int = 10
    seal_as: str | None = None
    tamper: Callable[[Phase, int, RecordDict], None] | None = None
    evaluate: Callable[[int], Evaluation] = evaluation
    #: Secure aggregation: the stages (message types) this site does not answer, by round.
    silent: Callable[[str, int], bool] = lambda _stage, _rnd: False
    #: Secure aggregation: an answer of the test's own in place of the real one (stage,
    #: round's context -> signed answer bytes; None: the real one).
    forge_answer: Callable[[str, bytes], bytes | None] = lambda _stage, _context: None
    #: Secure aggregation: seal its score histograms in its evaluation all the same (a site
    #: breaking the protocol).
    clear_histograms: bool = False
    #: What it states as its data fingerprint beside each update ("": nothing).
    data_fingerprint: str = ""
    #: Its evaluation of its personalized model, when an evaluate message asks for one
    #: (``keys.PERSONALIZE``), and the requests it got: (round, the global state carried).
    personal: Callable[[int], Evaluation] = evaluation
    personal_requests: list[tuple[int, State]] = field(default_factory=list)

    def __call__(self, msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        signed = open_global(from_blob_record(msg.content[keys.GLOBAL]), self.coordinator)
        if self.silent(kind, signed.round):
            return None
        info = {keys.SITE: self.name, keys.STATUS: "ok", keys.ERROR: ""}
        if self.data_fingerprint and kind == Phase.TRAIN:
            info[keys.DATA_FINGERPRINT] = self.data_fingerprint
        records = RecordDict({keys.CONFIG: ConfigRecord(info)})
        context = round_context(signed.run_token, signed.round)
        task = None
        if keys.SECAGG in msg.content:  # as client/app.py does: the real site's functions
            task = StageTask.from_bytes(from_blob_record(msg.content[keys.SECAGG]))
        if kind in STAGES:
            assert task is not None
            answer = self.forge_answer(kind, context) or answer_stage(
                task, self.seal_as or self.name, self.key, context, self.n_train
            )
            records[keys.SECAGG] = blob_record(answer)
            records[keys.METRICS] = MetricRecord({keys.TASK_SECONDS: 0.1})
            return Message(records, reply_to=msg)
        phase = Phase(kind)
        if phase == Phase.TRAIN or task is not None:
            # With secure aggregation an evaluate message is one of its round's exchange too:
            # it evaluates the round before's state and uploads a masked vector of zeros.
            delta = None
            if phase == Phase.TRAIN:
                delta = self.update(signed.round, signed.state)
                if delta is None:
                    return None
            codec = signed.config.codec  # as the signed site config says
            privacy = signed.config.privacy
            if delta is not None and privacy.clip > 0:
                delta, _ = clip_update(delta, privacy.clip)
            if signed.round > 1:  # and the evaluation of the state it trained from
                records[keys.EVALUATION] = self._sealed_evaluation(
                    signed, signed.round - 1, masked=task is not None
                )
            if task is not None:
                histograms = self.evaluate(signed.round - 1)[1:] if task.histograms else None
                delta = masked_update(
                    delta, histograms, privacy, task, self.name, self.key, context
                )
                codec = RING
            assert delta is not None
            records[keys.SEALED] = blob_record(
                seal_delta(
                    delta,
                    run_token=signed.run_token,
                    round=signed.round,
                    site_id=self.seal_as or self.name,
                    method=signed.method,
                    fingerprint=signed.fingerprint,
                    num_examples=self.n_train,
                    codec=codec,
                    run_public=signed.run_public,
                    identity=self.key,
                )
            )
            records[keys.METRICS] = MetricRecord({keys.N_TRAIN: self.n_train, keys.AUC: 0.5})
        else:
            records[keys.METRICS] = MetricRecord({keys.TASK_SECONDS: 0.1})
            personal = bool(msg.content[keys.CONFIG].get(keys.PERSONALIZE, 0))
            if personal:
                self.personal_requests.append((signed.round, dict(signed.state)))
            records[keys.EVALUATION] = self._sealed_evaluation(
                signed, signed.round, personal=personal
            )
        if self.tamper is not None:
            self.tamper(phase, signed.round, records)
        return Message(records, reply_to=msg)

    def _sealed_evaluation(
        self, signed: GlobalState, rnd: int, masked: bool = False, personal: bool = False
    ) -> ArrayRecord:
        """The sealed evaluation of round ``rnd``'s state (``masked``: secure aggregation, its
        histograms left out: they go in the masked vector; ``personal``: of its personalized
        model)."""
        metrics, pos, neg = (self.personal if personal else self.evaluate)(rnd)
        if masked and not self.clear_histograms:
            pos, neg = [], []
        return blob_record(
            seal_evaluation(
                metrics,
                pos,
                neg,
                run_token=signed.run_token,
                round=rnd,
                site_id=self.seal_as or self.name,
                fingerprint=signed.fingerprint,
                run_public=signed.run_public,
                identity=self.key,
            )
        )


def constant(value: float) -> Callable[[int, State], State]:
    """An update of ``value`` in every entry, whatever the round."""
    return lambda _rnd, state: {k: np.full_like(v, value) for k, v in state.items()}
