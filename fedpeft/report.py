"""The run summary: per-site table, bytes per round, AUC-per-round plot, all from the store."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.common.config import probes_used
from fedpeft.common.errors import FedpeftError
from fedpeft.common.keys import AUC_HIGH, AUC_LOW, EPOCHS_RUN, LORA_RANK, SITE_EPSILON
from fedpeft.common.metrics import CALIBRATION_BINS, Difference
from fedpeft.distilling import Comparison, side
from fedpeft.server.rounds import LISTED_SITES, delivered_round
from fedpeft.server.store import (
    ALL_TEST_ROWS,
    BaselineResult,
    LrCandidate,
    RunStatus,
    RunStore,
    SiteResult,
)


@dataclass(frozen=True)
class SiteRow:
    site: str
    n_train: int | None
    n_test: int | None
    alone: float | None
    federated: float | None
    centralized: float | None
    #: TF-IDF + logistic regression on the same split (None for runs recorded without it).
    tfidf_alone: float | None = None
    tfidf_pooled: float | None = None
    #: The columns (attribute names) whose model is degenerate at this site: AUC below 0.5 or,
    #: for a baseline, constant scores (stored with it). Shown as such, never as a reference.
    degenerate: frozenset[str] = frozenset()
    #: The federated AUC's 95 % interval as the site computed it (DeLong), if it sent one.
    federated_interval: tuple[float, float] | None = None
    #: The site's personalized model (``federation.personalize``): its AUC and interval, and the
    #: epochs it fine-tuned (0: it kept the global part); None without personalization.
    personalized: float | None = None
    personalized_interval: tuple[float, float] | None = None
    personal_epochs: int | None = None


@dataclass(frozen=True)
class Summary:
    run_id: int
    status: str
    selected_round: int | None
    method: str
    trainable: int
    total: int
    rounds: int
    rows: list[SiteRow]
    pooled_federated: float | None
    bytes_up_per_round: dict[str, float]  # site -> mean bytes uploaded per round it trained
    full_model_bytes: int
    rejections: list[str]
    wall_seconds: float | None
    #: Why a run that did not finish ended (failed) or stopped (interrupted).
    error: str | None = None
    last_round: int | None = None  # the last round recorded
    #: The run's most rounds (``federation.rounds``), and why it ran fewer (:func:`early_stop`).
    max_rounds: int | None = None
    early_stop: str = ""
    #: A DP run's epsilon after each round that recorded one, (round, epsilon), in order.
    epsilons: list[tuple[int, float]] = field(default_factory=list)
    #: The delta those epsilons hold at (the run config's ``federation.dp.delta``).
    delta: float | None = None
    #: Each site's epsilon after the last round it took part in.
    site_epsilons: dict[str, float] = field(default_factory=dict)
    #: The pooled TF-IDF model's AUC over every site's test rows together.
    pooled_tfidf: float | None = None
    #: The pooled federated AUC's 95 % interval (DeLong, from the pooled histograms).
    pooled_interval: tuple[float, float] | None = None
    #: The federated run's learning rate (the stored config's ``train.lr``) and the grid the
    #: baselines chose theirs from (``tuning.lr_grid``; empty for runs recorded before).
    federated_lr: float | None = None
    lr_grid: tuple[float, ...] = ()
    #: The baselines' probes (``tuning.probe_epochs``, where the run used them): each rate
    #: trained this many epochs and only the chosen one the whole budget; 0 = whole runs.
    probe_epochs: int = 0
    #: Baseline kind (alone, centralized) -> site -> the rate its model chose.
    baseline_lrs: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The federated runs this run's rate was chosen from (``simulate --tune-lr``), if it was.
    federated_candidates: tuple[LrCandidate, ...] = ()
    #: Baseline kind (alone, centralized) -> site -> federated AUC minus the baseline's on the
    #: site's test rows (DeLong, paired), for baselines recorded with it.
    differences: dict[str, dict[str, Difference]] = field(default_factory=dict)
    #: The delivered round's pooled Brier score and ECE (from the pooled score histograms), and
    #: each site's Brier score as the site computed it.
    pooled_brier: float | None = None
    pooled_ece: float | None = None
    site_brier: dict[str, float] = field(default_factory=dict)
    #: The part each site personalized (``federation.personalize``); None without it.
    personalized_part: str | None = None
    #: The LoRA rank each site trained at (its last train row), when some site trained below
    #: the run's ``run_lora_rank`` (a site of less capacity); empty otherwise.
    lora_ranks: dict[str, int] = field(default_factory=dict)
    run_lora_rank: int | None = None
    #: A distilled student's teacher and itself (``fedpeft distill``); None for other runs.
    distilled: Comparison | None = None
    #: The distillation's temperature and the soft loss's weight.
    distill_settings: tuple[float, float] | None = None
    #: The run's stages (``[[schedule]]``) as "rounds 1-2: head at lr 0.01"; empty without.
    stages: list[str] = field(default_factory=list)

    @property
    def has_tfidf(self) -> bool:
        """Whether the run recorded the TF-IDF reference (older runs did not)."""
        return self.pooled_tfidf is not None or any(
            r.tfidf_alone is not None or r.tfidf_pooled is not None for r in self.rows
        )

    def degenerate_in(self, attr: str) -> list[str]:
        """The sites whose ``attr`` model is degenerate."""
        return [r.site for r in self.rows if attr in r.degenerate]

    def macro(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.rows]
        if any(v is None or not math.isfinite(v) for v in values) or not values:
            return None
        return sum(values) / len(values)


def summarize(store: RunStore, run_id: int | None = None) -> Summary:
    run = store.get_run(run_id)
    rounds = store.rounds(run.id)
    results = store.site_results(run.id)
    delivered = delivered_round(rounds)
    chosen = delivered.round if delivered else None
    evals = {r.site: r for r in results if r.phase == "evaluate" and r.round == chosen}
    personal = {r.site: r for r in results if r.phase == "personalize" and r.round == chosen}
    trains = [r for r in results if r.phase == "train"]
    n_train = {r.site: r.n for r in trains if r.n is not None}
    baselines = {(b.kind, b.site): b for b in store.baselines(run.id)}
    named = {r.site for r in results} | {b.site for b in baselines.values()}
    sites = sorted(named - {ALL_TEST_ROWS})
    rows = []
    for site in sites:
        alone = baselines.get(("alone", site))
        central = baselines.get(("centralized", site))
        ev = evals.get(site)
        federated = ev.auc if ev and ev.status == "ok" else None
        flagged = {
            attr
            for attr, kind in _BASELINE_COLUMNS.items()
            if (b := baselines.get((kind, site))) is not None and b.degenerate
        }
        mine = personal.get(site)
        personalized = mine.auc if mine and mine.status == "ok" else None
        for attr, auc in (("federated", federated), ("personalized", personalized)):
            if auc is not None and auc < 0.5:
                flagged.add(attr)
        rows.append(
            SiteRow(
                site=site,
                n_train=n_train.get(site) or (alone.n_train if alone else None),
                n_test=(ev.n if ev and ev.n is not None else (alone.n_test if alone else None)),
                alone=alone.auc if alone else None,
                federated=federated,
                centralized=central.auc if central else None,
                tfidf_alone=_auc_of(baselines.get(("tfidf-alone", site))),
                tfidf_pooled=_auc_of(baselines.get(("tfidf-pooled", site))),
                degenerate=frozenset(flagged),
                federated_interval=_interval(
                    ev.extra.get(AUC_LOW) if ev else None, ev.extra.get(AUC_HIGH) if ev else None
                ),
                personalized=personalized,
                personalized_interval=_interval(
                    mine.extra.get(AUC_LOW) if mine else None,
                    mine.extra.get(AUC_HIGH) if mine else None,
                ),
                personal_epochs=(
                    int(mine.extra.get(EPOCHS_RUN, 0))
                    if mine and personalized is not None
                    else None
                ),
            )
        )
    site_epsilons = {
        r.site: r.extra[SITE_EPSILON]
        for r in sorted(trains, key=lambda r: r.round)
        if r.extra.get(SITE_EPSILON) is not None
    }
    uploads: dict[str, list[int]] = {}
    for r in trains:
        if r.bytes_up:
            uploads.setdefault(r.site, []).append(r.bytes_up)
    return Summary(
        run_id=run.id,
        status=run.status,
        selected_round=chosen,
        method=run.method,
        trainable=run.trainable_params,
        total=run.total_params,
        rounds=len(rounds),
        rows=rows,
        pooled_federated=delivered.pooled_auc if delivered else None,
        bytes_up_per_round={s: sum(v) / len(v) for s, v in uploads.items()},
        full_model_bytes=run.total_params * 4,
        rejections=[
            f"round {r.round} {r.phase} {r.site}: {r.status} ({r.reason})"
            for r in results
            if r.status != "ok"
        ],
        wall_seconds=run.wall_seconds,
        error=run.error,
        last_round=max((r.round for r in rounds), default=None),
        max_rounds=_count(_config_value(run.config_json, "federation", "rounds")),
        early_stop=early_stop(run.config_json, len(rounds), run.status),
        epsilons=[(r.round, r.epsilon) for r in rounds if r.epsilon is not None],
        delta=_number(_config_value(run.config_json, "federation", "dp", "delta")),
        site_epsilons=site_epsilons,
        pooled_tfidf=_auc_of(baselines.get(("tfidf-pooled", ALL_TEST_ROWS))),
        pooled_interval=_interval(delivered.pooled_low, delivered.pooled_high)
        if delivered
        else None,
        federated_lr=_number(_config_value(run.config_json, "train", "lr")),
        lr_grid=_rates(_config_value(run.config_json, "tuning", "lr_grid")),
        probe_epochs=_probe_epochs(run.config_json),
        federated_candidates=run.lr_candidates,
        pooled_brier=delivered.pooled_brier if delivered else None,
        pooled_ece=delivered.pooled_ece if delivered else None,
        personalized_part=(
            str(part)
            if (part := _config_value(run.config_json, "federation", "personalize"))
            not in (None, "none")
            else None
        ),
        site_brier={
            site: ev.brier
            for site, ev in sorted(evals.items())
            if ev.status == "ok" and ev.brier is not None
        },
        differences={
            kind: {
                b.site: Difference(b.diff, b.diff_se)
                for (k, _), b in sorted(baselines.items())
                if k == kind and b.diff is not None and b.diff_se is not None
            }
            for kind in ("alone", "centralized")
        },
        baseline_lrs={
            kind: {b.site: b.lr for (k, _), b in baselines.items() if k == kind and b.lr}
            for kind in ("alone", "centralized")
        },
        **_lora_ranks(trains, run.config_json),
        **_distilled(store, run.id, run.config_json),
        stages=stage_lines(run.config_json),
    )


def stage_lines(config_json: str) -> list[str]:
    """Each stage of a staged run (``[[schedule]]``) as "rounds 1-2: head at lr 0.01"."""
    schedule = _config_value(config_json, "schedule")
    composed = bool(_config_value(config_json, "method", "compose"))
    lines, end = [], 0
    for stage in schedule if isinstance(schedule, list) else []:
        start, end = end + 1, end + int(stage["rounds"])
        rounds = f"round {start}" if start == end else f"rounds {start}-{end}"
        part = f"{stage['method']} ({stage['trains']})" if composed else stage["trains"]
        lines.append(f"{rounds}: {part} at lr {float(stage['lr']):g}")
    return lines


def _distilled(store: RunStore, run_id: int, config_json: str) -> dict[str, Any]:
    """``distilled`` and ``distill_settings`` of :class:`Summary`, for a student whose teacher
    the store still holds."""
    teacher = _number(_config_value(config_json, "distill", "teacher_run"))
    if not teacher:
        return {}
    try:
        pair = Comparison(side(store, int(teacher)), side(store, run_id))
    except (FedpeftError, OSError, ValueError):
        return {}  # the teacher's run is no longer in the store, or its base is not here
    t = _number(_config_value(config_json, "distill", "temperature"))
    a = _number(_config_value(config_json, "distill", "alpha"))
    return {
        "distilled": pair,
        "distill_settings": None if t is None or a is None else (t, a),
    }


def _lora_ranks(trains: list[SiteResult], config_json: str) -> dict[str, Any]:
    """``lora_ranks`` and ``run_lora_rank`` of :class:`Summary`: each site's rank from its
    last accepted train row (the coordinator checked it against the delta), kept only in a
    LoRA run where a site trained below the run's rank."""
    run_rank = _number(_config_value(config_json, "method", "lora", "r"))
    if _config_value(config_json, "method", "name") != "lora" or run_rank is None:
        return {}
    ranks = {
        r.site: int(rank)
        for r in sorted(trains, key=lambda r: r.round)
        if r.status == "ok"
        and isinstance(rank := r.extra.get(LORA_RANK), int | float)
        and math.isfinite(rank)
    }
    if all(rank >= run_rank for rank in ranks.values()):
        return {}
    return {"lora_ranks": dict(sorted(ranks.items())), "run_lora_rank": int(run_rank)}


def _interval(low: float | None, high: float | None) -> tuple[float, float] | None:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return low, high


def _with_interval(text: str, interval: tuple[float, float] | None) -> str:
    return text if interval is None else f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"


#: Report column (SiteRow attribute) -> the baseline kind it shows.
_BASELINE_COLUMNS = {
    "alone": "alone",
    "centralized": "centralized",
    "tfidf_alone": "tfidf-alone",
    "tfidf_pooled": "tfidf-pooled",
}
DEGENERATE = "(degenerate)"


def _auc_of(baseline: BaselineResult | None) -> float | None:
    return baseline.auc if baseline is not None else None


def _probe_epochs(config_json: str) -> int:
    """The probe length the baselines used (``common.config.probes_used``), 0 for whole runs
    or a config stored before the setting existed."""
    probe = _number(_config_value(config_json, "tuning", "probe_epochs"))
    rounds = _number(_config_value(config_json, "federation", "rounds"))
    epochs = _number(_config_value(config_json, "train", "local_epochs"))
    if probe is None or rounds is None or epochs is None:
        return 0
    grid = _rates(_config_value(config_json, "tuning", "lr_grid"))
    return probes_used(int(probe), len(grid), int(rounds * epochs))


def _config_value(config_json: str, *path: str) -> object:
    """A setting of the run config as stored, by its path (None where a config stored before
    the setting existed has none)."""
    try:
        value: object = json.loads(config_json)
    except json.JSONDecodeError:
        return None
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _rates(value: object) -> tuple[float, ...]:
    rates = value if isinstance(value, list) else []
    return tuple(r for x in rates if (r := _number(x)) is not None)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def early_stop(config_json: str, rounds: int, status: str) -> str:
    """Why a finished run with patience recorded fewer than its most rounds, or "" where it did
    not (a run without patience that ends early is one whose privacy budget ran out)."""
    most = _count(_config_value(config_json, "federation", "rounds"))
    patience = _count(_config_value(config_json, "federation", "patience"))
    if not patience or most is None or status != "finished" or rounds >= most:
        return ""
    why = f"no lower validation loss in {patience} rounds (federation.patience)"
    if _number(_config_value(config_json, "federation", "dp", "target_epsilon")):
        why += " or the privacy budget (federation.dp.target_epsilon)"
    return f"ended early: {why}"


def _f(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def render_table(s: Summary) -> str:
    header = ["site", "n train / n test", "alone AUC", "federated AUC", "centralized AUC"]
    attrs = ["alone", "federated", "centralized"]
    if any(r.personalized is not None for r in s.rows):
        header.insert(4, "personalized AUC")
        attrs.insert(2, "personalized")
    if s.has_tfidf:  # a run recorded before the TF-IDF reference existed shows no empty columns
        header += ["TF-IDF alone AUC", "TF-IDF pooled AUC"]
        attrs += ["tfidf_alone", "tfidf_pooled"]

    def cell(r: SiteRow, attr: str) -> str:
        text = _f(getattr(r, attr))
        if attr == "federated":
            text = _with_interval(text, r.federated_interval)
        elif attr == "personalized":
            text = _with_interval(text, r.personalized_interval)
            text += " (kept global)" if r.personal_epochs == 0 else ""
        return f"{text} {DEGENERATE}" if attr in r.degenerate else text

    def macro(attr: str) -> str:
        text = _f(s.macro(attr))
        return f"{text} {DEGENERATE}" if s.degenerate_in(attr) and text != "n/a" else text

    body = [
        (r.site, f"{r.n_train or '?'} / {r.n_test or '?'}", *(cell(r, a) for a in attrs))
        for r in s.rows
    ]
    body.append(("macro (mean of sites)", "", *(macro(a) for a in attrs)))
    pooled = {
        "federated": _with_interval(_f(s.pooled_federated), s.pooled_interval),
        "tfidf_pooled": _f(s.pooled_tfidf),
    }
    body.append(("pooled (all test rows)", "", *(pooled.get(a, "") for a in attrs)))
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    out.append("")
    out.append(
        f"run {s.run_id} ({s.status}): method {s.method}, {s.rounds} rounds"
        f"{f' of at most {s.max_rounds} ({s.early_stop})' if s.early_stop else ''}, "
        f"{s.trainable:,} of "
        f"{s.total:,} parameters shared ({100 * s.trainable / s.total:.2f} %)"
    )
    out.append(
        f"federated AUC = the global state of round {s.selected_round}, the lowest loss on the "
        "sites' validation rows (alone and centralized keep their best epoch the same way)"
    )
    if s.pooled_interval is not None or any(r.federated_interval for r in s.rows):
        out.append(
            "[low, high] = the AUC's 95 % interval (DeLong): a site's computed at the site from "
            "its scores, the pooled one from the pooled score histograms"
        )
    if "personalized" in attrs:
        out.append(
            f"personalized AUC = each site's model after fine-tuning the {s.personalized_part} "
            f"of round {s.selected_round}'s state on its own training rows (kept by its "
            "validation loss; the part never left the site). (kept global) = no epoch lowered "
            "its validation loss, so it is the global model"
        )
    if s.lora_ranks:
        out.append(
            f"LoRA rank each site trained (the run's {s.run_lora_rank}; a site of less capacity "
            "trains the first components, each averaged over the sites that trained it): "
            + ", ".join(f"{site} {rank}" for site, rank in s.lora_ranks.items())
        )
    out += _rates_lines(s)
    out += _difference_lines(s)
    out += _calibration_lines(s)
    if s.has_tfidf:
        out.append(
            "TF-IDF = TF-IDF (word 1-2 grams) + logistic regression on the same split, on each "
            "site's training rows (alone) or all sites' (pooled), C chosen on the validation rows"
        )
    flagged = [
        f"{header[2 + i]} at {', '.join(s.degenerate_in(a))}"
        for i, a in enumerate(attrs)
        if s.degenerate_in(a)
    ]
    if flagged:
        out.append(
            f"{DEGENERATE} = AUC below 0.5 or constant scores on that site's test rows: no "
            f"reference to judge the federated model by ({'; '.join(flagged)})"
        )
    full = s.full_model_bytes
    for site, b in sorted(s.bytes_up_per_round.items()):
        out.append(
            f"bytes up per round, {site}: {b:,.0f} ({100 * b / full:.2f} % of the full model's "
            f"{full:,} fp32 bytes)"
        )
    if s.epsilons:
        at = "δ not recorded" if s.delta is None else f"δ = {s.delta:g}"
        out.append(
            f"privacy spent, the run's ε after each round ({at}): "
            + ", ".join(f"round {r} {eps:.2f}" for r, eps in s.epsilons)
        )
        if s.site_epsilons:
            out.append(
                "ε per site, over the rounds it took part in: "
                + ", ".join(f"{site} {eps:.2f}" for site, eps in sorted(s.site_epsilons.items()))
            )
    if s.stages:
        out.append(
            "schedule (what the sites trained, all: every shared parameter, head: the head "
            "alone, method: the method's own, mlm: the method's own on the notes' text, "
            "masked-language pretraining that leaves the head as it was): " + "; ".join(s.stages)
        )
    if s.distilled is not None:
        out += _distilled_lines(s.distilled, s.distill_settings)
    if s.rejections:
        out.append("not used:")
        out += [f"  {r}" for r in s.rejections]
    if s.status == RunStatus.INTERRUPTED:
        after = "before round 1" if s.last_round is None else f"after round {s.last_round}"
        out.append(
            f"run {s.run_id} was interrupted {after}: the process running it died "
            f"({s.error or 'no detail recorded'})"
        )
    elif s.status == RunStatus.FAILED:
        out.append(f"run {s.run_id} failed: {s.error or 'no error recorded'}")
    if s.wall_seconds is not None:
        out.append(f"federated run wall time: {s.wall_seconds:.0f} s")
    return "\n".join(out)


def _distilled_lines(c: Comparison, settings: tuple[float, float] | None) -> list[str]:
    t, st = c.teacher, c.student
    how = "" if settings is None else f" at temperature {settings[0]:g}, alpha {settings[1]:g}"
    lines = [
        f"distilled from run {t.run_id}{how}: teacher {t.layers} encoder layers, "
        f"{t.total_params:,} parameters, macro AUC {_f(t.macro_auc)}; this student "
        f"{st.layers} layers, {st.total_params:,} parameters "
        f"({100 * st.total_params / max(t.total_params, 1):.0f} %), macro AUC {_f(st.macro_auc)}"
    ]
    if c.retained is not None:
        lines.append(
            f"AUC retained: {100 * c.retained:.1f} % of the teacher's macro AUC (inference "
            "time: `fedpeft distill` times both side by side)"
        )
    return lines


def _rates_lines(s: Summary) -> list[str]:
    """Which learning rate each mode used, and how it was chosen."""
    out = []
    chosen = []
    for kind, by_site in s.baseline_lrs.items():
        rates = set(by_site.values())
        if len(rates) == 1 and (kind == "centralized" or len(by_site) > 1):
            chosen.append(f"{kind} {_rate(rates.pop())}")  # one model, or every site alike
        elif by_site:
            chosen.append(kind + " " + ", ".join(f"{k} {_rate(v)}" for k, v in by_site.items()))
    if chosen:  # language-model baselines recorded with their rates
        grid = ", ".join(_rate(r) for r in s.lr_grid) or "the run's grid"
        how = (
            f"after each rate's first {s.probe_epochs} epochs (then only that rate trained the "
            "whole budget) "
            if s.probe_epochs
            else ""
        )
        out.append(
            f"learning rate, chosen by validation loss {how}from {grid}: " + "; ".join(chosen)
        )
    if s.federated_candidates:
        runs = ", ".join(
            f"run {c.run} (lr {_rate(c.lr)}: {_f4(c.val_loss)})" for c in s.federated_candidates
        )
        out.append(
            f"learning rate, federated: {_rate(s.federated_lr or 0)}, chosen by the validation "
            f"loss of each run's delivered round from {runs}"
        )
    elif chosen and s.federated_lr is not None:
        out.append(
            f"learning rate, federated: {_rate(s.federated_lr)} (train.lr, the same at every site "
            "and round; not tuned: simulate --tune-lr picks it from the grid too)"
        )
    return out


def _difference_lines(s: Summary) -> list[str]:
    """Federated minus each reference, per site and macro, with 95 % intervals."""
    out = []
    for kind, by_site in s.differences.items():
        if not by_site:
            continue
        parts = [f"{site} {_signed(d)}" for site, d in by_site.items()]
        if len(by_site) == len(s.rows) > 1:  # every site compared: the macro's difference too
            parts.append(f"macro {_signed(Difference.mean(list(by_site.values())))}")
        out.append(f"federated − {kind} AUC, same test rows: " + "; ".join(parts))
    if out:
        out.append(
            "(federated − X [low, high] = the difference with its 95 % interval, DeLong paired: "
            "both models scored on the same patients; an interval holding 0 = no clear "
            "difference; the macro's treats the sites as independent)"
        )
    return out


def _calibration_lines(s: Summary) -> list[str]:
    out = []
    if s.pooled_brier is not None and s.pooled_ece is not None:
        out.append(
            f"calibration of round {s.selected_round}, all test rows (from the pooled score "
            f"histograms, {CALIBRATION_BINS} bins): Brier {s.pooled_brier:.3f}, expected "
            f"calibration error {s.pooled_ece:.3f}"
        )
    if s.site_brier:
        out.append(
            "Brier per site (at the site): "
            + ", ".join(f"{site} {b:.3f}" for site, b in s.site_brier.items())
        )
    return out


def _signed(d: Difference) -> str:
    low, high = d.interval
    return f"{d.value:+.3f} [{low:+.3f}, {high:+.3f}]"


def _f4(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _rate(x: float) -> str:
    return f"{x:.3g}"


def median_by_round(aucs: Iterable[tuple[int, float | None]]) -> list[tuple[int, float]]:
    """The median site's AUC per round, from (round, AUC) pairs (an AUC of None is left out):
    what the plot and the dashboard draw for a run of many sites."""
    by_round: dict[int, list[float]] = {}
    for rnd, auc in aucs:
        if auc is not None:
            by_round.setdefault(rnd, []).append(auc)
    return [(rnd, statistics.median(v)) for rnd, v in sorted(by_round.items())]


def plot_auc(store: RunStore, run_id: int, path: Path) -> Path:
    """A PNG of AUC per round: one line per site and the pooled AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = store.rounds(run_id)
    results = [r for r in store.site_results(run_id) if r.phase == "evaluate" and r.auc is not None]
    delivered = delivered_round(rounds)
    chosen = delivered.round if delivered else None
    curve = delivered.pooled_reliability if delivered else ()
    if curve:  # a second panel: the delivered round's reliability curve
        fig, (ax, rel) = plt.subplots(
            2, 1, figsize=(9, 8.5), dpi=110, gridspec_kw={"height_ratios": [1.1, 1]}
        )
        _reliability(rel, curve, chosen)
    else:
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    names = sorted({r.site for r in results})
    for site in names:
        points = [(r.round, r.auc) for r in results if r.site == site]
        if len(names) > LISTED_SITES:  # one faint line each, no legend entry
            ax.plot(*zip(*points, strict=True), color="tab:blue", alpha=0.15, linewidth=0.8)
            continue
        n = next((r.n for r in results if r.site == site and r.n is not None), None)
        label = f"{site} (n={n})" if n is not None else site
        ax.plot(*zip(*points, strict=True), marker="o", linewidth=1.2, label=label)
    if len(names) > LISTED_SITES:
        ax.plot([], [], color="tab:blue", alpha=0.3, label=f"each of {len(names)} sites")
        per_round, medians = zip(*median_by_round((r.round, r.auc) for r in results), strict=True)
        ax.plot(per_round, medians, color="tab:blue", linewidth=2, label="median site")
    pooled = [(r.round, r.pooled_auc) for r in rounds if r.pooled_auc is not None]
    if pooled:
        ax.plot(*zip(*pooled, strict=True), color="black", linewidth=2.5, label="pooled")
    band = [
        (r.round, r.pooled_low, r.pooled_high)
        for r in rounds
        if r.pooled_low is not None and r.pooled_high is not None
    ]
    if band:
        xs, lows, highs = zip(*band, strict=True)
        ax.fill_between(xs, lows, highs, color="black", alpha=0.12, label="pooled, 95 % interval")
    summary = summarize(store, run_id)
    for attr, style in (("alone", ":"), ("centralized", "-.")):
        value = summary.macro(attr)
        if value is not None:
            flagged = f" {DEGENERATE}" if summary.degenerate_in(attr) else ""
            ax.axhline(
                value,
                color="dimgrey",
                linestyle=style,
                linewidth=1.2,
                label=f"{attr} (macro) {value:.3f}{flagged}",
            )
    if chosen is not None:
        ax.axvline(
            chosen, color="grey", linestyle="--", linewidth=1, label=f"chosen (round {chosen})"
        )
    ax.set_xticks([r.round for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("AUC of the global model (site test rows)")
    ax.set_title(f"fedpeft run {run_id}: AUC per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _reliability(ax: Any, curve: Sequence[tuple[float, float, int]], chosen: int | None) -> None:
    """The reliability curve: share of positives against mean score, per bin, marker area by
    rows; the diagonal is perfect calibration."""
    means, observed, rows = zip(*curve, strict=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    ax.plot(means, observed, color="black", linewidth=1.2)
    ax.scatter(means, observed, s=[20 + 200 * k / max(rows) for k in rows], color="black", zorder=3)
    for m, o, k in curve:
        ax.annotate(f"{k}", (m, o), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"mean score in the bin ({CALIBRATION_BINS} equal bins; label: rows)")
    ax.set_ylabel("share of positives")
    ax.set_title(f"reliability of round {chosen}'s global state, all test rows (pooled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
