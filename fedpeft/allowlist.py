"""Flower's allow-list of SuperNodes, kept in step with fedpeft's register of sites.

fedpeft's register (``sites.txt``: a name and a public key per line) decides whose deltas are
accepted; the running SuperLink's allow-list (``flwr supernode register``) decides whose
SuperNode may connect at all. :func:`register_site` writes both or neither. The Flower node id
each site was given is remembered by name beside the register (``sites.txt.flower-nodes.json``),
so that the site can be unregistered by name.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from fedpeft.common.environment import FLWR_HOME_ENV
from fedpeft.common.errors import ConfigError, FedpeftError
from fedpeft.processes import BIN, child_env
from fedpeft.settings import CoordinatorConfig, host_port


def flower_cli_home(config_path: Path, cfg: CoordinatorConfig) -> Path:
    """A Flower CLI home beside the coordinator's config that dials its own Control API (its
    ``flwr`` commands name the connection ``coordinator``)."""
    host, port = host_port(cfg.api_address)
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
    home = flower_cli_home(config_path, cfg)
    done = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        env=child_env({FLWR_HOME_ENV: str(home)}),
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
