"""The ``docker compose`` rehearsal: a coordinator and three hospitals on one machine.

``fedpeft rehearsal init OUT`` makes everything the rehearsal needs, once, in one folder per
party (in docker-compose.yml each is a volume that only its own container mounts)::

    OUT/coordinator/   coordinator.toml, run.toml, certs/ (a development CA and a server
                       certificate for the host name "coordinator"), keys/coordinator.key (0600)
                       and .pub, store.key (0600), sites.txt (empty: sites are registered when
                       the SuperLink runs), site-keys/NAME.pub (what each site sent)
    OUT/NAME/          site.toml, keys/NAME.key (0600) and .pub, ca.crt, coordinator.pub,
                       records.csv (that hospital's heart-disease notes and labels)

``fedpeft rehearsal coordinator DIR`` is the coordinator container's command: it starts the
SuperLink, registers every key in ``DIR/site-keys`` with fedpeft and with Flower (so the sites'
SuperNodes are let in), says it is ready, runs ``DIR/run.toml`` to the end, prints the report and
stops the SuperLink. Its exit status is the run's: 0 only when the store records it finished.

Keys made here are for a rehearsal on one machine (one process made them all); a consortium
makes each key where it stays (``fedpeft site enroll`` at each hospital).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fedpeft import allowlist, processes
from fedpeft.common.config import FederationConfig
from fedpeft.common.errors import ConfigError
from fedpeft.settings import CoordinatorConfig, load_coordinator_config

#: The three hospitals of the rehearsal and their file-safe site names.
HOSPITALS = {"Cleveland": "Cleveland", "Hungary": "Hungary", "VA Long Beach": "VA-Long-Beach"}
#: The coordinator's host name on the compose network (the server certificate names it).
COORDINATOR_HOST = "coordinator"
#: Touched when the coordinator has let every site in; docker-compose.yml's health check.
READY_FILE = Path("/tmp/fedpeft-ready")

COORDINATOR_TOML = """\
[coordinator]
fleet_address = "0.0.0.0:9092"     # the compose network: the only port sites reach
api_address = "127.0.0.1:9093"     # Control/Runtime APIs: inside the coordinator's container only
state = "superlink.db"
identity_key = "keys/coordinator.key"
sites = "sites.txt"
store_key_file = "store.key"

[tls]
ca = "certs/ca.crt"
certificate = "certs/server.pem"
key = "certs/server.key"
"""

RUN_TOML = """\
# The rehearsal's run: the heart benchmark with the default method at three hospitals.
device = "cpu"
db = "sqlite:///runs.db"

[federation]
rounds = {rounds}
min_sites = {min_sites}
round_timeout_s = 900.0
"""

SITE_TOML = """\
[site]
name = "{name}"
coordinator = "{host}:9092"
ca = "ca.crt"
identity_key = "keys/{name}.key"
coordinator_key = "coordinator.pub"
data = "records.csv"
api_port = 9094
# On the site's own writable volume (the rest of the site's folder is mounted read-only).
ledger = "state/ledger.jsonl"

# What this hospital lets a run do; a run outside it is refused before any training.
[policy]
methods = ["lora", "prompt", "ia3"]
max_local_epochs = 3
max_rounds = 20
codecs = ["fp32", "fp16", "int8"]
max_upload_bytes = 1048576
"""


def init(out: Path, rounds: int = FederationConfig.rounds) -> list[Path]:
    """Write the rehearsal's files under ``out`` (refusing to overwrite a previous one);
    returns the folders made, coordinator first."""
    from fedpeft.certs import LOOPBACK_NAMES, make_pki
    from fedpeft.common.data import heart_sites
    from fedpeft.identity import enroll
    from fedpeft.server.checkpoints import write_store_key

    if rounds < 1:
        raise ConfigError(f"rehearsal: --rounds {rounds}: expected at least 1")
    coord = out / "coordinator"
    if (coord / "coordinator.toml").exists():
        raise ConfigError(
            f"{coord / 'coordinator.toml'} exists: this rehearsal is already set up (remove "
            "its volumes, `docker compose down -v`, to make new keys)"
        )
    coord.mkdir(parents=True, exist_ok=True)
    # The sites dial "coordinator"; the Flower CLI in the coordinator's container dials its
    # Control API on 127.0.0.1 over TLS with the same certificate.
    make_pki(coord / "certs", [COORDINATOR_HOST, *LOOPBACK_NAMES])
    (coord / "certs" / "ca.key").unlink()  # nothing more is signed: the CA key is not kept
    enroll(coord / "keys", "coordinator")
    write_store_key(coord / "store.key")
    (coord / "sites.txt").write_text("# registered by `fedpeft rehearsal coordinator`\n")
    (coord / "coordinator.toml").write_text(COORDINATOR_TOML)
    min_sites = len(HOSPITALS)
    (coord / "run.toml").write_text(RUN_TOML.format(rounds=rounds, min_sites=min_sites))
    (coord / "site-keys").mkdir(exist_ok=True)
    made = [coord]
    records = {site.name: site for site in heart_sites()}
    for hospital, name in HOSPITALS.items():
        home = out / name
        home.mkdir(parents=True, exist_ok=True)
        key = enroll(home / "keys", name)
        (coord / "site-keys" / f"{name}.pub").write_bytes(key.public_key.read_bytes())
        (home / "ca.crt").write_bytes((coord / "certs" / "ca.crt").read_bytes())
        (home / "coordinator.pub").write_bytes((coord / "keys" / "coordinator.pub").read_bytes())
        data = records[hospital]
        frame = pd.DataFrame({"text": list(data.texts), "label": data.labels})
        frame.to_csv(home / "records.csv", index=False)
        (home / "state").mkdir(exist_ok=True)
        (home / "site.toml").write_text(SITE_TOML.format(name=name, host=COORDINATOR_HOST))
        made.append(home)
    return made


def register_sites(
    config_path: Path, cfg: CoordinatorConfig, keys: Path, say: Callable[[str], None]
) -> list[str]:
    """Register every ``keys/NAME.pub`` with fedpeft and with the running SuperLink; a site
    already in both (a restarted rehearsal) is left as it is."""
    from fedpeft.common.trust import read_sites_file
    from fedpeft.identity import remove_site

    names = []
    for pub in sorted(keys.glob("*.pub")):
        name = pub.stem
        names.append(name)
        if name in read_sites_file(cfg.sites):
            if allowlist.flower_node_id(cfg, name) is not None:
                say(f"site {name} is registered already")
                continue
            remove_site(cfg.sites, name)  # registered with fedpeft only: do both again
        fingerprint, node = allowlist.register_site(config_path, cfg, name, pub.read_text())
        say(f"registered site {name} ({fingerprint}) as Flower node {node}")
    if not names:
        raise ConfigError(f"{keys}: no site keys (NAME.pub) to register")
    return names


def coordinator(folder: Path, say: Callable[[str], None]) -> int:
    """The coordinator's side of the rehearsal; returns the exit status."""
    from fedpeft.runs import run_and_report

    config_path = folder / "coordinator.toml"
    if not config_path.exists():
        raise ConfigError(
            f"{config_path}: no such file. Make the rehearsal's keys and files first: "
            "`docker compose run --rm setup`"
        )
    cfg = load_coordinator_config(config_path)
    READY_FILE.unlink(missing_ok=True)
    superlink = subprocess.Popen(
        processes.superlink_command(cfg, insecure=False),
        env=processes.coordinator_env(cfg, processes.flwr_home(config_path)),
        cwd=folder,
    )
    try:
        say(f"SuperLink started (Fleet API {cfg.fleet_address}); waiting for it")
        processes.wait_for(cfg.api_address, say, attempts=8, first_wait=1.0)
        processes.wait_for(cfg.fleet_address.replace("0.0.0.0", "127.0.0.1"), say, attempts=8)
        names = register_sites(config_path, cfg, folder / "site-keys", say)
        READY_FILE.touch()
        say(f"ready: {len(names)} site(s) may connect ({', '.join(names)})")
        run_and_report(folder / "run.toml", config_path, cfg, say=say)
        return 0
    finally:
        READY_FILE.unlink(missing_ok=True)
        superlink.terminate()
        try:
            superlink.wait(timeout=30)
        except subprocess.TimeoutExpired:
            superlink.kill()
            superlink.wait()
