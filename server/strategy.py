"""The federated round loop at the coordinator.

One round: send the global shared state (signed by the coordinator) to the sampled sites,
collect their sealed deltas, read each one on its own (server/replies.py: a bad reply is
rejected for that site in that round and recorded; the round goes on), aggregate the valid ones
with FedAvg (server/aggregation.py) and apply. Every site evaluates the new global state: the
sampled ones at the start of the next round's train message (one message per site and round),
the others with an evaluate message sent in the same exchange, and every site with one after the
last round. Then the round is written to the store (server/rounds.py makes its rows).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from fedpeft.common import crypto, keys
from fedpeft.common.config import MLM, RunConfig
from fedpeft.common.dp import Accountant, dp_average, noise_std_central
from fedpeft.common.envelope import Expected, sign_global
from fedpeft.common.errors import FedpeftError, Reason
from fedpeft.common.keys import Phase
from fedpeft.common.methods.compose import stage_marker, stage_trains_name
from fedpeft.common.methods.lora import state_rank
from fedpeft.common.records import blob_record, message_nbytes
from fedpeft.common.secagg import (
    FixedPoint,
    PublicKeys,
    SecAggError,
    decode_parts,
    flatten,
    round_context,
    unflatten,
    unmask_sum,
)
from fedpeft.common.secagg_messages import (
    KEYS,
    MASKED,
    SHARES,
    UNMASK,
    Answer,
    StageTask,
    answer_ciphertexts,
    answer_examples,
    answer_keys,
    answer_revealed,
    open_answer,
)
from fedpeft.common.state import State
from fedpeft.common.trust import CoordinatorTrust, read_sites_file
from fedpeft.common.wire import RING
from fedpeft.server.aggregation import (
    WEIGHT,
    Bounds,
    ServerOptimizer,
    aggregate,
    dp_aggregate,
    scale,
    secure_scales,
    server_step,
)
from fedpeft.server.checkpoints import open_state, seal_state
from fedpeft.server.replies import (
    EvaluationIntake,
    Intake,
    Reply,
    no_reply,
    read_answer,
    read_evaluate,
    read_train,
)
from fedpeft.server.rounds import (
    personal_summary,
    round_result,
    round_summary,
    select_round,
    site_rows,
)
from fedpeft.server.store.base import ReplyStatus, RoundResult, RunStore, utcnow
from fedpeft.server.validation import MAX_SIGNED_EXAMPLES

log = logging.getLogger("fedpeft.server")

Progress = Callable[[str], None]
#: Score histograms of test rows: positives' and negatives' counts per bin.
Histogram = tuple[list[int], list[int]]


T = TypeVar("T")


def usable_keys(answer: Answer) -> PublicKeys:
    """A site's advertised X25519 keys, each one every other site can agree a secret with (32
    bytes, not a low-order point): else :class:`SecAggError`, and that site alone drops out."""
    keys_ = answer_keys(answer)
    probe = x25519.X25519PrivateKey.generate()
    for key in keys_:
        if crypto.x25519_shared(probe, key) is None:
            raise SecAggError("an advertised key no site can agree a secret with")
    return keys_


def keys_and_examples(most: int) -> Callable[[Answer], tuple[PublicKeys, int]]:
    """Reads a keys answer: its usable keys and its example count (1..``most``)."""

    def parse(answer: Answer) -> tuple[PublicKeys, int]:
        return usable_keys(answer), answer_examples(answer, most)

    return parse


def round_rng(seed: int, rnd: int) -> np.random.Generator:
    """The sampling generator of round ``rnd``: a function of the run's seed and the round
    alone, so a resumed run samples as the uninterrupted one would."""
    return np.random.default_rng([seed, rnd])


def samples(k: int, n: int) -> bool:
    """Whether ``federation.sites_per_round`` = ``k`` draws a sample of ``n`` nodes (0, or not
    below their number: every node trains)."""
    return 0 < k < n


def sample_nodes(nodes: list[int], k: int, rng: np.random.Generator) -> list[int]:
    """The nodes that train this round: ``k`` of them drawn without replacement from ``nodes``
    in the order given (the round loop gives them by site name), returned by node id; all of
    them when ``k`` is 0 or not below their number (``federation.sites_per_round``)."""
    if not samples(k, len(nodes)):
        return list(nodes)
    # Draw positions, not the ids: Flower's node ids are unsigned 64-bit, and numpy turns a
    # list holding ids above 2**63 into floats, which round them to ids no node has.
    return sorted(nodes[int(i)] for i in rng.choice(len(nodes), size=k, replace=False))


@dataclass(frozen=True)
class Resume:
    """Where a resumed run picks up: its last recorded round (0: none), that round's global
    state, and the rounds recorded so far. A resumed run has a new run key and token: the
    sites need nothing but to stay connected."""

    round: int
    state: State
    history: list[RoundResult]
    #: The server optimizer's moments after that round (server/aggregation.py
    #: ``server_step``; empty with fedavg).
    moments: State = field(default_factory=dict)


@dataclass
class _Trained:
    """A round whose new global state is not yet evaluated: what its store row needs."""

    round: int
    started: datetime
    train: list[Reply]
    applied: bool
    state: State  # the global state after the round
    moments: State  # the server optimizer's moments after the round
    seconds: float  # its exchange and aggregation (the last round's: and its evaluation)
    #: A DP run: the share of the available sites sampled, and the run's ε after the round.
    sample_rate: float | None = None
    epsilon: float | None = None

    def evaluators(self, nodes: list[int], training: list[int]) -> list[int]:
        """The nodes that get an evaluate message for this state: all but those training from it
        (their train reply carries the evaluation) and those silent in this round, most likely
        gone (their failure is recorded with the train reply; a sampled one is still asked)."""
        silent = {r.node_id for r in self.train if r.code == Reason.NO_REPLY}
        return [n for n in nodes if n not in training and n not in silent]


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
        load_sites: Callable[[], Mapping[str, ec.EllipticCurvePublicKey]] | None = None,
        noise_rng: np.random.Generator | None = None,
        teacher: State | None = None,
    ):
        fed = cfg.federation
        self.cfg = cfg
        #: A distillation run's teacher state, signed into every global state it sends.
        self.teacher = teacher
        self.site_config = cfg.for_sites()
        # A DP run (federation.dp, central): the privacy spent, round after round, and the
        # noise's source (the OS's entropy; a seeded one in tests only).
        self.accountant = (
            Accountant(fed.dp.noise_multiplier, fed.dp.delta) if fed.dp.enabled else None
        )
        self.noise_rng = noise_rng or np.random.default_rng()
        self.trust = trust
        # The register of sites, read again for every round's replies (:meth:`_registered`):
        # ``load_sites``, else the register the trust was read from, else the trust's sites.
        self.sites = dict(trust.sites)
        if load_sites is None and trust.sites_file is not None:
            load_sites = partial(read_sites_file, trust.sites_file)
        self.load_sites = load_sites
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
        self.site_names: dict[int, str] = {}  # the name each node's last reply claimed
        self.bound: dict[int, str] = {}  # the site each node's signed replies are from
        #: How the aggregated update moves the global state, and its moments (empty: fedavg).
        self.optimizer = ServerOptimizer(
            fed.server_optimizer,
            fed.server_lr,
            fed.server_beta1,
            fed.server_beta2,
            fed.server_tau,
        )
        self.moments: State = {}
        #: The nodes a roll call asked for their site (:meth:`_roll_call`).
        self.called: set[int] = set()
        #: Secure aggregation: this round's weight of each site of the roster.
        self.secure_weights: dict[str, float] = {}

    # -- the round loop ------------------------------------------------------------------------

    def start(self, grid: object, resume: Resume | None = None) -> int | None:
        """Run every round; return the round whose global state the run delivers.

        One message per site and round: the train message of round r carries the global state
        of round r-1, which the site evaluates before it trains from it (client/app.py), so a
        round's row is written once the next round's replies are in; a site not sampled for
        training gets an evaluate message in the same exchange, and after the last round every
        site gets one (:meth:`_exchange`)."""
        fed = self.cfg.federation
        nodes = self._wait_for_nodes(grid)
        history: list[RoundResult] = []
        first = 1
        if resume is not None:  # the rounds the store holds stand; go on from the last one
            history, first, self.state = list(resume.history), resume.round + 1, resume.state
            self.moments = dict(resume.moments)
            self._replay_privacy(history)
        pending: _Trained | None = None  # the last round, its new state not yet evaluated
        for rnd in range(first, fed.rounds + 1):
            nodes = sorted(grid.get_node_ids()) or nodes  # type: ignore[attr-defined]
            k = fed.sites_per_round
            sample_rate = (k if samples(k, len(nodes)) else len(nodes)) / max(len(nodes), 1)
            if self._over_budget(rnd, sample_rate):
                break
            self._roll_call(grid, rnd, nodes)
            started, t0 = utcnow(), time.perf_counter()
            # Under secure aggregation a node is bound to its site partway through round 1 (its
            # keys stage), and no roll call runs: the draw follows node ids in every round.
            order = nodes if fed.secure_aggregation.enabled else self._by_site(nodes)
            sampled = sample_nodes(order, k, round_rng(self.cfg.seed, rnd))
            evaluate = [] if pending is None else pending.evaluators(nodes, sampled)
            self.progress(
                f"round {rnd}/{fed.rounds}: training at {len(sampled)} site(s)"
                + ("" if pending is None else f" (evaluating round {pending.round}'s state first)")
            )
            pooled, total = None, None
            if fed.secure_aggregation.enabled:
                train, evaluations, total, pooled = self._secure_exchange(
                    grid, rnd - 1, sampled, evaluate
                )
            else:
                train, evaluations = self._exchange(grid, rnd - 1, sampled, evaluate)
            if pending is not None:
                history.append(self._record(pending, evaluations, pooled))
            if fed.secure_aggregation.enabled:
                applied = self._apply_sum(rnd, train, total, sample_rate)
            else:
                applied = self._aggregate_train(rnd, train, sample_rate)
            for reply in train:  # applied or not, no update is needed again: hold none
                reply.delta = None
            pending = _Trained(
                rnd, started, train, applied, self.state, self.moments, time.perf_counter() - t0
            )
            if applied and self.accountant is not None:
                pending.sample_rate, pending.epsilon = sample_rate, self.accountant.epsilon()
            if self._converged(history, rnd):
                break
        if pending is not None:
            # The last round's global state, evaluated by every site still there.
            t0 = time.perf_counter()
            pooled, evaluators = None, pending.evaluators(nodes, [])
            if fed.secure_aggregation.enabled:  # an exchange of its own, one round past the last
                _, evaluations, _, pooled = self._secure_exchange(
                    grid, pending.round, [], evaluators
                )
            else:
                _, evaluations = self._exchange(grid, fed.rounds, [], evaluators)
            pending.seconds += time.perf_counter() - t0
            history.append(self._record(pending, evaluations, pooled))
        if not any(r.applied for r in history):
            raise FedpeftError(
                f"no round had the {fed.min_sites} valid update(s) it needs (federation."
                "min_sites): the global state never changed; see each site's reason in the store"
            )
        chosen = select_round(history)
        self.progress(
            f"selected the global state of round {chosen} (lowest validation loss across sites)"
        )
        if fed.personalize != "none" and chosen is not None:
            self._personalize(grid, chosen)
        return chosen

    def _personalize(self, grid: object, rnd: int) -> None:
        """After the run, every site fine-tunes the ``federation.personalize`` part of round
        ``rnd``'s global state (the delivered one) on its own rows and evaluates its model
        (client/app.py ``personalize``): one evaluate message each, asking for it. Only the
        evaluation comes back, recorded as the site's ``personalize`` row of round ``rnd``,
        beside its evaluation of the global state."""
        fed = self.cfg.federation
        _, blob = self.store.global_state(self.run_id, rnd)
        state = open_state(self.store_key, self.run_id, rnd, blob)
        nodes = sorted(grid.get_node_ids())  # type: ignore[attr-defined]
        self.progress(
            f"personalization: {len(nodes)} site(s) fine-tune the {fed.personalize} of round "
            f"{rnd}'s state on their own rows (at most {fed.personalize_epochs} epochs)"
        )
        _, replies = self._exchange(grid, rnd, [], nodes, state=state, personal=True)
        personal = site_rows(rnd, replies, Phase.PERSONALIZE)
        self.store.add_site_results(self.run_id, personal)
        rows = self.store.site_results(self.run_id)
        named = {r.site: r for r in rows if r.round == rnd and r.phase == Phase.EVALUATE}
        for line in personal_summary(personal, named):
            self.progress(line)

    def _record(
        self, trained: _Trained, evaluations: list[Reply], pooled: Histogram | None = None
    ) -> RoundResult:
        """Write a round to the store once its global state is evaluated: its row, its sites'
        train and evaluate rows and the (sealed) global state it ended with. ``pooled``: the
        sites' score histograms summed under secure aggregation (no site's reached here)."""
        rnd, train = trained.round, trained.train
        result = round_result(
            rnd,
            trained.started,
            utcnow(),
            trained.seconds,
            train,
            evaluations,
            trained.applied,
            self.cfg.federation.examples_bound_factor,
            pooled,
        )
        result = replace(result, sample_rate=trained.sample_rate, epsilon=trained.epsilon)
        if self.site_config.stage(rnd).trains == MLM:  # pretraining left the head untrained:
            result = replace(result, val_loss=None)  # not a round to deliver (select_round)
        self.store.add_round(
            self.run_id,
            result,
            site_rows(rnd, train, Phase.TRAIN) + site_rows(rnd, evaluations, Phase.EVALUATE),
            seal_state(self.store_key, self.run_id, rnd, trained.state, trained.moments),
        )
        for line in round_summary(result, train, evaluations):
            self.progress(line)
        return result

    def _converged(self, history: list[RoundResult], rnd: int) -> bool:
        """Federated early stopping (``federation.patience``): whether the sites' weighted
        validation loss has not improved for ``patience`` recorded rounds. Known once round
        ``rnd``'s replies have brought the evaluation of round ``rnd - 1``; round ``rnd`` is then
        the last one trained (its state is evaluated after the loop)."""
        patience, fed = self.cfg.federation.patience, self.cfg.federation
        losses = [
            (r.val_loss, r.round)
            for r in history
            if r.val_loss is not None and np.isfinite(r.val_loss)
        ]
        if not patience or not losses or rnd >= fed.rounds:
            return False
        best_loss, best_round = min(losses)
        if history[-1].round - best_round < patience:
            return False
        self.progress(
            f"round {rnd}: the last; the validation loss has not improved for {patience} "
            f"round(s) since round {best_round} ({best_loss:.4f}) (federation.patience)"
        )
        return True

    def _replay_privacy(self, history: list[RoundResult]) -> None:
        """A resumed DP run's accountant, as it stood after the rounds in ``history``: each
        applied round at its stored sampling rate, with the sites whose updates it used."""
        if self.accountant is None:
            return
        used: dict[int, list[str]] = {}
        for row in self.store.site_results(self.run_id):
            if row.phase == Phase.TRAIN and row.status == ReplyStatus.OK:
                used.setdefault(row.round, []).append(row.site)
        for r in history:
            if r.applied and r.sample_rate:
                self.accountant.record_round(r.sample_rate, used.get(r.round, []))

    def _over_budget(self, rnd: int, sample_rate: float) -> bool:
        """Whether round ``rnd`` would take a DP run past ``federation.dp.target_epsilon``: the
        run then ends with the rounds it has (said so)."""
        dp = self.cfg.federation.dp
        if self.accountant is None or not dp.target_epsilon:
            return False
        after = self.accountant.peek(sample_rate)
        if after <= dp.target_epsilon:
            return False
        self.progress(
            f"round {rnd}: not run; it would spend the privacy budget (epsilon {after:.3f} > "
            f"target {dp.target_epsilon:g} at delta {dp.delta:g}; spent "
            f"{self.accountant.epsilon():.3f})"
        )
        return True

    def _aggregate_train(self, rnd: int, train: list[Reply], sample_rate: float = 1.0) -> bool:
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
        fed = self.cfg.federation
        if self.accountant is not None:
            # DP-FedAvg: clipped, uniform weights, noise of σ·C on the sum; the round is spent.
            std = noise_std_central(fed.dp.noise_multiplier, fed.dp.clip)
            pairs = [(r.site, r.delta) for r in ordered]
            delta, notes = dp_aggregate(pairs, fed.dp.clip, std, self.noise_rng)  # type: ignore[arg-type]
            self.accountant.record_round(sample_rate, [r.site for r in ordered])
            for r in ordered:
                r.notes = {**notes[r.site], keys.SITE_EPSILON: self.accountant.site_epsilon(r.site)}
            self._step(rnd, delta)
            return True
        bounds = Bounds(
            max_examples=fed.max_examples,
            examples_factor=fed.examples_bound_factor,
            norm_factor=fed.norm_bound_factor,
            aggregator=fed.aggregator,
            trim_fraction=fed.trim_fraction,
        )
        updates = [(r.site, r.delta, int(r.metrics[keys.N_TRAIN])) for r in ordered]
        # Sites of less capacity trained LoRA at a lower rank (validated in read_train): each
        # component is averaged over the sites that trained it.
        run_rank = state_rank({name: v.shape for name, v in self.state.items()})
        ranks = {r.site: int(r.metrics.get(keys.LORA_RANK, run_rank)) for r in ordered}
        lower = fed.lower_ranks == "rank-aware" and any(r < run_rank for r in ranks.values())
        delta, notes = aggregate(updates, bounds, ranks if lower else None)  # type: ignore[arg-type]
        for r in ordered:
            r.notes = notes[r.site]
        self._step(rnd, delta)
        return True

    def _step(self, rnd: int, delta: State) -> None:
        """Move the global state by round ``rnd``'s aggregate (``server_step``). In a staged
        run only the round's stage's part moves: the rest keeps its values, which a server
        optimizer's momentum or DP's noise would otherwise move (keeping them is
        post-processing of the noisy aggregate: the DP guarantee holds)."""
        before = self.state
        self.state, self.moments = server_step(before, delta, self.moments, self.optimizer)
        if self.cfg.schedule:
            trains, marker = self.site_config.stage(rnd).trains, stage_marker(self.site_config, rnd)
            self.state = {
                name: value if stage_trains_name(name, trains, marker) else before[name]
                for name, value in self.state.items()
            }

    # -- secure aggregation (common/secagg.py; its messages: common/secagg_messages.py) ----------

    def _secure_exchange(
        self, grid: object, state_round: int, sampled: list[int], evaluate: list[int]
    ) -> tuple[list[Reply], list[Reply], State | None, Histogram | None]:
        """Round ``state_round + 1`` with secure aggregation, over the sampled sites (they train)
        and the sites that only evaluate the global state of ``state_round`` (the round's others,
        or every site in the run's closing exchange, where ``sampled`` is empty): keys from all
        of them (U1), their key shares (U2), the train and evaluate messages in which U2 uploads
        masked vectors (U3), then the shares that unmask the sum. A vector is the site's update
        times its weight (zeros for an evaluating site) in fixed point, then, after round 1, the
        score histograms of its evaluation of ``state_round``'s state: the coordinator learns
        the sum of the updates and the pooled histogram, neither one site's.

        Returns the train replies (an accepted one holds no update: nobody knows it), the
        evaluations (metrics only), the sum of U3's weighted updates and the pooled histogram
        (each None if it cannot be had: the rows say why)."""
        rnd, sa = state_round + 1, self.cfg.federation.secure_aggregation
        context = round_context(self.run_token, rnd)
        layout = flatten(self.state)[1]
        length = sum(math.prod(shape) for _, shape in layout) if sampled else 0
        bins = self.cfg.federation.histogram_bins if state_round >= 1 else 0
        failed: dict[int, Reply] = {}
        everyone = sorted({*sampled, *evaluate})
        answers = self._stage(
            grid,
            KEYS,
            rnd,
            {n: StageTask(KEYS) for n in everyone},
            context,
            failed,
            keys_and_examples(MAX_SIGNED_EXAMPLES),  # capped as FedAvg caps them
        )
        # A key another site also advertised (a copy, or a collision) serves neither of them.
        counts = Counter(key for _, (keys_, _) in answers.values() for key in keys_)
        for node, (_, (keys_, _)) in list(answers.items()):
            if any(counts[key] > 1 for key in keys_):
                failed[node] = self._stage_failure(
                    node, f"{Reason.SECAGG}: {KEYS}: a key another site also advertised"
                )
                del answers[node]
        roster = {site: keys_ for site, (keys_, _) in answers.values()}
        self.secure_weights = self._secure_weights(
            {site: n for node, (site, (_, n)) in answers.items() if node in sampled}
        )
        node_of = {site: node for node, (site, _) in answers.items()}
        t = sa.shares_needed(len(roster))
        if t > len(roster):  # fewer than 2 sites: a sum would be one site's update
            for node in answers:
                failed[node] = self._stage_failure(
                    node,
                    f"{Reason.SECAGG}: {len(roster)} site(s) sent keys, secure aggregation needs "
                    f"{t}",
                )
            return (*self._dropped_out(sampled, evaluate, failed, [], []), None, None)
        tasks = {node_of[v]: StageTask(SHARES, roster, t) for v in roster}

        def one_share_for_each_other_site(answer: Answer) -> dict[str, bytes]:
            shares = answer_ciphertexts(answer)
            if set(shares) != set(roster) - {answer.site}:
                raise SecAggError("its shares are not one for each other site of the roster")
            return shares

        shares = dict(
            self._stage(
                grid, SHARES, rnd, tasks, context, failed, one_share_for_each_other_site
            ).values()
        )
        u2 = sorted(shares)

        def addressed(v: str) -> dict[str, bytes]:
            return {u: shares[u][v] for u in u2 if u != v and v in shares[u]}

        tasks = {}
        for v in u2:
            trains = node_of[v] in sampled
            tasks[node_of[v]] = StageTask(
                Phase.TRAIN.value if trains else Phase.EVALUATE.value,
                roster,
                t,
                addressed(v),
                length=length,
                weight=self.secure_weights[v] if trains else 1.0,
                bins=bins,
            )
        evaluated: dict[str, np.ndarray] = {}
        train, evaluations = self._exchange(
            grid,
            state_round,
            sorted(n for n in tasks if n in sampled),
            sorted(n for n in tasks if n not in sampled),
            tasks,
            evaluated,
        )
        masked = {
            r.site: r.delta[MASKED]
            for r in train
            if r.status == ReplyStatus.OK and r.delta is not None
        } | evaluated
        dropped = tuple(v for v in u2 if v not in masked)
        tasks = {
            node_of[v]: StageTask(
                UNMASK, roster, t, addressed(v), tuple(sorted(masked)), dropped, length
            )
            for v in masked
        }
        # A site silent or wrong here still has its vector in the sum (others' shares remove its
        # masks): its rows stay; what it failed to send is only said.
        unhelpful: dict[int, Reply] = {}
        revealed = dict(
            self._stage(grid, UNMASK, rnd, tasks, context, unhelpful, answer_revealed).values()
        )
        for reply in unhelpful.values():
            self.progress(f"round {rnd}: {reply.site} sent no shares to unmask: {reply.reason}")
        replies, evaluations = self._dropped_out(sampled, evaluate, failed, train, evaluations)
        for r in replies:
            r.delta = None  # a masked vector says nothing of the site's update
        total, pooled = None, None
        if masked:
            try:
                ring = unmask_sum(masked, revealed, roster, u2, t, context)
                fixed = FixedPoint(self.site_config.privacy.fixed_point_range, len(roster))
                update, summed = decode_parts(fixed, ring, len(masked), length)
            except SecAggError as exc:
                self.progress(f"round {rnd}: the sum could not be unmasked: {exc}")
                for r in replies:
                    if r.status == ReplyStatus.OK:
                        r.status, r.code = ReplyStatus.REJECTED, Reason.SECAGG
                        r.reason = f"{Reason.SECAGG}: the round's sum was not unmasked ({exc})"
            else:
                if length:
                    total = unflatten(update.astype(np.float32), layout)
                if bins:
                    pooled = self._pooled(state_round, summed, masked, evaluations)
        return replies, evaluations, total, pooled

    def _dropped_out(
        self,
        sampled: list[int],
        evaluate: list[int],
        failed: Mapping[int, Reply],
        train: list[Reply],
        evaluations: list[Reply],
    ) -> tuple[list[Reply], list[Reply]]:
        """A secure exchange's rows: one train row for each sampled node and one evaluate row
        for each evaluating one, a node that dropped out at a stage with the reason it did."""
        by_node = {r.node_id: r for r in train}
        replies = [failed.get(n) or by_node.get(n) or self._stage_failure(n, "") for n in sampled]
        answered = {r.node_id for r in evaluations}
        for node in evaluate:
            if node not in answered:
                evaluations.append(failed.get(node) or self._stage_failure(node, ""))
        return replies, sorted(evaluations, key=lambda r: r.node_id)

    def _pooled(
        self,
        state_round: int,
        summed: np.ndarray,
        masked: Mapping[str, np.ndarray],
        evaluations: list[Reply],
    ) -> Histogram | None:
        """The pooled score histogram of the sites whose vectors were summed, if it holds the
        test rows their signed evaluations state (each site's must have opened): else None, and
        the round has no pooled AUC (said)."""
        stated = {
            e.site: e.metrics.get(keys.N_TEST, -1.0)
            for e in evaluations
            if e.status == ReplyStatus.OK
        }
        rows = int(summed.sum())
        bins = summed.size // 2
        if set(masked) <= set(stated) and rows == sum(stated[s] for s in masked):
            return summed[:bins].tolist(), summed[bins:].tolist()
        self.progress(
            f"round {state_round}: no pooled AUC: the summed score histograms hold {rows} rows, "
            f"not the test rows the summed sites' evaluations state"
        )
        return None

    def _stage(
        self,
        grid: object,
        stage: str,
        rnd: int,
        tasks: Mapping[int, StageTask],
        context: bytes,
        failed: dict[int, Reply],
        parse: Callable[[Answer], T],
    ) -> dict[int, tuple[str, T]]:
        """One secure-aggregation stage: each node's task out, its signed answer back, read by
        ``parse``: node -> (site, what it said). A node that does not answer, or answers
        wrongly (unsigned, another site's, malformed: whatever ``parse`` refuses), gets its
        train row's failure in ``failed`` and drops out of the round; the round goes on."""
        if not tasks:
            return {}
        nodes = sorted(tasks)
        messages = self._configure(stage, nodes, rnd, tasks, {})
        received = exchange(grid, messages, self.cfg.federation.round_timeout_s)
        registered = self._registered()
        answers: dict[int, tuple[str, T]] = {}
        for msg in received:
            node = int(msg.metadata.src_node_id)  # type: ignore[attr-defined]
            if node in answers or node in failed or node not in tasks:
                continue
            reply, blob = read_answer(msg, self._name(node))  # type: ignore[arg-type]
            if blob is None:
                failed[node] = reply
                continue
            try:
                answer = open_answer(blob, context, stage, registered)
            except SecAggError as exc:
                failed[node] = self._stage_failure(node, f"{Reason.SECAGG}: {stage}: {exc}")
                continue
            if self.bound.setdefault(node, answer.site) != answer.site:
                failed[node] = self._stage_failure(
                    node,
                    f"{Reason.BAD_SIGNATURE}: node {node} answers for site "
                    f"{self.bound[node]!r}, this answer is signed by site {answer.site!r}",
                )
                continue
            self.site_names[node] = answer.site
            try:  # signed by a registered site, perhaps malformed all the same
                said = parse(answer)
            except (SecAggError, KeyError, TypeError, ValueError, AttributeError) as exc:
                detail = str(exc)[:200] or exc.__class__.__name__
                failed[node] = self._stage_failure(node, f"{Reason.SECAGG}: {stage}: {detail}")
                continue
            answers[node] = (answer.site, said)
        for node in nodes:
            if node not in answers and node not in failed:
                failed[node] = replace(
                    no_reply(
                        node, self._name(node), Phase.TRAIN, self.cfg.federation.round_timeout_s
                    ),
                    reason=f"{Reason.NO_REPLY}: no answer to the secure aggregation stage {stage}",
                )
        return answers

    def _stage_failure(self, node: int, reason: str) -> Reply:
        """A node's train row when it dropped out before its masked update."""
        code = Reason(reason.split(":", 1)[0]) if reason else Reason.NO_REPLY
        return Reply(node, self._name(node), ReplyStatus.REJECTED, reason or None, code)

    def _secure_weights(self, examples: Mapping[str, int]) -> dict[str, float]:
        """The weight each site of a secure-aggregation round multiplies its update by: its
        example count, bounded as FedAvg's is (``max_examples``, ``examples_bound_factor``),
        over the roster's largest; equal weights in a DP run (one site moves the sum by at most
        the clip)."""
        if self.accountant is not None:
            return dict.fromkeys(examples, 1.0)
        fed = self.cfg.federation
        return secure_scales(
            examples,
            Bounds(max_examples=fed.max_examples, examples_factor=fed.examples_bound_factor),
        )

    def _apply_sum(
        self, rnd: int, train: list[Reply], total: State | None, sample_rate: float
    ) -> bool:
        """Apply a secure-aggregation round: the unmasked sum of the weighted updates in it
        divided by the sum of their weights (:meth:`_secure_weights`: FedAvg's weights, equal in
        a DP run), with the DP noise on the sum in a DP run (central: added here; distributed:
        the sites added theirs)."""
        used = [r for r in train if r.status == ReplyStatus.OK]
        fed = self.cfg.federation
        distributed = self.accountant is not None and fed.dp.mode == "distributed"
        if total is not None and distributed and len(used) < fed.min_sites:
            # The coordinator saw this noisy sum even though it is not applied: it is spent.
            self.accountant.record_round(sample_rate, [r.site for r in used])  # type: ignore[union-attr]
        if total is None or len(used) < fed.min_sites:
            self.progress(
                f"round {rnd}: {len(used)} masked update(s) summed, fewer than min_sites="
                f"{fed.min_sites}; the global state stays as it was"
            )
            return False
        weights = {r.site: self.secure_weights[r.site] for r in used}
        total_weight = sum(weights.values())
        if self.accountant is None:
            delta = scale(total, 1.0 / total_weight)
        else:
            std = 0.0
            if fed.dp.mode == "central":
                std = noise_std_central(fed.dp.noise_multiplier, fed.dp.clip)
            delta = dp_average(total, len(used), std, self.noise_rng)
            self.accountant.record_round(sample_rate, [r.site for r in used])
        for r in used:
            r.notes = {WEIGHT: weights[r.site] / total_weight}
            if self.accountant is not None:
                r.notes[keys.SITE_EPSILON] = self.accountant.site_epsilon(r.site)
        self._step(rnd, delta)
        return True

    # -- sampling --------------------------------------------------------------------------------

    def _roll_call(self, grid: object, rnd: int, nodes: list[int]) -> None:
        """Before a round samples, learn which site each node not yet asked is: it evaluates
        the current global state, and its signed reply binds it (:meth:`_bind`). Sampling then
        draws from the sites in name order (:meth:`_by_site`), so a seed samples the same sites
        in every run and in a resumed one: Flower's node ids are drawn anew by every simulation
        (and by a SuperLink for a node that registers again). A node is asked once (one that
        stays silent does not hold up every round); a node that joins later is asked in the
        round it appears. Only where a round samples; not under secure aggregation, where no
        site's evaluation reaches the coordinator on its own. The evaluations are not
        recorded."""
        fed = self.cfg.federation
        if fed.secure_aggregation.enabled or not samples(fed.sites_per_round, len(nodes)):
            return
        unbound = [n for n in nodes if n not in self.bound and n not in self.called]
        if not unbound:
            return
        self.called.update(unbound)
        self._exchange(grid, rnd - 1, [], unbound)
        named = sum(n in self.bound for n in nodes)
        self.progress(
            f"round {rnd}: {named} of {len(nodes)} site(s) answered the roll call (each evaluated "
            f"round {rnd - 1}'s state, not recorded); sampling draws from the sites by name"
            + ("" if named == len(nodes) else ", the silent ones after them by node id")
        )

    def _by_site(self, nodes: list[int]) -> list[int]:
        """``nodes`` in the order sampling draws from: by the site each is bound to, then the
        unbound ones by node id."""
        return sorted(nodes, key=lambda n: (n not in self.bound, self.bound.get(n, ""), n))

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

    def _configure(
        self,
        phase: str,
        nodes: list[int],
        rnd: int,
        tasks: Mapping[int, StageTask] | None = None,
        state: State | None = None,
        personal: bool = False,
    ) -> list[object]:
        """One ``phase`` message of round ``rnd`` per node: the signed global state (with the
        run's site config; ``state``, else the run's) and the round, and with ``tasks`` each
        node's secure-aggregation task; ``personal``: asking each site to personalize it."""
        from flwr.app import ConfigRecord, Message, RecordDict

        config = ConfigRecord({keys.ROUND: rnd, **({keys.PERSONALIZE: 1} if personal else {})})
        # The settings sites act on travel inside the signed global state, nowhere else.
        signed = sign_global(
            self.state if state is None else state,
            run_token=self.run_token,
            round=rnd,
            method=self.cfg.method.name,
            fingerprint=self.fingerprint,
            run_public=crypto.raw_public(self.run_key),
            config=self.site_config,
            coordinator=self.trust.identity,
            teacher=self.teacher,
        )
        messages: list[object] = []
        state_record = blob_record(signed)  # one record in every message, not a copy each
        for node in nodes:
            content = RecordDict({keys.GLOBAL: state_record, keys.CONFIG: config})
            if tasks is not None:
                content[keys.SECAGG] = blob_record(tasks[node].to_bytes())
            messages.append(
                Message(content, dst_node_id=node, message_type=str(phase), group_id=str(rnd))
            )
        return messages

    def _exchange(
        self,
        grid: object,
        state_round: int,
        train: list[int],
        evaluate: list[int],
        tasks: Mapping[int, StageTask] | None = None,
        evaluated_masked: dict[str, np.ndarray] | None = None,
        state: State | None = None,
        personal: bool = False,
    ) -> tuple[list[Reply], list[Reply]]:
        """Send the global state of round ``state_round`` (0: the initial one) in one exchange:
        to ``train`` as round ``state_round + 1``'s train message, to ``evaluate`` as an
        evaluate message; wait for the replies and read each. Returns the train replies, one per
        node of ``train``, and the evaluations of that state: one per node of ``evaluate`` and,
        after round 1, one per node of ``train`` (its train reply carries it).

        With ``tasks`` (secure aggregation) every message carries its node's task, an evaluate
        message is of round ``state_round + 1`` too, the score histograms come only inside the
        masked vectors, and an evaluating site's vector goes into ``evaluated_masked``.

        ``state`` and ``personal`` (evaluate only): that state instead of the run's, each
        site asked to personalize it first (:meth:`_personalize`)."""
        timeout = self.cfg.federation.round_timeout_s
        messages = self._configure(Phase.TRAIN, train, state_round + 1, tasks) if train else []
        if evaluate and tasks is not None:
            messages += self._configure(Phase.EVALUATE, evaluate, state_round + 1, tasks)
        elif evaluate:
            messages += self._configure(
                Phase.EVALUATE, evaluate, state_round, state=state, personal=personal
            )
        # Each reply is let go once read: the sealed bytes of a round's updates and their opened
        # deltas are not all held at once.
        received = deque(exchange(grid, messages, timeout))
        sent = {m.metadata.dst_node_id: message_nbytes(m) for m in messages}  # type: ignore[attr-defined]
        del messages
        intake = self._intake(
            state_round + 1, None if tasks is None else next(iter(tasks.values())).entries
        )
        judge = self._evaluation_intake(state_round, histograms=tasks is None)
        opened: set[str] = set()
        trained: dict[int, Reply] = {}
        evaluated: dict[int, Reply] = {}
        while received:
            msg = received.popleft()
            node = int(msg.metadata.src_node_id)
            if node in trained or node in evaluated:
                continue  # one reply per node and exchange
            name = self._name(node)
            if node in train:
                reply = trained[node] = self._bind(node, read_train(msg, intake, opened, name))
                if reply.opened:
                    opened.add(reply.site)
                if state_round >= 1:
                    evaluated[node] = self._bind(
                        node, read_evaluate(msg, judge, name, in_train=True)
                    )
            elif tasks is None:
                reply = evaluated[node] = self._bind(node, read_evaluate(msg, judge, name))
            else:
                reply = evaluated[node] = self._evaluated_masked(
                    msg, node, name, intake, judge, opened, evaluated_masked
                )
            self.site_names[node] = reply.site
            # The bytes of a train reply count once, with its update.
            reply.bytes_up, reply.bytes_down = message_nbytes(msg), sent.get(node, 0)
        for node in train:
            if node not in trained:
                trained[node] = no_reply(node, self._name(node), Phase.TRAIN, timeout)
        for node in (train if state_round >= 1 else []) + evaluate:
            if node not in evaluated:
                evaluated[node] = no_reply(node, self._name(node), Phase.EVALUATE, timeout)
        return [trained[n] for n in train], [evaluated[n] for n in sorted(evaluated)]

    def _evaluated_masked(
        self,
        msg: Any,
        node: int,
        name: str,
        intake: Intake,
        judge: EvaluationIntake,
        opened: set[str],
        out: dict[str, np.ndarray] | None,
    ) -> Reply:
        """An evaluating site's reply in a secure exchange: its evaluation (metrics only), and
        its masked vector into ``out``; a vector that does not open rejects the evaluation."""
        reply = self._bind(node, read_evaluate(msg, judge, name, in_train=True))
        if reply.status != ReplyStatus.OK:
            return reply
        vector = self._bind(node, read_train(msg, intake, opened, name))
        if vector.opened:
            opened.add(vector.site)
        if vector.status != ReplyStatus.OK or vector.delta is None:
            return replace(reply, status=vector.status, code=vector.code, reason=vector.reason)
        if out is not None:
            out[vector.site] = vector.delta[MASKED]
        return reply

    def _name(self, node: int) -> str:
        return self.bound.get(node) or self.site_names.get(node, f"node-{node}")

    def _bind(self, node: int, reply: Reply) -> Reply:
        """The first envelope a node's reply opened (a delta or an evaluation, signed by a
        registered site) binds the node, authenticated by Flower with that site's key, to that
        site for the run; a reply from that node signed by another site is refused."""
        if not reply.opened:
            return reply
        bound = self.bound.setdefault(node, reply.site)
        if bound == reply.site:
            return reply
        return replace(
            reply,
            status=ReplyStatus.REJECTED,
            code=Reason.BAD_SIGNATURE,
            reason=f"{Reason.BAD_SIGNATURE}: node {node} answers for site {bound!r}, this "
            f"reply is signed by site {reply.site!r}",
            delta=None,
            histogram=None,
        )

    def _evaluation_intake(self, rnd: int, histograms: bool = True) -> EvaluationIntake:
        """What is accepted as an evaluation of the global state of round ``rnd`` (with its
        score histograms, or, under secure aggregation, without)."""
        fed = self.cfg.federation
        return EvaluationIntake(
            run_token=self.run_token,
            round=rnd,
            fingerprint=self.fingerprint,
            run_key=self.run_key,
            sites=self.sites,  # the register as :meth:`_intake` read it for this exchange
            max_rows=fed.max_examples or MAX_SIGNED_EXAMPLES,
            histograms=histograms,
            bins=fed.histogram_bins,
        )

    def _intake(self, rnd: int, masked: int | None = None) -> Intake:
        """What this round accepts as a train reply (``masked``: a secure-aggregation round's,
        one vector of that many entries in Z_2^32 whose values say nothing on their own)."""
        fed = self.cfg.federation
        fp32 = sum(v.nbytes for v in self.state.values())
        shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        if masked is not None:
            shapes = {MASKED: (masked,)}
        expected = Expected(
            run_token=self.run_token,
            round=rnd,
            method=self.cfg.method.name,
            fingerprint=self.fingerprint,
            shapes=shapes,
            max_bytes=fed.max_upload_bytes or 2 * fp32 + 65_536,
            codec=RING if masked is not None else fed.codec,
        )
        max_norm = None if masked is not None else fed.max_update_norm or None
        return Intake(expected, self.run_key, self._registered(), max_norm)

    def _registered(self) -> Mapping[str, ec.EllipticCurvePublicKey]:
        """The registered sites as the register says now, read once per exchange after its
        replies are in: a site removed (``fedpeft coordinator remove-site``) is refused
        ``unknown-site`` from then on, a re-keyed one is checked against its new key. A
        register that cannot be read keeps the last one read; the run goes on."""
        if self.load_sites is None:
            return self.sites
        try:
            sites = dict(self.load_sites())
        except (FedpeftError, OSError, ValueError) as exc:
            warning = f"warning: the register of sites could not be read ({exc}); kept the last"
            log.warning(warning)
            self.progress(warning)
            return self.sites
        changed = [n for n in sites if n in self.sites and not _same_key(sites[n], self.sites[n])]
        for what, names in (
            ("removed (refused from now on)", sorted(set(self.sites) - set(sites))),
            ("added", sorted(set(sites) - set(self.sites))),
            ("given a new key", sorted(changed)),
        ):
            if names:
                self.progress(f"register of sites: {', '.join(names)} {what}")
        self.sites = sites
        return sites


def _same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


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
