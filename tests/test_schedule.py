"""Staged runs (``[[schedule]]``): each stage trains a part of the shared parameters at its own
rate for some rounds, and the next starts where it ended."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_client import RUN_KEY, SITE_KEY, _message, _setup, _site_file, _state
from test_client import task_identity as task_identity  # the autouse fixture, here too

from fedpeft.client.app import handle, stage_trains
from fedpeft.common import keys
from fedpeft.common.config import (
    RunConfig,
    SiteRunConfig,
    Stage,
    build_config,
    load_config,
    stage_of,
)
from fedpeft.common.envelope import Expected, open_delta
from fedpeft.common.errors import ConfigError, FedpeftError
from fedpeft.common.methods import build_model
from fedpeft.common.model import model_fingerprint, resolve_model_path
from fedpeft.common.records import from_blob_record
from fedpeft.report import stage_lines

HEAD = "classifier."


def test_a_schedule_sets_the_rounds_and_each_stages_rate() -> None:
    cfg = build_config({"schedule": [{"rounds": 2, "lr": 0.01, "trains": "head"}, {"rounds": 3}]})
    assert cfg.federation.rounds == 5
    assert cfg.schedule == (Stage(2, 0.01, "head"), Stage(3, cfg.train.lr, "all"))
    site = cfg.for_sites()
    assert SiteRunConfig.from_json(site.to_json()) == site
    assert [site.stage(r).trains for r in range(1, 6)] == ["head"] * 2 + ["all"] * 3
    assert site.stage(2).lr == 0.01 and site.stage(3).lr == cfg.train.lr
    plain = load_config().for_sites()
    assert plain.stage(4) == Stage(4, plain.train.lr, "all")  # no schedule: one stage
    assert stage_of((Stage(1, 0.1, "head"),), 2, 0.5) == Stage(2, 0.5, "all")
    assert stage_lines(cfg.to_json()) == [
        "rounds 1-2: head at lr 0.01",
        "rounds 3-5: all at lr 0.005",
    ]
    assert stage_lines(load_config().to_json()) == []


def test_a_bad_schedule_names_each_problem() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(
            {
                "schedule": [{"rounds": 0, "lr": 2.0, "trains": "lora"}, {"rounds": 1}],
                "federation": {"patience": 2},
            }
        )
    text = str(err.value)
    for part in (
        "schedule[0].rounds: must be at least 1",
        "schedule[0].lr: must be in [0, 1)",
        "schedule[0].trains: 'lora' is not one of all, head, method",
        "schedule: not with federation.patience",
    ):
        assert part in text, text
    with pytest.raises(ConfigError, match=r"schedule\[1\].rounds: expected int"):
        build_config({"schedule": [{"rounds": 1}, {"rounds": "two"}]})
    with pytest.raises(ConfigError, match="schedule: expected a list of tables"):
        build_config({"schedule": [3]})
    # A site's signed config must add up: its stages are the run's rounds.
    values = json.loads(build_config({"schedule": [{"rounds": 2}]}).for_sites().to_json())
    values["rounds"] = 3
    with pytest.raises(ConfigError, match="its stages' rounds add up to 2, the run has 3"):
        SiteRunConfig.from_json(json.dumps(values))


def test_a_stage_leaves_only_its_part_to_train() -> None:
    cfg = load_config()

    def trained(trains: str) -> set[str]:
        model = build_model(cfg.model, cfg.method, 0.0, 0)
        stage_trains(model, trains)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    everything, head, method = trained("all"), trained("head"), trained("method")
    assert head and method and head | method == everything and not head & method
    assert all(HEAD in n for n in head) and not any(HEAD in n for n in method)
    assert all(".lora_" in n for n in method)
    model = build_model(cfg.model, cfg.method, 0.0, 0)
    for name, param in model.named_parameters():
        if HEAD in name:
            param.requires_grad_(False)
    with pytest.raises(FedpeftError, match="leaves nothing to train"):
        stage_trains(model, "head")


def _delta(cfg: RunConfig, tmp_path: Path, rnd: int) -> dict[str, np.ndarray]:
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = handle(_message(cfg, fp, rnd=rnd), _setup(_site_file(tmp_path)))
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok", reply.content[keys.CONFIG]
    shapes = {k: v.shape for k, v in _state(cfg).items()}
    sealed = from_blob_record(reply.content[keys.SEALED])
    expected = Expected("run-token", rnd, "lora", fp, shapes, 1 << 22)
    return open_delta(sealed, expected, RUN_KEY, {"site-x": SITE_KEY.public_key()}).delta


def test_a_site_trains_the_stage_of_the_round(tmp_path: Path, cfg: RunConfig) -> None:
    """Round 1 of head:1 then method:1 moves only the head, round 2 only LoRA; the delta keeps
    the run's names and shapes, zero where the stage did not train."""
    staged = build_config(
        {
            **json.loads(cfg.to_json()),
            "schedule": [
                {"rounds": 1, "lr": 0.05, "trains": "head"},
                {"rounds": 1, "trains": "method"},
            ],
        }
    )
    first, second = _delta(staged, tmp_path, 1), _delta(staged, tmp_path, 2)
    assert set(first) == set(second) == set(_state(staged))
    moved = {name for name, v in first.items() if np.abs(v).max() > 0}
    assert moved and all(HEAD in n for n in moved)
    moved = {name for name, v in second.items() if np.abs(v).max() > 0}
    assert moved and not any(HEAD in n for n in moved)


def test_the_cli_reads_stages() -> None:
    from fedpeft.cli import _overrides, parser

    args = parser().parse_args(["simulate", "--schedule", "head:2:0.01", "all:5"])
    cfg = load_config(overrides=_overrides(args))
    assert cfg.federation.rounds == 7 and cfg.schedule[0] == Stage(2, 0.01, "head")
    with pytest.raises(SystemExit):
        parser().parse_args(["simulate", "--schedule", "head-2"])


@pytest.mark.slow
def test_a_staged_run_in_simulation(tmp_path: Path) -> None:
    """Two stages in Flower's simulation: both rounds take every site and apply, and the
    report names the stages."""
    from site_files import write_heart_sites

    from fedpeft.report import render_table, summarize
    from fedpeft.server.store import open_store
    from fedpeft.simulate import run_simulation

    sites = write_heart_sites(tmp_path / "sites", ("a-cleveland", "b-hungary"), 60)
    db = f"sqlite:///{tmp_path / 'run.db'}"
    cfg = load_config(
        overrides={
            "data.dataset": str(sites),
            "db": db,
            "model.max_length": 64,
            "seed": 1,
            "device": "cpu",
            "schedule": [{"rounds": 1, "lr": 0.01, "trains": "head"}, {"rounds": 1}],
        }
    )
    result = run_simulation(cfg, cpus=2, progress=lambda _: None)
    store = open_store(db)
    try:
        rounds = store.rounds(result.run_id)
        assert [r.round for r in rounds] == [1, 2]
        assert all(r.accepted == 2 and r.applied for r in rounds)
        text = render_table(summarize(store, result.run_id))
    finally:
        store.close()
    assert "round 1: head at lr 0.01; round 2: all at lr 0.005" in text
