"""The baselines: alone and centralized trained for real on a tiny two-site folder (slow), and
the TF-IDF reference on synthetic sites whose text decides the label (fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from site_files import write_heart_sites

from fedpeft.baselines import (
    BaselineOutcome,
    budget,
    choose_rate,
    federated_scores,
    run_baselines,
    run_tfidf,
    with_differences,
)
from fedpeft.common.config import RunConfig, load_config
from fedpeft.common.data import SiteData, load_sites, split_site
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.metrics import auc
from fedpeft.server.store import ALL_TEST_ROWS


@pytest.mark.slow
def test_alone_and_centralized_cover_every_site(tmp_path: Path) -> None:
    write_heart_sites(tmp_path, ("a", "b"), rows=40)
    cfg = load_config(
        overrides={
            "data.dataset": str(tmp_path),
            "federation.rounds": 1,
            "model.max_length": 48,
            "device": "cpu",
            "tuning.lr_grid": [5e-3, 1e-3],
        }
    )
    lines: list[str] = []
    outcomes = run_baselines(cfg, workers=2, progress=lines.append, kinds=("centralized", "alone"))
    got = {(o.kind, o.site): o for o in outcomes}
    assert set(got) == {("alone", "a"), ("alone", "b"), ("centralized", "a"), ("centralized", "b")}
    assert (
        got[("centralized", "a")].n_train
        == got[("alone", "a")].n_train + got[("alone", "b")].n_train
    )
    assert got[("alone", "a")].n_test == got[("centralized", "a")].n_test == 12
    assert all(0.0 <= o.auc <= 1.0 for o in outcomes)
    # Each model trained at both rates (a line each), then one was chosen (a line each).
    assert sum(" at lr " in line for line in lines) == 6
    chosen = [line for line in lines if "chosen by validation loss" in line]
    assert len(chosen) == 3 and any("centralized (all sites)" in line for line in chosen)
    assert all(o.lr in (5e-3, 1e-3) and np.isfinite(o.val_loss) for o in outcomes)
    # One centralized model: one rate at every site.
    assert got[("centralized", "a")].lr == got[("centralized", "b")].lr

    # Paired with a "federated" model (here an untrained one): each difference is that model's
    # AUC minus the baseline's on the same rows, which the baseline's own scores give.
    model = build_model(cfg.model, cfg.method, cfg.train.dropout, seed=11)
    state = shared_state(model)
    federated = federated_scores(cfg, state, ["a", "b"])
    compared = with_differences(cfg, state, outcomes)
    for o in compared:
        labels, scores = federated[o.site]
        assert len(o.scores) == len(labels) == o.n_test
        assert auc(labels, np.asarray(o.scores)) == pytest.approx(o.auc)
        assert o.diff == pytest.approx(auc(labels, scores) - o.auc)
        assert o.diff_se is not None and o.diff_se > 0


@pytest.mark.slow
def test_probes_choose_the_rate_and_only_it_trains_the_whole_budget(tmp_path: Path) -> None:
    write_heart_sites(tmp_path, ("a", "b"), rows=40)

    def cfg_with(**tuning: object) -> RunConfig:
        return load_config(
            overrides={
                "data.dataset": str(tmp_path),
                "federation.rounds": 3,
                "model.max_length": 48,
                "device": "cpu",
                **{f"tuning.{k}": v for k, v in tuning.items()},
            }
        )

    cfg = cfg_with(lr_grid=[5e-3, 5e-4], probe_epochs=1)
    lines: list[str] = []
    outcomes = run_baselines(cfg, workers=2, progress=lines.append, kinds=("centralized",))
    probes = [line for line in lines if "first 1 epochs" in line]
    assert len(probes) == 2  # one probe per rate
    losses = {float(line.split(" at lr ")[1].split(",")[0]): float(line.rsplit(" ", 1)[1])
              for line in probes}  # fmt: skip
    best = min(losses, key=lambda lr: (losses[lr], -lr))
    assert any(f"lr {best:g} chosen by validation loss after 1 epochs" in line for line in lines)
    # Only the chosen rate trained the whole budget: one whole-run line, at that rate.
    whole = [line for line in lines if " done in " in line and "first" not in line]
    assert len(whole) == 1 and f"at lr {best:g} done" in whole[0]
    assert {o.lr for o in outcomes} == {best}

    # The chosen model is exactly the one that rate trains without any probing: the probe
    # changed which rate was chosen, never how the chosen model trained.
    alone_rate = run_baselines(
        cfg_with(lr_grid=[best]), workers=1, progress=lambda _: None, kinds=("centralized",)
    )
    assert [(o.site, o.auc, o.val_loss, o.scores) for o in outcomes] == [
        (o.site, o.auc, o.val_loss, o.scores) for o in alone_rate
    ]
    # A probe is the start of its rate's whole run: after one epoch of three it has no lower
    # validation loss than the whole run's best.
    assert losses[best] >= outcomes[0].val_loss


def _outcome(lr: float, val_loss: float, seconds: float, site: str = "a") -> BaselineOutcome:
    return BaselineOutcome("alone", site, 10, 5, 0.7, seconds, lr=lr, val_loss=val_loss)


def test_a_baseline_keeps_the_rate_with_the_lowest_validation_loss() -> None:
    grid = [[_outcome(5e-3, 0.52, 10.0)], [_outcome(1e-3, 0.41, 11.0)], [_outcome(5e-4, 0.47, 9.0)]]
    (chosen,) = choose_rate(grid)
    assert chosen.lr == 1e-3 and chosen.val_loss == 0.41
    assert chosen.seconds == 30.0  # the grid's cost, not the one model's
    # A tie keeps the larger rate, whatever order the models finished in.
    tie = [[_outcome(1e-3, 0.41, 1.0)], [_outcome(5e-3, 0.41, 1.0)]]
    assert choose_rate(tie)[0].lr == 5e-3
    # A model whose validation loss never became finite (it diverged) is never chosen.
    diverged = [[_outcome(5e-3, float("inf"), 1.0)], [_outcome(5e-4, 0.9, 1.0)]]
    assert choose_rate(diverged)[0].lr == 5e-4
    # One model covering two sites: both its outcomes come back, at its rate.
    two = [
        [_outcome(5e-3, 0.3, 1.0, "a"), _outcome(5e-3, 0.3, 1.0, "b")],
        [_outcome(1e-3, 0.2, 1.0, "a"), _outcome(1e-3, 0.2, 1.0, "b")],
    ]
    assert [(o.site, o.lr) for o in choose_rate(two)] == [("a", 1e-3), ("b", 1e-3)]


# -- TF-IDF + logistic regression ------------------------------------------------------------

FILLER = ("patient", "seen", "today", "history", "of", "smoking", "mild", "cough", "no", "fever")


def _note(rng: np.random.Generator, positive: bool) -> str:
    """Filler words in random order and one word that gives the label away."""
    words = list(rng.choice(FILLER, size=6))
    words.insert(int(rng.integers(0, 7)), "elevated" if positive else "unremarkable")
    return " ".join(words)


def _tfidf_config(folder: Path, seed: int = 3) -> RunConfig:
    return load_config(overrides={"data.dataset": str(folder), "seed": seed})


def _write_sites(
    folder: Path, sizes: dict[str, int], flip_test_of: RunConfig | None = None
) -> None:
    """One CSV per site, about a third positive. With ``flip_test_of``, the rows that run's split
    puts in test get the other label's word (the split depends on the labels and seed alone)."""
    rng = np.random.default_rng(0)
    for name, n in sizes.items():
        labels = (rng.random(n) < 0.35).astype(np.int64)
        labels[:2] = (0, 1)  # both classes, whatever the draw
        flipped = np.zeros(n, dtype=bool)
        if flip_test_of is not None:
            cfg, site = flip_test_of, SiteData(name, ("x",) * n, labels)
            split = split_site(site, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction)
            flipped[split.test] = True
        texts = [_note(rng, bool(y) != f) for y, f in zip(labels, flipped, strict=True)]
        pd.DataFrame({"text": texts, "label": labels}).to_csv(folder / f"{name}.csv", index=False)


def _by(outcomes: list[BaselineOutcome]) -> dict[tuple[str, str], BaselineOutcome]:
    return {(o.kind, o.site): o for o in outcomes}


def test_tfidf_learns_a_label_the_text_decides_alone_and_pooled(tmp_path: Path) -> None:
    sizes = {"a": 80, "b": 60, "c": 50}
    _write_sites(tmp_path, sizes)
    cfg = _tfidf_config(tmp_path)
    outcomes = run_tfidf(cfg)
    got = _by(outcomes)
    expected = {(k, s) for k in ("tfidf-alone", "tfidf-pooled") for s in sizes}
    assert set(got) == expected | {("tfidf-pooled", ALL_TEST_ROWS)}
    assert all(o.auc > 0.9 for o in outcomes), [(o.kind, o.site, o.auc) for o in outcomes]
    # Deterministic: the same config gives the same numbers and the same choice of C.
    again = _by(run_tfidf(cfg))
    assert {k: (o.auc, o.detail) for k, o in got.items()} == {
        k: (o.auc, o.detail) for k, o in again.items()
    }


def test_tfidf_trains_and_scores_exactly_the_rows_the_split_gives(tmp_path: Path) -> None:
    """The test rows carry the other label's word: a model trained on the split's training rows
    and scored on its test rows ranks them backwards (AUC near 0). Scored on any other rows, or
    trained with the test rows in, it would not."""
    cfg = _tfidf_config(tmp_path)
    _write_sites(tmp_path, {"a": 80, "b": 60}, flip_test_of=cfg)
    sites = load_sites(cfg.data)
    splits = {
        s.name: split_site(s, cfg.seed, cfg.data.test_fraction, cfg.train.val_fraction)
        for s in sites
    }
    got = _by(run_tfidf(cfg))
    for s in sites:
        alone, pooled = got[("tfidf-alone", s.name)], got[("tfidf-pooled", s.name)]
        assert alone.auc < 0.1 and pooled.auc < 0.1
        assert alone.n_train == len(splits[s.name].train)
        assert alone.n_test == pooled.n_test == len(splits[s.name].test)
        assert pooled.n_train == sum(len(sp.train) for sp in splits.values())
    everything = got[("tfidf-pooled", ALL_TEST_ROWS)]
    assert everything.n_test == sum(len(sp.test) for sp in splits.values())
    assert everything.auc < 0.1


def test_tfidf_alone_starts_no_language_model(tmp_path: Path) -> None:
    _write_sites(tmp_path, {"a": 40, "b": 40})
    lines: list[str] = []
    outcomes = run_baselines(_tfidf_config(tmp_path), progress=lines.append, kinds=("tfidf",))
    assert {o.kind for o in outcomes} == {"tfidf-alone", "tfidf-pooled"}
    assert len(lines) == 2
    assert lines[0].startswith("baseline tfidf-alone (each site)") and "a " in lines[0]
    assert (
        lines[1].startswith("baseline tfidf-pooled (all sites, C ") and "all test rows" in lines[1]
    )


def test_a_baseline_has_the_run_s_budget_and_stopping_rule() -> None:
    cfg = load_config(
        overrides={"federation.rounds": 6, "train.local_epochs": 2, "federation.patience": 0}
    )
    assert budget(cfg) == (12, 12)  # the run stops never early: neither does the baseline
    stops = load_config(
        overrides={"federation.rounds": 6, "train.local_epochs": 2, "federation.patience": 2}
    )
    assert budget(stops) == (12, 4)  # two rounds without a better loss = four epochs
