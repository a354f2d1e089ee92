from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.common.config import RunConfig, load_config
from fedpeft.common.errors import ConfigError


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg.method.name == "lora"
    assert cfg.data.dataset == "heart"
    assert cfg.federation.rounds >= 1


def test_toml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("seed = 3\n[federation]\nrounds = 4\n[train]\nlr = 1\n")
    cfg = load_config(path, {"federation.rounds": 2, "train.batch_size": None})
    assert cfg.seed == 3
    assert cfg.federation.rounds == 2  # the flag wins
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 16  # None = flag not given


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[federation]\nrounds = "many"\nbogus = 1\n[train]\nbatch_size = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "federation.rounds" in text
    assert "federation.bogus: unknown setting" in text
    assert "train.batch_size" in text
    assert len(info.value.problems) == 3


def test_range_checks() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"federation.rounds": 0, "train.lr": -1.0, "data.dataset": "nope"})
    assert len(info.value.problems) == 3
    assert "data.dataset" in str(info.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_json_round_trip_is_exact() -> None:
    cfg = load_config(overrides={"seed": 7, "method.lora.target_modules": ["query"]})
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.method.lora.target_modules == ("query",)


#: The rates every benchmark in docs/benchmarks.md ran with: a change here changes results.
BENCHMARKED_LR = {
    "lora": 5e-3,
    "prefix": 1e-2,
    "prompt": 3e-2,
    "ia3": 5e-3,
    "adapter": 5e-3,
    "bitfit": 5e-3,
    "full": 5e-5,
}


def test_each_method_trains_at_its_own_rate_unless_told() -> None:
    resolved = {m: load_config(overrides={"method.name": m}).train.lr for m in BENCHMARKED_LR}
    assert resolved == BENCHMARKED_LR
    assert load_config().train.lr == BENCHMARKED_LR["lora"]
    full = load_config(overrides={"method.name": "full"})
    assert RunConfig.from_json(full.to_json()).train.lr == 5e-5  # stored resolved
    assert load_config(overrides={"method.name": "full", "train.lr": 0.1}).train.lr == 0.1
    with pytest.raises(ConfigError, match="'mine' has no default learning rate"):
        load_config(overrides={"method.name": "mine"})
    assert load_config(overrides={"method.name": "mine", "train.lr": 0.1}).method.name == "mine"


def test_method_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={
                "method.prefix.num_virtual_tokens": 0,
                "method.prompt.init": "words",
                "method.adapter.placement": ["attention", "everywhere"],
            }
        )
    assert len(info.value.problems) == 3


def test_the_method_tables_are_stored_as_before() -> None:
    """The ``method`` part of a stored run config (``to_json``), which sites and exports read.
    (A new method's table adds a key; these stay as they are.)"""
    stored = json.loads(load_config().to_json())["method"]
    expected = {
        "name": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"]},
        "prefix": {"num_virtual_tokens": 20},
        "prompt": {
            "num_virtual_tokens": 20,
            "init": "text",
            "init_text": "Patient findings: risk of disease:",
        },
        "adapter": {"bottleneck": 16, "placement": ["attention", "ffn"]},
    }
    assert {key: stored[key] for key in expected} == expected
