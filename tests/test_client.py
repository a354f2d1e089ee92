"""The site's message handler, called directly with real Flower messages (no network): with a
SiteSetup (as the site worker calls it) and through the Flower ClientApp shell (node config)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft.client.app import handle, handle_in_context
from fedpeft.client.setup import SiteSetup
from fedpeft.common import crypto, keys
from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb
from fedpeft.common.config import DataSchema, RunConfig, load_config
from fedpeft.common.data import data_fingerprint, load_site_file
from fedpeft.common.envelope import (
    Expected,
    OpenedEvaluation,
    open_delta,
    open_evaluation,
    sign_global,
)
from fedpeft.common.errors import DeltaRejected
from fedpeft.common.methods import build_model, shared_state
from fedpeft.common.model import model_fingerprint, resolve_model_path
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.tensors import to_numpy
from fedpeft.common.trust import SiteTrust
from fedpeft.processes import write_site_setup
from fedpeft.settings import load_site_config

RUN_KEY = crypto.new_run_key()
COORDINATOR = crypto.new_identity()
SITE_KEY = crypto.new_identity()


def _site_file(folder: Path, rows: int = 40, bad_row: bool = False) -> Path:
    texts = [
        f"{50 + i % 20} y male. bp {120 + i}. {'asymptomatic' if i % 2 else 'no pain'}."
        for i in range(rows)
    ]
    if bad_row:
        texts[5] = " "
    path = folder / "site-x.csv"
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(rows)]}).to_csv(path, index=False)
    return path


def _state(cfg: RunConfig) -> dict:
    return to_numpy(shared_state(build_model(cfg.model, cfg.method, 0.0, cfg.seed)))


def _message(
    cfg: RunConfig,
    fingerprint: str,
    kind: str = "train",
    signer: object = COORDINATOR,
    rnd: int = 1,
) -> Message:
    signed = sign_global(
        _state(cfg),
        run_token="run-token",
        round=rnd,
        method=cfg.method.name,
        fingerprint=fingerprint,
        run_public=crypto.raw_public(RUN_KEY),
        config=cfg.for_sites(),
        coordinator=signer,  # type: ignore[arg-type]
    )
    config = ConfigRecord({keys.ROUND: rnd})
    content = RecordDict({keys.GLOBAL: blob_record(signed), keys.CONFIG: config})
    return Message(content, dst_node_id=7, message_type=kind)


def _setup(path: Path) -> SiteSetup:
    """The site's own settings, as the worker builds them from site.toml."""
    trust = SiteTrust(SITE_KEY, COORDINATOR.public_key())
    return SiteSetup("site-x", path, DataSchema(), "cpu", trust)


def _site_setup(path: Path, data_table: str = "") -> str:
    """The setup file ``fedpeft site start`` writes from a site.toml for ``path``'s records
    (keys beside them)."""
    folder = path.parent
    crypto.write_private_key(folder / "site.key", SITE_KEY)
    (folder / "coordinator.pub").write_text(crypto.public_openssh(COORDINATOR.public_key()))
    toml = folder / "site.toml"
    toml.write_text(
        f'[site]\nname = "site-x"\ncoordinator = "127.0.0.1:1"\nidentity_key = "site.key"\n'
        f'coordinator_key = "coordinator.pub"\ndata = "{path.name}"\ndevice = "cpu"\n{data_table}'
    )
    return str(write_site_setup(load_site_config(toml, insecure=True), folder / "home"))


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Flower stamps messages with the identity of the process's task; set one, as
    Flower's own in-process simulation does."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_train_replies_with_a_sealed_delta_of_the_shared_state(
    tmp_path: Path, cfg: RunConfig
) -> None:
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = handle(_message(cfg, fp), _setup(path))
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "ok" and info[keys.SITE] == "site-x"
    # The site's data version leaves beside the update: a hash of its rows, never a row.
    assert info[keys.DATA_FINGERPRINT] == data_fingerprint(load_site_file(path, DataSchema()))
    state = _state(cfg)
    expected = Expected(
        run_token="run-token",
        round=1,
        method="lora",
        fingerprint=fp,
        shapes={k: v.shape for k, v in state.items()},
        max_bytes=1 << 22,
    )
    sealed = from_blob_record(reply.content[keys.SEALED])
    opened = open_delta(sealed, expected, RUN_KEY, {"site-x": SITE_KEY.public_key()})
    delta = opened.delta
    assert opened.site_id == "site-x" and opened.num_examples > 0
    assert sum(v.size for v in delta.values()) == 74_498
    assert any(abs(v).max() > 0 for v in delta.values())
    metrics = reply.content[keys.METRICS]
    assert metrics[keys.N_TRAIN] > 0 and 0.0 <= metrics[keys.AUC] <= 1.0
    assert metrics[keys.TASK_SECONDS] > metrics[keys.TRAIN_SECONDS] > 0  # the whole message
    # Round 1 trains from the initial state: nothing to evaluate first.
    assert keys.EVALUATION not in reply.content


def _evaluation(reply: Message, fp: str, rnd: int) -> OpenedEvaluation:
    """The reply's sealed evaluation of round ``rnd``'s state, opened as the coordinator does."""
    return open_evaluation(
        from_blob_record(reply.content[keys.EVALUATION]),
        run_token="run-token",
        round=rnd,
        fingerprint=fp,
        run_key=RUN_KEY,
        sites={"site-x": SITE_KEY.public_key()},
    )


def test_a_later_train_message_also_evaluates_the_state_it_trains_from(
    tmp_path: Path, cfg: RunConfig
) -> None:
    """After round 1 the train reply carries what an evaluate message for the same global
    state gets: the same metrics and histogram, sealed and signed (one message a round instead
    of two); the train message of round 2 evaluates the state of round 1."""
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    trained = handle(_message(cfg, fp, "train", rnd=2), _setup(path))
    evaluated = handle(_message(cfg, fp, "evaluate", rnd=2), _setup(path))
    assert trained.content[keys.CONFIG][keys.STATUS] == "ok" and keys.SEALED in trained.content
    folded, alone = _evaluation(trained, fp, 1), _evaluation(evaluated, fp, 2)
    assert folded.site_id == alone.site_id == "site-x"
    assert folded.metrics == alone.metrics
    assert folded.metrics[keys.N_TEST] > 0 and keys.VAL_LOSS in folded.metrics
    # The AUC's 95 % interval is computed at the site; only its two ends leave.
    low, high = folded.metrics[keys.AUC_LOW], folded.metrics[keys.AUC_HIGH]
    assert 0.0 <= low <= folded.metrics[keys.AUC] <= high <= 1.0
    assert (folded.hist_pos, folded.hist_neg) == (alone.hist_pos, alone.hist_neg)
    # The reply's own metrics stay those of the locally trained model.
    assert keys.N_TRAIN in trained.content[keys.METRICS]
    with pytest.raises(DeltaRejected, match="wrong-round|an evaluation of round 1"):
        _evaluation(trained, fp, 2)  # bound to the round it evaluated


def test_evaluate_replies_with_a_sealed_histogram_not_predictions(
    tmp_path: Path, cfg: RunConfig
) -> None:
    """The evaluation travels sealed: in the clear, the reply says only how long it took."""
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = handle(_message(cfg, fp, "evaluate"), _setup(path))
    opened = _evaluation(reply, fp, 1)
    assert sum(opened.hist_pos) + sum(opened.hist_neg) == opened.metrics[keys.N_TEST] > 0
    assert keys.SEALED not in reply.content
    assert set(reply.content[keys.METRICS]) == {keys.TASK_SECONDS}


def test_the_signed_config_sets_the_histogram_bins(tmp_path: Path) -> None:
    """``federation.histogram_bins`` travels in the signed site config; the site's histograms
    have that many bins, holding the same rows."""
    cfg = load_config(
        overrides={
            "data.dataset": str(tmp_path),
            "model.max_length": 32,
            "federation.histogram_bins": 20,
        }
    )
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    opened = _evaluation(handle(_message(cfg, fp, "evaluate"), _setup(path)), fp, 1)
    assert len(opened.hist_pos) == len(opened.hist_neg) == 20
    assert sum(opened.hist_pos) + sum(opened.hist_neg) == opened.metrics[keys.N_TEST] > 0


def test_a_global_state_not_signed_by_the_coordinator_is_refused(
    tmp_path: Path, cfg: RunConfig
) -> None:
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    forged = _message(cfg, fp, signer=crypto.new_identity())
    reply = handle(forged, _setup(path))
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "error"
    assert "not signed by the coordinator's key" in info[keys.ERROR]
    assert keys.SEALED not in reply.content


def test_a_site_without_settings_is_a_clear_error(tmp_path: Path, cfg: RunConfig) -> None:
    context = _context({keys.NODE_SITE: "site-x"})
    reply = handle_in_context(_message(cfg, "sha256:x"), context)
    assert reply.content[keys.CONFIG][keys.ERROR].startswith("KeyFileError")
    assert reply.content[keys.CONFIG][keys.SITE] == "site-x"


def test_fingerprint_mismatch_is_refused(tmp_path: Path, cfg: RunConfig) -> None:
    path = _site_file(tmp_path)
    reply = handle(_message(cfg, "sha256:" + "0" * 64), _setup(path))
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "error"
    assert "fingerprint mismatch" in info[keys.ERROR]
    assert keys.SEALED not in reply.content


def test_bad_site_data_reply_carries_no_local_detail(tmp_path: Path, cfg: RunConfig) -> None:
    path = _site_file(tmp_path, bad_row=True)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = handle(_message(cfg, fp), _setup(path))
    error = reply.content[keys.CONFIG][keys.ERROR]
    assert error.startswith("DataError")
    assert str(tmp_path) not in error and "site-x.csv" not in error and "row" not in error


def _alter_config(msg: Message, old: bytes, new: bytes) -> Message:
    """``msg`` with ``old`` replaced by ``new`` inside the site config of its signed global state
    (the signature left as it was): a relay altering the run's settings in transit."""
    signed, header = pb.SignedGlobalState(), pb.GlobalStateHeader()
    signed.ParseFromString(from_blob_record(msg.content[keys.GLOBAL]))
    header.ParseFromString(signed.header)
    assert old.decode() in header.site_config_json
    header.site_config_json = header.site_config_json.replace(old.decode(), new.decode())
    signed.header = header.SerializeToString()
    msg.content[keys.GLOBAL] = blob_record(signed.SerializeToString())
    return msg


def test_a_config_altered_in_transit_is_refused_as_forged(tmp_path: Path, cfg: RunConfig) -> None:
    """One byte of the signed config changed (one local epoch becomes nine): refused before any
    data is read or any model loaded, with the forged reason the coordinator records."""
    path = _site_file(tmp_path)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    msg = _alter_config(_message(cfg, fp), b'"local_epochs":1', b'"local_epochs":9')
    reply = handle(msg, _setup(tmp_path / "absent.csv"))  # no rows are read: the file is absent
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "error"
    assert info[keys.ERROR] == (
        "ForgedGlobalState: the global state is not signed by the coordinator's key"
    )
    assert keys.SEALED not in reply.content
    assert path.exists()


def test_the_site_reads_its_rows_with_its_own_schema_from_site_toml(
    tmp_path: Path, cfg: RunConfig
) -> None:
    """The columns come from site.toml's [data] table (through the setup file that site start
    writes and the Flower shell's node config names),
    never from the coordinator: a file whose columns are ``note`` and ``y`` trains."""
    path = _site_file(tmp_path)
    pd.read_csv(path).rename(columns={"text": "note", "label": "y"}).to_csv(path, index=False)
    fp = model_fingerprint(resolve_model_path(cfg.model))
    context = _context({keys.NODE_SITE: "site-x", keys.NODE_SITE_SETUP: _site_setup(path)})
    refused = handle_in_context(_message(cfg, fp, "evaluate"), context)
    assert refused.content[keys.CONFIG][keys.ERROR] == "DataError: failed its checks"
    table = '[data]\ntext_column = "note"\nlabel_column = "y"\n'
    other = tmp_path / "other"
    other.mkdir()
    moved = other / path.name
    path.rename(moved)
    context = _context({keys.NODE_SITE: "site-x", keys.NODE_SITE_SETUP: _site_setup(moved, table)})
    reply = handle_in_context(_message(cfg, fp, "evaluate"), context)
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok", reply.content[keys.CONFIG][keys.ERROR]
    assert _evaluation(reply, fp, 1).metrics[keys.N_TEST] > 0


def test_virtual_sites_in_one_process_share_one_frozen_base_model() -> None:
    # A simulation's actor serves any of its (say 100) sites: each site's session holds only
    # its tokenized rows, and training at one site leaves the shared base model as it was.
    import torch

    from fedpeft.client.app import site_session
    from fedpeft.client.setup import Partition

    cfg = load_config(overrides={"data.dataset": "synthetic:3", "model.max_length": 32})
    trust = SiteTrust(SITE_KEY, COORDINATOR.public_key())
    setups = [
        SiteSetup(
            f"partition-{i}",
            None,
            DataSchema(),
            "cpu",
            trust,
            partition=Partition("synthetic:3", i),
        )
        for i in range(3)
    ]
    sessions = [site_session(cfg.for_sites(), s) for s in setups]
    assert [s.site for s in sessions] == ["site-1", "site-2", "site-3"]
    assert all(s.base is sessions[0].base for s in sessions)
    assert len({s.data_fingerprint for s in sessions}) == 3
    before = {k: v.clone() for k, v in sessions[0].base.state_dict().items()}
    fp = model_fingerprint(resolve_model_path(cfg.model))
    reply = handle(_message(cfg, fp), setups[1])
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok"
    after = sessions[0].base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_base_model_let_go_takes_its_sessions_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A long-lived site worker serving runs of more seeds than it keeps base models for
    # (_MAX_BASES) lets the oldest go, and no session keeps it alive. (A small stand-in model:
    # what is checked is the cache.)
    from types import SimpleNamespace

    import torch

    from fedpeft.client import app

    monkeypatch.setattr(app, "_BASES", {})
    monkeypatch.setattr(app, "_SESSIONS", {})
    monkeypatch.setattr(app, "load_base_model", lambda _m, _d, _s: torch.nn.Linear(1, 1))
    kept = app._MAX_BASES
    cfgs = [load_config(overrides={"seed": seed}).for_sites() for seed in range(1, kept + 2)]
    cpu = torch.device("cpu")
    bases = [app._base_model(c, cpu) for c in cfgs[:kept]]
    assert app._base_model(cfgs[0], cpu) is bases[0]  # loaded once
    for i, base in enumerate(bases):
        app._SESSIONS[(f"run-{i}",)] = SimpleNamespace(base=base)  # type: ignore[assignment]
    app._base_model(cfgs[kept], cpu)
    assert list(app._SESSIONS) == [(f"run-{i}",) for i in range(1, kept)]
    assert len(app._BASES) == kept and bases[0] not in app._BASES.values()
