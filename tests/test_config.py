from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedpeft.common.config import (
    DPConfig,
    RunConfig,
    SecureAggregationConfig,
    SitePrivacy,
    SiteRunConfig,
    load_config,
)
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


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("heart", (5, 0)), ("synthetic:4", (5, 0)), ("pima", (20, 3)), ("medpar", (20, 3))],
)
def test_a_run_gets_its_data_sets_rounds_and_patience(
    dataset: str, expected: tuple[int, int]
) -> None:
    """Run to convergence (at most 20 rounds, patience 3) unless the data is the heart demo,
    whose baselines would not fit its time; a folder of the user's own sites converges too."""
    cfg = load_config(overrides={"data.dataset": dataset})
    assert (cfg.federation.rounds, cfg.federation.patience) == expected


@pytest.mark.parametrize("folder", ["synthetic_notes", "synthetic-sites"])
def test_a_folder_named_synthetic_is_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).mkdir()
    cfg = load_config(overrides={"data.dataset": folder})
    assert (cfg.federation.rounds, cfg.federation.patience) == (20, 3)


def test_a_folder_of_sites_runs_to_convergence_unless_told(tmp_path: Path) -> None:
    def fed(**values: object) -> tuple[int, int]:
        cfg = load_config(overrides={"data.dataset": str(tmp_path), **values})
        return cfg.federation.rounds, cfg.federation.patience

    assert fed() == (20, 3)
    assert fed(**{"federation.rounds": 7}) == (7, 0)  # rounds alone: exactly that many
    assert fed(**{"federation.patience": 2}) == (20, 2)
    stages = [{"trains": "head", "rounds": 2}, {"trains": "all", "rounds": 3}]
    assert fed(schedule=stages) == (5, 0)  # a schedule sets the rounds and runs each one
    path = tmp_path / "run.toml"
    path.write_text("[federation]\nrounds = 9\n")
    cfg = load_config(path, {"data.dataset": str(tmp_path)})
    assert (cfg.federation.rounds, cfg.federation.patience) == (9, 0)  # the file's choice
    # A stored run's config keeps what it ran with.
    stored = load_config(overrides={"data.dataset": "pima", "federation.rounds": 7})
    again = RunConfig.from_json(stored.to_json())
    assert (again.federation.rounds, again.federation.patience) == (7, 0)


def test_range_checks() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"federation.rounds": 0, "train.lr": -1.0, "data.dataset": "nope"})
    assert len(info.value.problems) == 3
    assert "data.dataset" in str(info.value)


@pytest.mark.parametrize("name", ["synthetic", "synthetic:2", "synthetic:1000"])
def test_synthetic_data_sets_are_accepted(name: str) -> None:
    assert load_config(overrides={"data.dataset": name}).data.dataset == name


@pytest.mark.parametrize("name", ["synthetic:1", "synthetic:1001", "synthetic:ten", "synthetic:"])
def test_a_bad_synthetic_site_count_is_one_clear_problem(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"data.dataset": name})
    assert info.value.problems == [
        f"data.dataset {name!r}: synthetic:N needs a site count N in 2..1000"
    ]


@pytest.mark.parametrize("bins", [1, 1001])
def test_histogram_bins_lie_in_2_to_1000(bins: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"federation.histogram_bins": bins})
    assert info.value.problems == ["federation.histogram_bins: must be in 2..1000"]
    assert load_config(overrides={"federation.histogram_bins": 20}).for_sites().histogram_bins == 20


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
    (A new method's table adds a key, a new setting a key in its table, 0 or off by default;
    these values stay as they are: hybrid LoRA added ``full_layers``, 0 = LoRA alone.)"""
    stored = json.loads(load_config().to_json())["method"]
    expected = {
        "name": "lora",
        "lora": {
            "r": 8,
            "alpha": 16,
            "dropout": 0.05,
            "target_modules": ["query", "value"],
            "full_layers": 0,
        },
        "prefix": {"num_virtual_tokens": 20},
        "prompt": {
            "num_virtual_tokens": 20,
            "init": "text",
            "init_text": "Patient findings: risk of disease:",
        },
        "adapter": {"bottleneck": 16, "placement": ["attention", "ffn"]},
    }
    assert {key: stored[key] for key in expected} == expected


# -- federation.secure_aggregation and federation.dp -------------------------------------------


def test_privacy_is_off_by_default_and_sites_clip_nothing() -> None:
    cfg = load_config()
    assert not cfg.federation.dp.enabled and not cfg.federation.secure_aggregation.enabled
    assert cfg.federation.site_clip == 0.0
    assert cfg.for_sites().privacy == SitePrivacy(
        clip=0.0,
        noise_multiplier=0.0,
        distributed_noise=False,
        secure_aggregation=False,
        threshold=0.0,
        fixed_point_range=0.0,
    )


def test_the_privacy_tables_are_read_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        "[federation.secure_aggregation]\nenabled = true\nthreshold = 0.75\nclip = 2\n"
        "[federation.dp]\nenabled = true\nclip = 0.5\nnoise_multiplier = 1.1\ndelta = 1e-6\n"
        'mode = "distributed"\n'
    )
    cfg = load_config(path)
    assert cfg.federation.secure_aggregation == SecureAggregationConfig(True, 0.75, 2.0)
    assert cfg.federation.dp == DPConfig(True, 0.5, 1.1, 0.0, 1e-6, "distributed")
    assert cfg.federation.site_clip == 0.5  # DP's clip; secure aggregation's is the range
    # The range: secure aggregation's clip and six sigma * clip of room for the noise.
    assert cfg.for_sites().privacy == SitePrivacy(0.5, 1.1, True, True, 0.75, 2.0 + 6 * 1.1 * 0.5)
    assert RunConfig.from_json(cfg.to_json()) == cfg
    site = cfg.for_sites()
    assert SiteRunConfig.from_json(site.to_json()) == site


@pytest.mark.parametrize(
    ("overrides", "privacy"),
    [
        ({"federation.secure_aggregation.enabled": True}, SitePrivacy(10, 0, False, True, 0.6, 10)),
        ({"federation.dp.enabled": True}, SitePrivacy(1.0, 1.5, False, False, 0.0, 0.0)),
        (
            {"federation.dp.enabled": True, "federation.secure_aggregation.enabled": True},
            SitePrivacy(1.0, 1.5, False, True, 0.6, 10.0),
        ),
    ],
    ids=["secure-aggregation", "central-dp", "both"],
)
def test_what_each_setting_tells_the_sites(overrides: dict, privacy: SitePrivacy) -> None:
    cfg = load_config(overrides={"federation.dp.noise_multiplier": 1.5, **overrides})
    assert cfg.for_sites().privacy == privacy


def test_every_privacy_problem_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={
                "federation.secure_aggregation.threshold": 0.5,
                "federation.secure_aggregation.clip": -1.0,
                "federation.dp.enabled": True,
                "federation.dp.clip": 0.0,
                "federation.dp.delta": 1.0,
                "federation.dp.mode": "local",
            }
        )
    text = str(info.value)
    for name in (
        "federation.secure_aggregation.threshold: must be in (0.5, 1]",
        "federation.secure_aggregation.clip: must be positive, got -1.0",
        "federation.dp.clip: must be positive, got 0.0",
        "federation.dp.delta: must be in (0, 1), got 1.0",
        "federation.dp.mode: 'local' is not one of central, distributed",
        "federation.dp: enabled needs noise_multiplier > 0 or target_epsilon > 0",
    ):
        assert name in text
    assert len(info.value.problems) == 6
    # DP off: its noise settings are not needed.
    assert not load_config(overrides={"federation.dp.mode": "distributed"}).federation.dp.enabled


def test_distributed_noise_needs_secure_aggregation_and_a_clip_within_its_range() -> None:
    dp = {"federation.dp.enabled": True, "federation.dp.noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="distributed needs federation.secure_aggregation"):
        load_config(overrides={**dp, "federation.dp.mode": "distributed"})
    with pytest.raises(ConfigError, match="federation.dp.clip: 12.0 is above"):
        load_config(
            overrides={
                **dp,
                "federation.dp.clip": 12.0,
                "federation.secure_aggregation.enabled": True,
            }
        )


@pytest.mark.parametrize(
    ("threshold", "n", "t"),
    [(0.6, 5, 3), (0.7, 10, 7), (0.6, 2, 2), (0.6, 3, 2), (1.0, 4, 4), (0.51, 3, 2), (1.0, 1, 2)],
)
def test_shares_needed_is_max_2_and_ceil_threshold_times_n(
    threshold: float, n: int, t: int
) -> None:
    # 0.7 * 10 is 7.000000000000001 in floating point: t must still be 7, not 8.
    assert SecureAggregationConfig(True, threshold).shares_needed(n) == t


def test_every_valid_threshold_gives_a_t_secure_aggregation_accepts() -> None:
    from fedpeft.common.secagg import check_threshold

    for threshold in (0.500001, 0.51, 0.6, 0.7, 0.75, 0.99, 1.0):
        load_config(overrides={"federation.secure_aggregation.threshold": threshold})
        for n in range(2, 41):
            check_threshold(SecureAggregationConfig(True, threshold).shares_needed(n), n)


def test_a_target_epsilon_run_reaches_sites_only_with_its_calibrated_sigma() -> None:
    cfg = load_config(
        overrides={"federation.dp.enabled": True, "federation.dp.target_epsilon": 3.0}
    )
    with pytest.raises(ConfigError, match="not calibrated yet"):
        cfg.for_sites()
    calibrated = cfg.with_noise_multiplier(2.25)
    assert calibrated.federation.dp.noise_multiplier == 2.25
    assert calibrated.for_sites().privacy.noise_multiplier == 2.25
    assert RunConfig.from_json(calibrated.to_json()) == calibrated  # stored as used
    with pytest.raises(ConfigError, match="must be positive"):
        cfg.with_noise_multiplier(0.0)


def test_a_signed_site_config_with_inconsistent_privacy_is_refused() -> None:
    site = load_config().for_sites()
    values = json.loads(site.to_json())
    values["privacy"].update(distributed_noise=True, noise_multiplier=1.0, clip=1.0)
    with pytest.raises(ConfigError, match="privacy.distributed_noise: needs secure_aggregation"):
        SiteRunConfig.from_json(json.dumps(values))
    values = json.loads(site.to_json())
    del values["privacy"]["clip"]
    with pytest.raises(ConfigError, match="privacy.clip: missing"):
        SiteRunConfig.from_json(json.dumps(values))


def test_the_fixed_point_range_leaves_room_for_distributed_noise() -> None:
    """A masked update is encoded within privacy.fixed_point_range: secure aggregation's clip,
    plus six times sigma * clip with distributed DP, so encoding does not clip the noise."""
    base = {
        "federation.secure_aggregation.enabled": True,
        "federation.secure_aggregation.clip": 2.0,
        "federation.dp.enabled": True,
        "federation.dp.noise_multiplier": 1.5,
        "federation.dp.clip": 1.0,
    }
    central = load_config(overrides=base).for_sites().privacy
    assert central.fixed_point_range == 2.0
    distributed = load_config(overrides={**base, "federation.dp.mode": "distributed"})
    assert distributed.for_sites().privacy.fixed_point_range == 2.0 + 6 * 1.5 * 1.0


def test_the_lr_grid_defaults_to_the_rate_a_third_and_a_tenth_and_is_stored_resolved() -> None:
    cfg = load_config()
    assert cfg.tuning.lr_grid == (5e-3, 1.67e-3, 5e-4)  # LoRA's 5e-3, three significant digits
    prompt = load_config(overrides={"method.name": "prompt"})
    assert prompt.tuning.lr_grid == (3e-2, 1e-2, 3e-3)
    mine = load_config(overrides={"train.lr": 0.01, "tuning.lr_grid": [0.02, 0.001]})
    assert mine.tuning.lr_grid == (0.02, 0.001)  # given: kept, not derived from train.lr
    assert RunConfig.from_json(cfg.to_json()).tuning == cfg.tuning
    assert "lr_grid" not in cfg.for_sites().to_json()  # the coordinator's setting only
    odd = load_config(overrides={"train.lr": 1.2345e-3}).tuning.lr_grid
    assert odd == (1.2345e-3, 4.11e-4, 1.23e-4)  # the run's own rate exactly, then rounded


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([0.0, 1e-3], "each rate must be in (0, 1)"),
        ([1.5], "each rate must be in (0, 1)"),
        ([1e-3, 1e-3], "each once"),
        ([1e-3 * (i + 1) for i in range(9)], "at most 8 rates"),
        (["fast"], "expected a list of float"),
    ],
)
def test_a_bad_lr_grid_is_named(grid: list[object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(overrides={"tuning.lr_grid": grid})
    assert "tuning.lr_grid" in str(err.value)


def test_server_optimizer_settings_are_checked() -> None:
    cfg = load_config(
        overrides={"federation.server_optimizer": "fedyogi", "federation.server_lr": 0.01}
    )
    assert (cfg.federation.server_optimizer, cfg.federation.server_lr) == ("fedyogi", 0.01)
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={
                "federation.server_optimizer": "sgd",
                "federation.server_lr": 0.0,
                "federation.server_beta2": 1.0,
                "federation.server_tau": -1.0,
            }
        )
    assert info.value.problems == [
        "federation.server_optimizer: 'sgd' is not one of fedavg, fedadam, fedyogi",
        "federation.server_lr: must be positive",
        "federation.server_beta2: must be in [0, 1)",
        "federation.server_tau: must be positive",
    ]


def test_personalization_settings_are_checked_and_reach_the_sites() -> None:
    cfg = load_config(overrides={"federation.personalize": "lora-b"})
    site = cfg.for_sites()
    assert (site.personalize, site.personalize_epochs) == ("lora-b", 5)
    assert SiteRunConfig.from_json(site.to_json()) == site
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides={
                "federation.personalize": "lora-b",
                "federation.personalize_epochs": 0,
                "method.name": "ia3",
                "federation.secure_aggregation.enabled": True,
            }
        )
    assert [p for p in info.value.problems if "personaliz" in p] == [
        "federation.personalize_epochs: must be in 1..100, got 0",
        "federation.personalize: lora-b needs method lora (the method is 'ia3')",
        "federation.personalize: not with secure aggregation (the sites' personalized "
        "evaluations would reach the coordinator one by one, outside the secure exchange)",
    ]
    with pytest.raises(ConfigError, match="federation.personalize: 'all' is not one of none"):
        load_config(overrides={"federation.personalize": "all"})
