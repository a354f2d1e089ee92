"""Who trusts whom: the coordinator's identity and the registered sites' public keys (server
side), a site's identity and the coordinator's public key (site side).

Deployment reads them from files named in the environment; ``fedpeft simulate`` makes a fresh
set for its virtual sites in a private temporary folder (:func:`make_simulation_keys`) and
removes it when the simulation ends.

Sites file: one registered site per line, ``NAME ecdsa-sha2-nistp384 AAAA...``; ``#`` comments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.common import crypto
from fedpeft.common.environment import COORDINATOR_KEY_ENV, SITES_ENV
from fedpeft.common.errors import KeyFileError


@dataclass(frozen=True)
class CoordinatorTrust:
    identity: ec.EllipticCurvePrivateKey
    #: The registered sites' public keys, by name, as read at the start.
    sites: dict[str, ec.EllipticCurvePublicKey]
    #: The register they were read from (deployment): the round loop reads it again for every
    #: round's replies, so that ``remove-site`` takes effect in a running run. None: the sites
    #: are fixed for the run (a simulation's fresh keys, tests).
    sites_file: Path | None = None


@dataclass(frozen=True)
class SiteTrust:
    identity: ec.EllipticCurvePrivateKey
    coordinator: ec.EllipticCurvePublicKey


def read_sites_file(path: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    sites: dict[str, ec.EllipticCurvePublicKey] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the registered sites ({exc.strerror})") from None
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        name, _, key = text.partition(" ")
        try:
            sites[name] = crypto.parse_public_key(key)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: line {number} (site {name!r}): {exc}") from None
    return sites


def coordinator_trust_from_env() -> CoordinatorTrust:
    missing = [v for v in (COORDINATOR_KEY_ENV, SITES_ENV) if not os.environ.get(v)]
    if missing:
        raise KeyFileError(
            f"set {' and '.join(missing)}: the coordinator's identity key and the registered "
            "sites file (fedpeft coordinator add-site)"
        )
    sites_file = Path(os.environ[SITES_ENV])
    return CoordinatorTrust(
        crypto.read_private_key(Path(os.environ[COORDINATOR_KEY_ENV])),
        read_sites_file(sites_file),
        sites_file,
    )


def make_simulation_keys(folder: Path, site_names: list[str]) -> CoordinatorTrust:
    """Fresh keys for a simulation: the coordinator's and one per virtual site (by partition
    id), private files 0600 in ``folder``; the coordinator's public key beside them."""
    coordinator = crypto.new_identity()
    crypto.write_private_key(folder / "coordinator.key", coordinator)
    (folder / "coordinator.pub").write_text(crypto.public_openssh(coordinator.public_key()) + "\n")
    sites = {}
    for pid, name in enumerate(site_names):
        key = crypto.new_identity()
        crypto.write_private_key(folder / f"partition-{pid}.key", key)
        sites[name] = key.public_key()
    return CoordinatorTrust(coordinator, sites)


def site_trust(identity_key: Path, coordinator_public: Path) -> SiteTrust:
    try:
        coordinator_line = Path(coordinator_public).read_text()
    except OSError as exc:
        raise KeyFileError(
            f"{coordinator_public}: cannot read the coordinator's public key ({exc.strerror})"
        ) from None
    return SiteTrust(
        crypto.read_private_key(Path(identity_key)), crypto.parse_public_key(coordinator_line)
    )
