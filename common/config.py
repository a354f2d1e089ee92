"""Run configuration: frozen dataclasses, loaded from TOML, validated once at the entry point.

A run config is data. It is built once (file values, then CLI overrides, in :func:`load_config`),
validated with every problem reported together, and then passed down unchanged.

Sites never see the whole of it: :meth:`RunConfig.for_sites` keeps only what a site acts on
(:class:`SiteRunConfig`: seed, model, method, local training, codec, rounds, upload bound and test
fraction), which travels inside the coordinator's signed global state (common/envelope.py), so
both sides train with the same settings and no relay can alter them. What a site's rows look
like (:class:`DataSchema`) and the device it trains on are the site's own settings (site.toml);
the store URL (``db``) is the coordinator's and is never serialized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import get_spec, method_names, specs
from fedpeft.common.methods.adapter import AdapterConfig
from fedpeft.common.methods.lora import LoraConfig
from fedpeft.common.methods.prefix import PrefixConfig
from fedpeft.common.methods.prompt import PromptConfig
from fedpeft.common.tomlfile import read_toml

BENCHMARKS = ("heart", "pima")
DEVICES = ("auto", "cpu", "cuda")
CODECS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model every site shares."""

    #: A local Hugging Face model directory or hub id; empty = the packaged all-MiniLM-L6-v2.
    name_or_path: str = ""
    #: Notes longer than this many tokens are truncated.
    max_length: int = 128


@dataclass(frozen=True)
class MethodConfig:
    """Which PEFT method trains, with its own hyperparameters: a table per method that has
    settings, named after it (``fedpeft.common.methods``' registry; a test keeps them in step)."""

    #: A registered method's name (:func:`fedpeft.common.methods.method_names`).
    name: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)


@dataclass(frozen=True)
class TrainConfig:
    """Local training at a site (and for the alone / centralized baselines)."""

    local_epochs: int = 1
    batch_size: int = 16
    #: AdamW learning rate; 0 = the method's own rate (its ``MethodSpec.default_lr``), resolved
    #: when the config is built so that the stored config shows the rate that was used.
    lr: float = 0.0
    weight_decay: float = 0.01
    #: Dropout inside the base model's layers (hidden and attention) during training.
    dropout: float = 0.1
    #: Global-norm gradient clipping; 0 disables it.
    grad_clip: float = 1.0
    #: Fraction of a site's training rows held out for early stopping.
    val_fraction: float = 0.15
    #: Epochs without a better validation loss before a local run stops (the best state is kept).
    patience: int = 2


#: ``federation.aggregator`` values (server/aggregation.py).
AGGREGATORS = ("fedavg", "trimmed-mean")


@dataclass(frozen=True)
class FederationConfig:
    """The round loop at the coordinator."""

    rounds: int = 5
    #: Sites sampled for training each round; 0 = every site.
    sites_per_round: int = 0
    #: A round with fewer valid updates than this keeps the previous global state.
    min_sites: int = 1
    #: Seconds the coordinator waits for replies in one round.
    round_timeout_s: float = 600.0
    #: How sites encode their deltas before sealing: fp32, fp16 or int8 (per-row scales).
    codec: str = "fp32"
    #: Largest L2 norm of one site's update that is accepted; 0 = no bound.
    max_update_norm: float = 0.0
    #: Largest example count one site's update is weighted by in FedAvg: a larger signed count
    #: is capped to it (recorded for that site and round); 0 = no cap.
    max_examples: int = 100_000
    #: A signed example count above this many times the round's median count is capped to it
    #: (with at least 3 valid updates; recorded): no site outweighs the typical one by more;
    #: 0 = off.
    examples_bound_factor: float = 10.0
    #: An update whose L2 norm is above this many times the round's median update norm is
    #: scaled down to that bound (with at least 3 valid updates; recorded); 0 = off.
    norm_bound_factor: float = 5.0
    #: ``fedavg`` (weighted by example counts) or ``trimmed-mean`` (coordinate-wise: drops the
    #: extremes of every coordinate, then an unweighted mean).
    aggregator: str = "fedavg"
    #: trimmed-mean: the share of updates dropped at each end of every coordinate (rounded up,
    #: leaving at least one update).
    trim_fraction: float = 0.2
    #: Largest sealed upload accepted, in bytes; 0 = twice the fp32 size of the shared state
    #: plus 64 KiB.
    max_upload_bytes: int = 0


@dataclass(frozen=True)
class DataSchema:
    """How a site's records file reads: the site's own setting (site.toml ``[data]``; in a
    simulation, the simulation's ``[data]``), never the coordinator's."""

    text_column: str = "text"
    label_column: str = "label"
    #: Optional column with ``train`` / ``test`` per row; otherwise a stratified split is drawn.
    split_column: str = "split"
    #: Skip (and count) bad rows instead of failing on the first one.
    skip_bad_rows: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Where site records come from and how they are split."""

    #: ``heart``, ``pima``, or a folder with one data file per site (CSV, JSONL or Parquet).
    dataset: str = "heart"
    text_column: str = "text"
    label_column: str = "label"
    #: Optional column with ``train`` / ``test`` per row; otherwise a stratified split is drawn.
    split_column: str = "split"
    test_fraction: float = 0.3
    #: Skip (and count) bad rows instead of failing on the first one.
    skip_bad_rows: bool = False

    @property
    def schema(self) -> DataSchema:
        """The columns and bad-row rule: what the simulation's virtual sites read their files
        with."""
        return DataSchema(
            self.text_column, self.label_column, self.split_column, self.skip_bad_rows
        )


@dataclass(frozen=True)
class SiteRunConfig:
    """What a site acts on: exactly the settings a site reads to train, evaluate and seal (and a
    site policy may check). The coordinator signs it with each global state; a site takes its
    settings from nowhere else. No store, no data set or columns, no device, no key paths."""

    seed: int
    model: ModelConfig
    method: MethodConfig
    train: TrainConfig
    #: How the site encodes its delta before sealing (``federation.codec``).
    codec: str
    #: Rounds in the run (``federation.rounds``).
    rounds: int
    #: Largest sealed upload the coordinator accepts (``federation.max_upload_bytes``; 0 = its
    #: automatic bound, twice the fp32 size of the shared state plus 64 KiB).
    max_upload_bytes: int
    #: Fraction of the site's rows held out for testing when its file has no split column.
    test_fraction: float

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces; what is signed and hashed."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SiteRunConfig:
        """Parse and check a site config; ``ConfigError`` naming every problem (every setting
        must be there: a signed config is complete)."""
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"site config: not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(values, dict):
            raise ConfigError("site config: expected a JSON object")
        problems: list[str] = []
        cfg = _build(cls, values, "", problems, complete=True)
        if not problems:
            _check_site(cfg, problems)
        if problems:
            raise ConfigError(problems)
        return cfg  # type: ignore[no-any-return]

    def config_hash(self) -> str:
        """SHA-256 (hex) of :meth:`to_json`: names this config in a site's ledger and approvals."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs."""

    seed: int = 0
    #: ``auto`` picks CUDA when present, else CPU.
    device: str = "auto"
    #: SQLAlchemy URL of the run store.
    db: str = "sqlite:///fedpeft.db"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_json(self) -> str:
        """Everything but ``db``: the store URL (which may carry a password) is the coordinator's
        own setting and is never serialized (the stored config, the app bundle)."""
        values = dataclasses.asdict(self)
        del values["db"]
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return build_config(json.loads(text))

    def for_sites(self) -> SiteRunConfig:
        """The part of this config that sites act on (see :class:`SiteRunConfig`)."""
        return SiteRunConfig(
            seed=self.seed,
            model=self.model,
            method=self.method,
            train=self.train,
            codec=self.federation.codec,
            rounds=self.federation.rounds,
            max_upload_bytes=self.federation.max_upload_bytes,
            test_fraction=self.data.test_fraction,
        )


# -- building and validation -------------------------------------------------------------------


def _build(
    cls: type, values: dict[str, Any], prefix: str, problems: list[str], complete: bool = False
) -> Any:
    """``cls`` from nested ``values``; problems are collected. With ``complete``, every field
    must be given (no defaults)."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            problems.append(f"{prefix}{key}: unknown setting")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in values:
            if complete:
                problems.append(f"{prefix}{f.name}: missing")
            continue
        value, hint, where = values[f.name], hints[f.name], f"{prefix}{f.name}"
        if is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a table of settings")
                continue
            kwargs[f.name] = _build(hint, value, where + ".", problems, complete)  # type: ignore[arg-type]
        else:
            converted = _convert(value, hint, where, problems)
            if converted is not None:
                kwargs[f.name] = converted
    if complete and len(kwargs) < len(known):
        return None  # a problem is recorded; a dataclass without defaults cannot be built
    return cls(**kwargs)


def _convert(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list | tuple) or not all(isinstance(v, item) for v in value):
            problems.append(f"{where}: expected a list of {item.__name__}")
            return None
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        problems.append(f"{where}: expected {hint.__name__}, got {value!r}")
        return None
    return value


def _needs(problems: list[str]) -> Callable[[bool, str], None]:
    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    return need


def _check_model_and_training(
    model: ModelConfig, method: MethodConfig, t: TrainConfig, problems: list[str]
) -> None:
    """What a coordinator's run config and a site's signed config check alike."""
    need = _needs(problems)
    need(model.max_length >= 8, "model.max_length: must be at least 8")
    for spec in specs():
        if spec.config is not None:
            problems.extend(spec.check(getattr(method, spec.name)))
    need(t.local_epochs >= 1, "train.local_epochs: must be at least 1")
    need(t.batch_size >= 1, "train.batch_size: must be at least 1")
    need(t.lr >= 0, "train.lr: must not be negative (0 = the method's own rate)")
    need(t.weight_decay >= 0, "train.weight_decay: must not be negative")
    need(0 <= t.dropout < 1, "train.dropout: must be in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip: must not be negative (0 disables clipping)")
    need(0 < t.val_fraction < 0.5, "train.val_fraction: must be in (0, 0.5)")
    need(t.patience >= 1, "train.patience: must be at least 1")


def _check_site(cfg: SiteRunConfig, problems: list[str]) -> None:
    need = _needs(problems)
    _check_model_and_training(cfg.model, cfg.method, cfg.train, problems)
    need(cfg.train.lr > 0, "train.lr: must be positive (resolved by the coordinator)")
    need(cfg.rounds >= 1, "rounds: must be at least 1")
    need(cfg.codec in CODECS, f"codec: must be one of {', '.join(CODECS)}")
    need(cfg.max_upload_bytes >= 0, "max_upload_bytes: must not be negative (0 = auto)")
    need(0 < cfg.test_fraction < 1, "test_fraction: must be in (0, 1)")


def _check_ranges(cfg: RunConfig, problems: list[str]) -> None:
    need = _needs(problems)
    need(cfg.device in DEVICES, f"device: must be one of {', '.join(DEVICES)}")
    need(bool(cfg.db), "db: must be a SQLAlchemy URL")
    _check_model_and_training(cfg.model, cfg.method, cfg.train, problems)
    f = cfg.federation
    need(f.rounds >= 1, "federation.rounds: must be at least 1")
    need(f.sites_per_round >= 0, "federation.sites_per_round: must be 0 (all) or more")
    need(f.min_sites >= 1, "federation.min_sites: must be at least 1")
    need(
        f.sites_per_round == 0 or f.min_sites <= f.sites_per_round,
        "federation.min_sites: must not exceed federation.sites_per_round",
    )
    need(f.round_timeout_s > 0, "federation.round_timeout_s: must be positive")
    need(f.codec in CODECS, f"federation.codec: must be one of {', '.join(CODECS)}")
    need(f.max_update_norm >= 0, "federation.max_update_norm: must not be negative (0 = none)")
    need(f.max_examples >= 0, "federation.max_examples: must not be negative (0 = no cap)")
    for name in ("examples_bound_factor", "norm_bound_factor"):
        value = getattr(f, name)
        need(value == 0 or value >= 1, f"federation.{name}: must be 0 (off) or at least 1")
    need(
        f.aggregator in AGGREGATORS,
        f"federation.aggregator: {f.aggregator!r} is not one of {', '.join(AGGREGATORS)}",
    )
    need(0 <= f.trim_fraction < 0.5, "federation.trim_fraction: must be in [0, 0.5)")
    need(f.max_upload_bytes >= 0, "federation.max_upload_bytes: must not be negative (0 = auto)")
    need(0 < cfg.data.test_fraction < 1, "data.test_fraction: must be in (0, 1)")
    need(
        cfg.data.dataset in BENCHMARKS or Path(cfg.data.dataset).is_dir(),
        f"data.dataset: {cfg.data.dataset!r} is neither a benchmark "
        f"({', '.join(BENCHMARKS)}) nor an existing folder",
    )


def build_config(values: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested values; report every problem at once."""
    problems: list[str] = []
    cfg = _build(RunConfig, values, "", problems)
    if not problems:
        _check_ranges(cfg, problems)
    if problems:
        raise ConfigError(problems)
    if cfg.train.lr == 0:
        if cfg.method.name not in method_names():
            raise ConfigError(
                f"method.name: {cfg.method.name!r} has no default learning rate (known methods: "
                f"{', '.join(method_names())}); set train.lr for a method of your own"
            )
        lr = get_spec(cfg.method.name).default_lr
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))
    return cfg


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    node = values
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a run config: defaults, then the TOML file, then ``overrides`` (dotted keys).

    Overrides set to ``None`` are ignored, so CLI flags that were not given change nothing.
    """
    values = read_toml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(values, dotted, value)
    return build_config(values)
