"""The site policy and ledger wired into the site's handler (client/app.py ``handle``) and
worker: refusals before any row is read, approved runs, the upload guard, the ledger of every
task and reply, and the setup file that carries the policy from site.toml to the worker.

Real Flower messages, the real handler on a tiny site (40 rows, 32 tokens) or the in-memory
grid (tests/memory_grid.py) with scripted sites; no network."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from memory_grid import MemoryGrid, ScriptedSite, constant

from fedpeft.client import worker
from fedpeft.client.app import handle
from fedpeft.client.approvals import approve
from fedpeft.client.ledger import Ledger
from fedpeft.client.policy import DEFAULT_APPS, SitePolicy, expected_upload_bytes
from fedpeft.client.setup import SiteSetup, read_setup_file
from fedpeft.common import crypto, keys
from fedpeft.common.config import DataSchema, RunConfig, load_config
from fedpeft.common.envelope import OpenedEvaluation, open_evaluation, open_global, sign_global
from fedpeft.common.keys import Phase
from fedpeft.common.manifest import RunManifest
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.model import model_fingerprint, resolve_model_path
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.state import State
from fedpeft.common.tensors import to_numpy
from fedpeft.common.trust import CoordinatorTrust, SiteTrust
from fedpeft.processes import write_site_setup
from fedpeft.server.store import RunStore, open_store
from fedpeft.server.strategy import FederatedRun
from fedpeft.settings import load_site_config

RUN_KEY = crypto.new_run_key()
COORDINATOR = crypto.new_identity()
SITE_KEY = crypto.new_identity()
LEDGER_REFUSAL = "refused: the site's ledger cannot be written"


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _rows(folder: Path, rows: int = 40) -> Path:
    texts = [f"{50 + i % 20} y. bp {120 + i}. {'pain' if i % 2 else 'none'}." for i in range(rows)]
    path = folder / "site-x.csv"
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(rows)]}).to_csv(path, index=False)
    return path


def _pub(folder: Path, key: object, name: str = "coordinator.pub") -> Path:
    path = folder / name
    path.write_text(crypto.public_openssh(key.public_key()) + "\n")  # type: ignore[attr-defined]
    return path


def _policy(folder: Path, **changes: object) -> SitePolicy:
    policy = SitePolicy(
        coordinator_keys=(_pub(folder, COORDINATOR),), approvals=folder / "approved.jsonl"
    )
    return dataclasses.replace(policy, **changes)  # type: ignore[arg-type]


def _setup(
    data: Path, policy: SitePolicy | None, ledger: Path | None, site: str = "site-x"
) -> SiteSetup:
    trust = SiteTrust(SITE_KEY, COORDINATOR.public_key())
    return SiteSetup(site, data, DataSchema(), "cpu", trust, ledger=ledger, policy=policy)


_STATES: dict[str, State] = {}


def _state(cfg: RunConfig) -> State:
    if cfg.method.name not in _STATES:
        model = build_model(cfg.model, cfg.method, 0.0, cfg.seed)
        _STATES[cfg.method.name] = to_numpy(shared_state(model))
    return _STATES[cfg.method.name]


def _message(
    cfg: RunConfig, fp: str, kind: str = "train", rnd: int = 1, signer: object = COORDINATOR
) -> Message:
    signed = sign_global(
        _state(cfg),
        run_token="run-token",
        round=rnd,
        method=cfg.method.name,
        fingerprint=fp,
        run_public=crypto.raw_public(RUN_KEY),
        config=cfg.for_sites(),
        coordinator=signer,  # type: ignore[arg-type]
    )
    content = RecordDict(
        {keys.GLOBAL: blob_record(signed), keys.CONFIG: ConfigRecord({keys.ROUND: rnd})}
    )
    return Message(content, dst_node_id=7, message_type=kind)


def _fp(cfg: RunConfig) -> str:
    return model_fingerprint(resolve_model_path(cfg.model))


def _error(reply: Message) -> str:
    """What a reply that is not ok says: a refusal's reason as ``refused: <reason>``."""
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] in ("error", "refused") and keys.SEALED not in reply.content
    error = str(info[keys.ERROR])
    return f"refused: {error}" if info[keys.STATUS] == "refused" else error


def _events(ledger: Path) -> list[tuple[str, int, str, str]]:
    return [
        (r.entry.event, r.entry.round, r.entry.message_type, r.entry.reason)
        for r in Ledger(ledger).entries()
    ]


# -- the policy, before any row is read ----------------------------------------------------------

IDENTITY = {name: crypto.new_identity() for name in ("A", "B", "D")}
INITIAL: State = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}


def _new_run(run_cfg: RunConfig) -> tuple[RunStore, int]:
    """An in-memory store holding a new run of ``run_cfg`` on the tiny base model."""
    store = open_store("sqlite://")
    run_id = store.create_run(
        config_json=run_cfg.to_json(),
        dataset="heart",
        method="lora",
        model_name="tiny",
        model_fingerprint="sha256:tiny",
        trainable_params=10,
        total_params=10,
        seed=0,
    )
    return store, run_id


def test_a_site_whose_policy_forbids_the_method_refuses_and_the_others_are_aggregated(
    tmp_path: Path,
) -> None:
    """Site D allows only prompt tuning; the run is LoRA. D refuses every task before reading a
    row (its records file does not exist), writes each refusal to its ledger, and the
    coordinator records D's reason per round and phase while A and B are aggregated."""
    ledger = tmp_path / "ledger.jsonl"
    policy = _policy(tmp_path, methods=("prompt",))
    setup = SiteSetup(
        "D",
        tmp_path / "absent.csv",
        DataSchema(),
        "cpu",
        SiteTrust(IDENTITY["D"], COORDINATOR.public_key()),
        ledger=ledger,
        policy=policy,
    )
    scripted = {
        name: ScriptedSite(name, IDENTITY[name], COORDINATOR.public_key(), constant(1.0))
        for name in "AB"
    }
    run_cfg = load_config(overrides={"federation.rounds": 2})
    store, run_id = _new_run(run_cfg)
    trust = CoordinatorTrust(COORDINATOR, {n: k.public_key() for n, k in IDENTITY.items()})
    grid = MemoryGrid({1: scripted["A"], 2: scripted["B"], 3: lambda m: handle(m, setup)})
    FederatedRun(
        run_cfg, store, run_id, dict(INITIAL), "sha256:tiny", trust, os.urandom(32), print
    ).start(grid)

    reason = "refused: policy: method 'lora' is not allowed at this site (allowed: prompt)"
    rows = store.site_results(run_id)
    refused = [r for r in rows if r.site == "D"]
    assert {(r.round, r.phase) for r in refused} == {(n, p) for n in (1, 2) for p in keys.MESSAGES}
    assert all((r.status, r.reason) == ("failed", reason) for r in refused)
    assert all(r.status == "ok" for r in rows if r.site in "AB")
    rounds = store.rounds(run_id)
    assert [(r.accepted, r.applied) for r in rounds] == [(2, True), (2, True)]
    assert Ledger(ledger).verify().ok
    # D's tasks: a train message a round (round 2's would also evaluate round 1's state),
    # then the final evaluate message.
    assert _events(ledger) == [
        (event, n, str(p), reason if event == "refused" else "")
        for n, p in ((1, Phase.TRAIN), (2, Phase.TRAIN), (2, Phase.EVALUATE))
        for event in ("task", "refused")
    ]


def test_any_trusted_coordinator_key_opens_the_global_state_and_no_other(tmp_path: Path) -> None:
    """A policy that trusts two coordinator keys opens a state signed by the second (and then
    judges it: here its method is refused); a state signed by a third key is forged."""
    cfg = load_config(overrides={"data.dataset": str(tmp_path), "model.max_length": 32})
    second = crypto.new_identity()
    policy = _policy(tmp_path, methods=("prompt",))
    policy = dataclasses.replace(
        policy, coordinator_keys=(*policy.coordinator_keys, _pub(tmp_path, second, "second.pub"))
    )
    setup = _setup(tmp_path / "absent.csv", policy, None)
    opened = _error(handle(_message(cfg, "sha256:x", "evaluate", signer=second), setup))
    assert opened.startswith("refused: policy: method 'lora'")
    forged = _error(handle(_message(cfg, "sha256:x", signer=crypto.new_identity()), setup))
    assert forged == "ForgedGlobalState: the global state is not signed by the coordinator's key"


def test_an_approved_runs_only_site_trains_only_an_approved_run(
    tmp_path: Path, cfg: RunConfig
) -> None:
    data, fp = _rows(tmp_path), _fp(cfg)
    policy = _policy(tmp_path, approved_runs_only=True)
    setup = _setup(data, policy, tmp_path / "ledger.jsonl")
    msg = _message(cfg, fp)
    signed = open_global(from_blob_record(msg.content[keys.GLOBAL]), COORDINATOR.public_key())
    assert _error(handle(msg, setup)).startswith(
        f"refused: policy: run not approved (config sha256 {signed.config_hash[:12]}"
    )
    shapes = {name: tuple(v.shape) for name, v in signed.state.items()}
    bound = expected_upload_bytes(
        shapes, "fp32", method="lora", fingerprint=fp, site_id="site-x", run_token="run-token"
    )
    approve(
        policy.approvals,
        RunManifest(
            method="lora",
            model_fingerprint=fp,
            config_sha256=signed.config_hash,
            rounds=cfg.federation.rounds,
            local_epochs=cfg.train.local_epochs,
            codec="fp32",
            tensors=tuple(shapes.items()),
            upload_bytes=bound,
        ),
    )
    reply = handle(_message(cfg, fp), setup)
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok", reply.content[keys.CONFIG][keys.ERROR]
    assert [e[0] for e in _events(tmp_path / "ledger.jsonl")] == [
        "task",
        "refused",
        "task",
        "upload",
    ]


def test_under_secure_aggregation_the_upload_bound_holds_the_masked_vector(
    cfg: RunConfig,
) -> None:
    """A secure run's upload is one masked vector of the update's entries and the two score
    histograms: the bound a site's policy judges before training covers it (it did not count
    the histograms, so a tight max_upload_bytes let a site train, then refuse to send)."""
    from fedpeft.client.app import task_facts
    from fedpeft.common.envelope import seal_delta
    from fedpeft.common.secagg_messages import MASKED
    from fedpeft.common.wire import RING

    secure = load_config(
        overrides={
            "data.dataset": cfg.data.dataset,
            "model.max_length": cfg.model.max_length,
            "federation.secure_aggregation.enabled": True,
        }
    )
    fp = _fp(secure)
    signed = open_global(
        from_blob_record(_message(secure, fp).content[keys.GLOBAL]), COORDINATOR.public_key()
    )
    entries = sum(v.size for v in signed.state.values()) + 2 * 1000
    sealed = seal_delta(
        {MASKED: np.full(entries, 2**32 - 1, dtype=np.uint32)},
        run_token=signed.run_token,
        round=signed.round,
        site_id="site-x",
        method="lora",
        fingerprint=fp,
        num_examples=2**53,
        codec=RING,
        run_public=signed.run_public,
        identity=crypto.new_identity(),
    )
    facts = task_facts(signed, "SHA256:x", "site-x")
    assert len(sealed) <= facts.upload_bytes < len(sealed) + 1024


def test_an_upload_over_the_site_s_maximum_is_refused(
    tmp_path: Path, cfg: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before training when the bound says so; and, should the bound be wrong, refused
    again on the sealed bytes before they leave."""
    data, fp = _rows(tmp_path), _fp(cfg)
    ledger = tmp_path / "ledger.jsonl"
    setup = _setup(tmp_path / "absent.csv", _policy(tmp_path, max_upload_bytes=1000), ledger)
    early = _error(handle(_message(cfg, fp), setup))
    assert early.startswith("refused: policy: upload of ") and "maximum of 1,000" in early
    monkeypatch.setattr("fedpeft.client.app.expected_upload_bytes", lambda *a, **k: 1)
    late = _error(handle(_message(cfg, fp), dataclasses.replace(setup, data_file=data)))
    assert late.startswith("refused: policy: upload of ") and "maximum of 1,000" in late
    assert [e[0] for e in _events(ledger)] == ["task", "refused", "task", "refused"]
    assert all(r.entry.upload_bytes == 0 for r in Ledger(ledger).entries())


# -- the ledger ----------------------------------------------------------------------------------


def test_a_three_round_run_leaves_a_ledger_that_verifies_with_what_left(
    tmp_path: Path, cfg: RunConfig
) -> None:
    """Each round: a train task and its sealed upload, an evaluate task and its reply; the
    upload lines carry the SHA-256 and size of exactly the bytes sent, and the run's config
    hash (the signed one, which approvals name)."""
    data, fp = _rows(tmp_path), _fp(cfg)
    ledger = tmp_path / "ledger.jsonl"
    setup = _setup(data, _policy(tmp_path), ledger)
    sent, config_hash = [], ""
    for rnd in (1, 2, 3):
        for kind in ("train", "evaluate"):
            msg = _message(cfg, fp, kind, rnd)
            config_hash = open_global(
                from_blob_record(msg.content[keys.GLOBAL]), COORDINATOR.public_key()
            ).config_hash
            reply = handle(msg, setup)
            assert reply.content[keys.CONFIG][keys.STATUS] == "ok"
            if kind == "train":
                sent.append(from_blob_record(reply.content[keys.SEALED]))
    result = Ledger(ledger).verify()
    assert result.ok and result.entries == 12, result.message
    records = Ledger(ledger).entries()
    assert [(r.entry.event, r.entry.round, r.entry.message_type) for r in records] == [
        (event, rnd, kind)
        for rnd in (1, 2, 3)
        for kind in ("train", "evaluate")
        for event in ("task", "upload")
    ]
    assert {r.entry.config_sha256 for r in records} == {config_hash}
    assert all((r.entry.run_token, r.entry.method) == ("run-token", "lora") for r in records)
    uploads = [r.entry for r in records if r.entry.event == "upload"]
    assert [(u.upload_sha256, u.upload_bytes) for u in uploads if u.message_type == "train"] == [
        (hashlib.sha256(s).hexdigest(), len(s)) for s in sent
    ]
    assert all(u.upload_bytes == 0 for u in uploads if u.message_type == "evaluate")


def test_a_ledger_that_cannot_be_written_makes_the_site_refuse(
    tmp_path: Path, cfg: RunConfig
) -> None:
    """No folder for the ledger, or a torn last line: nothing leaves without an entry."""
    missing = _setup(tmp_path / "absent.csv", _policy(tmp_path), tmp_path / "none" / "l.jsonl")
    assert _error(handle(_message(cfg, "sha256:x"), missing)) == LEDGER_REFUSAL
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"seq":1')
    setup = _setup(tmp_path / "absent.csv", _policy(tmp_path), torn)
    assert _error(handle(_message(cfg, "sha256:x", "evaluate"), setup)) == LEDGER_REFUSAL
    assert torn.read_bytes() == b'{"seq":1'


def test_a_forged_state_and_a_fingerprint_mismatch_are_ledger_refusals(
    tmp_path: Path, cfg: RunConfig
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    setup = _setup(_rows(tmp_path), _policy(tmp_path), ledger)
    forged = _error(handle(_message(cfg, _fp(cfg), signer=crypto.new_identity()), setup))
    mismatch = _error(handle(_message(cfg, "sha256:" + "0" * 64), setup))
    assert "fingerprint mismatch" in mismatch
    records = Ledger(ledger).entries()
    assert [(r.entry.event, r.entry.run_token, r.entry.reason) for r in records] == [
        ("task", "", ""),
        ("refused", "", forged),
        ("task", "run-token", ""),
        ("refused", "run-token", mismatch),
    ]


def _fab(clientapp: str) -> SimpleNamespace:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", f'[tool.flwr.app.components]\nclientapp = "{clientapp}"\n')
    content = buf.getvalue()
    return SimpleNamespace(content=content, hash_str=hashlib.sha256(content).hexdigest())


def test_the_worker_writes_an_app_it_refuses_to_the_ledger(tmp_path: Path, cfg: RunConfig) -> None:
    ledger = tmp_path / "ledger.jsonl"
    setup = _setup(tmp_path / "absent.csv", _policy(tmp_path), ledger)
    context = Context(
        run_id=5,
        node_id=7,
        node_config={keys.NODE_SITE: "site-x"},
        state=RecordDict(),
        run_config={},
    )
    reply, account = worker.answer(_message(cfg, "sha256:x"), context, _fab("evil:app"), setup)
    reason = "refused: app 'evil:app' is not allowed at this site"
    assert _error(reply) == reason and account == reason
    assert _events(ledger) == [("task", 1, "train", ""), ("refused", 1, "train", reason)]


# -- the setup file: site.toml's policy reaches the worker -----------------------------------


def test_the_setup_file_carries_the_policy_and_the_worker_runs_its_apps(tmp_path: Path) -> None:
    crypto.write_private_key(tmp_path / "site.key", SITE_KEY)
    _pub(tmp_path, COORDINATOR)
    _pub(tmp_path, crypto.new_identity(), "other.pub")
    _rows(tmp_path)
    toml = tmp_path / "site.toml"
    toml.write_text(
        '[site]\nname = "site-x"\ncoordinator = "127.0.0.1:1"\nidentity_key = "site.key"\n'
        'coordinator_key = "coordinator.pub"\ndata = "site-x.csv"\ndevice = "cpu"\n'
        '[policy]\ncoordinator_keys = ["coordinator.pub", "other.pub"]\nmethods = ["prompt"]\n'
        "max_local_epochs = 2\nmax_upload_bytes = 5000\napproved_runs_only = true\n"
        'apps = ["fedpeft.client.app:app", "site_dump:app"]\n'
    )
    site = load_site_config(toml, insecure=True)
    path = write_site_setup(site, tmp_path / "home")
    text = path.read_text()
    assert "PRIVATE" not in text and "ecdsa-sha2" not in text  # names and paths only
    assert json.loads(text)["policy"]["methods"] == ["prompt"]
    setup = read_setup_file(path)
    assert setup.policy == site.policy and setup.ledger == site.ledger.resolve()
    assert setup.allowed_apps == ("fedpeft.client.app:app", "site_dump:app")
    assert len(setup.coordinator_keys()) == 2
    assert read_setup_file(path, ("x:app",)).allowed_apps == ("x:app",)  # --allow-app wins
    (tmp_path / "other.pub").unlink()
    with pytest.raises(Exception, match="other.pub"):  # named at start, not at the first task
        read_setup_file(path)


def test_a_simulated_site_has_no_policy_and_the_default_apps() -> None:
    assert SiteSetup.__dataclass_fields__["policy"].default is None
    assert SiteSetup.__dataclass_fields__["allowed_apps"].default is DEFAULT_APPS


#: A privacy rule of the site policy, the run config that meets it, and the refusal otherwise.
PRIVACY_RULES = {
    "require_dp": (
        {"federation.dp.enabled": True, "federation.dp.noise_multiplier": 1.0},
        "refused: policy: differential privacy required, the run does not use it",
    ),
    "require_secure_aggregation": (
        {"federation.secure_aggregation.enabled": True},
        "refused: policy: secure aggregation required, the run does not use it",
    ),
}


@pytest.mark.parametrize("met", [False, True])
@pytest.mark.parametrize("rule", sorted(PRIVACY_RULES))
def test_a_site_that_requires_dp_or_secure_aggregation_refuses_a_run_without_it(
    tmp_path: Path, rule: str, met: bool
) -> None:
    """require_dp / require_secure_aggregation: a run without it is refused by the policy before
    any row is read; a run with it passes the policy (and this site, with no records file, then
    fails). Sites A and B go on either way."""
    setup = SiteSetup(
        "D",
        tmp_path / "absent.csv",
        DataSchema(),
        "cpu",
        SiteTrust(IDENTITY["D"], COORDINATOR.public_key()),
        policy=_policy(tmp_path, **{rule: True}),
    )
    meeting, refusal = PRIVACY_RULES[rule]
    run_cfg = load_config(overrides={"federation.rounds": 1, **(meeting if met else {})})
    store, run_id = _new_run(run_cfg)
    scripted = {
        name: ScriptedSite(name, IDENTITY[name], COORDINATOR.public_key(), constant(0.1))
        for name in "AB"
    }
    trust = CoordinatorTrust(COORDINATOR, {n: k.public_key() for n, k in IDENTITY.items()})
    grid = MemoryGrid({1: scripted["A"], 2: scripted["B"], 3: lambda m: handle(m, setup)})
    FederatedRun(
        run_cfg, store, run_id, dict(INITIAL), "sha256:tiny", trust, os.urandom(32), print
    ).start(grid)
    (train,) = [r for r in store.site_results(run_id) if r.site == "D" and r.phase == "train"]
    (result,) = store.rounds(run_id)
    store.close()
    assert train.status == "failed" and (train.reason == refusal) is not met, train.reason
    assert result.applied and result.accepted == 2


def _opened_evaluation(reply: Message, fp: str) -> OpenedEvaluation:
    """The sealed evaluation in a reply of round 1, opened as the coordinator opens it."""
    return open_evaluation(
        from_blob_record(reply.content[keys.EVALUATION]),
        run_token="run-token",
        round=1,
        fingerprint=fp,
        run_key=RUN_KEY,
        sites={"site-x": SITE_KEY.public_key()},
    )


def _personal(cfg: RunConfig, fp: str) -> Message:
    msg = _message(cfg, fp, "evaluate")
    msg.content[keys.CONFIG] = ConfigRecord({keys.ROUND: 1, keys.PERSONALIZE: 1})
    return msg


def test_a_site_personalizes_only_for_a_run_that_asks_and_within_its_policy(
    tmp_path: Path, cfg: RunConfig
) -> None:
    data, fp = _rows(tmp_path), _fp(cfg)
    setup = _setup(data, _policy(tmp_path), None)
    # A run without personalization: the request is refused, nothing trained.
    assert _error(handle(_personal(cfg, fp), setup)) == (
        "refused: a personalization request in a run without personalization"
    )
    personal = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, personalize="head")
    )
    reply = handle(_personal(personal, fp), setup)
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok"
    # What leaves: the site's status, its task time and the sealed evaluation; no update.
    assert sorted(reply.content.keys()) == sorted([keys.CONFIG, keys.METRICS, keys.EVALUATION])
    assert list(reply.content[keys.METRICS].keys()) == [keys.TASK_SECONDS]
    opened = _opened_evaluation(reply, fp)
    # Its personalized model's evaluation, with the epochs its fine-tuning took: the metrics
    # every evaluation has and that count, nothing of the parameters.
    assert 0 <= opened.metrics[keys.EPOCHS_RUN] <= 5 and opened.metrics[keys.N_TEST] > 0
    plain = handle(_message(personal, fp, "evaluate"), setup)
    usual = _opened_evaluation(plain, fp)
    assert set(opened.metrics) == set(usual.metrics) | {keys.EPOCHS_RUN}
    assert len(opened.hist_pos) == len(usual.hist_pos)
    # The site's policy bounds personalization's epochs as it bounds a round's.
    strict = _setup(data, _policy(tmp_path, max_local_epochs=2), None)
    assert "5 local epochs above the site's maximum of 2" in _error(
        handle(_personal(personal, fp), strict)
    )
