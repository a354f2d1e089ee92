"""``fedpeft coordinator start`` and ``fedpeft site start``: Flower's SuperLink and SuperNode,
started with fedpeft's keys, certificates and settings from one TOML file each.

Every path in a config file is relative to that file's folder. Everything a process needs is
checked before it starts, and each problem is named. Without TLS nothing starts unless
``--insecure`` is given (then a loud warning, and no site authentication: Flower needs TLS for
it).

coordinator.toml::

    [coordinator]
    fleet_address = "0.0.0.0:9092"      # the only port sites reach (gRPC, TLS)
    api_address = "127.0.0.1:8000"      # Control + Runtime APIs: loopback / private network only
    state = "superlink.db"              # SuperLink state (SQLite), kept across restarts
    identity_key = "keys/coordinator.key"
    sites = "sites.txt"
    store_key_file = "store.key"
    [tls]
    ca = "certs/ca.crt"
    certificate = "certs/server.pem"
    key = "certs/server.key"

site.toml::

    [site]
    name = "Cleveland"
    coordinator = "coordinator.example.org:9092"
    ca = "certs/ca.crt"
    identity_key = "keys/Cleveland.key"
    coordinator_key = "keys/coordinator.pub"
    data = "records.csv"
    api_port = 9094                     # the SuperNode's own local API (loopback)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.common.errors import ConfigError, FedpeftError

log = logging.getLogger("fedpeft.deploy")
BIN = Path(sys.executable).parent

INSECURE_WARNING = (
    "\n"
    "!! INSECURE MODE: no TLS. Everything between sites and coordinator travels in clear text,\n"
    "!! and sites are NOT authenticated (Flower's node authentication needs TLS). Deltas are\n"
    "!! still sealed and signed by fedpeft, but use this only on a machine or network you own\n"
    "!! for a rehearsal, never between hospitals.\n"
)


def _read_toml(path: Path, table: str) -> dict[str, Any]:
    try:
        values = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    if not isinstance(values.get(table), dict):
        raise ConfigError(f"{path}: needs a [{table}] table")
    return values


class _Reader:
    """Typed access to one table of a config file, collecting every problem."""

    def __init__(self, path: Path, values: dict[str, Any], table: str):
        self.path, self.values, self.table = path, values.get(table, {}), table
        self.folder = Path(path).resolve().parent
        self.problems: list[str] = []
        self.known: set[str] = set()

    def text(self, key: str, default: str | None = None) -> str:
        self.known.add(key)
        value = self.values.get(key, default)
        if not isinstance(value, str) or not value:
            self.problems.append(f"{self.path}: [{self.table}] {key}: expected a string")
            return ""
        return value

    def number(self, key: str, default: int) -> int:
        self.known.add(key)
        value = self.values.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
            self.problems.append(f"{self.path}: [{self.table}] {key}: expected a port number")
            return default
        return value

    def file(self, key: str, default: str | None = None, must_exist: bool = True) -> Path:
        text = self.text(key, default)
        path = (self.folder / text) if text else self.folder
        if text and must_exist and not path.is_file():
            self.problems.append(f"{self.path}: [{self.table}] {key}: {path}: no such file")
        return path

    def collect(self) -> list[str]:
        """Every problem so far, unknown settings included."""
        unknown = sorted(set(self.values) - self.known)
        return self.problems + [
            f"{self.path}: [{self.table}] {k}: unknown setting" for k in unknown
        ]

    def done(self, *more: list[str]) -> None:
        problems = self.collect() + [p for m in more for p in m]
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class Tls:
    ca: Path
    certificate: Path
    key: Path


@dataclass(frozen=True)
class CoordinatorConfig:
    fleet_address: str
    api_address: str
    state: Path
    identity_key: Path
    sites: Path
    store_key_file: Path
    tls: Tls | None


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    values = _read_toml(path, "coordinator")
    r = _Reader(path, values, "coordinator")
    cfg_fleet = r.text("fleet_address", "0.0.0.0:9092")
    cfg_api = r.text("api_address", "127.0.0.1:8000")
    state = r.file("state", "superlink.db", must_exist=False)
    identity = r.file("identity_key", "keys/coordinator.key")
    sites = r.file("sites", "sites.txt")
    store_key = r.file("store_key_file", "store.key")
    tls, tls_problems = None, []
    if "tls" in values:
        t = _Reader(path, values, "tls")
        tls = Tls(t.file("ca"), t.file("certificate"), t.file("key"))
        tls_problems = t.collect()
    r.done(tls_problems)
    return CoordinatorConfig(cfg_fleet, cfg_api, state, identity, sites, store_key, tls)


@dataclass(frozen=True)
class SiteConfig:
    name: str
    coordinator: str
    ca: Path | None
    identity_key: Path
    coordinator_key: Path
    data: Path
    api_port: int


def load_site_config(path: Path, insecure: bool = False) -> SiteConfig:
    values = _read_toml(path, "site")
    r = _Reader(path, values, "site")
    name = r.text("name")
    coordinator = r.text("coordinator")
    ca = None
    if "ca" in r.values or not insecure:
        ca = r.file("ca")
    cfg = SiteConfig(
        name=name,
        coordinator=coordinator,
        ca=ca,
        identity_key=r.file("identity_key"),
        coordinator_key=r.file("coordinator_key"),
        data=r.file("data"),
        api_port=r.number("api_port", 9094),
    )
    r.done()
    return cfg


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _quiet_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def superlink_command(cfg: CoordinatorConfig, insecure: bool) -> list[str]:
    host, port = _host_port(cfg.api_address)
    cmd = [
        str(BIN / "flower-superlink"),
        *("--fleet-api-address", cfg.fleet_address, "--host", host, "--port", str(port)),
        *("--database", str(cfg.state), "--disable-runtime-dependency-installation"),
    ]
    if cfg.tls is None:
        if not insecure:
            raise ConfigError(
                "no [tls] table: the coordinator does not start without TLS; add the CA, "
                "certificate and key (fedpeft certs makes development ones), or pass --insecure "
                "for a rehearsal on a machine you own"
            )
        return [*cmd, "--insecure"]
    tls = cfg.tls
    return [
        *cmd,
        *("--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.certificate)),
        *("--ssl-keyfile", str(tls.key), "--enable-supernode-auth"),
    ]


def supernode_command(cfg: SiteConfig, insecure: bool) -> list[str]:
    node_config = (
        f'site="{cfg.name}" data-path="{cfg.data}" identity-key="{cfg.identity_key}" '
        f'coordinator-key="{cfg.coordinator_key}"'
    )
    cmd = [
        *(str(BIN / "flower-supernode"), "--superlink", cfg.coordinator),
        *("--node-config", node_config, "--port", str(cfg.api_port)),
    ]
    if cfg.ca is None:
        if not insecure:
            raise ConfigError("no ca: a site does not start without TLS unless --insecure")
        return [*cmd, "--insecure"]
    return [
        *cmd,
        *("--root-certificates", str(cfg.ca)),
        *("--auth-supernode-private-key", str(cfg.identity_key)),
    ]


def wait_for(
    address: str, say: Callable[[str], None], attempts: int = 0, first_wait: float = 2.0
) -> None:
    """Block until ``address`` accepts TCP connections, retrying with exponential backoff
    (capped at 60 s) and saying so; ``attempts`` > 0 bounds the tries."""
    host, port = _host_port(address)
    wait, tried = first_wait, 0
    while True:
        tried += 1
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as exc:
            if attempts and tried >= attempts:
                raise ConfigError(
                    f"coordinator {address} unreachable after {tried} tries ({exc.strerror or exc})"
                ) from None
            say(
                f"coordinator {address} unreachable ({exc.strerror or exc}); retrying in "
                f"{wait:.0f} s"
            )
            time.sleep(wait)
            wait = min(wait * 2, 60.0)


def run_foreground(cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Run ``cmd`` as a child, pass SIGINT/SIGTERM on to it, return its exit code."""
    child = subprocess.Popen(cmd, env=env, cwd=cwd)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def flwr_home(config_path: Path) -> Path:
    """Flower's home for a SuperLink or SuperNode: ``$FLWR_HOME`` if set (a container whose
    config folder is read-only sets it), else ``flwr-home`` beside the config file."""
    if os.environ.get("FLWR_HOME"):
        return Path(os.environ["FLWR_HOME"])
    return Path(config_path).resolve().parent / "flwr-home"


def coordinator_env(cfg: CoordinatorConfig, flwr_home: Path) -> dict[str, str]:
    """What the SuperLink passes on to the ServerApp process it starts for each run."""
    return _quiet_env(
        FLWR_HOME=str(flwr_home),
        FEDPEFT_COORDINATOR_KEY=str(cfg.identity_key),
        FEDPEFT_SITES=str(cfg.sites),
        FEDPEFT_STORE_KEY_FILE=str(cfg.store_key_file),
    )


def site_env(flwr_home: Path) -> dict[str, str]:
    return _quiet_env(FLWR_HOME=str(flwr_home))


# -- Flower's register of SuperNodes, kept in step with fedpeft's -------------------------------


def _flower_cli_home(config_path: Path, cfg: CoordinatorConfig) -> Path:
    """A Flower CLI home beside the coordinator's config that dials its own Control API."""
    host, port = _host_port(cfg.api_address)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    home = Path(config_path).resolve().parent / "flwr-cli"
    home.mkdir(exist_ok=True)
    connection = f'address = "{host}:{port}"\n'
    connection += (
        f'root-certificates = "{cfg.tls.ca}"\n' if cfg.tls is not None else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "coordinator"\n\n[superlink.coordinator]\n{connection}'
    )
    return home


def _flwr(config_path: Path, cfg: CoordinatorConfig, *args: str) -> dict[str, Any]:
    home = _flower_cli_home(config_path, cfg)
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        env=_quiet_env(FLWR_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        reply: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-500:]}
    if done.returncode != 0 or not reply.get("success", False):
        raise ConfigError(
            f"Flower's SuperLink at {cfg.api_address} refused `flwr {' '.join(args)}`: "
            f"{reply.get('error-message', reply)} (is `fedpeft coordinator start` running?)"
        )
    return reply


def _node_ids_file(sites: Path) -> Path:
    return sites.with_name(sites.name + ".flower-nodes.json")


def _read_node_ids(cfg: CoordinatorConfig) -> dict[str, int]:
    ids_file = _node_ids_file(cfg.sites)
    return json.loads(ids_file.read_text()) if ids_file.exists() else {}


def flower_node_id(cfg: CoordinatorConfig, name: str) -> int | None:
    """The Flower node id that ``name``'s key was allow-listed as, if it was."""
    ids = _read_node_ids(cfg)
    return int(ids[name]) if name in ids else None


def register_site(
    config_path: Path, cfg: CoordinatorConfig, name: str, pubkey: str
) -> tuple[str, int]:
    """Register a site with fedpeft (``cfg.sites``) and allow-list it in the running SuperLink:
    both registers or neither. Returns the key's fingerprint and the Flower node id."""
    from fedpeft.identity import add_site, remove_site

    fingerprint = add_site(cfg.sites, name, pubkey)  # checks name and key first
    try:
        node = flower_register(config_path, cfg, name)
    except FedpeftError:
        remove_site(cfg.sites, name)
        raise
    return fingerprint, node


def flower_register(config_path: Path, cfg: CoordinatorConfig, name: str) -> int:
    """Allow-list a site's key (as registered in ``cfg.sites``) in the running SuperLink;
    remember its node id by name."""
    from fedpeft.common import crypto
    from fedpeft.common.trust import read_sites_file

    key_file = Path(config_path).resolve().parent / "flwr-cli" / f"{name}.pub"
    key_file.parent.mkdir(exist_ok=True)
    key_file.write_text(crypto.public_openssh(read_sites_file(cfg.sites)[name]) + "\n")
    reply = _flwr(config_path, cfg, "supernode", "register", str(key_file), "--name", name)
    node_id = int(reply["node-id"])
    ids = _read_node_ids(cfg)
    ids[name] = node_id
    _node_ids_file(cfg.sites).write_text(json.dumps(ids, indent=2) + "\n")
    return node_id


def flower_unregister(config_path: Path, cfg: CoordinatorConfig, name: str) -> int | None:
    """Remove a site's key from the running SuperLink's allow-list, if it was registered."""
    ids = _read_node_ids(cfg)
    if name not in ids:
        return None
    node_id = int(ids.pop(name))
    _flwr(config_path, cfg, "supernode", "unregister", str(node_id))
    _node_ids_file(cfg.sites).write_text(json.dumps(ids, indent=2) + "\n")
    return node_id
