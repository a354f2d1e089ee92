"""coordinator.toml and site.toml: every problem named before anything starts; no TLS, no start
(unless --insecure); an unreachable coordinator is retried with backoff, then named."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedpeft import deploy
from fedpeft.cli import main
from fedpeft.common.errors import ConfigError


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
    cfg = deploy.load_coordinator_config(toml)
    with pytest.raises(ConfigError, match="does not start without TLS"):
        deploy.superlink_command(cfg, insecure=False)
    cmd = deploy.superlink_command(cfg, insecure=True)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd


def test_tls_settings_and_unknown_keys_are_checked(tmp_path: Path) -> None:
    toml = tmp_path / "coordinator.toml"
    for name in ("keys/coordinator.key", "sites.txt", "store.key", "ca.crt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    toml.write_text('[coordinator]\nport = 1\n[tls]\nca = "ca.crt"\ncertificate = "s.pem"\n')
    with pytest.raises(ConfigError) as info:
        deploy.load_coordinator_config(toml)
    problems = "\n".join(info.value.problems)
    assert "[coordinator] port: unknown setting" in problems
    assert "s.pem: no such file" in problems and "[tls] key: expected a string" in problems
    (tmp_path / "s.pem").write_text("x")
    (tmp_path / "s.key").write_text("x")
    toml.write_text('[coordinator]\n[tls]\nca = "ca.crt"\ncertificate = "s.pem"\nkey = "s.key"\n')
    cmd = deploy.superlink_command(deploy.load_coordinator_config(toml), insecure=False)
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
        deploy.wait_for(f"127.0.0.1:{port}", said.append, attempts=3, first_wait=0.01)
    assert len(said) == 2 and all("retrying in" in line for line in said)
