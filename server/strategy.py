"""The federated round loop at the coordinator.

One round: send the global shared state (signed by the coordinator) to the sampled sites,
collect their sealed deltas, open and validate each one on its own (a bad reply is rejected for
that site in that round and recorded; the round goes on), aggregate the valid ones with FedAvg,
apply, ask every site to evaluate the new global state, pool the AUC from their histograms, and
write the round to the store.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from fedpeft.common import crypto, keys
from fedpeft.common.config import RunConfig
from fedpeft.common.envelope import Expected, open_delta, sign_global
from fedpeft.common.errors import DeltaRejected, FedpeftError, Reason
from fedpeft.common.keys import Phase
from fedpeft.common.metrics import pooled_auc
from fedpeft.common.records import blob_record, from_blob_record, message_nbytes
from fedpeft.common.state import State
from fedpeft.common.trust import CoordinatorTrust
from fedpeft.server import validation
from fedpeft.server.aggregation import apply_delta, fedavg
from fedpeft.server.checkpoints import seal_state
from fedpeft.server.store.base import ReplyStatus, RoundResult, RunStore, SiteResult, utcnow

log = logging.getLogger("fedpeft.server")

Progress = Callable[[str], None]

#: Reply metrics kept in a site result's ``extra`` column.
EXTRA_METRICS = (keys.STEPS, keys.EPOCHS_RUN, keys.VAL_LOSS, keys.N_VAL, "seconds-per-step")


@dataclass
class Reply:
    """One site's answer to one message, decoded, or the reason it could not be used."""

    node_id: int
    site: str
    status: ReplyStatus = ReplyStatus.OK
    reason: str | None = None
    delta: State | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    histogram: tuple[list[int], list[int]] | None = None
    bytes_up: int = 0  # the whole reply as serialized by Flower
    bytes_down: int = 0  # the whole message sent to the site


def _finite_mean(values: Iterable[float], weights: Iterable[float] | None = None) -> float | None:
    v = np.asarray(list(values), dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(list(weights), dtype=np.float64)
    ok = np.isfinite(v)
    return float(np.average(v[ok], weights=w[ok])) if ok.any() and w[ok].sum() > 0 else None


def select_round(rounds: list[RoundResult]) -> int | None:
    """The round whose global state the run delivers: the lowest validation loss across sites
    (the federated form of the early stopping that local training does); the last round when
    no round has one. Ties go to the earlier round."""
    scored = [r for r in rounds if r.val_loss is not None and np.isfinite(r.val_loss)]
    if scored:
        return min(scored, key=lambda r: (r.val_loss, r.round)).round
    return rounds[-1].round if rounds else None


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
            sampled = self._sample(nodes)
            self.progress(f"round {rnd}/{fed.rounds}: training at {len(sampled)} site(s)")
            replies = self._send(grid, Phase.TRAIN, sampled, rnd)
            valid = [r for r in replies if r.status == ReplyStatus.OK]
            applied = len(valid) >= fed.min_sites
            if applied:
                ordered = sorted(valid, key=lambda r: r.site)
                delta = fedavg([(r.delta, int(r.metrics[keys.N_TRAIN])) for r in ordered])  # type: ignore[misc]
                self.state = apply_delta(self.state, delta)
            else:
                self.progress(
                    f"round {rnd}: {len(valid)} valid update(s), fewer than min_sites="
                    f"{fed.min_sites}; the global state stays as it was"
                )
            # A site that did not answer the train message in time is not waited for again in
            # this round: it is most likely gone (its failure is recorded with the train reply).
            silent = {r.node_id for r in replies if (r.reason or "").startswith(Reason.NO_REPLY)}
            evaluations = self._send(
                grid, Phase.EVALUATE, [n for n in nodes if n not in silent], rnd
            )
            result = self._round_result(rnd, started, t0, replies, evaluations, applied)
            self.store.add_round(
                self.run_id,
                result,
                self._site_rows(rnd, replies, Phase.TRAIN)
                + self._site_rows(rnd, evaluations, Phase.EVALUATE),
                seal_state(self.store_key, self.run_id, rnd, self.state),
            )
            self._report(result, replies, evaluations)
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

    def _sample(self, nodes: list[int]) -> list[int]:
        k = self.cfg.federation.sites_per_round
        if k == 0 or k >= len(nodes):
            return list(nodes)
        return sorted(int(n) for n in self.rng.choice(nodes, size=k, replace=False))

    def _send(self, grid: object, kind: Phase, nodes: list[int], rnd: int) -> list[Reply]:
        from flwr.app import ConfigRecord, Message, RecordDict

        config = ConfigRecord(
            {
                keys.RUN_CONFIG_JSON: self.cfg.to_json(),
                keys.ROUND: rnd,
            }
        )
        signed = sign_global(
            self.state,
            run_token=self.run_token,
            round=rnd,
            method=self.cfg.method.name,
            fingerprint=self.fingerprint,
            run_public=crypto.raw_public(self.run_key),
            coordinator=self.trust.identity,
        )
        messages = [
            Message(
                RecordDict({keys.GLOBAL: blob_record(signed), keys.CONFIG: config}),
                dst_node_id=node,
                message_type=kind,
                group_id=str(rnd),
            )
            for node in nodes
        ]
        received = grid.send_and_receive(  # type: ignore[attr-defined]
            messages, timeout=self.cfg.federation.round_timeout_s
        )
        sent = {m.metadata.dst_node_id: message_nbytes(m) for m in messages}
        replies = {}
        opened_sites: set[str] = set()
        for msg in received:
            reply = self._decode(msg, kind, rnd, opened_sites)
            reply.bytes_up = message_nbytes(msg)
            reply.bytes_down = sent.get(reply.node_id, 0)
            replies[reply.node_id] = reply
        for node in nodes:
            if node not in replies:
                replies[node] = Reply(
                    node,
                    self._name(node),
                    ReplyStatus.FAILED,
                    f"{Reason.NO_REPLY}: no reply to the {kind} message (the site may be "
                    f"down; the round waits at most {self.cfg.federation.round_timeout_s:.0f} s)",
                )
        return [replies[n] for n in nodes]

    def _name(self, node: int) -> str:
        return self.site_names.get(node, f"node-{node}")

    def _expected(self, rnd: int) -> Expected:
        fed = self.cfg.federation
        fp32 = sum(v.nbytes for v in self.state.values())
        return Expected(
            run_token=self.run_token,
            round=rnd,
            method=self.cfg.method.name,
            fingerprint=self.fingerprint,
            shapes={k: tuple(v.shape) for k, v in self.state.items()},
            max_bytes=fed.max_upload_bytes or 2 * fp32 + 65_536,
            codec=fed.codec,
        )

    def _decode(self, msg: object, kind: Phase, rnd: int, opened_sites: set[str]) -> Reply:
        node = int(msg.metadata.src_node_id)  # type: ignore[attr-defined]
        if msg.has_error():  # type: ignore[attr-defined]
            err = msg.error  # type: ignore[attr-defined]
            return Reply(
                node, self._name(node), ReplyStatus.FAILED, f"{Reason.SITE_ERROR}: {err.reason}"
            )
        content = msg.content  # type: ignore[attr-defined]
        try:
            info = content[keys.CONFIG]
            site = str(info[keys.SITE])
            self.site_names[node] = site
            if info[keys.STATUS] != "ok":
                return Reply(
                    node,
                    site,
                    ReplyStatus.FAILED,
                    f"{Reason.SITE_ERROR}: {info.get(keys.ERROR, '')}",
                )
            metrics = {k: float(v) for k, v in content[keys.METRICS].items()}
        except (KeyError, TypeError, ValueError) as exc:
            return Reply(
                node, self._name(node), ReplyStatus.REJECTED, f"{Reason.MALFORMED}: {exc!r}"
            )
        reply = Reply(node, site, metrics=metrics)
        if kind == Phase.EVALUATE:
            try:
                hist = content[keys.HISTOGRAM]
                reply.histogram = (list(hist[keys.HIST_POS]), list(hist[keys.HIST_NEG]))
            except KeyError as exc:
                reply.status, reply.reason = ReplyStatus.REJECTED, f"{Reason.MALFORMED}: {exc!r}"
            return reply
        try:
            sealed = from_blob_record(content[keys.SEALED])
            opened = open_delta(sealed, self._expected(rnd), self.run_key, self.trust.sites)
            if opened.site_id != site or site in opened_sites:
                raise DeltaRejected(
                    Reason.BAD_SIGNATURE,
                    f"a delta signed by site {opened.site_id!r} sent as site {site!r}"
                    + (" a second time this round" if site in opened_sites else ""),
                )
            opened_sites.add(site)
            max_norm = self.cfg.federation.max_update_norm or None
            validation.validate_delta(opened.delta, opened.num_examples, max_norm)
            reply.delta = opened.delta
            reply.metrics[keys.N_TRAIN] = float(opened.num_examples)  # the signed count
        except DeltaRejected as exc:
            reply.status, reply.reason = ReplyStatus.REJECTED, str(exc)
        except (KeyError, TypeError, ValueError) as exc:
            reply.status, reply.reason = ReplyStatus.REJECTED, f"{Reason.MALFORMED}: {exc!r}"
        return reply

    # -- recording -------------------------------------------------------------------------------

    def _round_result(
        self,
        rnd: int,
        started: datetime,
        t0: float,
        replies: list[Reply],
        evaluations: list[Reply],
        applied: bool,
    ) -> RoundResult:
        ok = [e for e in evaluations if e.status == ReplyStatus.OK]
        histograms = [e.histogram for e in ok if e.histogram is not None]
        return RoundResult(
            round=rnd,
            started_at=started,
            finished_at=utcnow(),
            seconds=time.perf_counter() - t0,
            pooled_auc=pooled_auc(histograms) if histograms else None,
            macro_auc=_finite_mean(e.metrics.get(keys.AUC, float("nan")) for e in ok),
            loss=_finite_mean(
                (e.metrics.get(keys.LOSS, float("nan")) for e in ok),
                (e.metrics.get(keys.N_TEST, 0.0) for e in ok),
            ),
            val_loss=_finite_mean(
                (e.metrics.get(keys.VAL_LOSS, float("nan")) for e in ok),
                (e.metrics.get(keys.N_VAL, 0.0) for e in ok),
            ),
            accepted=sum(r.status == ReplyStatus.OK for r in replies),
            rejected=sum(r.status != ReplyStatus.OK for r in replies),
            applied=applied,
        )

    def _site_rows(self, rnd: int, replies: list[Reply], phase: Phase) -> list[SiteResult]:
        rows = []
        for r in replies:
            m = r.metrics
            n_key = keys.N_TRAIN if phase == Phase.TRAIN else keys.N_TEST
            rows.append(
                SiteResult(
                    round=rnd,
                    site=r.site,
                    phase=phase,
                    status=r.status,
                    reason=r.reason,
                    n=int(m[n_key]) if n_key in m else None,
                    loss=m.get(keys.LOSS),
                    auc=m.get(keys.AUC),
                    auprc=m.get(keys.AUPRC),
                    accuracy=m.get(keys.ACCURACY),
                    brier=m.get(keys.BRIER),
                    bytes_up=r.bytes_up,
                    bytes_down=r.bytes_down,
                    seconds=m.get(keys.TRAIN_SECONDS),
                    extra={k: v for k, v in m.items() if k in EXTRA_METRICS},
                )
            )
        return rows

    def _report(self, result: RoundResult, replies: list[Reply], evaluations: list[Reply]) -> None:
        def fmt(x: float | None) -> str:
            return "  n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"

        sites = ", ".join(
            f"{e.site} {fmt(e.metrics.get(keys.AUC))} (n={int(e.metrics.get(keys.N_TEST, 0))})"
            for e in sorted(evaluations, key=lambda e: e.site)
            if e.status == ReplyStatus.OK
        )
        self.progress(
            f"round {result.round}: pooled AUC {fmt(result.pooled_auc)}, macro AUC "
            f"{fmt(result.macro_auc)}, {result.accepted} update(s) accepted, {result.rejected} "
            f"rejected, {result.seconds:.1f} s | {sites}"
        )
        for r in replies + evaluations:
            if r.status != ReplyStatus.OK:
                self.progress(f"round {result.round}: {r.site} {r.status}: {r.reason}")
