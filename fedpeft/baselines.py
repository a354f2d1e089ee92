"""The references a federated run is judged against, trained without any federation.

``alone``: each site trains the same method with the same budget on its own rows only.
``centralized``: one model trains on the union of every site's training rows (the upper
reference that federation tries to reach without moving a record). Both use the same split,
model, method, trainer, budget and stopping rule as the federated run (:func:`budget`), and
each picks its learning rate from ``tuning.lr_grid`` by validation loss (never the test rows), so
that no reference is judged at a rate chosen for federated rounds of a few steps each. With
``tuning.probe_epochs`` = 0 every rate trains the whole budget and the model with the lowest
validation loss is kept; with k > 0 every rate first trains k epochs (a probe: exactly the first
k epochs of its whole run), the rate whose probe reached the lowest validation loss is chosen, and
only that rate trains the whole budget (:func:`run_baselines`).

``tfidf-alone`` / ``tfidf-pooled``: the classical reference, TF-IDF + logistic regression, on the
same split (each site's training rows / all sites' together, scored on each site's test rows):
what a language model has to beat to earn its cost. Seconds on a CPU, so it runs in-process.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.common.config import RunConfig, pretraining_rounds, probes_used
from fedpeft.common.data import SiteData, SiteSplit, load_sites, split_site
from fedpeft.common.metrics import (
    auc,
    auc_difference,
    degenerate,
    evaluate_scores,
    score_histograms,
)
from fedpeft.server.store.base import ALL_TEST_ROWS

if TYPE_CHECKING:
    import torch

    from fedpeft.client.trainer import Encoded, TrainResult


@dataclass(frozen=True)
class BaselineTask:
    kind: str  # alone | centralized
    sites: tuple[str, ...]  # the sites whose training rows it uses
    lr: float  # the learning rate this model trains at (one rate of the grid)
    #: A probe: only the budget's first ``probe`` epochs, to compare rates (0 = the whole budget).
    probe: int = 0


@dataclass(frozen=True)
class BaselineOutcome:
    kind: str  # alone | centralized | tfidf-alone | tfidf-pooled
    site: str  # ALL_TEST_ROWS: the AUC over every site's test rows together
    n_train: int
    n_test: int
    auc: float
    seconds: float
    detail: str = ""  # for the progress line only (the regularization TF-IDF chose)
    #: AUC below 0.5 or constant scores on this site's test rows (common/metrics.py).
    degenerate: bool = False
    #: The learning rate the model trained at (None for TF-IDF), and its validation loss there.
    lr: float | None = None
    val_loss: float = float("inf")
    #: The model's scores on the site's test rows, in split order (for the paired comparison
    #: with the federated model, :func:`with_differences`; never stored).
    scores: tuple[float, ...] = ()
    #: Federated AUC minus this one on the same rows, and its standard error (DeLong, paired).
    diff: float | None = None
    diff_se: float | None = None


def encoded_sites(cfg: RunConfig, names: Sequence[str]) -> dict[str, dict[str, Encoded]]:
    """The train, val and test rows (``Encoded``) of each site of ``names``, split as the
    federated run splits them: what a baseline trains on and what every model is scored on,
    in one order, so that two models' test scores pair row by row."""
    from fedpeft.client.trainer import encode_site
    from fedpeft.common.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    return {
        site.name: encode_site(
            tokenizer,
            site,
            split_site(site, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction),
            cfg.model.max_length,
        )
        for site in load_sites(cfg.data)
        if site.name in names
    }


def budget(cfg: RunConfig) -> tuple[int, int]:
    """A baseline's epochs and its early-stopping patience in epochs: the federated run's budget
    and stopping rule. It trains at most ``rounds × local_epochs`` epochs, as many as a site
    makes in the run; it stops once ``federation.patience`` rounds' worth of epochs brought no
    lower validation loss, as the run stops, and never early when the run does not (patience
    0); either way it keeps its best epoch, as the run delivers its best round. A schedule's
    mlm rounds (pretraining, no labels) are not counted: they fine-tune nothing."""
    epochs = (cfg.federation.rounds - pretraining_rounds(cfg.schedule)) * cfg.train.local_epochs
    patience = cfg.federation.patience * cfg.train.local_epochs
    return epochs, patience if patience > 0 else epochs


def _train(
    cfg: RunConfig, task: BaselineTask, threads: int
) -> tuple[torch.nn.Module, dict[str, dict[str, Encoded]], TrainResult, int, float]:
    """Train ``task``'s model: its rate, the run's budget and stopping rule, or the budget's
    first ``task.probe`` epochs with the learning-rate schedule those epochs have in the whole
    run (so a probe is exactly its rate's whole run cut short). The model, the sites' encoded
    parts, the training result, the training rows and the seconds taken."""
    import torch

    from fedpeft.client.trainer import Encoded, train_local
    from fedpeft.common.methods import build_model
    from fedpeft.common.model import resolve_device

    torch.set_num_threads(threads)
    started = time.perf_counter()
    parts = encoded_sites(cfg, task.sites)

    def union(part: str) -> Encoded:
        rows = [parts[s][part] for s in task.sites]
        return Encoded(sum((r.ids for r in rows), ()), np.concatenate([r.labels for r in rows]))

    device = resolve_device(cfg.device)
    model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed).to(device)
    epochs, patience = budget(cfg)
    run = min(task.probe, epochs) if task.probe else epochs
    # No FedProx: a model trained in one piece has no global state to stay near.
    train = dataclasses.replace(cfg.train, lr=task.lr, patience=patience, prox_mu=0.0)
    data = union("train")
    result = train_local(
        model, data, union("val"), train, run, device, cfg.seed, span=(0.0, run / epochs)
    )
    return model, parts, result, len(data), time.perf_counter() - started


def run_probe(cfg: RunConfig, task: BaselineTask, threads: int = 1) -> BaselineOutcome:
    """Train ``task``'s probe (its rate's first epochs) and return its best validation loss and
    seconds; nothing is scored on test rows."""
    _, _, result, n_train, seconds = _train(cfg, task, threads)
    no_auc = math.nan  # a probe scores no test row
    return BaselineOutcome(
        task.kind,
        ALL_TEST_ROWS,
        n_train,
        0,
        no_auc,
        seconds,
        lr=task.lr,
        val_loss=result.best_val_loss,
    )


def run_task(cfg: RunConfig, task: BaselineTask, threads: int = 1) -> list[BaselineOutcome]:
    """Train one baseline model and evaluate it on the test rows of each site it covers."""
    from fedpeft.client.trainer import predict

    model, parts, result, n_train, seconds = _train(cfg, task, threads)
    device = next(model.parameters()).device
    outcomes = []
    for s in task.sites:
        scores, loss = predict(model, parts[s]["test"], device)
        ev = evaluate_scores(parts[s]["test"].labels, scores, loss)
        outcomes.append(
            BaselineOutcome(
                task.kind,
                s,
                n_train,
                len(parts[s]["test"]),
                ev.auc,
                seconds,
                degenerate=degenerate(ev.auc, ev.hist_pos, ev.hist_neg),
                lr=task.lr,
                val_loss=result.best_val_loss,
                scores=tuple(float(x) for x in scores),
            )
        )
    return outcomes


# -- the federated model against them, paired --------------------------------------------------


def federated_scores(
    cfg: RunConfig, state: Mapping[str, Any], sites: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The labels of each of ``sites``' test rows and the scores on them of the model with the
    shared ``state`` (the federated run's delivered global state), split and ordered as
    :func:`run_task` splits them."""
    import torch

    from fedpeft.client.trainer import predict
    from fedpeft.common.methods import build_model, load_shared_state
    from fedpeft.common.model import resolve_device

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed)
    load_shared_state(model, dict(state))
    model.to(device)
    out = {}
    for name, parts in encoded_sites(cfg, sites).items():
        test = parts["test"]
        out[name] = (test.labels, predict(model, test, device)[0])
    return out


def with_differences(
    cfg: RunConfig, state: Mapping[str, Any], outcomes: Sequence[BaselineOutcome]
) -> list[BaselineOutcome]:
    """``outcomes`` with, for each alone or centralized model, the federated model's AUC minus
    its own on the same test rows and that difference's standard error (DeLong, paired: the
    two models are scored on the same patients, so the comparison is sharper than two
    separate intervals)."""
    sites = sorted({o.site for o in outcomes if o.scores})
    if not sites:
        return list(outcomes)
    federated = federated_scores(cfg, state, sites)
    out = []
    for o in outcomes:
        if o.scores and o.site in federated:
            labels, scores = federated[o.site]
            d = auc_difference(labels, scores, np.asarray(o.scores))
            o = dataclasses.replace(o, diff=d.value, diff_se=d.se)
        out.append(o)
    return out


# -- the classical reference ---------------------------------------------------------------------

#: Inverse regularization strengths of the logistic regression; each model keeps the one with the
#: lowest loss on its validation rows, as the language-model baselines keep their best epoch.
TFIDF_C_GRID = (0.1, 1.0, 10.0)


@dataclass(frozen=True)
class TextRows:
    texts: list[str]
    labels: np.ndarray

    @staticmethod
    def of(sites: Sequence[tuple[SiteData, np.ndarray]]) -> TextRows:
        """The rows ``idx`` of each ``(site, idx)``, in that order."""
        parts = [site.subset(idx) for site, idx in sites]
        return TextRows(
            [t for texts, _ in parts for t in texts],
            np.concatenate([labels for _, labels in parts]),
        )

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TfidfModel:
    vectorizer: Any  # sklearn TfidfVectorizer, fitted
    classifier: Any  # sklearn LogisticRegression, fitted
    c: float  # the C chosen from TFIDF_C_GRID

    def scores(self, texts: list[str]) -> np.ndarray:
        """P(label 1) of each text."""
        return np.asarray(self.classifier.predict_proba(self.vectorizer.transform(texts))[:, 1])


def fit_tfidf(train: TextRows, val: TextRows, seed: int) -> TfidfModel:
    """TF-IDF of word 1-2 grams (sublinear tf) + class-balanced logistic regression, fitted on
    ``train``; C from :data:`TFIDF_C_GRID` by class-balanced log loss on ``val`` (ties: the
    smaller C). Deterministic: lbfgs has no randomness, and ``seed`` is passed all the same."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.utils.class_weight import compute_sample_weight

    # Single-character tokens kept (sklearn drops them by default): notes carry counts and codes
    # as single digits ("0 vessels", "slope 2"), and bigrams join them to their word.
    vectorizer = TfidfVectorizer(
        ngram_range=(1, 2), sublinear_tf=True, min_df=1, token_pattern=r"(?u)\b\w+\b"
    )
    x_train = vectorizer.fit_transform(train.texts)
    x_val = vectorizer.transform(val.texts)
    # Weighted as the training loss is (class_weight="balanced"), so a rare class counts.
    weights = compute_sample_weight("balanced", val.labels)
    best: tuple[float, TfidfModel] | None = None
    for c in TFIDF_C_GRID:
        classifier = LogisticRegression(
            C=c, max_iter=1000, class_weight="balanced", random_state=seed
        )
        classifier.fit(x_train, train.labels)
        loss = log_loss(
            val.labels, classifier.predict_proba(x_val)[:, 1], labels=[0, 1], sample_weight=weights
        )
        if best is None or loss < best[0]:
            best = (loss, TfidfModel(vectorizer, classifier, c))
    assert best is not None
    return best[1]


def tfidf_baselines(
    sites: Sequence[SiteData], splits: Mapping[str, SiteSplit], seed: int
) -> list[BaselineOutcome]:
    """``tfidf-alone`` (a model per site, on its training rows) and ``tfidf-pooled`` (one model on
    every site's training rows), each scored on every site's test rows of ``splits``; the pooled
    model also on all test rows together (site :data:`ALL_TEST_ROWS`)."""
    outcomes: list[BaselineOutcome] = []
    for site in sites:
        started = time.perf_counter()
        split = splits[site.name]
        model = fit_tfidf(
            TextRows.of([(site, split.train)]), TextRows.of([(site, split.val)]), seed
        )
        test = TextRows.of([(site, split.test)])
        value, bad = _judged(test, model)
        outcomes.append(
            BaselineOutcome(
                "tfidf-alone",
                site.name,
                len(split.train),
                len(test),
                value,
                time.perf_counter() - started,
                f"C {model.c:g}",
                degenerate=bad,
            )
        )
    started = time.perf_counter()
    train = TextRows.of([(s, splits[s.name].train) for s in sites])
    model = fit_tfidf(train, TextRows.of([(s, splits[s.name].val) for s in sites]), seed)
    tests = {s.name: TextRows.of([(s, splits[s.name].test)]) for s in sites}
    tests[ALL_TEST_ROWS] = TextRows.of([(s, splits[s.name].test) for s in sites])
    judged = {name: _judged(rows, model) for name, rows in tests.items()}
    seconds = time.perf_counter() - started
    for name, rows in tests.items():
        value, bad = judged[name]
        outcomes.append(
            BaselineOutcome(
                "tfidf-pooled",
                name,
                len(train),
                len(rows),
                value,
                seconds,
                f"C {model.c:g}",
                degenerate=bad,
            )
        )
    return outcomes


def _judged(rows: TextRows, model: TfidfModel) -> tuple[float, bool]:
    """The model's AUC on ``rows``, and whether it is degenerate there."""
    scores = model.scores(rows.texts)
    value = auc(rows.labels, scores)
    return value, degenerate(value, *score_histograms(rows.labels, scores))


def run_tfidf(cfg: RunConfig) -> list[BaselineOutcome]:
    """:func:`tfidf_baselines` on the run's sites, split as the federated run splits them."""
    sites = load_sites(cfg.data)
    splits = {
        s.name: split_site(s, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction)
        for s in sites
    }
    return tfidf_baselines(sites, splits, cfg.seed)


def _tfidf_line(done: list[BaselineOutcome]) -> str:
    if done[0].kind == "tfidf-alone":  # a model per site: its own time and C
        seconds = sum(o.seconds for o in done)
        aucs = ", ".join(f"{o.site} {o.auc:.3f} ({o.detail})" for o in done)
        return f"baseline tfidf-alone (each site) done in {seconds:.1f} s: AUC {aucs}"
    aucs = ", ".join(f"{o.site or 'all test rows'} {o.auc:.3f}" for o in done)
    return (
        f"baseline tfidf-pooled (all sites, {done[0].detail}) done in {done[0].seconds:.1f} s: "
        f"AUC {aucs}"
    )


# -- all of them ---------------------------------------------------------------------------------

#: What ``fedpeft simulate --baselines all`` trains: "tfidf" is both tfidf-alone and tfidf-pooled.
BASELINE_KINDS = ("tfidf", "centralized", "alone")


def run_baselines(
    cfg: RunConfig,
    workers: int = 2,
    progress: Callable[[str], None] = print,
    kinds: tuple[str, ...] = BASELINE_KINDS,
) -> list[BaselineOutcome]:
    """The baselines of ``kinds``: TF-IDF in this process (seconds), then alone for every site
    and/or centralized spread over ``workers`` single-thread processes, each choosing its rate
    from the grid: by its whole runs, or by probes (``tuning.probe_epochs``) and then one whole
    run at the chosen rate, started as soon as that model's probes are in."""
    outcomes: list[BaselineOutcome] = []
    if "tfidf" in kinds:
        tfidf = run_tfidf(cfg)
        outcomes += tfidf
        progress(_tfidf_line([o for o in tfidf if o.kind == "tfidf-alone"]))
        progress(_tfidf_line([o for o in tfidf if o.kind == "tfidf-pooled"]))
    names = tuple(s.name for s in load_sites(cfg.data))
    # Largest first, so the centralized models do not start last and leave a core idle.
    groups = [("centralized", names)] if "centralized" in kinds else []
    if "alone" in kinds:
        groups += [("alone", (n,)) for n in names]
    if not groups:
        return outcomes
    grid = cfg.tuning.lr_grid
    probe = probes_used(cfg.tuning.probe_epochs, len(grid), budget(cfg)[0])
    trained: dict[tuple[str, tuple[str, ...]], list[list[BaselineOutcome]]] = {
        g: [] for g in groups
    }
    probed: dict[tuple[str, tuple[str, ...]], list[BaselineOutcome]] = {g: [] for g in groups}
    # A process pool that fails loudly (BrokenProcessPool) if a worker dies, instead of hanging.
    with ProcessPoolExecutor(
        max_workers=min(workers, len(groups) * len(grid)),
        mp_context=multiprocessing.get_context("spawn"),
    ) as pool:
        running: dict[Future[Any], BaselineTask] = {}

        def submit(task: BaselineTask) -> None:
            running[pool.submit(run_probe if task.probe else run_task, cfg, task)] = task

        for kind, sites in groups:
            for lr in grid:
                submit(BaselineTask(kind, sites, lr, probe))
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                group = (task.kind, task.sites)
                what = _what(task.sites, task.kind)
                if task.probe:
                    first = future.result()
                    probed[group].append(first)
                    progress(
                        f"baseline {task.kind} ({what}) at lr {task.lr:g}, first {task.probe} "
                        f"epochs, done in {first.seconds:.0f} s: validation loss "
                        f"{first.val_loss:.4f}"
                    )
                    if len(probed[group]) == len(grid):
                        best = min(probed[group], key=lambda o: rate_rank(o.val_loss, o.lr or 0))
                        progress(
                            f"baseline {task.kind} ({what}): lr {best.lr:g} chosen by validation "
                            f"loss after {task.probe} epochs; it now trains the whole budget"
                        )
                        submit(BaselineTask(task.kind, task.sites, best.lr or 0.0))
                    continue
                result = future.result()
                trained[group].append(result)
                progress(
                    f"baseline {task.kind} ({what}) at lr {task.lr:g} done in "
                    f"{result[0].seconds:.0f} s: validation loss {result[0].val_loss:.4f}"
                )
    for (kind, sites), results in trained.items():
        chosen = choose_rate(results)
        # What choosing cost: every probe's time as well as the whole runs'.
        spent = chosen[0].seconds + sum(o.seconds for o in probed[(kind, sites)])
        outcomes.extend(dataclasses.replace(o, seconds=spent) for o in chosen)
        how = f"after {probe} epochs " if probe else ""
        tried = probed[(kind, sites)] or [r[0] for r in results]
        losses = ", ".join(f"{o.lr:g} {o.val_loss:.4f}" for o in sorted(tried, key=_larger_first))
        aucs = ", ".join(f"{o.site} {o.auc:.3f}" for o in chosen)
        progress(
            f"baseline {kind} ({_what(sites, kind)}): lr {chosen[0].lr:g} chosen by validation "
            f"loss {how}({losses}); test AUC {aucs}"
        )
    return outcomes


def _what(sites: tuple[str, ...], kind: str) -> str:
    return sites[0] if kind == "alone" else "all sites"


def _larger_first(outcome: BaselineOutcome) -> float:
    return -(outcome.lr or 0.0)


def rate_rank(val_loss: float | None, lr: float) -> tuple[float, float]:
    """How a grid's rates rank, best first, for every mode alike: the lowest validation loss
    (none recorded ranks last), ties to the larger rate."""
    return (math.inf if val_loss is None else val_loss, -lr)


def choose_rate(results: list[list[BaselineOutcome]]) -> list[BaselineOutcome]:
    """Of one baseline's models (one per rate; each a list of outcomes, one per test site), the
    one :func:`rate_rank` puts first (never a test-row number), its ``seconds`` the whole
    grid's: what choosing the rate cost."""
    best = min(results, key=lambda r: rate_rank(r[0].val_loss, r[0].lr or 0.0))
    total = sum(r[0].seconds for r in results)
    return [dataclasses.replace(o, seconds=total) for o in best]
