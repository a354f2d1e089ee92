"""Distillation to a smaller student (``fedpeft distill``): the student's layers, the soft loss,
the teacher signed into the global state, the site training on it, the coordinator taking the
teacher from its store; and, in simulation, a teacher distilled across the sites and exported."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from test_client import COORDINATOR, RUN_KEY, SITE_KEY, _setup, _site_file
from test_client import task_identity as task_identity  # the autouse fixture, here too

from fedpeft.client.app import handle, site_session
from fedpeft.client.trainer import Encoded, Teacher, logits_of, train_local
from fedpeft.common import crypto, keys
from fedpeft.common.config import RunConfig, SiteRunConfig, build_config, load_config
from fedpeft.common.envelope import Expected, ForgedGlobalState, open_delta, open_global
from fedpeft.common.envelope import sign_global as sign
from fedpeft.common.errors import ConfigError, ModelError, StoreError
from fedpeft.common.methods import build_method, build_model, shared_state
from fedpeft.common.model import (
    keep_layers,
    kept_layers,
    load_base_model,
    model_fingerprint,
    resolve_model_path,
)
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.tensors import to_numpy
from fedpeft.distilling import student_config
from fedpeft.server.app import distill_teacher
from fedpeft.server.checkpoints import seal_state, write_store_key
from fedpeft.server.store import RoundResult, open_store

CPU = torch.device("cpu")


def test_a_student_keeps_evenly_spaced_layers_with_the_top_one() -> None:
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(6, 2) == [2, 5]
    assert kept_layers(6, 1) == [5]
    assert kept_layers(6, 0) == kept_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    assert kept_layers(12, 4) == [2, 5, 8, 11]
    with pytest.raises(ModelError, match=r"model.layers: 7 is not in 1..6"):
        kept_layers(6, 7)


def test_the_students_layers_are_the_bases_own() -> None:
    cfg = load_config().model
    base = load_base_model(cfg, 0.0, 0)
    student = load_base_model(dataclasses.replace(cfg, layers=3), 0.0, 0)
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    for mine, theirs in zip(student.bert.encoder.layer, [1, 3, 5], strict=True):
        for (name, p), (_, q) in zip(
            mine.named_parameters(), base.bert.encoder.layer[theirs].named_parameters(), strict=True
        ):
            assert torch.equal(p, q), name
    assert torch.equal(student.classifier.weight, base.classifier.weight)  # the same seed's head
    gone = sum(p.numel() for p in base.bert.encoder.layer[0].parameters())
    total = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in student.parameters()) == total - 3 * gone
    # LoRA names the student's layers 0..2, as any model of three layers.
    names = shared_state(build_method(load_config().method, student))
    assert any(".layer.2." in n for n in names) and not any(".layer.3." in n for n in names)
    with pytest.raises(ModelError, match="no encoder.layer list"):
        keep_layers(torch.nn.Linear(2, 2), 1)


def test_the_soft_loss_pulls_toward_the_teacher() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
    hard = torch.tensor(0.7)
    idx = np.array([2, 0, 1])
    same = Teacher(logits.numpy()[[1, 2, 0]], temperature=2.0, alpha=0.5)
    # The teacher's own logits: no divergence left, only the hard labels' share.
    assert float(same.loss(logits, idx, hard)) == pytest.approx(0.35, abs=1e-6)
    assert float(Teacher(np.zeros((3, 2)), 2.0, 0.0).loss(logits, idx, hard)) == pytest.approx(0.7)
    # Away from the teacher: KL(teacher || student), here a uniform teacher, at T = 1.
    other = Teacher(np.zeros((3, 2), np.float32), temperature=1.0, alpha=1.0)
    p = torch.softmax(logits, -1)
    kl = float((0.5 * (np.log(0.5) - p.log())).sum(-1).mean())
    assert float(other.loss(logits, np.arange(3), hard)) == pytest.approx(kl, rel=1e-5)


def test_a_student_trains_only_its_shared_parameters_toward_the_teacher(rows: Encoded) -> None:
    cfg = load_config(overrides={"train.lr": 1e-2})
    teacher_model = build_model(cfg.model, cfg.method, 0.0, 0)
    with torch.no_grad():
        teacher_model.classifier.modules_to_save["default"].bias.copy_(torch.tensor([-2.0, 2.0]))
    t_logits = logits_of(teacher_model, rows, CPU)
    assert t_logits.shape == (len(rows), 2) and (t_logits[:, 1] > t_logits[:, 0]).all()
    student_cfg = dataclasses.replace(cfg.model, layers=2)
    student = build_model(student_cfg, cfg.method, 0.0, 0)
    frozen = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}
    before = shared_state(student)
    gap = float(torch.softmax(torch.tensor(t_logits), -1)[:, 1].mean())
    start = float(torch.softmax(torch.tensor(logits_of(student, rows, CPU)), -1)[:, 1].mean())
    teacher = Teacher(t_logits, temperature=2.0, alpha=1.0)  # the soft labels alone
    train_local(student, rows, rows, cfg.train, 3, CPU, seed=0, teacher=teacher)
    after = shared_state(student)
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    end = float(torch.softmax(torch.tensor(logits_of(student, rows, CPU)), -1)[:, 1].mean())
    # The teacher says "positive" for every row (labels are 25 % positive): the student follows.
    assert abs(end - gap) < abs(start - gap)


def _distill_cfg(tmp_path: Path, **distill: object) -> RunConfig:
    values = {
        "data": {"dataset": str(tmp_path)},
        "model": {"max_length": 32, "layers": 2},
        "distill": {"teacher_run": 1, **distill},
    }
    return build_config(values)


def test_distill_settings_are_checked_and_signed(tmp_path: Path) -> None:
    cfg = _distill_cfg(tmp_path, temperature=3.0, alpha=0.25)
    site = cfg.for_sites()
    assert site.distill.enabled and site.distill.temperature == 3.0
    assert SiteRunConfig.from_json(site.to_json()) == site
    assert site.config_hash() != load_config().for_sites().config_hash()
    with pytest.raises(ConfigError) as err:
        build_config(
            {
                "model": {"layers": -1},
                "distill": {"teacher_run": 2, "temperature": 0, "alpha": 1.5},
                "federation": {"personalize": "head"},
            }
        )
    text = str(err.value)
    for part in (
        "model.layers: must be 0",
        "distill.temperature: must be positive",
        "distill.alpha: must be in [0, 1]",
        "distill: not with federation.personalize",
    ):
        assert part in text
    bad = build_config({"distill": {"teacher_method": {"lora": {"r": 0}}}})  # off: unchecked
    assert not bad.distill.enabled
    with pytest.raises(ConfigError, match="distill.teacher_method: 'full' trains base weights"):
        build_config({"distill": {"teacher_run": 1, "teacher_method": {"name": "full"}}})
    with pytest.raises(ConfigError, match="distill.teacher_method: method.lora.r"):
        build_config({"distill": {"teacher_run": 1, "teacher_method": {"lora": {"r": 0}}}})


def _signed(cfg: RunConfig, teacher: dict | None) -> bytes:
    state = to_numpy(shared_state(build_model(cfg.model, cfg.method, 0.0, cfg.seed)))
    return sign(
        state,
        run_token="run-token",
        round=1,
        method=cfg.method.name,
        fingerprint=model_fingerprint(resolve_model_path(cfg.model)),
        run_public=crypto.raw_public(RUN_KEY),
        config=cfg.for_sites(),
        coordinator=COORDINATOR,
        teacher=teacher,
    )


def _teacher_state(cfg: RunConfig) -> dict:
    """A teacher of the default model: LoRA on six layers, its head leaning positive."""
    model = build_model(dataclasses.replace(cfg.model, layers=0), cfg.method, 0.0, 5)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].bias.copy_(torch.tensor([-1.0, 1.0]))
    return to_numpy(shared_state(model))


def test_the_teacher_travels_signed_beside_the_state(tmp_path: Path) -> None:
    cfg = _distill_cfg(tmp_path)
    teacher = _teacher_state(cfg)
    got = open_global(_signed(cfg, teacher), COORDINATOR.public_key())
    assert set(got.teacher) == set(teacher)
    assert all(np.array_equal(got.teacher[k], v) for k, v in teacher.items())
    assert not any(k.startswith("teacher/") for k in got.state)
    student = to_numpy(shared_state(build_model(cfg.model, cfg.method, 0.0, cfg.seed)))
    assert set(got.state) == set(student)
    # A teacher goes with a distillation config and only with one, both ways.
    with pytest.raises(ValueError, match="teacher state goes with a distillation config"):
        _signed(cfg, None)
    plain = load_config(overrides={"data.dataset": str(tmp_path)})
    with pytest.raises(ValueError, match="teacher state goes with a distillation config"):
        _signed(plain, teacher)
    smuggled = sign(
        {"teacher/x": np.zeros(2, np.float32)},
        run_token="t",
        round=1,
        method="lora",
        fingerprint="f",
        run_public=crypto.raw_public(RUN_KEY),
        config=plain.for_sites(),
        coordinator=COORDINATOR,
    )
    with pytest.raises(ForgedGlobalState, match="teacher does not match its config's distill"):
        open_global(smuggled, COORDINATOR.public_key())


def test_a_site_distills_the_signed_teacher_and_sends_only_the_students_delta(
    tmp_path: Path,
) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    cfg = _distill_cfg(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    setup = _setup(_site_file(tmp_path))
    content = RecordDict(
        {
            keys.GLOBAL: blob_record(_signed(cfg, _teacher_state(cfg))),
            keys.CONFIG: ConfigRecord({keys.ROUND: 1}),
        }
    )
    reply = handle(Message(content, dst_node_id=7, message_type="train"), setup)
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok", reply.content[keys.CONFIG]
    student = to_numpy(shared_state(build_model(cfg.model, cfg.method, 0.0, cfg.seed)))
    shapes = {k: v.shape for k, v in student.items()}
    sealed = from_blob_record(reply.content[keys.SEALED])
    expected = Expected("run-token", 1, "lora", fp, shapes, 1 << 22)
    delta = open_delta(sealed, expected, RUN_KEY, {"site-x": SITE_KEY.public_key()}).delta
    assert set(delta) == set(student) and any(abs(v).max() > 0 for v in delta.values())
    # The teacher's logits on the site's training rows, computed once for the run.
    session = site_session(cfg.for_sites(), setup)
    (logits,) = session.teacher_logits.values()
    assert logits.shape == (len(session.train), 2)
    assert (logits[:, 1] > logits[:, 0]).mean() > 0.9  # the teacher's head leans positive
    # A teacher state that is not of the teacher's method is refused, and named.
    content[keys.GLOBAL] = blob_record(_signed(cfg, {"x": np.zeros(2, np.float32)}))
    reply = handle(Message(content, dst_node_id=7, message_type="train"), setup)
    assert reply.content[keys.CONFIG][keys.STATUS] == "error"
    assert "teacher state does not fit" in reply.content[keys.CONFIG][keys.ERROR]


def _stored_teacher(tmp_path: Path, cfg: RunConfig, status: str = "finished") -> tuple[str, bytes]:
    db = f"sqlite:///{tmp_path / 'teach.db'}"
    store = open_store(db)
    run_id = store.create_run(
        config_json=cfg.to_json(),
        dataset="heart",
        method=cfg.method.name,
        model_name="m",
        model_fingerprint=model_fingerprint(resolve_model_path(cfg.model)),
        trainable_params=1,
        total_params=1,
        seed=0,
    )
    key = write_store_key(tmp_path / "store.key")
    t = datetime(2026, 1, 1)
    state = _teacher_state(cfg)
    for rnd, val_loss, scale in ((1, 0.4, 1.0), (2, 0.9, 0.0)):  # round 1 is delivered
        result = RoundResult(rnd, t, t, 1.0, 0.8, 0.8, 0.5, 1, 0, True, val_loss=val_loss)
        sealed = seal_state(key, run_id, rnd, {k: v * scale for k, v in state.items()})
        store.add_round(run_id, result, [], sealed)
    store.finish_run(run_id, status=status, wall_seconds=1.0)
    store.close()
    return db, key


def test_the_coordinator_takes_the_teachers_delivered_round_from_its_store(
    tmp_path: Path,
) -> None:
    teacher_cfg = load_config(overrides={"data.dataset": str(tmp_path), "federation.rounds": 5})
    db, key = _stored_teacher(tmp_path, teacher_cfg)
    cfg = dataclasses.replace(
        student_config(
            teacher_cfg, 1, layers=2, temperature=2.0, alpha=0.5, overrides={"train.lr": 1e-3}
        ),
        db=db,
    )
    assert (cfg.model.layers, cfg.distill.teacher_run, cfg.train.lr) == (2, 1, 1e-3)
    # A converging teacher's rounds and patience are the student's, unless it is given rounds:
    # then it runs every one, as simulate's --rounds alone does.
    pima = load_config(overrides={"data.dataset": "pima"})
    kept = student_config(pima, 1, layers=2, temperature=2.0, alpha=0.5, overrides={})
    assert (kept.federation.rounds, kept.federation.patience) == (20, 3)
    told = student_config(
        pima, 1, layers=2, temperature=2.0, alpha=0.5, overrides={"federation.rounds": 8}
    )
    assert (told.federation.rounds, told.federation.patience) == (8, 0)
    # A staged teacher's stages are not the student's; another method takes its own rate.
    staged = build_config(
        {**json.loads(teacher_cfg.to_json()), "schedule": [{"method": "prompt"}, {"rounds": 2}]}
    )
    prompt = student_config(
        staged, 1, layers=3, temperature=2.0, alpha=0.5, overrides={"method.name": "prompt"}
    )
    assert (prompt.schedule, prompt.method.compose) == ((), ())
    assert (prompt.method.name, prompt.train.lr, prompt.federation.rounds) == ("prompt", 3e-2, 3)
    assert cfg.distill.teacher_method == teacher_cfg.method and cfg.data == teacher_cfg.data
    fp = model_fingerprint(resolve_model_path(cfg.model))
    store = open_store(db)
    try:
        state = distill_teacher(store, cfg, fp, key, say=lambda _: None)
        assert state is not None
        expected = _teacher_state(teacher_cfg)
        assert all(np.array_equal(state[k], v) for k, v in expected.items())  # round 1's
        assert distill_teacher(store, teacher_cfg, fp, key) is None  # no [distill]: none
        with pytest.raises(ConfigError, match="trained on another base model"):
            distill_teacher(store, cfg, "sha256:other", key)
        ia3 = dataclasses.replace(cfg.distill.teacher_method, name="ia3")
        other = dataclasses.replace(cfg.distill, teacher_method=ia3)
        with pytest.raises(ConfigError, match=r"its method \(lora\) or layers"):
            distill_teacher(store, dataclasses.replace(cfg, distill=other), fp, key)
        missing = dataclasses.replace(cfg.distill, teacher_run=9)
        with pytest.raises(StoreError, match="has no run 9"):
            distill_teacher(store, dataclasses.replace(cfg, distill=missing), fp, key)
    finally:
        store.close()
    (tmp_path / "failed").mkdir()
    failed_db, key = _stored_teacher(tmp_path / "failed", teacher_cfg, status="failed")
    store = open_store(failed_db)
    try:
        with pytest.raises(ConfigError, match="the run is failed, not finished"):
            distill_teacher(store, cfg, fp, key)
    finally:
        store.close()
    assert json.loads(cfg.to_json())["distill"]["teacher_run"] == 1


@pytest.mark.slow
def test_fedpeft_distill_trains_a_student_across_the_sites_and_exports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher run, then `fedpeft distill` of it in simulation: the student's round takes
    every site, it is smaller and timed beside its teacher, the report and the card name the
    teacher, and the export loads as the student with its three layers."""
    from site_files import write_heart_sites

    from fedpeft.cli import main
    from fedpeft.common.export import load_export, read_manifest
    from fedpeft.distilling import delivered_model
    from fedpeft.simulate import delivered_state

    (tmp_path / "sites").mkdir()
    sites = write_heart_sites(tmp_path / "sites", ("a-cleveland", "b-hungary"), 60)
    db = f"sqlite:///{tmp_path / 'run.db'}"
    common = ["--db", db, "--cpus", "2"]
    teach = ["simulate", "--dataset", str(sites), "--rounds", "1", "--no-baselines", "--seed", "1"]
    assert main([*teach, *common]) == 0
    capsys.readouterr()
    args = ["distill", "--run", "1", "--layers", "3", "--time-batch", "4", *common]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^encoder layers +6 +3$", out, re.M), out
    assert "AUC retained:" in out and "inference speed-up:" in out
    assert "distilled from run 1 at temperature 2, alpha 0.5" in out  # the report's line
    store = open_store(db)
    try:
        teacher, student = store.get_run(1), store.get_run(2)
        (rnd,) = store.rounds(2)
        assert rnd.accepted == 2 and rnd.rejected == 0 and rnd.applied
        assert student.total_params < teacher.total_params
        assert student.trainable_params < teacher.trainable_params  # 3 layers of LoRA, not 6
        cfg = RunConfig.from_json(student.config_json)
        assert cfg.model.layers == 3 and cfg.distill.teacher_run == 1
    finally:
        store.close()
    export = tmp_path / "student"
    assert main(["export", "--run", "2", "--db", db, "--out", str(export)]) == 0
    assert read_manifest(export)["config"]["model"]["layers"] == 3
    assert "## Distillation" in (export / "README.md").read_text()
    loaded = load_export(export).eval()
    assert loaded.config.num_hidden_layers == 3
    state = delivered_state(db, 2)
    assert state is not None
    reference = delivered_model(dataclasses.replace(cfg, db=db), state).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
