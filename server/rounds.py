"""Rounds as data: what the store records for a round and for each site in it, the lines the
operator reads, and which round's global state a run delivers.

Pure functions of the replies the round loop (server/strategy.py) read; no Flower, no store.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from fedpeft.common import keys
from fedpeft.common.keys import Phase
from fedpeft.common.metrics import (
    auc_from_histograms,
    auc_interval_from_histograms,
    calibration_from_histograms,
    pool_histograms,
)
from fedpeft.server.aggregation import CAPPED_EXAMPLES, CLIPPED_TO, NORM
from fedpeft.server.store.base import ReplyStatus, RoundResult, SiteResult
from fedpeft.server.validation import MAX_SIGNED_EXAMPLES

if TYPE_CHECKING:
    from fedpeft.server.replies import Reply

#: Reply metrics kept in a site result's ``extra`` column.
EXTRA_METRICS = (
    keys.AUC_LOW,
    keys.AUC_HIGH,
    keys.STEPS,
    keys.EPOCHS_RUN,
    keys.LORA_RANK,
    keys.MLM_LOSS,
    keys.VAL_LOSS,
    keys.N_VAL,
    "seconds-per-step",
    keys.TASK_SECONDS,
)


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


def delivered_round(rounds: list[RoundResult]) -> RoundResult | None:
    """The record of the round :func:`select_round` picks; None without rounds."""
    chosen = select_round(rounds)
    return next((r for r in rounds if r.round == chosen), None)


def round_result(
    rnd: int,
    started: datetime,
    finished: datetime,
    seconds: float,
    train: list[Reply],
    evaluations: list[Reply],
    applied: bool,
    weight_factor: float = 0.0,
    pooled: tuple[list[int], list[int]] | None = None,
) -> RoundResult:
    """One round's row: the pooled AUC from the sites' histograms (``pooled``: their sum, as
    secure aggregation gives it, when no site's reached the coordinator), the macro AUC, the
    loss and validation loss weighted by each site's rows, and how many updates were accepted.

    ``weight_factor`` (``federation.examples_bound_factor``): with 3 or more evaluations, no
    site's validation rows weigh more than this many times the median site's, so no site moves
    the round the run delivers (:func:`select_round`) by more than that bounded weight."""
    ok = [e for e in evaluations if e.status == ReplyStatus.OK]
    n_val = [e.metrics.get(keys.N_VAL, 0.0) for e in ok]
    if weight_factor and len(n_val) >= 3:
        cap = weight_factor * float(np.median(n_val))
        n_val = [min(n, cap) for n in n_val]
    histograms = [e.histogram for e in ok if e.histogram is not None]
    if pooled is not None:
        histograms = [pooled]
    pooled_value = low = high = calibration = None
    if histograms:  # summed once: the pooled AUC, its interval and the calibration
        summed = pool_histograms(histograms)
        pooled_value = auc_from_histograms(*summed)
        low, high = auc_interval_from_histograms(*summed)
        calibration = calibration_from_histograms(*summed)
    return RoundResult(
        round=rnd,
        started_at=started,
        finished_at=finished,
        seconds=seconds,
        pooled_auc=pooled_value,
        macro_auc=_finite_mean(e.metrics.get(keys.AUC, float("nan")) for e in ok),
        loss=_finite_mean(
            (e.metrics.get(keys.LOSS, float("nan")) for e in ok),
            (e.metrics.get(keys.N_TEST, 0.0) for e in ok),
        ),
        val_loss=_finite_mean((e.metrics.get(keys.VAL_LOSS, float("nan")) for e in ok), n_val),
        accepted=sum(r.status == ReplyStatus.OK for r in train),
        rejected=sum(r.status != ReplyStatus.OK for r in train),
        applied=applied,
        pooled_low=low,
        pooled_high=high,
        pooled_brier=calibration.brier if calibration else None,
        pooled_ece=calibration.ece if calibration else None,
        pooled_reliability=calibration.curve if calibration else (),
    )


def _count(value: float | None) -> int | None:
    """A row count a reply states, if it is one: a whole number from 0 to
    :data:`~fedpeft.server.validation.MAX_SIGNED_EXAMPLES` (a site may say anything)."""
    if value is None or not np.isfinite(value) or not float(value).is_integer():
        return None
    return int(value) if 0 <= value <= MAX_SIGNED_EXAMPLES else None


def site_rows(rnd: int, replies: list[Reply], phase: Phase) -> list[SiteResult]:
    """One store row per reply of one phase, with its status, reason, metrics and bytes."""
    n_key = keys.N_TRAIN if phase == Phase.TRAIN else keys.N_TEST
    rows = []
    for r in replies:
        m = r.metrics
        rows.append(
            SiteResult(
                round=rnd,
                site=r.site,
                phase=phase,
                status=r.status,
                reason=r.reason,
                n=_count(m.get(n_key)),
                loss=m.get(keys.LOSS),
                auc=m.get(keys.AUC),
                auprc=m.get(keys.AUPRC),
                accuracy=m.get(keys.ACCURACY),
                brier=m.get(keys.BRIER),
                bytes_up=r.bytes_up,
                bytes_down=r.bytes_down,
                seconds=m.get(keys.TRAIN_SECONDS),
                extra={**{k: v for k, v in m.items() if k in EXTRA_METRICS}, **r.notes},
                data_fingerprint=r.data_fingerprint,
            )
        )
    return rows


#: A round's progress line names each site's AUC up to this many sites, and summarizes above.
LISTED_SITES = 12


def round_summary(result: RoundResult, train: list[Reply], evaluations: list[Reply]) -> list[str]:
    """What the operator reads after a round: the AUCs and counts, then each reply not used."""

    def fmt(x: float | None) -> str:
        return "  n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"

    ok = sorted((e for e in evaluations if e.status == ReplyStatus.OK), key=lambda e: e.site)
    sites = ", ".join(
        f"{e.site} {fmt(e.metrics.get(keys.AUC))} (n={int(e.metrics.get(keys.N_TEST, 0))})"
        for e in ok
    )
    if len(ok) > LISTED_SITES:  # one line stays one line with 100 sites
        sites = f"{len(ok)} sites evaluated"
        aucs = [
            (e.metrics[keys.AUC], e.site)
            for e in ok
            if np.isfinite(e.metrics.get(keys.AUC, np.nan))
        ]
        if aucs:
            (low, low_site), (high, high_site) = min(aucs), max(aucs)
            median = float(np.median([a for a, _ in aucs]))
            sites += (
                f", site AUC median {median:.3f}, lowest {low_site} {low:.3f}, highest "
                f"{high_site} {high:.3f} (fedpeft report lists each)"
            )
    interval = ""
    if result.pooled_low is not None and result.pooled_high is not None:
        interval = f" [{result.pooled_low:.2f}, {result.pooled_high:.2f}]"
    lines = [
        f"round {result.round}: pooled AUC {fmt(result.pooled_auc)}{interval}, macro AUC "
        f"{fmt(result.macro_auc)}, {result.accepted} update(s) accepted, {result.rejected} "
        f"rejected, {result.seconds:.1f} s"
        + ("" if result.epsilon is None else f", privacy spent: epsilon {result.epsilon:.3f}")
        + f" | {sites}"
    ]
    lines += [
        f"round {result.round}: {r.site} {r.status}: {r.reason}"
        for r in train + evaluations
        if r.status != ReplyStatus.OK
    ]
    lines += [f"round {result.round}: {r.site} {note}" for r in train for note in bounded(r)]
    return lines


def bounded(reply: Reply) -> list[str]:
    """What bounded an accepted update's influence, in words (server/aggregation.py)."""
    notes, said = reply.notes, []
    if CAPPED_EXAMPLES in notes:
        said.append(
            f"signed {reply.metrics.get(keys.N_TRAIN, 0):.0f} examples, weighted as "
            f"{notes[CAPPED_EXAMPLES]:.0f} (federation.max_examples, examples_bound_factor)"
        )
    if CLIPPED_TO in notes:
        said.append(
            f"update norm {notes[NORM]:.3g} scaled down to {notes[CLIPPED_TO]:.3g} "
            "(federation.norm_bound_factor x the round's median)"
        )
    return said


def personal_summary(
    personal: list[SiteResult], global_rows: dict[str, SiteResult], listed: int = LISTED_SITES
) -> list[str]:
    """What the operator reads after personalization: each site's personalized AUC beside its
    AUC under the delivered global state (up to ``listed`` sites; a summary above), then the
    mean of both over the sites that have both."""

    def auc(row: SiteResult | None) -> float | None:
        if row is None or row.status != ReplyStatus.OK or row.auc is None:
            return None
        return row.auc if np.isfinite(row.auc) else None

    lines, problems, pairs = [], [], []
    for row in sorted(personal, key=lambda r: r.site):
        mine, theirs = auc(row), auc(global_rows.get(row.site))
        if row.status != ReplyStatus.OK:
            problems.append(f"personalized: {row.site} {row.status}: {row.reason}")
            continue
        if mine is None:
            lines.append(f"personalized: {row.site} has no AUC (one class in its test rows)")
            continue
        epochs = int(row.extra.get(keys.EPOCHS_RUN, 0))
        how = (
            f"{epochs} epoch(s)"
            if epochs
            else "kept the global part (no epoch lowered its validation loss)"
        )
        low, high = row.extra.get(keys.AUC_LOW), row.extra.get(keys.AUC_HIGH)
        interval = "" if low is None or high is None else f" [{low:.2f}, {high:.2f}]"
        versus = "" if theirs is None else f" (global {theirs:.3f}, {mine - theirs:+.3f})"
        lines.append(f"personalized: {row.site} AUC {mine:.3f}{interval}{versus}, {how}")
        if theirs is not None:
            pairs.append((row.site, mine, theirs))
    if len(personal) > listed:  # one line for the sites, then at most ``listed`` failures
        gains = sorted((m - t, s) for s, m, t in pairs)
        lines = []
        if gains:
            lines.append(
                f"personalized: {len(personal)} sites, AUC gain over the global state median "
                f"{float(np.median([g for g, _ in gains])):+.3f}, lowest {gains[0][1]} "
                f"{gains[0][0]:+.3f}, highest {gains[-1][1]} {gains[-1][0]:+.3f} "
                "(fedpeft report lists each)"
            )
        problems = problems[:listed]
    lines += problems
    if pairs:
        mine_mean = float(np.mean([m for _, m, _ in pairs]))
        theirs_mean = float(np.mean([t for _, _, t in pairs]))
        lines.append(
            f"personalized: macro AUC {mine_mean:.3f} against the global state's {theirs_mean:.3f} "
            f"at the same {len(pairs)} site(s) ({mine_mean - theirs_mean:+.3f})"
        )
    return lines
