"""A real deployment on 127.0.0.1: a Flower SuperLink with TLS, SuperNode authentication and its
state in a SQLite file, two SuperNodes (one hospital each), one round of fedpeft. Then every file
the coordinator wrote is searched for the bytes of the sites' plaintext deltas."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpeft.certs import make_pki
from fedpeft.common.codec import state_from_bytes
from fedpeft.common.data import heart_sites
from fedpeft.identity import add_site, enroll
from fedpeft.server.checkpoints import write_store_key
from fedpeft.server.store import open_store

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
APP = Path(__file__).parent / "deploy_app"
SITES = ("Cleveland", "Hungary")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process {proc.args!r} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts; each is stopped by its PID at the end, whatever happens."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        if proc.poll() is None:
            proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def _windows(state: dict[str, np.ndarray]) -> list[bytes]:
    """Byte strings that only the plaintext delta holds: 16 values from the middle of every
    tensor that moved, as fp32 and as fp16."""
    out = []
    for value in state.values():
        flat = value.reshape(-1)
        if flat.size < 16 or not np.count_nonzero(flat):
            continue
        mid = flat[flat.size // 2 - 8 : flat.size // 2 + 8]
        if np.count_nonzero(mid) < 8:
            continue
        out += [mid.astype("<f4").tobytes(), mid.astype("<f2").tobytes()]
    return out


def test_one_round_over_tls_leaves_no_plaintext_delta_at_the_coordinator(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    coord = tmp_path / "coordinator"
    pki = make_pki(coord / "certs", ["localhost", "127.0.0.1"])
    enroll(coord / "keys", "coordinator")
    write_store_key(coord / "store.key")
    fleet, control = _free_port(), _free_port()
    coord_env = _env(
        coord / "flwr-home",
        FEDPEFT_COORDINATOR_KEY=str(coord / "keys" / "coordinator.key"),
        FEDPEFT_SITES=str(coord / "sites.txt"),
        FEDPEFT_STORE_KEY_FILE=str(coord / "store.key"),
    )
    with (coord / "superlink.log").open("wb") as log:
        superlink = subprocess.Popen(
            [
                *(str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(pki.ca_cert)),
                *("--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.server_key)),
                *("--enable-supernode-auth", "--database", str(coord / "state.db")),
                "--disable-runtime-dependency-installation",
                *("--fleet-api-address", f"127.0.0.1:{fleet}"),
                *("--host", "127.0.0.1", "--port", str(control)),
            ],
            cwd=coord,
            env=coord_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    processes.append(superlink)
    _wait_for_port(control, superlink)
    _wait_for_port(fleet, superlink)
    (coord / "flwr-home").mkdir(exist_ok=True)
    (coord / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{control}"\n'
        f'root-certificates = "{pki.ca_cert}"\n'
    )

    dumps = []
    for site, data in zip(SITES, heart_sites()[:2], strict=True):
        home = tmp_path / site
        keys = enroll(home / "keys", site)
        add_site(coord / "sites.txt", site, str(keys.public_key))
        registered = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(keys.public_key)],
            env=coord_env,
            cwd=coord,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        idx = np.random.default_rng(0).choice(len(data), 60, replace=False)
        pd.DataFrame({"text": [data.texts[i] for i in idx], "label": data.labels[idx]}).to_csv(
            home / "records.csv", index=False
        )
        (home / "dump").mkdir()
        dumps.append(home / "dump")
        node_config = (
            f'site="{site}" data-path="{home / "records.csv"}" '
            f'identity-key="{keys.private_key}" '
            f'coordinator-key="{coord / "keys" / "coordinator.pub"}" dump-dir="{home / "dump"}"'
        )
        with (home / "supernode.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    [
                        *(str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{fleet}"),
                        *("--root-certificates", str(pki.ca_cert)),
                        *("--auth-supernode-private-key", str(keys.private_key)),
                        *("--node-config", node_config, "--port", str(_free_port())),
                    ],
                    cwd=home,
                    env=_env(home / "flwr-home"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    db = f"sqlite:///{coord / 'runs.db'}"
    run = subprocess.run(
        [
            *(str(BIN / "flwr"), "run", str(APP), "local", "--stream"),
            *("--run-config", f'db="{db}" data.dataset="{tmp_path}" federation.min_sites=2'),
        ],
        env=coord_env,
        cwd=coord,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # Flower's own exit code can be 0 for a crashed ServerApp: the store says what happened.
    store = open_store(db)
    (info,) = store.list_runs()
    assert info.status == "finished", info.error
    (rnd,) = store.rounds(info.id)
    assert rnd.accepted == 2 and rnd.rejected == 0 and rnd.applied
    evals = [r for r in store.site_results(info.id) if r.phase == "evaluate"]
    assert sorted(r.site for r in evals) == sorted(SITES)
    assert all(r.status == "ok" and r.auc is not None for r in evals)
    store.close()

    deltas = [state_from_bytes(p.read_bytes()) for d in dumps for p in d.glob("delta-*")]
    assert len(deltas) == 2
    needles = [w for delta in deltas for w in _windows(delta)]
    assert len(needles) >= 8
    # The search can fail: the sites' own copies hold the bytes.
    site_copies = b"".join(p.read_bytes() for d in dumps for p in d.iterdir())
    assert all(n in site_copies for n in needles[::2])  # fp32 windows, as stored there
    written = [p for p in coord.rglob("*") if p.is_file()]
    assert any(p.name.startswith("state.db") for p in written)
    for path in written:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"plaintext delta bytes found in {path}"
