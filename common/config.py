"""Run configuration: frozen dataclasses, loaded from TOML, validated once at the entry point.

A run config is data. It is built once (file values, then CLI overrides, in :func:`load_config`),
validated with every problem reported together, and then passed down unchanged.

Sites never see the whole of it: :meth:`RunConfig.for_sites` keeps only what a site acts on
(:class:`SiteRunConfig`: seed, model, method, local training, codec, rounds, upload bound, test
fraction, and what it does to its update before it leaves: :class:`SitePrivacy`), which travels
inside the coordinator's signed global state (common/envelope.py), so both sides train with the
same settings and no relay can alter them. What a site's rows look like (:class:`DataSchema`)
and the device it trains on are the site's own settings (site.toml); the store URL (``db``) is
the coordinator's and is never serialized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
from fedpeft.common.metrics import HIST_BINS
from fedpeft.common.tomlfile import read_toml

BENCHMARKS = ("heart", "pima", "medpar")
DEVICES = ("auto", "cpu", "cuda")
#: How a site holds its frozen base model (its own setting; common/quantize.py).
QUANTIZE = ("none", "int8", "nf4")
#: ``export --quantize``: the whole model with its base in int8 as well (int8 only: what a site's
#: nf4 base trains is the same shared state, exported as any other; common/export.py).
EXPORT_QUANTIZE = ("none", "int8")
#: Methods that train, and so upload, every base weight: not in a site policy's default methods,
#: and not on an int8 base (see also ``MethodConfig.trains_base_weights``).
TRAINS_BASE_WEIGHTS = ("full",)
CODECS = ("fp32", "fp16", "int8")


#: ``synthetic`` alone: this many generated sites (common/data.py ``synthetic_sites``).
SYNTHETIC_DEFAULT_SITES = 100
SYNTHETIC_MAX_SITES = 1000


def synthetic_site_count(dataset: str) -> int | None:
    """The number of sites ``dataset`` names when it is ``synthetic`` or ``synthetic:N``
    (N in 2..:data:`SYNTHETIC_MAX_SITES`); None when it is not a synthetic data set. Raises
    :class:`ConfigError` on a malformed count."""
    name, sep, count = dataset.partition(":")
    if name != "synthetic":
        return None
    if not sep:
        return SYNTHETIC_DEFAULT_SITES
    if not count.isdigit() or not 2 <= int(count) <= SYNTHETIC_MAX_SITES:
        raise ConfigError(
            f"data.dataset {dataset!r}: synthetic:N needs a site count N in "
            f"2..{SYNTHETIC_MAX_SITES}"
        )
    return int(count)


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model every site shares."""

    #: A local Hugging Face model directory or hub id; empty = the packaged all-MiniLM-L6-v2.
    name_or_path: str = ""
    #: Notes longer than this many tokens are truncated.
    max_length: int = 128
    #: Encoder layers of the base kept, evenly spaced and the top one always (a smaller student
    #: initialized from the base's own layers, ``fedpeft distill``; common/model.py
    #: ``kept_layers``); 0 = every layer.
    layers: int = 0


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
    #: Other methods in the same model, for a staged run whose stages train different methods
    #: (set from ``[[schedule]]``; common/methods/compose.py). Empty: the method alone.
    compose: tuple[str, ...] = ()
    #: A masked-language head beside the method, for a staged run's domain-adaptive pretraining
    #: (a ``[[schedule]]`` stage that trains ``mlm``; common/methods/mlm.py). Set from the
    #: schedule, like ``compose``.
    mlm: bool = False

    def trains_base_weights(self) -> bool:
        """Whether the method trains weights of the base model itself (``full``, or LoRA with
        ``full_layers``), which a site holding an int8 base cannot."""
        return self.name in TRAINS_BASE_WEIGHTS or (
            self.name == "lora" and self.lora.full_layers > 0
        )


@dataclass(frozen=True)
class DistillConfig:
    """``[distill]``: the run trains a student (usually ``model.layers`` below the base's) that
    imitates a finished run's delivered model, its teacher, at every site (``fedpeft distill``).
    Each site computes the teacher's logits on its own training rows and trains the student on
    ``alpha`` times the soft loss (KL divergence at ``temperature``, times its square) plus
    ``1 - alpha`` times the hard labels' cross-entropy. The teacher's state travels inside the
    signed global state, under ``teacher/`` (common/envelope.py); it never changes."""

    #: The teacher run in the coordinator's store; 0 = no distillation.
    teacher_run: int = 0
    #: The teacher's method as it ran (read from its stored config by ``fedpeft distill``).
    teacher_method: MethodConfig = field(default_factory=MethodConfig)
    #: The teacher's encoder layers (its ``model.layers``; 0 = every layer).
    teacher_layers: int = 0
    temperature: float = 2.0
    alpha: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.teacher_run > 0


#: ``[[schedule]]`` ``trains`` values: every shared parameter, the classification head alone,
#: the method's own parameters without the head (client/app.py ``stage_trains``), or the
#: method's own with a masked-language head on the site's notes, no labels: domain-adaptive
#: pretraining (``mlm``; client/trainer.py ``MaskedLm``).
STAGE_TRAINS = ("all", "head", "method", "mlm")
#: The stage that pretrains on the notes (``[[schedule]]`` ``trains``; ``--dapt-rounds``).
MLM = "mlm"


@dataclass(frozen=True)
class Stage:
    """One stage of a staged run (``[[schedule]]``): for ``rounds`` rounds, the sites train
    ``trains`` of the shared parameters at ``lr``. The shared state stays the method's whole
    state across stages (what a stage does not train stays as it is and its delta is zero), so
    each stage starts where the one before it ended, e.g. the head alone first, then the head
    with LoRA (linear probing, then fine-tuning: Kumar et al. 2022)."""

    rounds: int = 1
    #: 0 = the run's ``train.lr``, or for a stage of another method, that method's default rate
    #: (resolved when the config is built).
    lr: float = 0.0
    trains: str = "all"
    #: The method whose parameters the stage trains (with the head, per ``trains``); "" = the
    #: run's ``method.name``. Stages of different methods compose them in one model
    #: (``method.compose``; common/methods/compose.py).
    method: str = ""


#: ``train.class_weight`` values.
CLASS_WEIGHTS = ("none", "balanced")
#: ``train.decay`` values (client/trainer.py ``lr_factor``).
DECAYS = ("none", "linear", "cosine")


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
    #: ``balanced``: each class's rows weigh in the training loss inversely to its share of the
    #: site's training rows (n / (2 n_class)), so a rare outcome counts; ``none``: all alike.
    class_weight: str = "none"
    #: FedProx's µ (Li et al. 2020): local training adds µ/2 ||w − w_global||² over the shared
    #: parameters, pulling each site's update toward the global state; 0 = plain FedAvg.
    prox_mu: float = 0.0
    #: Learning-rate warm-up: the rate rises linearly from 0 to ``lr`` over this share of the
    #: training budget (all rounds' local steps at a site; all epochs for a baseline); 0 = none.
    warmup: float = 0.0
    #: Learning-rate decay over the same budget: ``linear`` or ``cosine`` down toward 0 at its
    #: end, ``none`` keeps ``lr``. A run stopped early by ``federation.patience`` stops partway.
    decay: str = "none"


#: ``federation.aggregator`` values (server/aggregation.py).
AGGREGATORS = ("fedavg", "trimmed-mean")
#: ``federation.lower_ranks`` values (server/aggregation.py ``fedavg``).
LOWER_RANKS = ("rank-aware", "zero-padding")
#: ``federation.server_optimizer`` values (server/aggregation.py ``server_step``).
SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi")
#: The parts a site may personalize after the run (client/app.py ``personalize``), each with
#: what names its shared parameters (a substring of their names); ``lora-b`` is LoRA's B
#: matrices (FedSA-LoRA).
PERSONAL_MARKERS = {"head": "classifier.", "lora-b": ".lora_B."}
#: ``federation.personalize`` values.
PERSONAL_PARTS = ("none", *PERSONAL_MARKERS)
#: ``federation.dp.mode`` values: who adds the Gaussian noise (common/dp.py).
DP_MODES = ("central", "distributed")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """``[federation.secure_aggregation]``: sites upload their updates masked, so that the
    coordinator learns only the round's sum (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al.
    2020)."""

    enabled: bool = False
    #: The share of the round's sites whose mask shares must come back for the sum to be
    #: unmasked: a round of n sites needs t = max(2, ceil(threshold * n)) of them (see
    #: :meth:`shares_needed`); with fewer the round is refused, never summed wrong. In (0.5, 1]:
    #: more than half, so that two disjoint groups of sites never both reach it
    #: (``common.secagg.check_threshold``). Higher tolerates fewer dropouts; lower lets fewer
    #: colluding sites and the coordinator unmask one site's input.
    threshold: float = 0.6
    #: The L2 norm each site clips its update to before masking; also the range of the
    #: fixed-point encoding (no coordinate of a clipped update exceeds it). With
    #: ``federation.dp`` on, sites clip to ``dp.clip`` instead, which must not exceed this.
    #: 10: a LoRA update on heart has an L2 norm of 3.6-5.8 a round, and clipping it to 1
    #: slowed training (macro AUC 0.785 against 0.804 unclipped, docs/benchmarks.md); the
    #: fixed-point step stays 2 * clip * sites / 2**32 (5e-7 at 100 sites).
    clip: float = 10.0

    def shares_needed(self, n: int) -> int:
        """t for a round of ``n`` sites: ``max(2, ceil(threshold * n))`` (more than ``n`` when
        ``n`` < 2: such a round cannot be summed securely)."""
        # Rounded before ceil: 0.7 * 10 is 7.000000000000001 in binary floating point.
        return max(2, math.ceil(round(self.threshold * n, 9)))


@dataclass(frozen=True)
class DPConfig:
    """``[federation.dp]``: client-level differential privacy (DP-FedAvg, McMahan et al. 2018).
    Each site's update is clipped to ``clip``; the round's sum of updates carries Gaussian noise
    of standard deviation ``noise_multiplier * clip``; the aggregate is the noisy sum over the
    round's n participants, divided by n. The privacy accountant (common/dp.py, Opacus' RDP
    analysis) gives the run's epsilon at ``delta`` after every round, and each site's over the
    rounds it took part in."""

    enabled: bool = False
    #: The L2 norm each site clips its whole update to (the sensitivity of the round's sum).
    clip: float = 1.0
    #: σ: the noise on the round's sum has standard deviation σ * clip. 0 = calibrated at run
    #: start from ``target_epsilon`` (the σ that reaches it after ``federation.rounds`` rounds),
    #: recorded in the stored config.
    noise_multiplier: float = 0.0
    #: The run's privacy budget; 0 = none. With ``noise_multiplier`` 0 it sets σ (above).
    target_epsilon: float = 0.0
    #: The δ of the (ε, δ) guarantee: below 1 / (number of sites) to mean anything.
    delta: float = 1e-5
    #: ``central``: the coordinator adds the noise to the sum (it is trusted with the
    #: updates); ``distributed``: each of the round's sites adds its share, so that the
    #: securely aggregated sum carries it (needs ``federation.secure_aggregation``).
    mode: str = "central"


@dataclass(frozen=True)
class FederationConfig:
    """The round loop at the coordinator."""

    #: Rounds (with ``patience``: at most). A run config that does not set it gets its data
    #: set's (:func:`default_rounds`): 20 with patience 3, or 5 with none on the heart demo;
    #: given without ``patience``, every round runs.
    rounds: int = 5
    #: Federated early stopping: the run ends once the sites' weighted validation loss of the
    #: global state has not improved for this many rounds (the last round is then evaluated as
    #: usual); ``rounds`` is then a maximum. 0 = run every round.
    patience: int = 0
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
    #: FedAvg of LoRA updates from sites that trained a lower rank (their own ``lora_rank``):
    #: ``rank-aware`` averages each component over the sites that trained it (HetLoRA);
    #: ``zero-padding`` counts the others' zeros, shrinking the components few sites train.
    lower_ranks: str = "rank-aware"
    #: How the round's aggregated update moves the global state (Reddi et al. 2021, "Adaptive
    #: Federated Optimization"): ``fedavg`` adds it times ``server_lr``; ``fedadam`` and
    #: ``fedyogi`` treat it as a pseudo-gradient with first and second moments (``server_beta1``,
    #: ``server_beta2``, adaptivity ``server_tau``), kept with each round's checkpoint so that a
    #: resumed run goes on with them. Coordinator-only: the sites never see it.
    server_optimizer: str = "fedavg"
    #: The server's learning rate (η): 1 with fedavg is plain FedAvg; the paper's grid for
    #: fedadam / fedyogi spans 1e-3..1, around 1e-2.
    server_lr: float = 1.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    #: Largest sealed upload accepted, in bytes; 0 = twice the fp32 size of the shared state
    #: plus 64 KiB.
    max_upload_bytes: int = 0
    #: Bins of each site's score histograms by label, from which the pooled AUC is computed
    #: (2..1000). Fewer bins tell the coordinator less of each test row's score, at a cost in
    #: the pooled AUC's precision (docs/benchmarks.md); with secure aggregation it sees only
    #: their sum anyway.
    histogram_bins: int = HIST_BINS
    #: Personalization: after the last round, each site fine-tunes this part of the delivered
    #: global state on its own training rows (``head``: the classification head; ``lora-b``:
    #: LoRA's B matrices) and reports the AUC of the global and of its personalized model on its
    #: test rows. The personalized part never leaves the site; ``none`` = no personalization.
    personalize: str = "none"
    #: Most epochs of that fine-tuning (early-stopped on the site's validation rows; the site
    #: keeps the global part unchanged when no epoch lowers its validation loss).
    personalize_epochs: int = 5
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    dp: DPConfig = field(default_factory=DPConfig)

    @property
    def site_clip(self) -> float:
        """The L2 norm a site clips its update to: ``dp.clip`` with DP on, else
        ``secure_aggregation.clip`` with secure aggregation on, else 0 (no clipping)."""
        if self.dp.enabled:
            return self.dp.clip
        if self.secure_aggregation.enabled:
            return self.secure_aggregation.clip
        return 0.0


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


#: ``federation.rounds`` and ``federation.patience`` of a run whose config sets no rounds: run to
#: convergence, at most 20 rounds, ending after 3 without a lower validation loss. With 5 rounds
#: Pima, medpar and a user's folder of four CSV sites were still improving (docs/benchmarks.md).
CONVERGE_ROUNDS = (20, 3)
#: The same on the packaged heart demo (and the synthetic scale sets): 5 rounds, every one run.
#: Its baselines train three whole budgets per model (one per rate of the grid), so 20 rounds
#: would take the demo from about 7 minutes to over 12 on 2 cores, for +0.008 macro AUC.
DEMO_ROUNDS = (5, 0)


def default_rounds(dataset: str) -> tuple[int, int]:
    """The rounds and patience of a run on ``dataset`` whose config sets no rounds."""
    demo = dataset == "heart" or dataset.partition(":")[0] == "synthetic"
    return DEMO_ROUNDS if demo else CONVERGE_ROUNDS


def _with_default_rounds(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with its data set's :func:`default_rounds` where it does not set them: the
    rounds where it sets none, the patience too where it sets neither (rounds given alone run
    every one; a schedule sets the rounds and allows no patience). Anything malformed is left
    for :func:`_build` to report."""
    fed, data = values.get("federation", {}), values.get("data", {})
    dataset = data.get("dataset", DataConfig.dataset) if isinstance(data, dict) else None
    if not isinstance(fed, dict) or not isinstance(dataset, str) or values.get("schedule"):
        return values
    if "rounds" in fed:
        return values
    rounds, patience = default_rounds(dataset)
    return {**values, "federation": {"patience": patience, **fed, "rounds": rounds}}


#: ``tuning.lr_grid`` when none is given: the run's rate (``train.lr``) times these.
LR_GRID_FACTORS = (1.0, 1 / 3, 1 / 10)


@dataclass(frozen=True)
class TuningConfig:
    """``[tuning]``: how each mode picks its learning rate. The alone and centralized baselines
    (and ``fedpeft simulate --tune-lr``'s federated run) train once per rate of ``lr_grid`` and keep
    the model with the lowest validation loss, so that no mode is judged at a rate chosen for
    another (a rate that suits a site's few steps a round can wreck a model taking many more).
    The coordinator's own setting: it never reaches a site."""

    #: Learning rates to choose from; empty = ``train.lr`` times 1, 1/3 and 1/10 (resolved when
    #: the config is built, so the stored config shows the grid used). One rate = no choice.
    lr_grid: tuple[float, ...] = ()
    #: 0: each baseline trains every rate of the grid for its whole budget and keeps the model
    #: with the lowest validation loss. k > 0: each rate first trains only the budget's first k
    #: epochs (exactly the start of its whole run), the rate with the lowest validation loss
    #: then is chosen, and only it trains the whole budget: the grid then costs k epochs per
    #: other rate instead of a whole budget each, but a probe often picks another rate than
    #: whole runs would, and a weaker reference (docs/benchmarks.md).
    probe_epochs: int = 0


def probes_used(probe_epochs: int, rates: int, budget_epochs: int) -> int:
    """The probe length the baselines train (``tuning.probe_epochs``) where a probe decides
    anything: a grid of several rates and a probe shorter than the budget; else 0, whole runs.
    The one rule for ``baselines.run_baselines`` and for the report of a stored run."""
    return probe_epochs if rates > 1 and 0 < probe_epochs < budget_epochs else 0


@dataclass(frozen=True)
class DataConfig:
    """Where site records come from and how they are split."""

    #: ``heart``, ``pima``, ``medpar``, ``synthetic[:N]`` (N generated sites, default 100: for
    #: scale runs), or a folder with one data file per site (CSV, JSONL or Parquet).
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
class SitePrivacy:
    """What a site does to its update before it leaves (``federation.dp`` and
    ``federation.secure_aggregation``, resolved): clip it, add its share of the noise, mask it."""

    #: The L2 norm the site clips its whole update to; 0 = no clipping.
    clip: float
    #: σ of the run's noise (the round's sum carries σ * clip); 0 = DP off.
    noise_multiplier: float
    #: Distributed DP: the site adds its share of the noise,
    #: ``common.dp.noise_std_per_site(noise_multiplier, clip, n)``; otherwise the coordinator
    #: adds it (or nobody, with DP off).
    distributed_noise: bool
    #: The update leaves masked (secure aggregation): the coordinator learns only the sum.
    secure_aggregation: bool
    #: Secure aggregation: the share of the round's sites needed to unmask
    #: (:meth:`SecureAggregationConfig.shares_needed`); 0 without it.
    threshold: float
    #: Secure aggregation: the range of the fixed-point encoding; 0 without it.
    fixed_point_range: float


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
    #: What the site does to its update before it leaves.
    privacy: SitePrivacy
    #: Bins of the score histograms by label in its evaluations (``federation.histogram_bins``).
    histogram_bins: int
    #: The part a site personalizes after the run, and for how many epochs at most
    #: (``federation.personalize``, ``federation.personalize_epochs``).
    personalize: str
    personalize_epochs: int
    #: The teacher a student imitates (``[distill]``); ``teacher_run`` 0: none. (The defaults
    #: here and in other settings added since are what an older export's config reads as.)
    distill: DistillConfig = field(default_factory=DistillConfig)
    #: The run's stages (``[[schedule]]``); empty: every round trains everything at train.lr.
    schedule: tuple[Stage, ...] = ()

    def stage(self, rnd: int) -> Stage:
        """The stage round ``rnd`` is in; the whole run as one stage without a schedule."""
        return stage_of(self.schedule, rnd, self.train.lr)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces; what is signed and hashed."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, complete: bool = True) -> SiteRunConfig:
        """Parse and check a site config; ``ConfigError`` naming every problem (every setting
        must be there: a signed config is complete; ``complete`` False: a stored one, such as
        an older export's, where a setting added since takes its default)."""
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"site config: not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(values, dict):
            raise ConfigError("site config: expected a JSON object")
        problems: list[str] = []
        cfg = _build(cls, values, "", problems, complete=complete)
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
    tuning: TuningConfig = field(default_factory=TuningConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    #: Stages (``[[schedule]]``, ``simulate --schedule``): their rounds add up to the run's
    #: ``federation.rounds``, which a schedule sets.
    schedule: tuple[Stage, ...] = ()
    #: Simulation only, standing in for each site's own ``lora_rank`` (site.toml): the highest
    #: LoRA rank virtual site i trains, for sites of less capacity; 0, or a site past the list:
    #: the run's ``method.lora.r``. Never signed to a site.
    site_lora_ranks: tuple[int, ...] = ()
    #: Simulation only, standing in for each site's own ``quantize`` (site.toml): how virtual
    #: site i holds the frozen base model (``QUANTIZE``: none, int8 or nf4); a site past the
    #: list: none.
    site_quantize: tuple[str, ...] = ()

    def to_json(self) -> str:
        """Everything but ``db``: the store URL (which may carry a password) is the coordinator's
        own setting and is never serialized (the stored config, the app bundle)."""
        values = dataclasses.asdict(self)
        del values["db"]
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return build_config(json.loads(text))

    def with_noise_multiplier(self, sigma: float) -> RunConfig:
        """This config with ``federation.dp.noise_multiplier`` set: the σ calibrated from
        ``target_epsilon`` at run start (``common.dp.resolve_noise_multiplier``), so that the
        stored config and the sites' signed config show the σ that was used."""
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"federation.dp.noise_multiplier: must be positive, got {sigma!r}")
        f = self.federation
        dp = dataclasses.replace(f.dp, noise_multiplier=float(sigma))
        return dataclasses.replace(self, federation=dataclasses.replace(f, dp=dp))

    def with_dapt(self, rounds: int) -> RunConfig:
        """This config with ``rounds`` rounds of domain-adaptive pretraining first
        (``--dapt-rounds``): an mlm stage before the run's stages, or before one stage of the
        run's rounds that trains every shared parameter; checked as a run config is. A schedule
        runs every round, so the result has no ``federation.patience``."""
        if rounds < 1:
            raise ConfigError(f"--dapt-rounds: must be at least 1, got {rounds}")
        if pretraining_rounds(self.schedule):
            raise ConfigError("--dapt-rounds: the schedule has an mlm stage already")
        stages = self.schedule or (Stage(rounds=self.federation.rounds, trains="all"),)
        values = dataclasses.asdict(self)
        values["federation"]["patience"] = 0  # a schedule runs every round
        values["schedule"] = [dataclasses.asdict(s) for s in (Stage(rounds, trains=MLM), *stages)]
        return build_config(values)

    def _fixed_point_range(self) -> float:
        """The fixed-point range of a masked update: ``secure_aggregation.clip`` and, with
        distributed DP, six standard deviations of the largest noise share a site adds
        (sigma * clip, at t = 1) beyond it, so that encoding clips no coordinate of an honest
        site's noisy update short of odds of about 1e-9 each; 0 without secure aggregation."""
        f = self.federation
        if not f.secure_aggregation.enabled:
            return 0.0
        if f.dp.enabled and f.dp.mode == "distributed":
            return f.secure_aggregation.clip + 6 * f.dp.noise_multiplier * f.dp.clip
        return f.secure_aggregation.clip

    def for_sites(self) -> SiteRunConfig:
        """The part of this config that sites act on (see :class:`SiteRunConfig`).

        ``ConfigError`` while DP is on with σ still to be calibrated (``noise_multiplier`` 0):
        a site must never be told to add no noise by a config that asked for some; see
        :meth:`with_noise_multiplier`."""
        f = self.federation
        if f.dp.enabled and f.dp.noise_multiplier <= 0:
            raise ConfigError(
                "federation.dp.noise_multiplier: not calibrated yet from target_epsilon "
                "(RunConfig.with_noise_multiplier); sites cannot be given this config"
            )
        sa = f.secure_aggregation
        privacy = SitePrivacy(
            clip=f.site_clip,
            noise_multiplier=f.dp.noise_multiplier if f.dp.enabled else 0.0,
            distributed_noise=f.dp.enabled and f.dp.mode == "distributed",
            secure_aggregation=sa.enabled,
            threshold=sa.threshold if sa.enabled else 0.0,
            fixed_point_range=self._fixed_point_range(),
        )
        return SiteRunConfig(
            seed=self.seed,
            model=self.model,
            method=self.method,
            train=self.train,
            codec=self.federation.codec,
            rounds=self.federation.rounds,
            max_upload_bytes=self.federation.max_upload_bytes,
            test_fraction=self.data.test_fraction,
            privacy=privacy,
            histogram_bins=self.federation.histogram_bins,
            personalize=f.personalize,
            personalize_epochs=f.personalize_epochs,
            distill=self.distill,
            schedule=self.schedule,
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


def pretraining_rounds(schedule: tuple[Stage, ...]) -> int:
    """The rounds of ``schedule``'s mlm stages: domain-adaptive pretraining, no labels read."""
    return sum(s.rounds for s in schedule if s.trains == MLM)


def stage_of(schedule: tuple[Stage, ...], rnd: int, lr: float) -> Stage:
    """The stage of ``schedule`` that round ``rnd`` (from 1) is in; without a schedule, or past
    its end, every parameter at ``lr``."""
    end = 0
    for stage in schedule:
        end += stage.rounds
        if rnd <= end:
            return stage
    return Stage(rounds=max(rnd, 1), lr=lr, trains="all")


def _convert(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    if get_origin(hint) is tuple and is_dataclass(get_args(hint)[0]):
        item = get_args(hint)[0]
        if not isinstance(value, list | tuple) or not all(isinstance(v, dict) for v in value):
            problems.append(f"{where}: expected a list of tables")
            return None
        built = [_build(item, v, f"{where}[{i}].", problems) for i, v in enumerate(value)]
        return None if any(b is None for b in built) else tuple(built)
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
    need(model.layers >= 0, "model.layers: must be 0 (every layer) or more")
    problems.extend(_method_problems(method))
    _check_compose(method, problems)
    need(t.local_epochs >= 1, "train.local_epochs: must be at least 1")
    need(t.batch_size >= 1, "train.batch_size: must be at least 1")
    need(t.lr >= 0, "train.lr: must not be negative (0 = the method's own rate)")
    need(t.weight_decay >= 0, "train.weight_decay: must not be negative")
    need(0 <= t.dropout < 1, "train.dropout: must be in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip: must not be negative (0 disables clipping)")
    need(0 < t.val_fraction < 0.5, "train.val_fraction: must be in (0, 0.5)")
    need(t.patience >= 1, "train.patience: must be at least 1")
    need(
        t.class_weight in CLASS_WEIGHTS,
        f"train.class_weight: {t.class_weight!r} is not one of {', '.join(CLASS_WEIGHTS)}",
    )
    need(
        math.isfinite(t.prox_mu) and t.prox_mu >= 0,
        f"train.prox_mu: must be 0 (off) or positive, got {t.prox_mu!r}",
    )
    need(
        0 <= t.warmup < 1,
        f"train.warmup: must be in [0, 1) (a share of the budget), got {t.warmup!r}",
    )
    need(t.decay in DECAYS, f"train.decay: {t.decay!r} is not one of {', '.join(DECAYS)}")


def _check_personalize(
    part: str, epochs: int, method: str, secure: bool, prefix: str, problems: list[str]
) -> None:
    """``personalize``: a known part, one the method has, and a bounded number of epochs."""
    need = _needs(problems)
    if part not in PERSONAL_PARTS:
        problems.append(f"{prefix}personalize: {part!r} is not one of {', '.join(PERSONAL_PARTS)}")
        return
    need(1 <= epochs <= 100, f"{prefix}personalize_epochs: must be in 1..100, got {epochs!r}")
    need(
        part != "lora-b" or method == "lora",
        f"{prefix}personalize: lora-b needs method lora (the method is {method!r})",
    )
    need(
        part == "none" or not secure,
        f"{prefix}personalize: not with secure aggregation (the sites' personalized evaluations "
        "would reach the coordinator one by one, outside the secure exchange)",
    )


def _method_problems(method: MethodConfig) -> list[str]:
    """Each registered method's check of its settings table in ``method``."""
    return [
        problem
        for spec in specs()
        if spec.config is not None
        for problem in spec.check(getattr(method, spec.name))
    ]


def _check_distill(d: DistillConfig, prefix: str, problems: list[str]) -> None:
    need = _needs(problems)
    need(d.teacher_run >= 0, f"{prefix}teacher_run: must be 0 (none) or a run id")
    need(
        d.temperature > 0 and math.isfinite(d.temperature),
        f"{prefix}temperature: must be positive, got {d.temperature!r}",
    )
    need(0 <= d.alpha <= 1, f"{prefix}alpha: must be in [0, 1], got {d.alpha!r}")
    need(d.teacher_layers >= 0, f"{prefix}teacher_layers: must be 0 (every layer) or more")
    if d.enabled:
        need(
            not d.teacher_method.trains_base_weights(),
            f"{prefix}teacher_method: {d.teacher_method.name!r} trains base weights (full, or "
            "lora.full_layers): its state is the model itself, too large to send every round",
        )
        problems.extend(f"{prefix}teacher_method: {p}" for p in _method_problems(d.teacher_method))


def _check_compose(method: MethodConfig, problems: list[str]) -> None:
    """A model of several methods (``method.compose``): ones that compose, LoRA without
    ``full_layers``."""
    from fedpeft.common.methods import compose

    if not method.compose:
        return
    names = (method.name, *method.compose)
    if len(set(names)) < len(names):
        problems.append(f"method.compose: {', '.join(names)}: each method once")
    distinct = tuple(dict.fromkeys(names))
    problems.extend(f"method.compose: {p}" for p in compose.problems(distinct))
    if "lora" in names and method.lora.full_layers:
        problems.append("method.compose: not with method.lora.full_layers")


def _check_schedule(
    schedule: tuple[Stage, ...], rounds: int, method: MethodConfig, problems: list[str]
) -> None:
    need = _needs(problems)
    need(
        not method.compose or bool(schedule),
        "method.compose: set by the stages of a [[schedule]] that train other methods, not alone",
    )
    need(
        method.mlm == (pretraining_rounds(schedule) > 0),
        "method.mlm: set by a [[schedule]] stage that trains mlm, not alone",
    )
    need(
        not schedule or schedule[-1].trains != MLM,
        "schedule: the last stage trains mlm, so the classifier would never be trained after "
        "it; end with a stage that trains the head (all or head)",
    )
    for i, stage in enumerate(schedule):
        where = f"schedule[{i}]"
        need(stage.rounds >= 1, f"{where}.rounds: must be at least 1")
        need(stage.lr >= 0 and stage.lr < 1, f"{where}.lr: must be in [0, 1) (0 = train.lr)")
        need(
            stage.trains in STAGE_TRAINS,
            f"{where}.trains: {stage.trains!r} is not one of {', '.join(STAGE_TRAINS)}",
        )
        need(
            stage.method in ("", *method_names()),
            f"{where}.method: unknown method {stage.method!r}",
        )
    if schedule:
        total = sum(s.rounds for s in schedule)
        need(
            total == rounds,
            f"schedule: its stages' rounds add up to {total}, the run has {rounds} "
            "(federation.rounds)",
        )


def _check_site(cfg: SiteRunConfig, problems: list[str]) -> None:
    need = _needs(problems)
    _check_model_and_training(cfg.model, cfg.method, cfg.train, problems)
    _check_distill(cfg.distill, "distill.", problems)
    _check_schedule(cfg.schedule, cfg.rounds, cfg.method, problems)
    need(
        all(s.lr > 0 for s in cfg.schedule),
        "schedule: each stage's lr must be positive (resolved by the coordinator)",
    )
    need(
        all(s.method in (cfg.method.name, *cfg.method.compose) for s in cfg.schedule),
        "schedule: each stage's method must be the run's or one it composes",
    )
    _check_personalize(
        cfg.personalize,
        cfg.personalize_epochs,
        cfg.method.name,
        cfg.privacy.secure_aggregation,
        "",
        problems,
    )
    need(cfg.train.lr > 0, "train.lr: must be positive (resolved by the coordinator)")
    need(cfg.rounds >= 1, "rounds: must be at least 1")
    need(cfg.codec in CODECS, f"codec: must be one of {', '.join(CODECS)}")
    need(cfg.max_upload_bytes >= 0, "max_upload_bytes: must not be negative (0 = auto)")
    need(0 < cfg.test_fraction < 1, "test_fraction: must be in (0, 1)")
    need(2 <= cfg.histogram_bins <= HIST_BINS, f"histogram_bins: must be in 2..{HIST_BINS}")
    p = cfg.privacy
    need(p.clip >= 0 and math.isfinite(p.clip), "privacy.clip: must be 0 (none) or positive")
    need(
        p.noise_multiplier >= 0 and math.isfinite(p.noise_multiplier),
        "privacy.noise_multiplier: must be 0 (none) or positive",
    )
    if p.noise_multiplier > 0 or p.distributed_noise:
        need(p.clip > 0, "privacy.clip: must be positive with DP on (noise_multiplier > 0)")
    if p.distributed_noise:
        need(p.noise_multiplier > 0, "privacy.noise_multiplier: must be positive for site noise")
        need(p.secure_aggregation, "privacy.distributed_noise: needs secure_aggregation")
    if p.secure_aggregation:
        need(0.5 < p.threshold <= 1, "privacy.threshold: must be in (0.5, 1]")
        need(p.fixed_point_range > 0, "privacy.fixed_point_range: must be positive")
        need(p.clip > 0, "privacy.clip: must be positive with secure aggregation")


def _check_ranges(cfg: RunConfig, problems: list[str]) -> None:
    need = _needs(problems)
    need(cfg.device in DEVICES, f"device: must be one of {', '.join(DEVICES)}")
    need(bool(cfg.db), "db: must be a SQLAlchemy URL")
    if any(cfg.site_lora_ranks):
        need(
            not cfg.federation.secure_aggregation.enabled,
            "site_lora_ranks: not with secure aggregation (a component fewer sites train would "
            "show their updates in the sum; sites train the run's rank there)",
        )
        need(
            not cfg.method.compose and not cfg.method.mlm,
            "site_lora_ranks: not with stages of different methods or an mlm stage",
        )
        need(
            cfg.method.name == "lora",
            f"site_lora_ranks: sites of different LoRA ranks need method.name lora, not "
            f"{cfg.method.name!r}",
        )
        need(
            all(0 <= r <= cfg.method.lora.r for r in cfg.site_lora_ranks),
            f"site_lora_ranks: each must be in 0..method.lora.r ({cfg.method.lora.r}; 0: that "
            f"rank); got {list(cfg.site_lora_ranks)}",
        )
    need(
        all(q in QUANTIZE for q in cfg.site_quantize),
        f"site_quantize: each must be one of {', '.join(QUANTIZE)}; got {list(cfg.site_quantize)}",
    )
    if any(q != "none" for q in cfg.site_quantize):
        need(
            not cfg.method.trains_base_weights(),
            f"site_quantize: method {cfg.method.name!r} trains base weights (full, or "
            "method.lora.full_layers), which a quantized base holds frozen",
        )
    _check_model_and_training(cfg.model, cfg.method, cfg.train, problems)
    f = cfg.federation
    grid = cfg.tuning.lr_grid
    need(
        all(math.isfinite(r) and 0 < r < 1 for r in grid) and len(set(grid)) == len(grid),
        f"tuning.lr_grid: each rate must be in (0, 1), each once; got {list(grid)}",
    )
    need(len(grid) <= 8, f"tuning.lr_grid: at most 8 rates (each trains a model), got {len(grid)}")
    need(cfg.tuning.probe_epochs >= 0, "tuning.probe_epochs: must be 0 (whole runs) or more")
    need(f.rounds >= 1, "federation.rounds: must be at least 1")
    need(f.patience >= 0, "federation.patience: must be 0 (off) or more")
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
    need(
        f.lower_ranks in LOWER_RANKS,
        f"federation.lower_ranks: {f.lower_ranks!r} is not one of {', '.join(LOWER_RANKS)}",
    )
    need(0 <= f.trim_fraction < 0.5, "federation.trim_fraction: must be in [0, 0.5)")
    need(
        f.server_optimizer in SERVER_OPTIMIZERS,
        f"federation.server_optimizer: {f.server_optimizer!r} is not one of "
        f"{', '.join(SERVER_OPTIMIZERS)}",
    )
    need(f.server_lr > 0, "federation.server_lr: must be positive")
    for name in ("server_beta1", "server_beta2"):
        need(0 <= getattr(f, name) < 1, f"federation.{name}: must be in [0, 1)")
    need(f.server_tau > 0, "federation.server_tau: must be positive")
    need(f.max_upload_bytes >= 0, "federation.max_upload_bytes: must not be negative (0 = auto)")
    need(
        2 <= f.histogram_bins <= HIST_BINS,
        f"federation.histogram_bins: must be in 2..{HIST_BINS}",
    )
    _check_privacy(f, problems)
    _check_distill(cfg.distill, "distill.", problems)
    _check_schedule(cfg.schedule, f.rounds, cfg.method, problems)
    if cfg.schedule:
        need(
            f.patience == 0,
            "schedule: not with federation.patience (a stage could be stopped before the next "
            "one starts)",
        )
    if cfg.distill.enabled:
        need(
            f.personalize == "none",
            "distill: not with federation.personalize (a student is delivered as one model)",
        )
    _check_personalize(
        f.personalize,
        f.personalize_epochs,
        cfg.method.name,
        f.secure_aggregation.enabled,
        "federation.",
        problems,
    )
    need(0 < cfg.data.test_fraction < 1, "data.test_fraction: must be in (0, 1)")
    try:
        synthetic = synthetic_site_count(cfg.data.dataset) is not None
    except ConfigError as exc:
        problems.extend(exc.problems)
        synthetic = True  # said
    need(
        cfg.data.dataset in BENCHMARKS or synthetic or Path(cfg.data.dataset).is_dir(),
        f"data.dataset: {cfg.data.dataset!r} is neither a benchmark "
        f"({', '.join(BENCHMARKS)}), synthetic[:N] nor an existing folder",
    )


def _check_privacy(f: FederationConfig, problems: list[str]) -> None:
    need = _needs(problems)
    sa, dp = f.secure_aggregation, f.dp
    need(
        0.5 < sa.threshold <= 1,
        "federation.secure_aggregation.threshold: must be in (0.5, 1] (more than half of a "
        f"round's sites, as common/secagg.py requires), got {sa.threshold!r}",
    )
    need(
        sa.clip > 0 and math.isfinite(sa.clip),
        f"federation.secure_aggregation.clip: must be positive, got {sa.clip!r}",
    )
    need(
        dp.clip > 0 and math.isfinite(dp.clip),
        f"federation.dp.clip: must be positive, got {dp.clip!r}",
    )
    need(
        dp.noise_multiplier >= 0 and math.isfinite(dp.noise_multiplier),
        "federation.dp.noise_multiplier: must be 0 (calibrated from target_epsilon) or positive",
    )
    need(
        dp.target_epsilon >= 0 and math.isfinite(dp.target_epsilon),
        "federation.dp.target_epsilon: must be 0 (none) or positive",
    )
    need(0 < dp.delta < 1, f"federation.dp.delta: must be in (0, 1), got {dp.delta!r}")
    need(
        dp.mode in DP_MODES,
        f"federation.dp.mode: {dp.mode!r} is not one of {', '.join(DP_MODES)}",
    )
    if not dp.enabled:
        return
    need(
        dp.noise_multiplier > 0 or dp.target_epsilon > 0,
        "federation.dp: enabled needs noise_multiplier > 0 or target_epsilon > 0 (to calibrate "
        "the noise multiplier from)",
    )
    if dp.mode == "distributed":
        need(
            sa.enabled,
            "federation.dp.mode: distributed needs federation.secure_aggregation.enabled = "
            "true (without it the coordinator sees each update with only its share of the "
            "noise)",
        )
    if sa.enabled:
        need(
            dp.clip <= sa.clip,
            f"federation.dp.clip: {dp.clip!r} is above federation.secure_aggregation.clip "
            f"{sa.clip!r}, the range of the fixed-point encoding",
        )


def _resolved(stage: Stage, method: str, lr: float) -> Stage:
    """``stage`` with its method named (``""``: the run's ``method``) and its rate (0: the run's
    ``lr`` for the run's method, another method's own default rate)."""
    name = stage.method or method
    rate = stage.lr or (lr if name == method else get_spec(name).default_lr)
    return dataclasses.replace(stage, method=name, lr=rate)


def build_config(values: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested values; report every problem at once."""
    problems: list[str] = []
    cfg = _build(RunConfig, _with_default_rounds(values), "", problems)
    if not problems and cfg.schedule:  # a schedule sets the run's rounds, and its methods
        rounds = sum(s.rounds for s in cfg.schedule)
        fed = dataclasses.replace(cfg.federation, rounds=rounds)
        named = [s.method for s in cfg.schedule if s.method and s.method != cfg.method.name]
        compose = tuple(dict.fromkeys(named))
        mlm = pretraining_rounds(cfg.schedule) > 0
        method = dataclasses.replace(cfg.method, compose=compose, mlm=mlm)
        cfg = dataclasses.replace(cfg, federation=fed, method=method)
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
    if cfg.schedule:  # the stored config shows each stage's method and rate
        stages = tuple(_resolved(s, cfg.method.name, cfg.train.lr) for s in cfg.schedule)
        cfg = dataclasses.replace(cfg, schedule=stages)
    if not cfg.tuning.lr_grid:
        # The run's own rate exactly, the others to three significant digits.
        grid = (cfg.train.lr,) + tuple(
            float(f"{cfg.train.lr * k:.3g}") for k in LR_GRID_FACTORS[1:]
        )
        cfg = dataclasses.replace(cfg, tuning=dataclasses.replace(cfg.tuning, lr_grid=grid))
    return cfg


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` (nested, changed in place and returned) with ``overrides`` (dotted keys) set;
    overrides set to ``None`` are ignored, so CLI flags that were not given change nothing."""
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return values


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a run config: defaults, then the TOML file, then ``overrides`` (dotted keys).

    Overrides set to ``None`` are ignored, so CLI flags that were not given change nothing.
    """
    values = read_toml(path) if path is not None else {}
    return build_config(apply_overrides(values, overrides))
