"""The docker compose rehearsal's files (``fedpeft rehearsal init``) and the compose file itself.
The rehearsal running in containers is proved by deploy/e2e-compose.sh (run by .ci/run)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cryptography import x509

from fedpeft import processes, rehearsal
from fedpeft.cli import main
from fedpeft.common.config import load_config
from fedpeft.common.crypto import parse_public_key, public_openssh, read_private_key
from fedpeft.common.data import heart_sites
from fedpeft.common.environment import FLWR_HOME_ENV, QUIET
from fedpeft.common.errors import ConfigError
from fedpeft.rehearsal import HOSPITALS, init
from fedpeft.settings import load_coordinator_config, load_site_config

ROOT = Path(__file__).resolve().parents[1]
TLS_FILES = ("certs/ca.crt", "certs/server.pem", "certs/server.key")


def _san(cert: Path) -> set[str]:
    ext = x509.load_pem_x509_certificate(cert.read_bytes()).extensions
    names = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def test_init_writes_every_partys_files_and_they_load(tmp_path: Path) -> None:
    made = init(tmp_path / "r", rounds=3)
    coord = tmp_path / "r" / "coordinator"
    assert made == [coord, *(tmp_path / "r" / name for name in HOSPITALS.values())]

    cfg = load_coordinator_config(coord / "coordinator.toml")  # every file it names exists
    assert cfg.tls is not None and cfg.api_address.startswith("127.0.0.1:")
    assert {"coordinator", "127.0.0.1", "localhost"} <= _san(cfg.tls.certificate)
    assert not (coord / "certs" / "ca.key").exists()
    for secret in (cfg.identity_key, cfg.store_key_file, cfg.tls.key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    run = load_config(coord / "run.toml")
    assert run.federation.rounds == 3 and run.federation.min_sites == len(HOSPITALS)

    records = {site.name: site for site in heart_sites()}
    for hospital, name in HOSPITALS.items():
        site = load_site_config(tmp_path / "r" / name / "site.toml")
        assert site.name == name and site.coordinator == "coordinator:9092"
        key = read_private_key(site.identity_key)  # 0600, or it would be refused
        sent = (coord / "site-keys" / f"{name}.pub").read_text()
        assert public_openssh(parse_public_key(sent)) == public_openssh(key.public_key())
        assert site.ca is not None and site.ca.read_bytes() == cfg.tls.ca.read_bytes()
        frame = pd.read_csv(site.data)
        assert list(frame["text"]) == list(records[hospital].texts)
        assert list(frame["label"]) == list(records[hospital].labels)
        # The ledger on the site's writable state volume; a policy stricter than the defaults.
        assert site.ledger == (tmp_path / "r" / name / "state" / "ledger.jsonl").resolve()
        assert site.policy.methods == ("lora", "prompt", "ia3")
        assert site.policy.max_local_epochs == 3 and site.policy.max_upload_bytes == 1 << 20
        # No other site's private key is in this site's folder.
        assert [p.name for p in site.identity_key.parent.glob("*.key")] == [f"{name}.key"]

    with pytest.raises(ConfigError, match="already set up"):
        init(tmp_path / "r")


def test_certs_also_name_the_loopback_control_api(tmp_path: Path) -> None:
    assert main(["certs", "--out", str(tmp_path / "certs"), "--name", "coord.example.org"]) == 0
    assert _san(tmp_path / "certs" / "server.pem") == {
        "coord.example.org",
        "127.0.0.1",
        "localhost",
    }


def test_compose_file_keeps_each_party_to_its_own_volume_on_a_private_network() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert compose["networks"]["consortium"]["internal"] is True
    volume_of = {"coordinator": "coordinator"}
    volume_of.update({name.lower(): name.lower() for name in HOSPITALS.values()})
    assert set(services) == {"setup", *volume_of}
    for service, volume in volume_of.items():
        spec = services[service]
        mounts = [m.split("#")[0].strip().split(":") for m in spec["volumes"]]
        if service == "coordinator":
            assert mounts == [["coordinator", "/coordinator"]]
            continue
        # A site: its own files read-only, and its own state volume (the ledger) writable
        # at /site/state only.
        assert mounts == [[volume, "/site", "ro"], [f"{volume}-state", "/site/state"]], service
    for service, spec in services.items():
        assert spec["networks"] == ["consortium"], service
        assert spec["dns"] == ["127.0.0.1"], service  # no resolver beyond the network
        env = spec["environment"]
        assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["HF_HUB_OFFLINE"] == "1", service
        assert spec["build"]["network"] == "none", service
    setup_mounts = {m.split(":")[1] for m in services["setup"]["volumes"]}
    assert setup_mounts == {
        f"/rehearsal/{name}" for name in ["coordinator", *HOSPITALS.values()]
    } | {f"/rehearsal/{name}/state" for name in HOSPITALS.values()}


def test_the_rehearsal_starts_its_superlink_with_the_one_quiet_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "coordinator"
    for name in ("keys/coordinator.key", "sites.txt", "store.key", *TLS_FILES):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    (folder / "coordinator.toml").write_text(rehearsal.COORDINATOR_TOML)
    started: list[dict[str, str]] = []

    class SuperLink:
        def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
            started.append(env)

        def terminate(self) -> None: ...

        def wait(self, timeout: float) -> int:
            return 0

    def unreachable(*_: object, **__: object) -> None:
        raise ConfigError("stop here")

    monkeypatch.setattr(rehearsal.subprocess, "Popen", SuperLink)
    monkeypatch.setattr(processes, "wait_for", unreachable)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.delenv(FLWR_HOME_ENV, raising=False)
    with pytest.raises(ConfigError, match="stop here"):
        rehearsal.coordinator(folder, lambda _: None)
    cfg = load_coordinator_config(folder / "coordinator.toml")
    assert started == [processes.coordinator_env(cfg, folder.resolve() / "flwr-home")]
    assert started[0]["FLWR_TELEMETRY_ENABLED"] == "0" and started[0]["HF_HUB_OFFLINE"] == "1"


def test_the_containers_quiet_settings_agree_with_the_one_list() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    image = dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$", dockerfile, re.M))
    for where, env in [("compose", compose["x-quiet-env"]), ("Dockerfile", image)]:
        set_here = {k: str(v) for k, v in env.items() if k in QUIET}
        assert set_here == {k: QUIET[k] for k in set_here}, where
        assert {"FLWR_TELEMETRY_ENABLED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} <= set(
            set_here
        ), where
