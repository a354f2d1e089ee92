"""The signed, minimal run config: what sites act on travels signed with the global state, a
config altered in transit is refused and recorded, and the coordinator's store URL (with its
password) leaves the coordinator in no message, app bundle, export or log line.

Round loop over the in-memory grid (tests/memory_grid.py): scripted sites, or the real handler
with a site's own setup; no network, no model."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from memory_grid import MemoryGrid, Node, ScriptedSite, constant

from fedpeft.client.app import handle
from fedpeft.client.setup import SiteSetup
from fedpeft.common import crypto, keys
from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb
from fedpeft.common.config import DataSchema, RunConfig, SiteRunConfig, load_config
from fedpeft.common.envelope import open_global
from fedpeft.common.errors import ConfigError
from fedpeft.common.records import blob_record, from_blob_record
from fedpeft.common.state import State
from fedpeft.common.trust import CoordinatorTrust, SiteTrust
from fedpeft.runs import write_app
from fedpeft.server.app import CONFIG_KEY, RESUME_KEY, config_from_flower
from fedpeft.server.store import RunStore, SiteResult, open_store
from fedpeft.server.strategy import FederatedRun

COORDINATOR = crypto.new_identity()
IDENTITY = {name: crypto.new_identity() for name in "ABD"}
TRUST = CoordinatorTrust(COORDINATOR, {name: k.public_key() for name, k in IDENTITY.items()})
INITIAL: State = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
#: A coordinator store URL with a password: it must never leave the coordinator.
SECRET = "s3cret-pw"
STORE_URL = f"postgresql+psycopg://u:{SECRET}@127.0.0.1/x"


def _scripted(name: str) -> ScriptedSite:
    return ScriptedSite(name, IDENTITY[name], COORDINATOR.public_key(), constant(1.0))


def _run(nodes: dict[int, Node], cfg: RunConfig) -> tuple[MemoryGrid, RunStore, int, list[str]]:
    store = open_store("sqlite://")
    run_id = store.create_run(
        config_json=cfg.to_json(),
        dataset="heart",
        method=cfg.method.name,
        model_name="tiny",
        model_fingerprint="sha256:tiny",
        trainable_params=10,
        total_params=10,
        seed=cfg.seed,
    )
    grid, lines = MemoryGrid(nodes), []
    FederatedRun(
        cfg, store, run_id, dict(INITIAL), "sha256:tiny", TRUST, os.urandom(32), lines.append
    ).start(grid)
    return grid, store, run_id, lines


def _config(**overrides: object) -> RunConfig:
    return load_config(overrides={"db": STORE_URL, "federation.rounds": 2, **overrides})


def _alter_config(msg: Message) -> Message:
    """One byte of the signed site config changed in transit (1 local epoch becomes 9); the
    coordinator's signature left as it was."""
    signed, header = pb.SignedGlobalState(), pb.GlobalStateHeader()
    signed.ParseFromString(from_blob_record(msg.content[keys.GLOBAL]))
    header.ParseFromString(signed.header)
    header.site_config_json = header.site_config_json.replace(
        '"local_epochs":1', '"local_epochs":9'
    )
    signed.header = header.SerializeToString()
    msg.content[keys.GLOBAL] = blob_record(signed.SerializeToString())
    return msg


def test_a_config_altered_in_transit_is_refused_as_forged_and_the_coordinator_records_it() -> None:
    """Site D's messages are altered on the way: its handler (the real one, with D's own setup)
    refuses each as forged before reading a row; the coordinator records the reason for D, in
    both phases of every round, and the run goes on with A."""
    trust = SiteTrust(IDENTITY["D"], COORDINATOR.public_key())
    setup = SiteSetup("D", Path("/nonexistent/records.csv"), DataSchema(), "cpu", trust)
    _, store, run_id, _ = _run(
        {1: _scripted("A"), 2: lambda m: handle(_alter_config(m), setup)}, _config()
    )
    rows: list[SiteResult] = store.site_results(run_id)
    forged = [r for r in rows if r.site == "D"]
    assert {(r.round, r.phase) for r in forged} == {(n, p) for n in (1, 2) for p in keys.MESSAGES}
    for r in forged:
        assert (r.status, r.reason) == (
            "failed",
            "site-error: ForgedGlobalState: the global state is not signed by the coordinator's"
            " key",
        )
    assert all(r.status == "ok" for r in rows if r.site == "A")
    assert [r.applied for r in store.rounds(run_id)] == [True, True]


def _message_bytes(msg: Message) -> bytes:
    """Every object of the message's tree, serialized as Flower sends it."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(msg).values())


def test_sites_get_the_signed_site_config_and_nothing_else_of_the_run_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = _config(**{"federation.codec": "fp16", "train.local_epochs": 2})
    with caplog.at_level(logging.DEBUG):
        grid, store, run_id, lines = _run({1: _scripted("A"), 2: _scripted("B")}, cfg)
    assert len(grid.sent) == 6  # 2 sites x (a train message a round, then a final evaluate)
    for msg in grid.sent:
        assert set(msg.content.config_records[keys.CONFIG]) == {keys.ROUND}
        signed = open_global(from_blob_record(msg.content[keys.GLOBAL]), COORDINATOR.public_key())
        assert signed.config == cfg.for_sites()
        assert signed.config.codec == "fp16" and signed.config.train.local_epochs == 2
        assert SECRET.encode() not in _message_bytes(msg)
        assert b"postgresql" not in _message_bytes(msg)
    # Nor is it in the coordinator's log lines or the stored run config.
    assert not [line for line in lines + caplog.messages if SECRET in line]
    assert SECRET not in store.get_run(run_id).config_json
    assert "db" not in json.loads(cfg.to_json())


def test_the_site_config_holds_what_sites_read_and_no_coordinator_setting() -> None:
    cfg = _config()
    site = cfg.for_sites()
    assert set(json.loads(site.to_json())) == {
        "seed",
        "model",
        "method",
        "train",
        "codec",
        "rounds",
        "max_upload_bytes",
        "test_fraction",
        "privacy",
        "histogram_bins",
        "personalize",
        "personalize_epochs",
        "distill",
        "schedule",
    }
    assert (site.seed, site.model, site.method, site.train) == (
        cfg.seed,
        cfg.model,
        cfg.method,
        cfg.train,
    )
    assert (site.codec, site.rounds, site.max_upload_bytes, site.test_fraction) == (
        cfg.federation.codec,
        cfg.federation.rounds,
        cfg.federation.max_upload_bytes,
        cfg.data.test_fraction,
    )
    assert site.privacy.clip == cfg.federation.site_clip
    assert site.histogram_bins == cfg.federation.histogram_bins == 1000
    text = site.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert SiteRunConfig.from_json(text) == site
    other = dataclasses.replace(site, rounds=3)
    assert len(site.config_hash()) == 64 and site.config_hash() != other.config_hash()
    with pytest.raises(ConfigError, match="db: unknown setting"):
        SiteRunConfig.from_json(json.dumps({**json.loads(text), "db": STORE_URL}))


def test_the_app_bundle_carries_no_store_and_the_server_app_takes_the_coordinator_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config()
    fab = build_fab_from_disk(write_app(tmp_path, cfg))
    assert SECRET.encode() not in fab
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        for name in z.namelist():
            assert SECRET.encode() not in z.read(name), name
            assert b"postgresql" not in z.read(name), name
    run_config = {CONFIG_KEY: cfg.to_json()}
    monkeypatch.delenv("FEDPEFT_STORE", raising=False)
    with pytest.raises(ConfigError, match="FEDPEFT_STORE is not set"):
        config_from_flower(run_config)
    monkeypatch.setenv("FEDPEFT_STORE", STORE_URL)
    got = config_from_flower(run_config)
    assert got.db == STORE_URL and dataclasses.replace(got, db=cfg.db) == cfg
    assert config_from_flower({"federation.rounds": 1}).db == STORE_URL
    # A run config that names a store is refused: the store is not a run setting.
    for named in ({"db": "sqlite:///x.db"}, {CONFIG_KEY: json.dumps({"db": "sqlite:///x.db"})}):
        with pytest.raises(ConfigError, match="db: the store is the coordinator's"):
            config_from_flower(named)


def test_a_resumed_run_s_app_bundle_names_the_run_it_takes_up(tmp_path: Path) -> None:
    import tomllib

    cfg = _config()
    fresh = tomllib.loads((write_app(tmp_path / "a", cfg) / "pyproject.toml").read_text())
    resumed = tomllib.loads((write_app(tmp_path / "b", cfg, 7) / "pyproject.toml").read_text())
    assert fresh["tool"]["flwr"]["app"]["config"] == {CONFIG_KEY: cfg.to_json()}
    assert resumed["tool"]["flwr"]["app"]["config"] == {CONFIG_KEY: cfg.to_json(), RESUME_KEY: 7}
