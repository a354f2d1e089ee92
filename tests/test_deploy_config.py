"""coordinator.toml and site.toml: every problem named before anything starts; no TLS, no start
(unless --insecure); an unreachable coordinator is retried with backoff, then named; every
process started gets the one quiet environment (no telemetry, Hugging Face offline)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from fedpeft import allowlist, processes
from fedpeft.cli import main
from fedpeft.common import keys
from fedpeft.common.config import DataSchema, load_config
from fedpeft.common.environment import (
    COORDINATOR_KEY_ENV,
    FLWR_HOME_ENV,
    QUIET,
    SITES_ENV,
    STORE_ENV,
    STORE_KEY_FILE_ENV,
)
from fedpeft.common.errors import ConfigError
from fedpeft.settings import load_coordinator_config, load_site_config, shown_url


def test_the_coordinator_does_not_start_without_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "coordinator.toml"
    toml.write_text('[coordinator]\nfleet_address = "127.0.0.1:9092"\n')
    assert main(["coordinator", "start", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    # Both problems at once: the missing files, named with their paths.
    assert f"{tmp_path / 'keys' / 'coordinator.key'}: no such file" in err
    assert f"{tmp_path / 'sites.txt'}: no such file" in err
    for name in ("keys/coordinator.key", "sites.txt", "store.key"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    cfg = load_coordinator_config(toml)
    with pytest.raises(ConfigError, match="does not start without TLS"):
        processes.superlink_command(cfg, insecure=False)
    cmd = processes.superlink_command(cfg, insecure=True)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd


def test_tls_settings_and_unknown_keys_are_checked(tmp_path: Path) -> None:
    toml = tmp_path / "coordinator.toml"
    for name in ("keys/coordinator.key", "sites.txt", "store.key", "ca.crt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    toml.write_text('[coordinator]\nport = 1\n[tls]\nca = "ca.crt"\ncertificate = "s.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_coordinator_config(toml)
    problems = "\n".join(info.value.problems)
    assert "[coordinator] port: unknown setting" in problems
    assert "s.pem: no such file" in problems and "[tls] key: expected a string" in problems
    (tmp_path / "s.pem").write_text("x")
    (tmp_path / "s.key").write_text("x")
    toml.write_text('[coordinator]\n[tls]\nca = "ca.crt"\ncertificate = "s.pem"\nkey = "s.key"\n')
    cmd = processes.superlink_command(load_coordinator_config(toml), insecure=False)
    assert "--enable-supernode-auth" in cmd and str(tmp_path / "ca.crt") in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # the APIs stay on loopback by default


def test_a_site_with_a_missing_file_does_not_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text(
        '[site]\nname = "A"\ncoordinator = "127.0.0.1:1"\nca = "ca.crt"\n'
        'identity_key = "A.key"\ncoordinator_key = "c.pub"\ndata = "records.csv"\n'
    )
    assert main(["site", "start", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    for name in ("ca.crt", "A.key", "c.pub", "records.csv"):
        assert f"{tmp_path / name}: no such file" in err


def test_an_unreachable_coordinator_is_retried_then_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    said: list[str] = []
    with pytest.raises(ConfigError, match="unreachable after 3 tries"):
        processes.wait_for(f"127.0.0.1:{port}", said.append, attempts=3, first_wait=0.01)
    assert len(said) == 2 and all("retrying in" in line for line in said)


def test_a_run_config_and_a_coordinator_config_are_read_by_the_one_toml_reader(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[coordinator\n")
    for load in (load_config, load_coordinator_config, load_site_config):
        with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
            load(bad)
        with pytest.raises(ConfigError, match=r"missing\.toml: no such file"):
            load(tmp_path / "missing.toml")


def _site(tmp_path: Path) -> Path:
    for name in ("ca.crt", "A.key", "c.pub", "records.csv"):
        (tmp_path / name).write_text("x")
    toml = tmp_path / "site.toml"
    toml.write_text(
        '[site]\nname = "A"\ncoordinator = "127.0.0.1:1"\nca = "ca.crt"\n'
        'identity_key = "A.key"\ncoordinator_key = "c.pub"\ndata = "records.csv"\n'
    )
    return toml


def test_the_supernode_tells_a_client_app_its_site_and_its_setup_file(tmp_path: Path) -> None:
    """A ClientApp reads the site's own settings (data, schema, device, key paths) from the
    setup file site start writes from site.toml; the node config names only it and the site."""
    cfg = load_site_config(_site(tmp_path))
    setup = processes.write_site_setup(cfg, tmp_path / "home")
    written = json.loads(setup.read_text())
    policy = written.pop("policy")  # the [policy] as its fields: paths, names, numbers
    assert policy["coordinator_keys"] == [str(tmp_path / "c.pub")] and policy["max_rounds"] == 100
    assert written == {
        "site": "A",
        "data_file": str(tmp_path / "records.csv"),
        "schema": {
            "text_column": "text",
            "label_column": "label",
            "split_column": "split",
            "skip_bad_rows": False,
        },
        "device": "auto",
        "identity_key": str(tmp_path / "A.key"),
        "coordinator_key": str(tmp_path / "c.pub"),
        "ledger": str(tmp_path / "ledger.jsonl"),
        "lora_rank": 0,  # the run's
        "quantize": "none",
        "unlabeled_file": None,  # no unlabeled notes for an mlm stage
    }
    cmd = processes.supernode_command(cfg, insecure=False, setup_file=setup)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert node_config == f'{keys.NODE_SITE}="A" {keys.NODE_SITE_SETUP}="{setup}"'
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "A.key")


#: Values that a naive ``key="value"`` node config cuts short, splits or turns into more keys.
AWKWARD = [
    'say "hi"',
    "it's",
    "tab\there",
    "k=v",
    'x" evil="1',
    "a b,c;d",
    "new\nline",
    "C:\\a",
    "é☃",
]


@pytest.mark.parametrize("value", AWKWARD)
def test_node_config_values_round_trip_through_flowers_own_parser(
    tmp_path: Path, value: str
) -> None:
    from flwr.common.config import parse_config_args

    cfg = dataclasses.replace(load_site_config(_site(tmp_path)), name=value)
    setup = tmp_path / f"home {value}" / "site-setup.json"
    cmd = processes.supernode_command(cfg, insecure=False, setup_file=setup)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert node_config.isascii() and node_config.isprintable()
    assert parse_config_args([node_config]) == {
        keys.NODE_SITE: value,
        keys.NODE_SITE_SETUP: str(setup),
    }


def test_a_node_config_value_flower_cannot_carry_is_refused_naming_its_setting(
    tmp_path: Path,
) -> None:
    toml = _site(tmp_path)
    cfg = load_site_config(toml)
    bad = "A\udcff"  # a byte that is not UTF-8, as Python decodes a file name
    with pytest.raises(ConfigError, match=rf"{toml}: \[site\] name: 'A\\udcff' cannot be"):
        processes.supernode_command(dataclasses.replace(cfg, name=bad), insecure=False)
    with pytest.raises(ConfigError, match=rf"{toml}: the path of the site setup file"):
        processes.supernode_command(cfg, insecure=False, setup_file=tmp_path / bad / "s.json")


def test_the_site_s_schema_and_device_come_from_site_toml(tmp_path: Path) -> None:
    toml = _site(tmp_path)
    cfg = load_site_config(toml)
    assert (cfg.device, cfg.schema) == ("auto", DataSchema())  # the defaults
    assert cfg.data == tmp_path / "records.csv"  # [site] data, as before
    toml.write_text(
        toml.read_text() + 'device = "cpu"\n[data]\ntext_column = "note"\nlabel_column = "y"\n'
        'split_column = "part"\nskip_bad_rows = true\n'
    )
    cfg = load_site_config(toml)
    assert cfg.device == "cpu"
    assert cfg.schema == DataSchema("note", "y", "part", skip_bad_rows=True)
    text = toml.read_text().replace('device = "cpu"', 'device = "tpu"')
    toml.write_text(text.replace("skip_bad_rows = true", 'skip_bad_rows = "yes"\nbogus = 1'))
    with pytest.raises(ConfigError) as info:
        load_site_config(toml)
    assert sorted(info.value.problems) == sorted(
        [
            f"{toml}: [site] device: expected one of auto, cpu, cuda",
            f"{toml}: [data] skip_bad_rows: expected true or false",
            f"{toml}: [data] bogus: unknown setting",
        ]
    )


def test_the_coordinator_s_store_is_beside_its_config_unless_absolute(tmp_path: Path) -> None:
    toml = _coordinator(tmp_path)
    assert load_coordinator_config(toml).store == f"sqlite:///{tmp_path / 'runs.db'}"
    toml.write_text('[coordinator]\nstore = "postgresql+psycopg://u:s3cret-pw@db/x"\n')
    cfg = load_coordinator_config(toml)
    assert cfg.store == "postgresql+psycopg://u:s3cret-pw@db/x"
    assert processes.coordinator_env(cfg, tmp_path)[STORE_ENV] == cfg.store
    assert shown_url(cfg.store) == "postgresql+psycopg://u:***@db/x"
    toml.write_text('[coordinator]\nstore = "not a url"\n')
    with pytest.raises(ConfigError, match=r"\[coordinator\] store: not a SQLAlchemy URL"):
        load_coordinator_config(toml)


def _coordinator(tmp_path: Path) -> Path:
    for name in ("keys/coordinator.key", "sites.txt", "store.key"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    toml = tmp_path / "coordinator.toml"
    toml.write_text("[coordinator]\n")
    return toml


def test_every_process_we_start_has_telemetry_off_and_hugging_face_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the operator's shell says, the one list wins.
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert QUIET["FLWR_TELEMETRY_ENABLED"] == "0" and QUIET["HF_HUB_OFFLINE"] == "1"
    assert QUIET["TRANSFORMERS_OFFLINE"] == "1"
    cfg = load_coordinator_config(_coordinator(tmp_path))
    coordinator = processes.coordinator_env(cfg, tmp_path / "home")
    site = processes.site_env(tmp_path / "home")
    for env in (processes.child_env(), coordinator, site):
        assert {k: env[k] for k in QUIET} == dict(QUIET)
        assert env["PATH"].split(os.pathsep)[0] == str(processes.BIN)
    assert coordinator[FLWR_HOME_ENV] == site[FLWR_HOME_ENV] == str(tmp_path / "home")
    assert coordinator[COORDINATOR_KEY_ENV] == str(tmp_path / "keys" / "coordinator.key")
    assert coordinator[SITES_ENV] == str(tmp_path / "sites.txt")
    assert coordinator[STORE_KEY_FILE_ENV] == str(tmp_path / "store.key")
    assert coordinator[STORE_ENV] == f"sqlite:///{tmp_path / 'runs.db'}"


def test_the_flower_cli_runs_with_the_same_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = _coordinator(tmp_path)
    cfg = load_coordinator_config(toml)
    (tmp_path / "sites.txt.flower-nodes.json").write_text('{"A": 7}')
    seen: list[tuple[list[str], dict[str, str]]] = []

    def flwr(cmd: list[str], env: dict[str, str], **_: object) -> subprocess.CompletedProcess:
        seen.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 0, stdout='{"success": true}', stderr="")

    monkeypatch.setattr(allowlist.subprocess, "run", flwr)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    assert allowlist.flower_unregister(toml, cfg, "A") == 7
    [(cmd, env)] = seen
    assert cmd[1:4] == ["supernode", "unregister", "7"]
    assert env == processes.child_env({FLWR_HOME_ENV: str(tmp_path / "flwr-cli")})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    assert allowlist.flower_node_id(cfg, "A") is None


def test_the_control_api_stays_on_loopback_unless_exposed_with_tls(tmp_path: Path) -> None:
    toml = _coordinator(tmp_path)
    for address in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"):
        toml.write_text(f'[coordinator]\napi_address = "{address}"\n')
        assert load_coordinator_config(toml).expose_api is False
    toml.write_text('[coordinator]\napi_address = "0.0.0.0:8000"\n')
    with pytest.raises(ConfigError, match=r"api_address: 0\.0\.0\.0:8000 is not loopback"):
        load_coordinator_config(toml)
    # Exposed on purpose, but without TLS: still refused, and the reason says why.
    toml.write_text('[coordinator]\napi_address = "10.0.0.5:8000"\nexpose_api = true\n')
    with pytest.raises(ConfigError, match=r"expose_api: needs a \[tls\] table"):
        load_coordinator_config(toml)
    toml.write_text('[coordinator]\napi_address = "10.0.0.5:8000"\nexpose_api = "yes"\n')
    with pytest.raises(ConfigError, match="expose_api: expected true or false"):
        load_coordinator_config(toml)
    for name in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / name).write_text("")
    toml.write_text(
        '[coordinator]\napi_address = "10.0.0.5:8000"\nexpose_api = true\n'
        '[tls]\nca = "ca.crt"\ncertificate = "server.pem"\nkey = "server.key"\n'
    )
    cfg = load_coordinator_config(toml)
    cmd = processes.superlink_command(cfg, insecure=False)
    assert cfg.expose_api and cmd[cmd.index("--host") + 1] == "10.0.0.5"


def test_the_coordinator_start_warns_when_the_control_api_is_exposed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedpeft.cli import _start_coordinator

    toml = _coordinator(tmp_path)
    for name in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / name).write_text("")
    toml.write_text(
        '[coordinator]\napi_address = "10.0.0.5:8000"\nexpose_api = true\n'
        '[tls]\nca = "ca.crt"\ncertificate = "server.pem"\nkey = "server.key"\n'
    )

    class Stop(Exception):
        pass

    def stop(*_: object, **__: object) -> None:
        raise Stop  # the checks and warnings are done by then; nothing is started

    import fedpeft.common.crypto as crypto
    import fedpeft.common.trust as trust
    import fedpeft.server.checkpoints as checkpoints

    monkeypatch.setattr(crypto, "read_private_key", lambda *_: None)
    monkeypatch.setattr(trust, "read_sites_file", lambda *_: {})
    monkeypatch.setattr(checkpoints, "read_store_key", lambda *_: b"")
    monkeypatch.setattr(processes, "coordinator_env", stop)
    with pytest.raises(Stop):
        _start_coordinator(argparse.Namespace(config=toml, insecure=False))
    err = capsys.readouterr().err
    assert "Control and Runtime APIs are served on 10.0.0.5:8000" in err
    assert "anyone who reaches that address can submit runs" in err


def test_the_insecure_warning_says_what_anyone_on_the_path_can_do() -> None:
    text = " ".join(processes.INSECURE_WARNING.replace("!!", "").split())
    assert "Anyone on the path between sites and coordinator can read everything" in text
    assert "run code at every site" in text


def test_the_server_app_gets_no_secret_it_does_not_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-aws")
    monkeypatch.setenv("PGPASSWORD", "s3cret-pg")
    monkeypatch.setenv("FEDPEFT_STORE_KEY", "c2VjcmV0LXN0b3JlLWtleQ==")  # a raw key: unused
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("PYTHONPATH", "/opt/site-apps")
    env = processes.coordinator_env(load_coordinator_config(_coordinator(tmp_path)), tmp_path)
    leaked = [v for v in env.values() if "s3cret" in v or "c2VjcmV0" in v]
    assert leaked == []
    assert "FEDPEFT_STORE_KEY" not in env and env[STORE_KEY_FILE_ENV].endswith("store.key")
    assert env["LC_ALL"] == "C.UTF-8" and env["PYTHONPATH"] == "/opt/site-apps"
    assert {k: env[k] for k in QUIET} == dict(QUIET)
