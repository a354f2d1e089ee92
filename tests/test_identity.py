"""Enrollment and the coordinator's register of sites, through the CLI."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from fedpeft.cli import main
from fedpeft.common import crypto
from fedpeft.common.envelope import Expected, open_delta, seal_delta
from fedpeft.common.environment import COORDINATOR_KEY_ENV, SITES_ENV
from fedpeft.common.errors import DeltaRejected, KeyFileError
from fedpeft.common.trust import coordinator_trust_from_env, read_sites_file, site_trust


def test_enroll_register_seal_remove(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["site", "enroll", "--name", "Cleveland"]) == 0
    out = capsys.readouterr().out
    key, pub = tmp_path / "keys" / "Cleveland.key", tmp_path / "keys" / "Cleveland.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    site_key = crypto.read_private_key(key)
    assert crypto.fingerprint(site_key.public_key()) in out
    assert main(["site", "enroll", "--name", "Cleveland"]) == 2  # never replaced in place
    assert "already exists" in capsys.readouterr().err
    assert main(["coordinator", "init"]) == 0
    trust = site_trust(key, tmp_path / "keys" / "coordinator.pub")

    assert main(["coordinator", "add-site", "Cleveland", str(pub)]) == 0
    line = pub.read_text().split(" Cleveland")[0]
    assert main(["coordinator", "add-site", "Other", line]) == 2  # same key, second name
    assert "already registered as site 'Cleveland'" in capsys.readouterr().err
    assert main(["coordinator", "add-site", "bad name!", line]) == 2
    sites = read_sites_file(tmp_path / "sites.txt")
    assert list(sites) == ["Cleveland"]
    # The ServerApp's trust names its register, which its round loop reads again every round.
    monkeypatch.setenv(COORDINATOR_KEY_ENV, str(tmp_path / "keys" / "coordinator.key"))
    monkeypatch.setenv(SITES_ENV, str(tmp_path / "sites.txt"))
    server = coordinator_trust_from_env()
    assert (list(server.sites), server.sites_file) == (["Cleveland"], tmp_path / "sites.txt")

    run_key = crypto.new_run_key()
    delta = {"w": np.ones((2, 3), np.float32)}
    sealed = seal_delta(
        delta,
        run_token="r",
        round=1,
        site_id="Cleveland",
        method="lora",
        fingerprint="f",
        num_examples=5,
        codec="fp32",
        run_public=crypto.raw_public(run_key),
        identity=trust.identity,
    )
    expected = Expected("r", 1, "lora", "f", {"w": (2, 3)}, 1 << 16)
    assert open_delta(sealed, expected, run_key, sites).site_id == "Cleveland"

    assert main(["coordinator", "sites"]) == 0
    assert crypto.fingerprint(site_key.public_key()) in capsys.readouterr().out
    assert main(["coordinator", "remove-site", "Cleveland"]) == 0
    with pytest.raises(DeltaRejected) as info:
        open_delta(sealed, expected, run_key, read_sites_file(tmp_path / "sites.txt"))
    assert info.value.reason == "unknown-site"
    assert main(["coordinator", "remove-site", "Cleveland"]) == 2


def test_a_broken_sites_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "sites.txt"
    path.write_text("# register\nA ecdsa-sha2-nistp384 AAAAnotbase64\n")
    with pytest.raises(KeyFileError, match="line 2 \\(site 'A'\\)"):
        read_sites_file(path)
