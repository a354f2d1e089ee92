"""The federated round loop at the coordinator.

One round: send the global shared state (signed by the coordinator) to the sampled sites,
collect their sealed deltas, read each one on its own (server/replies.py: a bad reply is
rejected for that site in that round and recorded; the round goes on), aggregate the valid ones
with FedAvg (server/aggregation.py), apply, ask every site to evaluate the new global state,
and write the round to the store (server/rounds.py makes its rows).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from fedpeft.common import crypto, keys
from fedpeft.common.config import RunConfig
from fedpeft.common.envelope import Expected, sign_global
from fedpeft.common.errors import FedpeftError, Reason
from fedpeft.common.keys import Phase
from fedpeft.common.records import blob_record, message_nbytes
from fedpeft.common.state import State
from fedpeft.common.trust import CoordinatorTrust
from fedpeft.server.aggregation import apply_delta, fedavg
from fedpeft.server.checkpoints import seal_state
from fedpeft.server.replies import Intake, Reply, no_reply, read_evaluate, read_train
from fedpeft.server.rounds import round_result, round_summary, select_round, site_rows
from fedpeft.server.store.base import ReplyStatus, RoundResult, RunStore, utcnow

log = logging.getLogger("fedpeft.server")

Progress = Callable[[str], None]


def sample_nodes(nodes: list[int], k: int, rng: np.random.Generator) -> list[int]:
    """The nodes that train this round: ``k`` of them drawn without replacement, in node order;
    all of them when ``k`` is 0 or not below their number (``federation.sites_per_round``)."""
    if k == 0 or k >= len(nodes):
        return list(nodes)
    return sorted(int(n) for n in rng.choice(nodes, size=k, replace=False))


class FederatedRun:
    """Runs the rounds of one federated run over a Flower ``Grid`` and records them."""

    def __init__(
        self,
        cfg: RunConfig,
        store: RunStore,
        run_id: int,
        initial_state: State,
        fingerprint: str,
        trust: CoordinatorTrust,
        store_key: bytes,
        progress: Progress | None = None,
    ):
        self.cfg = cfg
        self.site_config = cfg.for_sites()
        self.trust = trust
        self.store_key = store_key
        # This run's key pair: sites seal their deltas for it. The private half lives only in
        # this process, for this run; the token binds every envelope to this run.
        self.run_key = crypto.new_run_key()
        self.run_token = uuid.uuid4().hex
        self.store = store
        self.run_id = run_id
        self.state = initial_state
        self.fingerprint = fingerprint
        self.progress = progress or log.info
        self.site_names: dict[int, str] = {}
        self.rng = np.random.default_rng(cfg.seed)

    # -- the round loop ------------------------------------------------------------------------

    def start(self, grid: object) -> int | None:
        """Run every round; return the round whose global state the run delivers."""
        fed = self.cfg.federation
        nodes = self._wait_for_nodes(grid)
        history: list[RoundResult] = []
        for rnd in range(1, fed.rounds + 1):
            started, t0 = utcnow(), time.perf_counter()
            nodes = sorted(grid.get_node_ids()) or nodes  # type: ignore[attr-defined]

            # -- training at the sampled sites -----------------------------------------------
            sampled = sample_nodes(nodes, fed.sites_per_round, self.rng)
            self.progress(f"round {rnd}/{fed.rounds}: training at {len(sampled)} site(s)")
            train = self._send_and_receive(grid, Phase.TRAIN, sampled, rnd)
            applied = self._aggregate_train(rnd, train)

            # -- evaluation of the new global state at every site ----------------------------
            # A site that did not answer the train message in time is not waited for again in
            # this round: it is most likely gone (its failure is recorded with the train reply).
            silent = {r.node_id for r in train if r.code == Reason.NO_REPLY}
            evaluate = [n for n in nodes if n not in silent]
            evaluations = self._send_and_receive(grid, Phase.EVALUATE, evaluate, rnd)

            # -- record ------------------------------------------------------------------------
            seconds = time.perf_counter() - t0
            result = round_result(rnd, started, utcnow(), seconds, train, evaluations, applied)
            self.store.add_round(
                self.run_id,
                result,
                site_rows(rnd, train, Phase.TRAIN) + site_rows(rnd, evaluations, Phase.EVALUATE),
                seal_state(self.store_key, self.run_id, rnd, self.state),
            )
            for line in round_summary(result, train, evaluations):
                self.progress(line)
            history.append(result)
        if not any(r.applied for r in history):
            raise FedpeftError(
                f"no round had the {fed.min_sites} valid update(s) it needs (federation."
                "min_sites): the global state never changed; see each site's reason in the store"
            )
        chosen = select_round(history)
        self.progress(
            f"selected the global state of round {chosen} (lowest validation loss across sites)"
        )
        return chosen

    def _aggregate_train(self, rnd: int, train: list[Reply]) -> bool:
        """Apply the FedAvg of the valid updates when there are at least ``min_sites`` of them;
        whether it was applied."""
        min_sites = self.cfg.federation.min_sites
        valid = [r for r in train if r.status == ReplyStatus.OK]
        if len(valid) < min_sites:
            self.progress(
                f"round {rnd}: {len(valid)} valid update(s), fewer than min_sites="
                f"{min_sites}; the global state stays as it was"
            )
            return False
        ordered = sorted(valid, key=lambda r: r.site)
        delta = fedavg([(r.delta, int(r.metrics[keys.N_TRAIN])) for r in ordered])  # type: ignore[misc]
        self.state = apply_delta(self.state, delta)
        return True

    # -- messaging -------------------------------------------------------------------------------

    def _wait_for_nodes(self, grid: object) -> list[int]:
        deadline = time.monotonic() + self.cfg.federation.round_timeout_s
        while True:
            nodes = sorted(grid.get_node_ids())  # type: ignore[attr-defined]
            if len(nodes) >= self.cfg.federation.min_sites:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} site(s) connected within "
                    f"{self.cfg.federation.round_timeout_s:.0f} s; min_sites="
                    f"{self.cfg.federation.min_sites}"
                )
            time.sleep(1.0)

    def _configure(self, phase: Phase, nodes: list[int], rnd: int) -> list[object]:
        """One message per node: the signed global state and the run config."""
        from flwr.app import ConfigRecord, Message, RecordDict

        config = ConfigRecord({keys.ROUND: rnd})
        # The settings sites act on travel inside the signed global state, nowhere else.
        signed = sign_global(
            self.state,
            run_token=self.run_token,
            round=rnd,
            method=self.cfg.method.name,
            fingerprint=self.fingerprint,
            run_public=crypto.raw_public(self.run_key),
            config=self.site_config,
            coordinator=self.trust.identity,
        )
        return [
            Message(
                RecordDict({keys.GLOBAL: blob_record(signed), keys.CONFIG: config}),
                dst_node_id=node,
                message_type=phase.value,
                group_id=str(rnd),
            )
            for node in nodes
        ]

    def _send_and_receive(
        self, grid: object, phase: Phase, nodes: list[int], rnd: int
    ) -> list[Reply]:
        """Send one phase's messages, wait for the replies, read each; one reply per node."""
        timeout = self.cfg.federation.round_timeout_s
        messages = self._configure(phase, nodes, rnd)
        received = exchange(grid, messages, timeout)
        sent = {m.metadata.dst_node_id: message_nbytes(m) for m in messages}  # type: ignore[attr-defined]
        intake = self._intake(rnd)
        opened: set[str] = set()
        replies: dict[int, Reply] = {}
        for msg in received:
            node = int(msg.metadata.src_node_id)
            if phase == Phase.TRAIN:
                reply = read_train(msg, intake, opened, self._name(node))
            else:
                reply = read_evaluate(msg, self._name(node))
            if reply.opened:
                opened.add(reply.site)
            self.site_names[node] = reply.site
            reply.bytes_up = message_nbytes(msg)
            reply.bytes_down = sent.get(node, 0)
            replies[node] = reply
        for node in nodes:
            if node not in replies:
                replies[node] = no_reply(node, self._name(node), phase, timeout)
        return [replies[n] for n in nodes]

    def _name(self, node: int) -> str:
        return self.site_names.get(node, f"node-{node}")

    def _intake(self, rnd: int) -> Intake:
        """What this round accepts as a train reply."""
        fed = self.cfg.federation
        fp32 = sum(v.nbytes for v in self.state.values())
        expected = Expected(
            run_token=self.run_token,
            round=rnd,
            method=self.cfg.method.name,
            fingerprint=self.fingerprint,
            shapes={k: tuple(v.shape) for k, v in self.state.items()},
            max_bytes=fed.max_upload_bytes or 2 * fp32 + 65_536,
            codec=fed.codec,
        )
        return Intake(expected, self.run_key, self.trust.sites, fed.max_update_norm or None)


#: Seconds between two pulls of the replies. Flower 1.39's deployment Grid pulls every 3 s in
#: ``send_and_receive``, up to 3 s added to every message phase. A pull is one local call to
#: the SuperLink, but the SuperLink logs each one (pull-messages is not among the requests its
#: access log treats as routine): 1 s keeps its log readable and most of the gain.
PULL_INTERVAL_S = 1.0


def exchange(grid: Any, messages: list[Any], timeout: float) -> list[Any]:
    """Push ``messages`` and pull their replies until each has one or ``timeout`` passes: what
    Flower's ``Grid.send_and_receive`` does, polling every :data:`PULL_INTERVAL_S` (or the
    grid's own ``pull_interval`` when shorter: the simulation's is 0.1 s). A grid
    without ``push_messages`` / ``pull_messages`` (a test's) is asked for ``send_and_receive``."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    interval = min(PULL_INTERVAL_S, float(getattr(grid, "pull_interval", PULL_INTERVAL_S)))
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    received: list[Any] = []
    while pending:
        replies = list(grid.pull_messages(pending))
        received.extend(replies)
        pending.difference_update(r.metadata.reply_to_message_id for r in replies)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return received
