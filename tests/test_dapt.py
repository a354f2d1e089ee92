"""Federated domain-adaptive pretraining: a schedule's ``mlm`` stage trains the method's
parameters and a masked-language head on the sites' notes (no labels), and fine-tuning starts
from there (``simulate --dapt-rounds N``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_client import _message, _setup, _site_file
from test_client import task_identity as task_identity  # the autouse fixture, here too
from test_schedule import _delta

from fedpeft.client.app import handle, stage_trains
from fedpeft.client.trainer import MaskedLm, encode, train_local
from fedpeft.common import keys
from fedpeft.common.config import RunConfig, SiteRunConfig, Stage, build_config, load_config
from fedpeft.common.data import DataSchema, load_notes
from fedpeft.common.errors import ConfigError, DataError, FedpeftError
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.methods.compose import HEAD, MLM_HEAD
from fedpeft.common.model import load_tokenizer, model_fingerprint, resolve_model_path


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return load_tokenizer(load_config().model)


def test_masking_follows_berts_recipe(tokenizer: object) -> None:
    mlm = MaskedLm.of(tokenizer)
    assert mlm is not None and mlm.mask_id == 103 and mlm.vocab_size == 30522
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(1000, 30000, size=(64, 128)))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    attention = torch.ones_like(ids)
    attention[:, 100:] = 0  # padding
    ids[:, 100:] = 0
    out, targets = mlm.masked(ids, attention, torch.Generator().manual_seed(1))
    chosen = targets != -100
    # Only real tokens are chosen: never [CLS], [SEP] or padding; about 15 % of them.
    assert not chosen[:, 0].any() and not chosen[:, -1].any() and not chosen[:, 100:].any()
    share = chosen.sum().item() / (64 * 98)
    assert 0.13 < share < 0.17, share
    assert torch.equal(targets[chosen], ids[chosen])  # the originals are the targets
    assert torch.equal(out[~chosen], ids[~chosen])  # the rest is unchanged
    masked = (out[chosen] == mlm.mask_id).float().mean().item()
    kept = (out[chosen] == ids[chosen]).float().mean().item()
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.14, (masked, kept)
    again, _ = mlm.masked(ids, attention, torch.Generator().manual_seed(1))
    other, _ = mlm.masked(ids, attention, torch.Generator().manual_seed(2))
    assert torch.equal(again, out) and not torch.equal(other, out)  # fixed by the seed


def test_dapt_rounds_put_an_mlm_stage_first() -> None:
    cfg = load_config(overrides={"federation.rounds": 4}).with_dapt(2)
    lr = cfg.train.lr
    assert cfg.federation.rounds == 6 and cfg.method.mlm and not cfg.method.compose
    assert cfg.schedule == (Stage(2, lr, "mlm", "lora"), Stage(4, lr, "all", "lora"))
    site = cfg.for_sites()
    assert SiteRunConfig.from_json(site.to_json()) == site
    assert [site.stage(r).trains for r in (1, 2, 3, 6)] == ["mlm", "mlm", "all", "all"]
    staged = build_config({"schedule": [{"rounds": 1, "trains": "head"}, {"rounds": 2}]})
    assert [s.trains for s in staged.with_dapt(1).schedule] == ["mlm", "head", "all"]
    with pytest.raises(ConfigError, match="must be at least 1"):
        cfg.with_dapt(0)
    with pytest.raises(ConfigError, match="has an mlm stage already"):
        cfg.with_dapt(1)


def test_a_bad_mlm_schedule_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(
            {
                "schedule": [{"rounds": 2}, {"rounds": 1, "trains": "mlm"}],
                "site_lora_ranks": [4, 8],
            }
        )
    text = str(err.value)
    assert "the last stage trains mlm" in text, text
    assert "site_lora_ranks: not with stages of different methods or an mlm stage" in text
    with pytest.raises(ConfigError, match="method.mlm: set by a"):
        build_config({"method": {"mlm": True}})


def test_the_cli_reads_dapt_rounds(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from fedpeft.cli import _overrides, main, parser

    args = parser().parse_args(["simulate", "--dapt-rounds", "3", "--schedule", "all:2"])
    cfg = load_config(overrides=_overrides(args)).with_dapt(args.dapt_rounds)
    assert [(s.trains, s.rounds) for s in cfg.schedule] == [("mlm", 3), ("all", 2)]
    assert main(["simulate", "--dapt-rounds", "2", "--tune-lr"]) == 2
    assert "--tune-lr varies the run's rate" in capsys.readouterr().err
    assert main(["simulate", "--dapt-rounds", "2", "--resume", "1"]) == 2
    assert "--dapt-rounds sets a new run's stages" in capsys.readouterr().err
    assert main(["simulate", "--dapt-rounds", "2", "--patience", "2"]) == 2
    assert "--patience (or the config's federation.patience) ends" in capsys.readouterr().err
    run_toml = tmp_path / "run.toml"
    run_toml.write_text("[federation]\npatience = 2\n")
    assert main(["simulate", "--config", str(run_toml), "--dapt-rounds", "2"]) == 2
    assert "--patience (or the config's federation.patience) ends" in capsys.readouterr().err
    # A data set whose default run stops early (patience 3): its pretrained run runs every round.
    pima = load_config(overrides={"data.dataset": "pima"})
    assert pima.federation.patience == 3
    staged = pima.with_dapt(2)
    assert [(s.trains, s.rounds) for s in staged.schedule] == [("mlm", 2), ("all", 20)]
    assert (staged.federation.rounds, staged.federation.patience) == (22, 0)


def test_pretraining_rounds_are_no_baselines_budget_and_no_students_stage() -> None:
    from fedpeft.baselines import budget
    from fedpeft.distilling import student_config

    cfg = load_config(overrides={"federation.rounds": 4, "train.local_epochs": 2})
    assert budget(cfg.with_dapt(3)) == budget(cfg) == (8, 8)  # the 4 fine-tuning rounds'
    student = student_config(
        cfg.with_dapt(3), 7, layers=3, temperature=2.0, alpha=0.5, overrides={}
    )
    assert not student.schedule and not student.method.mlm
    assert student.distill.teacher_method.mlm  # the teacher's state holds its head


def test_an_mlm_stage_trains_the_method_and_its_head_not_the_classifier() -> None:
    cfg = load_config().with_dapt(1)

    def trained(trains: str) -> set[str]:
        model = build_model(cfg.model, cfg.method, 0.0, 0)
        stage_trains(model, trains)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    mlm, everything, method = trained("mlm"), trained("all"), trained("method")
    assert {n for n in mlm if n.startswith(MLM_HEAD)} == {
        "mlm_head.dense.weight",
        "mlm_head.dense.bias",
        "mlm_head.norm.weight",
        "mlm_head.norm.bias",
    }
    assert mlm - method == {n for n in mlm if n.startswith(MLM_HEAD)}  # the method's, and it
    assert not any(HEAD in n for n in mlm)  # never the classifier
    assert not any(n.startswith(MLM_HEAD) for n in everything)  # which only an mlm stage trains


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_masked_language_training_lowers_its_loss(tokenizer: object, method: str) -> None:
    """The masked-language loss on held-out notes falls, only the method's parameters and the
    head move; prompt tuning's virtual tokens are left out of the predicted positions."""
    mlm = MaskedLm.of(tokenizer)
    assert mlm is not None
    texts = [f"{40 + i % 30} y male. chest pain type {i % 4}. chol {200 + i}." for i in range(48)]
    rows = encode(tokenizer, texts, np.zeros(48, dtype=np.int64), 32)
    held_out = encode(tokenizer, texts[::3], np.zeros(16, dtype=np.int64), 32)
    cfg = load_config(overrides={"method.name": method, "model.max_length": 32}).with_dapt(1)
    model = build_model(cfg.model, cfg.method, 0.0, 0)
    stage_trains(model, "mlm")
    before = shared_state(model)
    cpu = torch.device("cpu")
    start = mlm.mean_loss(model, held_out, cpu, 7)
    train = dataclasses.replace(cfg.train, lr=5e-3, patience=5)
    result = train_local(model, rows, held_out, train, 3, cpu, 0, mlm=mlm)
    assert result.best_val_loss == pytest.approx(mlm.mean_loss(model, held_out, cpu, 0))
    assert mlm.mean_loss(model, held_out, cpu, 7) < 0.7 * start
    after = shared_state(model)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert any(n.startswith(MLM_HEAD) for n in moved) and moved - set(
        n for n in moved if n.startswith(MLM_HEAD)
    )
    assert not any(HEAD in n for n in moved)


def _dapt(cfg: RunConfig) -> RunConfig:
    return build_config({**json.loads(cfg.to_json()), "federation": {"rounds": 1}}).with_dapt(1)


def test_a_site_pretrains_then_fine_tunes(tmp_path: Path, cfg: RunConfig) -> None:
    """Round 1 (mlm) moves the method's parameters and the masked-language head, never the
    classifier, and reports its loss; round 2 (all) moves the classifier, not the head."""
    staged = _dapt(cfg)
    first, second = _delta(staged, tmp_path, 1), _delta(staged, tmp_path, 2)
    moved = {name for name, v in first.items() if np.abs(v).max() > 0}
    assert any(n.startswith(MLM_HEAD) for n in moved) and any(".lora_" in n for n in moved)
    assert not any(HEAD in n for n in moved)
    moved = {name for name, v in second.items() if np.abs(v).max() > 0}
    assert any(HEAD in n for n in moved) and not any(n.startswith(MLM_HEAD) for n in moved)
    fp = model_fingerprint(resolve_model_path(staged.model))
    reply = handle(_message(staged, fp, rnd=1), _setup(_site_file(tmp_path)))
    metrics = reply.content[keys.METRICS]
    assert 0 < metrics[keys.MLM_LOSS] < 11  # below chance over 30,522 tokens (ln: 10.3)


def test_a_sites_unlabeled_notes_join_the_pretraining(tmp_path: Path, cfg: RunConfig) -> None:
    staged = _dapt(cfg)
    fp = model_fingerprint(resolve_model_path(staged.model))
    records = _site_file(tmp_path)
    notes = tmp_path / "notes.csv"
    text = [f"{30 + i} y female. ecg normal. thal {i % 3}." for i in range(30)]
    pd.DataFrame({"text": text}).to_csv(notes, index=False)
    alone = handle(_message(staged, fp, rnd=1), _setup(records))
    setup = dataclasses.replace(_setup(records), unlabeled_file=notes)
    with_notes = handle(_message(staged, fp, rnd=1), setup)
    steps = [r.content[keys.METRICS][keys.STEPS] for r in (alone, with_notes)]
    assert steps[1] > steps[0]  # 30 more notes: more batches an epoch
    # Notes that are a test or validation row's text are left out; the rest join the training
    # rows (which the notes also repeat here).
    from fedpeft.client import app

    records_text = pd.read_csv(records)["text"].tolist()
    repeated = tmp_path / "more-notes.csv"
    pd.DataFrame({"text": text + records_text}).to_csv(repeated, index=False)
    setup = dataclasses.replace(setup, unlabeled_file=repeated)
    session = app.site_session(staged.for_sites(), setup)
    assert session.pretrain is None  # read on the first mlm round, not before
    handle(_message(staged, fp, rnd=1), setup)
    assert session.pretrain is not None
    assert len(session.pretrain) == 2 * len(session.train) + 30
    assert not set(session.pretrain.ids) & (set(session.test.ids) | set(session.val.ids))
    # A note without text is named with its file and row.
    pd.DataFrame({"id": [1, 2], "text": ["fine", " "]}).to_csv(notes, index=False)
    with pytest.raises(DataError, match=r"notes.csv: row 2: field 'text' is empty"):
        load_notes(notes, DataSchema())
    assert load_notes(notes, DataSchema(skip_bad_rows=True)) == ("fine",)


def test_a_site_policy_decides_whether_it_pretrains(tmp_path: Path, cfg: RunConfig) -> None:
    from test_client import _site_setup
    from test_policy import _site

    from fedpeft.client.setup import read_setup_file
    from fedpeft.settings import load_site_config

    staged = _dapt(cfg)
    fp = model_fingerprint(resolve_model_path(staged.model))
    for allowed in (False, True):
        folder = tmp_path / str(allowed)
        folder.mkdir()
        table = f"[policy]\nmlm = {str(allowed).lower()}\n"
        setup = read_setup_file(Path(_site_setup(_site_file(folder), table)))
        reply = handle(_message(staged, fp, rnd=1), setup).content[keys.CONFIG]
        if allowed:
            assert reply[keys.STATUS] == "ok", reply
        else:
            assert reply[keys.STATUS] == "refused"
            assert "mlm stage" in reply[keys.ERROR] and "(mlm = false)" in reply[keys.ERROR]
        # A run without mlm stages is not judged by the setting.
        assert handle(_message(cfg, fp), setup).content[keys.CONFIG][keys.STATUS] == "ok"
    (tmp_path / "s").mkdir()
    assert not load_site_config(_site(tmp_path / "s")).policy.mlm  # off unless the site says
    toml = _site(tmp_path / "s", "[policy]\nmlm = true\n")
    toml.write_text(toml.read_text().replace("[policy]", 'unlabeled = "records.csv"\n[policy]'))
    site = load_site_config(toml)
    assert site.policy.mlm and site.unlabeled == tmp_path / "s" / "records.csv"


@pytest.mark.parametrize("method", ["lora", "adapter"])  # a peft adapter; fedpeft's state file
def test_an_mlm_run_exports_and_loads_back(tmp_path: Path, method: str) -> None:
    from fedpeft.common.export import STATE_FILE, export_state, load_export
    from fedpeft.common.methods import load_shared_state

    cfg = load_config(overrides={"method.name": method}).with_dapt(1)
    model = build_model(cfg.model, cfg.method, 0.0, cfg.seed).eval()
    state = {k: v + 0.01 for k, v in shared_state(model).items()}
    fp = model_fingerprint(resolve_model_path(cfg.model))
    files = export_state(
        cfg, state, tmp_path / "out", run_id=1, round=2, fingerprint=fp, quantize="int8"
    )
    assert (tmp_path / "out" / STATE_FILE in files) == (method == "adapter")
    load_shared_state(model, state)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=ids).logits, -1)
        loaded = load_export(tmp_path / "out").eval()
        assert torch.allclose(torch.softmax(loaded(input_ids=ids).logits, -1), expected)
        int8 = load_export(tmp_path / "out", quantized=True).eval()
        assert torch.allclose(torch.softmax(int8(input_ids=ids).logits, -1), expected, atol=0.05)


def test_a_tokenizer_without_a_mask_token_cannot_pretrain(tmp_path: Path, cfg: RunConfig) -> None:
    from fedpeft.client import app

    staged = _dapt(cfg)
    fp = model_fingerprint(resolve_model_path(staged.model))
    setup = _setup(_site_file(tmp_path))
    session = app.site_session(staged.for_sites(), setup)
    state = {
        k: v.numpy()
        for k, v in shared_state(build_model(staged.model, staged.method, 0.0, 1)).items()
    }
    with pytest.raises(FedpeftError, match="needs a tokenizer with a mask token"):
        app.handle_train(staged.for_sites(), 1, fp, state, dataclasses.replace(session, mlm=None))
