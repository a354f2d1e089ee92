"""Staged runs (``[[schedule]]``): each stage trains a part of the shared parameters at its own
rate for some rounds, and the next starts where it ended."""

from __future__ import annotations

import dataclasses
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
from fedpeft.common.methods.compose import MARKERS
from fedpeft.common.model import model_fingerprint, resolve_model_path
from fedpeft.common.records import from_blob_record
from fedpeft.report import stage_lines

HEAD = "classifier."


def test_a_schedule_sets_the_rounds_and_each_stages_rate() -> None:
    cfg = build_config({"schedule": [{"rounds": 2, "lr": 0.01, "trains": "head"}, {"rounds": 3}]})
    assert cfg.federation.rounds == 5
    lr = cfg.train.lr
    assert cfg.schedule == (Stage(2, 0.01, "head", "lora"), Stage(3, lr, "all", "lora"))
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
        "schedule[0].trains: 'lora' is not one of all, head, method, mlm",
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
    assert cfg.federation.rounds == 7 and cfg.schedule[0] == Stage(2, 0.01, "head", "lora")
    with pytest.raises(SystemExit):
        parser().parse_args(["simulate", "--schedule", "head-2"])
    args = parser().parse_args(["simulate", "--method", "lora", "--schedule", "prompt:3", "lora:5"])
    cfg = load_config(overrides=_overrides(args))
    assert cfg.method.compose == ("prompt",) and cfg.schedule[0].lr == 3e-2


def test_tune_lr_is_refused_with_a_schedule(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedpeft.cli import main

    toml = tmp_path / "run.toml"
    toml.write_text("[[schedule]]\nrounds = 1\ntrains = 'head'\n[[schedule]]\nrounds = 2\n")
    for flags in (["--schedule", "head:1", "all:1"], ["--config", str(toml)]):
        assert main(["simulate", "--tune-lr", *flags]) == 2
        assert "--tune-lr varies the run's rate; a schedule (--schedule, --dapt-rounds or" in (
            capsys.readouterr().err
        )


# -- stages of different methods: prompt tuning, then LoRA, in one model -----------------------


def _composed(cfg: RunConfig) -> RunConfig:
    return build_config(
        {
            **json.loads(cfg.to_json()),
            "schedule": [{"rounds": 1, "method": "prompt"}, {"rounds": 1, "method": "lora"}],
        }
    )


def test_stages_of_two_methods_share_one_model_of_both() -> None:
    cfg = _composed(load_config())
    assert (cfg.method.name, cfg.method.compose) == ("lora", ("prompt",))
    assert [(s.method, s.lr) for s in cfg.schedule] == [("prompt", 3e-2), ("lora", 5e-3)]
    model = build_model(cfg.model, cfg.method, 0.0, 0)
    state = {n for n, p in model.named_parameters() if p.requires_grad}
    prompt = {n for n in state if "prompt_encoder." in n}
    lora = {n for n in state if ".lora_" in n}
    head = {n for n in state if HEAD in n}
    assert prompt and lora and head and state == prompt | lora | head
    assert not any(".original_module." in n for n in state)  # peft's untrained head copy
    alone = build_model(cfg.model, load_config().method, 0.0, 0)
    lora_alone = sum(p.numel() for n, p in alone.named_parameters() if ".lora_" in n)
    assert sum(p.numel() for n, p in model.named_parameters() if n in lora) == lora_alone
    stage_trains(model, "all", MARKERS["prompt"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == prompt | head
    with pytest.raises(ConfigError) as err:
        build_config({"schedule": [{"method": "adapter"}, {"method": "ia3"}]})
    assert "adapter: not composed with another method" in str(err.value)
    assert "methods lora, adapter, ia3: stages of different methods take at most one" in str(
        err.value
    )
    with pytest.raises(ConfigError, match="method.compose: set by the stages of a"):
        build_config({"method": {"compose": ["prompt"]}})
    with pytest.raises(ConfigError, match="not with method.lora.full_layers"):
        build_config({"method": {"lora": {"full_layers": 1}}, "schedule": [{"method": "prompt"}]})


def test_a_site_trains_each_methods_stage_in_turn(tmp_path: Path, cfg: RunConfig) -> None:
    staged = _composed(cfg)
    first, second = _delta(staged, tmp_path, 1), _delta(staged, tmp_path, 2)
    moved = {name for name, v in first.items() if np.abs(v).max() > 0}
    assert any("prompt_encoder." in n for n in moved)
    assert all("prompt_encoder." in n or HEAD in n for n in moved)
    moved = {name for name, v in second.items() if np.abs(v).max() > 0}
    assert any(".lora_" in n for n in moved)
    assert all(".lora_" in n or HEAD in n for n in moved)


def test_a_composed_model_exports_as_its_state_and_loads_back(tmp_path: Path) -> None:
    import torch

    from fedpeft.common.export import STATE_FILE, export_state, load_export
    from fedpeft.common.methods import shared_state

    cfg = _composed(load_config())
    model = build_model(cfg.model, cfg.method, 0.0, cfg.seed).eval()
    state = {k: v + 0.01 for k, v in shared_state(model).items()}
    fp = model_fingerprint(resolve_model_path(cfg.model))
    files = export_state(cfg, state, tmp_path / "out", run_id=1, round=2, fingerprint=fp)
    assert tmp_path / "out" / STATE_FILE in files
    loaded = load_export(tmp_path / "out").eval()
    reference = build_model(cfg.model, cfg.method, 0.0, cfg.seed).eval()
    from fedpeft.common.methods import load_shared_state

    load_shared_state(reference, state)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_an_export_made_before_these_settings_still_loads(tmp_path: Path) -> None:
    from fedpeft.common.export import MANIFEST, export_state, load_export
    from fedpeft.common.methods import shared_state

    cfg = load_config()
    state = shared_state(build_model(cfg.model, cfg.method, 0.0, cfg.seed))
    fp = model_fingerprint(resolve_model_path(cfg.model))
    export_state(cfg, state, tmp_path, run_id=1, round=1, fingerprint=fp)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    for key in ("distill", "schedule"):
        del manifest["config"][key]
    del manifest["config"]["model"]["layers"], manifest["config"]["method"]["compose"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert load_export(tmp_path).config.num_hidden_layers == 6


def test_a_site_policy_judges_every_method_a_run_trains() -> None:
    from test_policy import KEY, POLICY, _task

    from fedpeft.client.policy import PolicyRefusal, check_task

    check_task(POLICY, _task(composed=("prompt",)), {}, {KEY})
    strict = dataclasses.replace(POLICY, methods=("lora",))
    with pytest.raises(PolicyRefusal, match="method 'prompt' is not allowed"):
        check_task(strict, _task(composed=("prompt",)), {}, {KEY})
