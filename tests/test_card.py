"""The model card with its lineage (fedpeft/card.py), over runs recorded in a real store: what it
says against what the store holds, its Hugging Face metadata, and `fedpeft report --format`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from recorded_runs import DATA, add_round, config, create, record_runs

from fedpeft.card import build_card, hub_id, to_html, to_json, to_markdown
from fedpeft.cli import main
from fedpeft.common.keys import AUC_HIGH, AUC_LOW, EPOCHS_RUN
from fedpeft.common.model import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_NAME
from fedpeft.server.store import RunStore, SiteResult, open_store


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    s = open_store(url)
    record_runs(s)
    s.close()
    return url


@pytest.fixture
def store(db: str) -> Iterator[RunStore]:
    s = open_store(db, create=False)
    yield s
    s.close()


def test_the_lineage_names_who_made_each_round_and_who_was_refused(store: RunStore) -> None:
    card = build_card(store, 1)
    assert card["run"]["delivered_round"] == card["run"]["described_round"] == 2
    assert [(r["round"], r["contributed"]) for r in card["lineage"]] == [
        (1, ["Cleveland", "Hungary"]),
        (2, ["Cleveland"]),  # Hungary's round-2 update was refused
    ]
    assert card["lineage"][1]["refused"] == [
        {"site": "Hungary", "status": "rejected", "reason": "update norm 91.2 above 50"}
    ]
    # Each site's data fingerprint, as it stated it; its numbers at the described round.
    assert {s: v["data_fingerprints"] for s, v in card["sites"].items()} == {
        s: [f] for s, f in DATA.items()
    }
    assert card["sites"]["Hungary"]["auc"] == 0.86
    assert card["sites"]["Hungary"]["auc_interval"] == [0.78, 0.93]
    assert card["sites"]["Cleveland"]["alone_auc"] == 0.7
    assert card["metrics"]["pooled_auc"] == 0.78
    assert card["metrics"]["macro_auc"] == pytest.approx(0.83)
    assert card["metrics"]["alone_macro_auc"] == pytest.approx(0.73)
    assert card["privacy"]["secure_aggregation"] is False
    # The config's hash is the one a site's ledger and approvals name the run by.
    assert re.fullmatch(r"[0-9a-f]{64}", card["site_config_sha256"])
    assert set(card["software"]) >= {"python", "fedpeft", "torch", "transformers", "peft", "flwr"}


def test_a_card_of_an_earlier_round_describes_that_round(store: RunStore) -> None:
    card = build_card(store, 1, round=1)
    assert card["run"]["described_round"] == 1 and card["run"]["delivered_round"] == 2
    assert card["metrics"]["pooled_auc"] == 0.7
    assert card["sites"]["Hungary"]["auc"] == 0.81
    with pytest.raises(Exception, match="no round 7"):
        build_card(store, 1, round=7)


def test_the_markdown_card_has_hugging_face_metadata(store: RunStore) -> None:
    text = to_markdown(build_card(store, 1))
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["pipeline_tag"] == "text-classification"
    assert "federated-learning" in meta["tags"] and "lora" in meta["tags"]
    [result] = meta["model-index"][0]["results"]
    assert {m["name"]: m["value"] for m in result["metrics"]} == {
        "pooled AUC (every site's test rows)": 0.78,
        "macro AUC (mean over sites)": pytest.approx(0.83),
    }
    # A model with no hub id to give has no base_model line (this store's is a local name).
    assert "base_model" not in meta
    assert "| 2 | Cleveland | Hungary (rejected: update norm 91.2 above 50) | yes | 0.780 |" in text
    assert DATA["Hungary"] in text


def test_the_packaged_default_model_is_named_by_its_hub_id(tmp_path: Path) -> None:
    assert hub_id(DEFAULT_MODEL_NAME) == DEFAULT_MODEL_HUB_ID
    assert hub_id("bert-base-uncased") is None
    assert hub_id("emilyalsentzer/Bio_ClinicalBERT") == "emilyalsentzer/Bio_ClinicalBERT"
    local = tmp_path / "models" / "mine"
    local.mkdir(parents=True)
    assert hub_id(str(local)) is None


def test_a_run_ended_by_its_patience_says_so(store: RunStore) -> None:
    """A finished run with fewer rounds than its most says why: on the card (each format) and
    in the report; a run that ran every round, or one still running, says nothing of it."""
    from fedpeft.report import render_table, summarize

    run = create(store, rounds=5, lr=5e-3, patience=2)
    for n in (1, 2, 3):
        add_round(store, run, n, 0.7, {"Cleveland": 0.7, "Hungary": 0.8})
    why = "ended early: no lower validation loss in 2 rounds (federation.patience)"
    running = build_card(store, run)
    assert running["run"]["ended_early"] == "" and why not in to_markdown(running)
    store.finish_run(run, status="finished", wall_seconds=1.0)
    card = build_card(store, run)
    assert f"3 recorded of 5 planned ({why})" in to_markdown(card)
    assert f"3 recorded of 5 ({why})" in to_html(card)
    assert f"3 rounds of at most 5 ({why})" in render_table(summarize(store, run))
    every = build_card(store, 1)  # 2 of 2 rounds, no patience
    assert every["run"]["ended_early"] == "" and "ended early" not in to_markdown(every)
    assert "ended early" not in render_table(summarize(store, 1))
    # With a privacy budget as well, either may have ended it.
    from fedpeft.report import early_stop

    cfg = json.loads(config(5, 5e-3, patience=2))
    cfg["federation"]["dp"]["target_epsilon"] = 3.0
    both = early_stop(json.dumps(cfg), 3, "finished")
    assert both == f"{why} or the privacy budget (federation.dp.target_epsilon)"


def test_json_and_html_say_the_same(store: RunStore) -> None:
    card = build_card(store, 1)
    assert json.loads(to_json(card)) == card
    html = to_html(card)
    assert re.search(r'<tr data-round="2">.*?class="contributed">Cleveland<', html, re.S)
    assert f"<code>{DATA['Cleveland']}</code>" in html
    assert 'id="described-round">2<' in html


def test_report_prints_the_card_in_each_format(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--db", db, "--run", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["lineage"][0]["contributed"] == [
        "Cleveland",
        "Hungary",
    ]
    assert main(["report", "--db", db, "--run", "1", "--format", "md"]) == 0
    assert "## Lineage: who contributed to each round" in capsys.readouterr().out
    assert main(["report", "--db", db, "--run", "1", "--format", "html"]) == 0
    assert "<h2>Lineage</h2>" in capsys.readouterr().out
    assert main(["report", "--db", db, "--run", "1"]) == 0  # the table, as before
    assert "federated AUC" in capsys.readouterr().out


def test_a_personalized_run_s_card_shows_each_site_s_own_model_beside_the_global_one(
    store: RunStore,
) -> None:
    run = create(store, rounds=2, lr=5e-3, personalize="lora-b")
    add_round(store, run, 1, 0.66, {"Cleveland": 0.61, "Hungary": 0.74})
    add_round(store, run, 2, 0.70, {"Cleveland": 0.72, "Hungary": 0.81})  # delivered
    store.add_site_results(
        run,
        [
            SiteResult(
                2, "Cleveland", "personalize", "ok", n=40, auc=0.79,
                extra={AUC_LOW: 0.70, AUC_HIGH: 0.88, EPOCHS_RUN: 3},
            ),
            SiteResult(2, "Hungary", "personalize", "ok", n=40, auc=0.81, extra={EPOCHS_RUN: 0}),
        ],
    )  # fmt: skip
    card = build_card(store, run)
    assert card["metrics"]["personalized_part"] == "lora-b"
    assert card["sites"]["Cleveland"]["personalized"] == {
        "auc": 0.79,
        "auc_interval": [0.70, 0.88],
        "epochs": 3,
    }
    assert card["sites"]["Hungary"]["personalized"]["epochs"] == 0  # it kept the global part
    md = to_markdown(card)
    assert "## Personalization (not part of this model)" in md
    assert "| Cleveland | 0.720 | 0.790 [0.700, 0.880] | 3 |" in md
    assert "| Hungary | 0.810 | 0.810 (kept global) | 0 |" in md
    html = to_html(card)
    assert re.search(r'id="card-personalized".*?class="n personalized">0.790<', html, re.S)
    # An earlier round's card shows none: only the delivered round's state was personalized.
    earlier = build_card(store, run, round=1)
    assert earlier["metrics"]["personalized_part"] is None
    assert "personalized" not in earlier["sites"]["Cleveland"]
    assert "Personalization" not in to_markdown(earlier) and "card-personalized" not in to_html(
        earlier
    )
