"""Enrollment: a site's (or the coordinator's) identity key, and the coordinator's register of
sites (``fedpeft site enroll``, ``fedpeft coordinator init|add-site|remove-site|sites``).

One ECDSA P-384 key in OpenSSH format per party: Flower 1.39's SuperNode authentication takes it
as is, and fedpeft signs deltas (sites) or global states (coordinator) with it behind a
domain-separation prefix (common/crypto.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedpeft.common import crypto
from fedpeft.common.errors import ConfigError
from fedpeft.common.trust import read_sites_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Enrolled:
    private_key: Path
    public_key: Path
    fingerprint: str


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"site name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def enroll(folder: Path, name: str) -> Enrolled:
    """A new identity key ``folder/NAME.key`` (0600) and ``folder/NAME.pub``; never overwrites."""
    check_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if private.exists() or public.exists():
        raise ConfigError(
            f"{private}: a key for {name!r} already exists; keys are never replaced "
            "in place (remove the old one deliberately to rotate it)"
        )
    key = crypto.new_identity()
    crypto.write_private_key(private, key)
    line = crypto.public_openssh(key.public_key())
    public.write_text(f"{line} {name}\n")
    return Enrolled(private, public, crypto.fingerprint(key.public_key()))


def _public_text(pubkey: str) -> str:
    """PUBKEY as given on the command line: an OpenSSH line, or the path of a .pub file."""
    path = Path(pubkey)
    if "ecdsa-sha2" not in pubkey and path.is_file():
        return path.read_text()
    return pubkey


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_site(sites_file: Path, name: str, pubkey: str) -> str:
    """Register ``name`` with its public key; returns the key's fingerprint. Refuses a name or a
    key that is already registered."""
    check_name(name)
    key = crypto.parse_public_key(_public_text(pubkey))
    sites = read_sites_file(sites_file) if sites_file.exists() else {}
    if name in sites:
        raise ConfigError(f"{sites_file}: site {name!r} is already registered; remove it first")
    line = crypto.public_openssh(key)
    for other, other_key in sites.items():
        if crypto.public_openssh(other_key) == line:
            raise ConfigError(f"{sites_file}: this key is already registered as site {other!r}")
    old = sites_file.read_text() if sites_file.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    _write_atomically(sites_file, f"{old}{name} {line}\n")
    return crypto.fingerprint(key)


def remove_site(sites_file: Path, name: str) -> None:
    """Unregister ``name``: its deltas are refused from the next message on."""
    sites = read_sites_file(sites_file) if sites_file.exists() else {}
    if name not in sites:
        raise ConfigError(f"{sites_file}: no registered site {name!r}")
    kept = [
        line
        for line in sites_file.read_text().splitlines()
        if line.split("#", 1)[0].strip().partition(" ")[0] != name
    ]
    _write_atomically(sites_file, "\n".join(kept) + "\n")
