"""The site's message handler, and the Flower ClientApp around it.

:func:`handle` answers one message with the site's own settings (:class:`SiteSetup`:
client/setup.py). ``train``: verify the coordinator's signature on the global state and the run's
site config it carries (the only settings the site acts on), check the base-model fingerprint,
train locally on the site's own rows, evaluate, and reply with ``delta = local - global`` over
the shared parameters, sealed for the run's key and signed with the site's identity key
(common/envelope.py), plus metrics. ``evaluate``: score the global state on the site's held-out
rows and reply with metrics and a score histogram by label (for the pooled AUC), never
individual predictions.

The site worker (client/worker.py) calls :func:`handle` with the setup it read at start; the
Flower ClientApp (:data:`app`) is a thin shell that builds the setup from its node config
(simulation, or stock Flower).

Before any row is read, the global state must be signed by a coordinator key the site trusts
and, at a deployed site, its policy (client/policy.py) must allow the task; a refused task's
reply says ``refused: <reason>``. A deployed site writes every task and every reply that leaves
to its ledger (client/ledger.py, :class:`TaskRecord`), and refuses a task it cannot record.

A failure at the site becomes a reply with status ``error`` and a short reason free of local
detail (no paths, no rows); the detail goes to the site's own log.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import re
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.client.approvals import read_approvals
from fedpeft.client.ledger import Ledger, LedgerError
from fedpeft.client.policy import (
    PolicyRefusal,
    SitePolicy,
    TaskFacts,
    check_task,
    check_upload,
    expected_upload_bytes,
)
from fedpeft.client.secagg import Histograms, answer_once, answer_stage, masked_update
from fedpeft.client.setup import SiteSetup, setup_from_node_config, site_name
from fedpeft.client.trainer import (
    Encoded,
    MaskedLm,
    Teacher,
    encode,
    encode_site,
    evaluate,
    logits_of,
    predict,
    train_local,
)
from fedpeft.common import keys
from fedpeft.common.config import (
    MLM,
    PERSONAL_MARKERS,
    DataConfig,
    ModelConfig,
    SiteRunConfig,
)
from fedpeft.common.data import (
    SiteData,
    data_fingerprint,
    load_notes,
    load_site_file,
    load_sites,
    split_site,
)
from fedpeft.common.dp import clip_update
from fedpeft.common.envelope import (
    ForgedGlobalState,
    GlobalState,
    open_global_signed_by,
    seal_delta,
    seal_evaluation,
)
from fedpeft.common.errors import ConfigError, DataError, FedpeftError, FingerprintMismatch
from fedpeft.common.keys import Phase, SiteStatus
from fedpeft.common.methods import build_method, load_shared_state, lora, shared_state
from fedpeft.common.methods.compose import stage_marker, stage_trains_name
from fedpeft.common.metrics import Evaluation
from fedpeft.common.model import (
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    resolve_device,
    resolve_model_path,
)
from fedpeft.common.quantize import quantize_base
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.secagg import round_context
from fedpeft.common.secagg_messages import MASKED, STAGES, StageTask
from fedpeft.common.state import State
from fedpeft.common.tensors import to_numpy, to_torch
from fedpeft.common.wire import RING

log = logging.getLogger("fedpeft.client")


@dataclass
class SiteSession:
    """What a site keeps between messages in one process: its rows, tokenized, and the model."""

    site: str
    train: Encoded
    val: Encoded
    test: Encoded
    base: torch.nn.Module
    fingerprint: str
    device: torch.device
    #: The site's rows as loaded (common/data.py ``data_fingerprint``): its data version, sent
    #: beside each update and written in the ledger, so that a model card can name it.
    data_fingerprint: str = ""
    #: A distillation teacher's logits on the training rows, by the teacher state's SHA-256:
    #: the teacher never changes during a run, so a site computes them once per process.
    teacher_logits: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: The tokenizer's mask token and vocabulary, for a schedule's mlm stage (None: it has no
    #: mask token).
    mlm: MaskedLm | None = None
    #: The notes an mlm stage pretrains on: the training rows and the site's unlabeled notes
    #: (its ``unlabeled`` file), never a test row; read on a run's first mlm round
    #: (:func:`read_notes`; None before).
    pretrain: Encoded | None = None


# One process may serve many messages (simulation keeps its actors, each serving any site);
# loading the model and tokenizing a site's rows once per process keeps a round cheap. The
# frozen base model is loaded once per process and shared by its sessions (each message trains
# a copy of it), so that a session costs only its tokenized rows: with 100 virtual sites on two
# actors, each actor keeps every site it served warm.
_SESSIONS: dict[tuple[Any, str], SiteSession] = {}
_MAX_SESSIONS = 1024
_BASES: dict[tuple[Any, ...], torch.nn.Module] = {}
_MAX_BASES = 3  # ~90 MB each with the default model; a distillation run holds two
#: A shipped or generated data set's sites, read once per process (a folder's files are read
#: for each new session: they may change between runs).
_DATASETS: dict[DataConfig, list[SiteData]] = {}


def _base_model(
    cfg: SiteRunConfig,
    device: torch.device,
    quantize: str = "none",
    model: ModelConfig | None = None,
) -> torch.nn.Module:
    """The run's frozen base model, cached per process; ``model``: that one instead (a
    distillation teacher's, of other layers)."""
    model = model or cfg.model
    key = (repr(model), cfg.train.dropout, cfg.seed, str(device), quantize)
    if key not in _BASES:
        if len(_BASES) >= _MAX_BASES:
            dropped = _BASES.pop(next(iter(_BASES)))  # oldest first, with its sessions: a
            # long-lived site worker serving runs of other seeds keeps at most two models
            for stale in [k for k, s in _SESSIONS.items() if s.base is dropped]:
                del _SESSIONS[stale]
        base = load_base_model(model, cfg.train.dropout, cfg.seed)
        if quantize != "none":  # the site's own setting: its copy of the base in int8 or nf4
            base = quantize_base(base, quantize)
        _BASES[key] = base.to(device)
    return _BASES[key]


def _site_data(setup: SiteSetup) -> SiteData:
    if setup.data_file is not None:
        return load_site_file(setup.data_file, setup.schema, name=setup.site)
    if setup.partition is None:
        raise DataError("the site's setup names no data")
    data = DataConfig(dataset=setup.partition.dataset, **dataclasses.asdict(setup.schema))
    if data in _DATASETS:
        sites = _DATASETS[data]
    else:
        sites = load_sites(data)
        if not Path(data.dataset).is_dir():
            _DATASETS[data] = sites
    if setup.partition.index >= len(sites):
        raise DataError(
            f"virtual site {setup.partition.index} has no data: the data set has {len(sites)} sites"
        )
    return sites[setup.partition.index]


def site_session(cfg: SiteRunConfig, setup: SiteSetup) -> SiteSession:
    """The cached session for this site and run config, built on first use. The key holds only
    what shapes the rows and the base model (the site's own data settings; the run's model,
    seed, split and dropout), none of which changes from round to round: sessions stay warm."""
    cache_key = (
        setup.data_key(),
        repr((cfg.model, cfg.seed, cfg.test_fraction, cfg.train.val_fraction, cfg.train.dropout)),
    )
    if cache_key in _SESSIONS:
        return _SESSIONS[cache_key]
    site = _site_data(setup)
    split = split_site(site, cfg.seed, cfg.test_fraction, cfg.train.val_fraction)
    tokenizer = load_tokenizer(cfg.model)
    rows = encode_site(tokenizer, site, split, cfg.model.max_length)
    device = resolve_device(setup.device)
    session = SiteSession(
        site=site.name,
        base=_base_model(cfg, device, setup.quantize),
        fingerprint=model_fingerprint(resolve_model_path(cfg.model)),
        device=device,
        data_fingerprint=data_fingerprint(site),
        train=rows["train"],
        val=rows["val"],
        test=rows["test"],
        mlm=MaskedLm.of(tokenizer),
    )
    if site.skipped_rows:
        log.warning("site %s: skipped %d bad rows", site.name, site.skipped_rows)
    if len(_SESSIONS) >= _MAX_SESSIONS:
        _SESSIONS.pop(next(iter(_SESSIONS)))  # oldest first
    _SESSIONS[cache_key] = session
    return session


def read_notes(session: SiteSession, setup: SiteSetup, cfg: SiteRunConfig) -> None:
    """Set ``session.pretrain`` once, on a run's first mlm round: the training rows and the
    site's unlabeled notes (label 0: an mlm stage reads none), less any note whose tokens are a
    test or validation row's (those rows stay unseen); the training rows alone without an
    unlabeled file."""
    if session.pretrain is not None:
        return
    if setup.unlabeled_file is None:
        session.pretrain = session.train
        return
    notes = load_notes(setup.unlabeled_file, setup.schema)
    tokenizer = load_tokenizer(cfg.model)
    extra = encode(
        tokenizer, list(notes), np.zeros(len(notes), dtype=np.int64), cfg.model.max_length
    )
    held_out = set(session.test.ids) | set(session.val.ids)
    kept = tuple(ids for ids in extra.ids if ids not in held_out)
    if len(kept) < len(extra.ids):
        log.warning(
            "site %s: %d unlabeled note(s) left out: the same as a test or validation row",
            session.site,
            len(extra.ids) - len(kept),
        )
    labels = np.concatenate([session.train.labels, np.zeros(len(kept), dtype=np.int64)])
    session.pretrain = Encoded(session.train.ids + kept, labels)


def site_seed(seed: int, rnd: int, site: str) -> int:
    """Per site and round, stable across processes (``hash()`` is salted per process)."""
    return (seed * 1_000_003 + rnd * 10_007 + zlib.crc32(site.encode())) % (2**31)


def site_lora_rank(cfg: SiteRunConfig, setting: int) -> int:
    """The LoRA rank this site trains the run at: its own ``lora_rank`` setting where that is
    below the run's rank (a site of less capacity), else the run's; 0 outside LoRA runs.

    Never below the run's under secure aggregation: a component that fewer sites train would
    show their updates in the unmasked sum (one site's alone, if only it trained it)."""
    if cfg.method.name != lora.SPEC.name:
        return 0
    run_rank = cfg.method.lora.r
    # Beside another method or a masked-language head (a staged run's model) LoRA's layers are
    # the run's rank.
    beside = bool(cfg.method.compose) or cfg.method.mlm
    if setting <= 0 or setting >= run_rank or cfg.privacy.secure_aggregation or beside:
        return run_rank
    return setting


def _model_with(
    session: SiteSession, cfg: SiteRunConfig, state: State, rank: int = 0
) -> torch.nn.Module:
    """The model of the global ``state``; with ``rank`` below the run's LoRA rank, a LoRA of
    that rank holding the state's first ``rank`` components (common/methods/lora.py)."""
    base = copy.deepcopy(session.base)
    if 0 < rank < cfg.method.lora.r:
        model = lora.build_at_rank(cfg.method.lora, base, rank)
        state = lora.truncate(state, rank)
    else:
        model = build_method(cfg.method, base)
    load_shared_state(model, to_torch(state))
    return model.to(session.device)


def teacher_of(
    cfg: SiteRunConfig, teacher_state: State, session: SiteSession, quantize: str = "none"
) -> Teacher:
    """A distillation run's teacher at this site: the teacher's model (its base layers and
    method, ``cfg.distill``) with ``teacher_state``, its logits on the site's training rows
    (computed once per process and teacher), the temperature and the soft loss's weight."""
    digest = hashlib.sha256()
    for name in sorted(teacher_state):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(teacher_state[name]).tobytes())
    key = digest.hexdigest()
    if key not in session.teacher_logits:
        d = cfg.distill
        teacher_model = dataclasses.replace(cfg.model, layers=d.teacher_layers)
        base = _base_model(cfg, session.device, quantize, teacher_model)
        model = build_method(d.teacher_method, copy.deepcopy(base))
        try:
            load_shared_state(model, to_torch(teacher_state))
        except ValueError as exc:
            raise ForgedGlobalState(  # signed but inconsistent: the coordinator's bug, refused
                f"the teacher state does not fit distill.teacher_method: {exc}"
            ) from None
        logits = logits_of(model.to(session.device), session.train, session.device)
        session.teacher_logits.clear()  # one teacher a run: the run's before it is done with
        session.teacher_logits[key] = logits
    return Teacher(session.teacher_logits[key], cfg.distill.temperature, cfg.distill.alpha)


def stage_trains(model: torch.nn.Module, trains: str, marker: str | None = None) -> None:
    """Leave only a stage's part of the shared parameters to train (``[[schedule]]``
    ``trains``): the classification head alone (``head``), the method's own parameters without
    the head (``method``), or both (``all``). ``marker``: in a model of several methods, the
    substring naming the stage's method's parameters (common/methods/compose.py ``MARKERS``);
    None: every shared parameter but the head is the method's. The rest stays as it is."""
    for name, param in model.named_parameters():
        if param.requires_grad and not stage_trains_name(name, trains, marker):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise FedpeftError(f"schedule: a stage that trains {trains!r} leaves nothing to train")


def _metrics(ev: Evaluation) -> dict[str, float]:
    return {
        keys.N_TEST: ev.n,
        keys.LOSS: ev.loss,
        keys.AUC: ev.auc,
        keys.AUC_LOW: ev.auc_low,
        keys.AUC_HIGH: ev.auc_high,
        keys.AUPRC: ev.auprc,
        keys.ACCURACY: ev.accuracy,
        keys.BRIER: ev.brier,
    }


def handle_train(
    cfg: SiteRunConfig,
    rnd: int,
    fingerprint: str,
    global_state: State,
    session: SiteSession,
    lora_rank: int = 0,
    teacher: Teacher | None = None,
) -> tuple[State, dict[str, float]]:
    """Local training from the global state; returns the delta and the reply metrics.

    ``lora_rank``: the site's own ``lora_rank`` setting (0: the run's). Below the run's rank the
    site trains the state's first components only, and its delta is zero beyond them.
    ``teacher``: a distillation run's (:func:`teacher_of`), which the student imitates."""
    if fingerprint != session.fingerprint:
        raise FingerprintMismatch(
            f"base-model fingerprint mismatch: the run uses {fingerprint[:19]}..., this site "
            f"holds {session.fingerprint[:19]}..."
        )
    rank = site_lora_rank(cfg, lora_rank)
    model = _model_with(session, cfg, global_state, rank)
    stage = cfg.stage(rnd)  # [[schedule]]: what trains this round, at which rate
    stage_trains(model, stage.trains, stage_marker(cfg, rnd))
    mlm = stage.trains == MLM  # domain-adaptive pretraining on the notes, no labels
    if mlm and session.mlm is None:
        raise FedpeftError("schedule: an mlm stage needs a tokenizer with a mask token")
    notes = session.pretrain if mlm and session.pretrain is not None else session.train
    result = train_local(
        model,
        notes,
        session.val,
        dataclasses.replace(cfg.train, lr=stage.lr),
        cfg.train.local_epochs,
        session.device,
        site_seed(cfg.seed, rnd, session.site),
        span=((rnd - 1) / cfg.rounds, rnd / cfg.rounds),  # where the rate schedule is
        teacher=None if mlm else teacher,
        mlm=session.mlm if mlm else None,
    )
    finite = math.isfinite(result.best_val_loss)
    local = to_numpy(shared_state(model))  # what trained: a stage may leave a part as it was
    start = lora.truncate(global_state, rank) if rank else global_state
    delta = lora.pad(
        {
            name: (local[name] - start[name]).astype(np.float32)
            if name in local
            else np.zeros_like(start[name], dtype=np.float32)
            for name in start
        },
        {name: value.shape for name, value in global_state.items()},
    )
    privacy = cfg.privacy
    if privacy.clip > 0:  # DP or secure aggregation: no update leaves with a larger norm
        delta, _ = clip_update(delta, privacy.clip)
    metrics = _metrics(evaluate(model, session.test, session.device))
    metrics.update(
        {
            keys.N_TRAIN: len(session.train),
            keys.TRAIN_SECONDS: result.seconds,
            keys.STEPS: result.steps,
            keys.EPOCHS_RUN: result.epochs_run,
            "seconds-per-step": result.seconds_per_step,
            **({keys.LORA_RANK: rank} if rank else {}),
            # inf when no validation token was chosen: nothing to report then
            **({keys.MLM_LOSS: result.best_val_loss} if mlm and finite else {}),
        }
    )
    return delta, metrics


def personalize(model: torch.nn.Module, cfg: SiteRunConfig, session: SiteSession) -> int:
    """Fine-tune ``cfg.personalize``'s part of ``model`` (the global state) on the site's own
    training rows, the rest frozen: up to ``personalize_epochs`` epochs, the best on the
    validation rows kept, and the global part kept when no epoch lowers the validation loss.
    Returns the epochs run, 0 when the global part was kept. Nothing of it leaves the site."""
    marker = PERSONAL_MARKERS[cfg.personalize]
    for name, param in model.named_parameters():
        if param.requires_grad and marker not in name:
            param.requires_grad_(False)
    start = shared_state(model)  # now the personal part alone
    _, start_loss = predict(model, session.val, session.device)
    result = train_local(
        model,
        session.train,
        session.val,
        dataclasses.replace(cfg.train, prox_mu=0.0),
        cfg.personalize_epochs,
        session.device,
        site_seed(cfg.seed, cfg.rounds + 1, session.site),
    )
    if result.best_val_loss >= start_loss:
        load_shared_state(model, start)
        return 0
    return result.epochs_run


def handle_evaluate(
    cfg: SiteRunConfig, global_state: State, session: SiteSession, personal: bool = False
) -> tuple[Evaluation, dict[str, float]]:
    """The global state on the test rows (reported) and its loss on the validation rows (for
    choosing the round, as early stopping does in local training). ``personal``: the site's
    personalized model instead (:func:`personalize`), with the epochs it took."""
    model = _model_with(session, cfg, global_state)
    extra = {keys.EPOCHS_RUN: personalize(model, cfg, session)} if personal else {}
    test = evaluate(model, session.test, session.device, bins=cfg.histogram_bins)
    _, val_loss = predict(model, session.val, session.device)
    return test, {
        **_metrics(test),
        keys.VAL_LOSS: val_loss,
        keys.N_VAL: len(session.val),
        **extra,
    }


def _reply(
    msg: Any,
    site: str,
    status: SiteStatus = SiteStatus.OK,
    error: str = "",
    sealed: bytes | None = None,
    metrics: dict[str, float] | None = None,
    evaluation: bytes | None = None,
    secagg: bytes | None = None,
    data_fingerprint: str = "",
) -> Any:
    """A reply's records: the site's status, its sealed delta, its own metrics (a train reply's
    are the local model's), and a global state's evaluation, sealed (:func:`seal_evaluation`)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict(
        {
            keys.CONFIG: ConfigRecord(
                {
                    keys.SITE: site,
                    keys.STATUS: status.value,
                    keys.ERROR: error,
                    **({keys.DATA_FINGERPRINT: data_fingerprint} if data_fingerprint else {}),
                }
            ),
        }
    )
    if sealed is not None:
        content[keys.SEALED] = blob_record(sealed)
    if metrics is not None:
        content[keys.METRICS] = MetricRecord({k: float(v) for k, v in metrics.items()})
    if evaluation is not None:
        content[keys.EVALUATION] = blob_record(evaluation)
    if secagg is not None:
        content[keys.SECAGG] = blob_record(secagg)
    return Message(content, reply_to=msg)


def seal_site_evaluation(
    signed: GlobalState,
    rnd: int,
    site: str,
    setup: SiteSetup,
    session: SiteSession,
    masked: bool = False,
    personal: bool = False,
) -> tuple[bytes, Histograms]:
    """The evaluation of the global state in ``signed`` (that of round ``rnd``), sealed for the
    run's key and signed by the site: only the coordinator reads it, and it knows who sent it.
    Also returns its score histograms: with ``masked`` (secure aggregation) they leave only
    inside the site's masked vector, summed with the others', and the sealed evaluation holds
    none. ``personal``: the evaluation of the site's personalized model instead."""
    ev, metrics = handle_evaluate(signed.config, signed.state, session, personal)
    shown: Histograms = ([], []) if masked else (ev.hist_pos, ev.hist_neg)
    sealed = seal_evaluation(
        metrics,
        *shown,
        run_token=signed.run_token,
        round=rnd,
        site_id=site,
        fingerprint=signed.fingerprint,
        run_public=signed.run_public,
        identity=setup.trust.identity,
    )
    return sealed, (ev.hist_pos, ev.hist_neg)


def folds_evaluation(rnd: int) -> bool:
    """Whether a train message of round ``rnd`` also asks for the evaluation of the global state
    it carries: every round after the first (that state is the previous round's result)."""
    return rnd > 1


def error_reply(msg: Any, site: str, status: SiteStatus, error: str) -> Any:
    """The reply of a site that does not answer ``msg``: ``status`` (``error`` or ``refused``)
    and a short public reason (no local detail); the coordinator records it per site and
    round."""
    return _reply(msg, site, status, error)


class TaskRefused(FedpeftError):
    """The site refuses a task for a reason it tells the coordinator (status ``refused``);
    ``reason`` is public: no paths, no rows."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


#: The public reason of a task refused because the ledger cannot be written: nothing leaves
#: the site without a ledger entry.
LEDGER_UNWRITABLE = "the site's ledger cannot be written"
_LEDGER_TYPE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


def message_round(msg: Any) -> int:
    """The round a message says it is about, as far as it can be read (0 when it cannot):
    for the ledger line of a message that may be refused before anything in it is checked."""
    try:
        rnd = int(msg.content[keys.CONFIG][keys.ROUND])
    except Exception:
        return 0
    return max(rnd, 0)


@dataclass
class TaskRecord:
    """What the site's ledger (client/ledger.py) says of one task, filled in as the task is
    read: one ``task`` line when it arrives, then one ``upload`` line for the reply that leaves
    or one ``refused`` line. Without a ledger (a simulation) it writes nothing.

    An append that fails raises :class:`TaskRefused` (:data:`LEDGER_UNWRITABLE`) with the detail
    in the site's log: the task is refused rather than answered without a record."""

    ledger: Ledger | None
    message_type: str
    round: int = 0
    run_token: str = ""
    config: str | None = None
    method: str = ""
    codec: str = ""
    task_written: bool = False

    @classmethod
    def of(cls, ledger: Path | None, msg: Any) -> TaskRecord:
        kind = str(msg.metadata.message_type)
        return cls(
            ledger=None if ledger is None else Ledger(ledger),
            message_type=kind if _LEDGER_TYPE.fullmatch(kind) else "unknown",
            round=message_round(msg),
        )

    def opened(self, signed: GlobalState) -> None:
        """The task's facts from its signed global state."""
        self.run_token, self.round = signed.run_token, signed.round
        self.config = signed.config.to_json()  # hashed in the ledger: the run's config hash
        self.method, self.codec = signed.config.method.name, signed.config.codec

    def _append(self, write: Callable[[Ledger], object]) -> None:
        if self.ledger is None:
            return
        try:
            write(self.ledger)
        except LedgerError as exc:
            log.error("site ledger: %s", exc)
            raise TaskRefused(LEDGER_UNWRITABLE) from None

    def task(self) -> None:
        """The ``task`` line (once per task)."""
        if self.task_written:
            return
        self._append(
            lambda ledger: ledger.record_task(
                run_token=self.run_token,
                round=self.round,
                message_type=self.message_type,
                config=self.config,
                method=self.method,
                codec=self.codec,
            )
        )
        self.task_written = True

    def upload(self, sealed: bytes | None, data_fingerprint: str = "") -> None:
        """The ``upload`` line of a reply that leaves with the site's result (and, beside an
        update, the data fingerprint that leaves with it)."""
        self._append(
            lambda ledger: ledger.record_upload(
                run_token=self.run_token,
                round=self.round,
                message_type=self.message_type,
                config=self.config or "",
                sealed=sealed,
                method=self.method,
                codec=self.codec,
                data_fingerprint=data_fingerprint,
            )
        )

    def refused(self, status: SiteStatus, error: str) -> tuple[SiteStatus, str]:
        """The ``task`` line if not yet written and the ``refused`` line naming ``error`` (a
        refusal's as ``refused: <reason>``); the status and error text to send, which are the
        ledger's refusal instead when it cannot be written."""
        reason = f"{SiteStatus.REFUSED}: {error}" if status == SiteStatus.REFUSED else error
        try:
            self.task()
            self._append(
                lambda ledger: ledger.record_refusal(
                    run_token=self.run_token,
                    round=self.round,
                    message_type=self.message_type,
                    reason=reason,
                    config=self.config,
                    method=self.method,
                    codec=self.codec,
                )
            )
        except TaskRefused as exc:
            return SiteStatus.REFUSED, exc.reason
        return status, error


def task_facts(
    signed: GlobalState, coordinator_key: str, site: str, trains: bool = True
) -> TaskFacts:
    """What the site's policy judges, from the signed global state alone (no row is read), for
    a train message (``trains``) or another."""
    cfg = signed.config
    shapes = {name: tuple(v.shape) for name, v in signed.state.items()}
    if cfg.privacy.secure_aggregation:
        # One masked vector: the update's entries, then (after round 1) the score histograms'.
        entries = sum(math.prod(shape) for shape in shapes.values()) + 2 * cfg.histogram_bins
        shapes = {MASKED: (entries,)}
    return TaskFacts(
        method=cfg.method.name,
        # The most epochs any task of the run trains here: a round's, or personalization's.
        local_epochs=max(
            cfg.train.local_epochs,
            0 if cfg.personalize == "none" else cfg.personalize_epochs,
        ),
        rounds=cfg.rounds,
        round=signed.round,
        codec=cfg.codec,
        upload_bytes=expected_upload_bytes(
            shapes,
            RING if cfg.privacy.secure_aggregation else cfg.codec,
            method=cfg.method.name,
            fingerprint=signed.fingerprint,
            site_id=site,
            run_token=signed.run_token,
        ),
        config_hash=signed.config_hash,
        model_fingerprint=signed.fingerprint,
        coordinator_key=coordinator_key,
        secure_aggregation=cfg.privacy.secure_aggregation,
        dp=cfg.privacy.noise_multiplier > 0,
        trains=trains,
        full_layers=cfg.method.lora.full_layers if cfg.method.name == lora.SPEC.name else 0,
        composed=cfg.method.compose,
        mlm=cfg.method.mlm,
    )


def check_policy(policy: SitePolicy, facts: TaskFacts, trusted: Collection[str]) -> None:
    """``PolicyRefusal`` unless ``policy`` allows the task; approved runs are read anew for
    every task (an approval needs no restart)."""
    approvals = {}
    if policy.approved_runs_only:
        try:
            approvals = read_approvals(policy.approvals)
        except ConfigError as exc:
            log.error("approved runs: %s", exc)
            raise TaskRefused("the site's approved runs cannot be read") from None
    check_task(policy, facts, approvals, trusted)


def _stage_task(msg: Any, cfg: SiteRunConfig, kind: str) -> StageTask | None:
    """The secure-aggregation task a message carries: every stage message and, in a run with
    secure aggregation, every train and evaluate message has one (None otherwise): a site of
    such a run sends neither an update nor a score histogram unmasked."""
    if kind not in STAGES and not cfg.privacy.secure_aggregation:
        return None
    if not cfg.privacy.secure_aggregation:
        raise TaskRefused("a secure aggregation stage in a run without secure aggregation")
    if keys.SECAGG not in msg.content:
        raise FedpeftError(f"a {kind} message without its secure aggregation task")
    task = StageTask.from_bytes(from_blob_record(msg.content[keys.SECAGG]))
    if task.stage != kind:
        raise FedpeftError(f"a {kind} message carrying a {task.stage[:32]} task")
    return task


def handle(msg: Any, setup: SiteSetup) -> Any:
    """The site's reply to one message from the coordinator (``train`` or ``evaluate``), with
    the site's own settings; the run's settings come only from the signed global state.

    In order: the global state must be signed by a coordinator key the site trusts; the site's
    policy (if any) must allow the task, judged before any row is read; the sealed upload is
    checked again before it leaves. With a ledger, the task, and the reply that leaves or the
    refusal, are written to it first (:class:`TaskRecord`)."""
    record = TaskRecord.of(setup.ledger, msg)
    site, kind = setup.site, str(msg.metadata.message_type)
    started = time.perf_counter()
    try:
        if kind not in (*keys.MESSAGES, *STAGES):
            raise FedpeftError(f"unknown message type {kind[:32]!r}")
        rnd = int(msg.content[keys.CONFIG][keys.ROUND])
        trusted = setup.coordinator_keys()
        signed, signer = open_global_signed_by(from_blob_record(msg.content[keys.GLOBAL]), trusted)
        record.opened(signed)
        record.task()
        _check_global(signed, rnd)
        cfg = signed.config
        if setup.policy is not None:
            facts = task_facts(signed, signer, site, trains=kind == Phase.TRAIN)
            check_policy(setup.policy, facts, trusted)
        if setup.quantize != "none" and cfg.method.trains_base_weights():
            raise TaskRefused(
                f"method {cfg.method.name!r} trains base weights; this site holds its base model "
                f"in {setup.quantize}"
            )
        context = round_context(signed.run_token, rnd)
        stage = _stage_task(msg, cfg, kind)
        if stage is not None:
            answer_once(
                site, signed.run_token, rnd, kind, record.ledger, cfg.privacy.threshold, stage
            )
        session = site_session(cfg, setup)  # kept warm: built once per run and process
        site = session.site
        if kind in STAGES:  # a stage of secure aggregation: keys or shares, nothing trained
            answer = answer_stage(stage, site, setup.trust.identity, context, len(session.train))  # type: ignore[arg-type]
            record.upload(answer)
            metrics = {keys.TASK_SECONDS: time.perf_counter() - started}
            return _reply(msg, site, metrics=metrics, secagg=answer)
        if kind == Phase.TRAIN or stage is not None:
            # After round 1 the state a site trains from is the previous round's new global
            # state: the site evaluates it first and sends that with its update, one message a
            # round instead of a train and an evaluate message. With secure aggregation an
            # evaluate message is one too: its round is its secure exchange's, the state it
            # carries the round before's, and only a masked vector of zeros leaves with it.
            trains = kind == Phase.TRAIN
            evaluation, histograms = None, None
            if folds_evaluation(rnd):
                evaluation, histograms = seal_site_evaluation(
                    signed, rnd - 1, site, setup, session, masked=stage is not None
                )
            delta, metrics = None, {}
            if trains:
                teacher = None
                if cfg.distill.enabled:
                    teacher = teacher_of(cfg, signed.teacher, session, setup.quantize)
                if cfg.stage(rnd).trains == MLM:  # the notes an mlm stage pretrains on
                    read_notes(session, setup, cfg)
                delta, metrics = handle_train(
                    cfg, rnd, signed.fingerprint, signed.state, session, setup.lora_rank, teacher
                )
                log.info("site %s round %d: local AUC %.3f", site, rnd, metrics[keys.AUC])
            codec = cfg.codec
            if stage is not None:  # secure aggregation: only the masked vector leaves
                delta = masked_update(
                    delta,
                    histograms if stage.histograms else None,
                    cfg.privacy,
                    stage,
                    site,
                    setup.trust.identity,
                    context,
                )
                codec = RING
            assert delta is not None
            sealed = seal_delta(
                delta,
                run_token=signed.run_token,
                round=rnd,
                site_id=site,
                method=cfg.method.name,
                fingerprint=signed.fingerprint,
                num_examples=len(session.train),
                codec=codec,
                run_public=signed.run_public,
                identity=setup.trust.identity,
            )
            if setup.policy is not None:
                check_upload(setup.policy, sealed)
            record.upload(sealed, session.data_fingerprint)
            metrics[keys.TASK_SECONDS] = time.perf_counter() - started
            return _reply(
                msg,
                site,
                sealed=sealed,
                metrics=metrics,
                evaluation=evaluation,
                data_fingerprint=session.data_fingerprint,
            )
        personal = bool(msg.content[keys.CONFIG].get(keys.PERSONALIZE, 0))
        if personal and cfg.personalize == "none":
            raise TaskRefused("a personalization request in a run without personalization")
        evaluation, _ = seal_site_evaluation(signed, rnd, site, setup, session, personal=personal)
        record.upload(None)
        metrics = {keys.TASK_SECONDS: time.perf_counter() - started}
        return _reply(msg, site, metrics=metrics, evaluation=evaluation)
    except (TaskRefused, PolicyRefusal) as exc:
        log.warning("site %s: refused a %s task: %s", site, kind[:32], exc.reason)
        status, error = SiteStatus.REFUSED, exc.reason
    except FedpeftError as exc:
        status, error = SiteStatus.ERROR, _public_error(site, exc)
    except Exception:
        log.exception("site %s: %s failed", site, kind)
        status, error = SiteStatus.ERROR, "internal error at the site (see the site's log)"
    return error_reply(msg, site, *record.refused(status, error))


def _public_error(site: str, exc: FedpeftError) -> str:
    log.error("site %s: %s", site, exc)
    # The coordinator sees the kind of failure, not local detail (paths, rows).
    shown = (FingerprintMismatch, ForgedGlobalState)
    public = str(exc) if isinstance(exc, shown) else "failed its checks"
    return f"{exc.__class__.__name__}: {public}"


def _failed(msg: Any, site: str, exc: FedpeftError) -> Any:
    return error_reply(msg, site, SiteStatus.ERROR, _public_error(site, exc))


def handle_in_context(msg: Any, context: Any) -> Any:
    """The Flower shell: the site's setup from the node config (``site-config`` or a virtual
    site's ``partition-id``), then :func:`handle`."""
    node_config = dict(context.node_config)
    try:
        setup = setup_from_node_config(node_config)
    except FedpeftError as exc:
        return _failed(msg, site_name(node_config), exc)
    return handle(msg, setup)


def _check_global(signed: GlobalState, rnd: int) -> None:
    """The signed global state must be the one this message is about."""
    if signed.round != rnd:
        raise ForgedGlobalState(
            f"the signed global state is for round {signed.round}, the message for round {rnd}"
        )


def build_client_app() -> Any:
    from flwr.clientapp import ClientApp

    client = ClientApp()

    @client.train()
    def train(msg: Any, context: Any) -> Any:
        return handle_in_context(msg, context)

    @client.evaluate()
    def evaluate_(msg: Any, context: Any) -> Any:
        return handle_in_context(msg, context)

    for stage in STAGES:  # "query.secagg_keys" etc.: Flower routes them by their action
        client.query(stage.split(".", 1)[1])(handle_in_context)

    return client


#: Entry point for Flower (``clientapp = "fedpeft.client.app:app"``).
app = build_client_app()
