"""What a site is, by its own settings: :class:`SiteSetup`, built once where a site starts.

Everything here is the site's to say, never the coordinator's: which rows are the text and the
label, whether bad rows are skipped, the device, the keys it trusts, where its ledger lives and
which ClientApps it runs. The coordinator's signed site config
(:class:`~fedpeft.common.config.SiteRunConfig`) says only how to train.

Where it comes from:

* deployment: ``fedpeft site start`` reads site.toml and writes what the site's handler needs
  (names and paths, no key material; the ``[policy]`` as its fields) to a setup file
  (:func:`write_setup_file`); the site worker reads it once at start (:func:`read_setup_file`),
  a Flower ClientApp through the node config's ``site-setup``;
* simulation: each virtual site's keys from the simulation's key folder and its data set,
  columns and device from the simulation's own config (:data:`SIMULATION_SITES_ENV`, written by
  :func:`simulation_sites_env`): one party runs coordinator and sites there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.client.policy import DEFAULT_APPS, SitePolicy, read_coordinator_keys
from fedpeft.common import crypto, keys
from fedpeft.common.config import DEVICES, QUANTIZE, DataConfig, DataSchema
from fedpeft.common.environment import SIMULATION_KEYS_ENV, SIMULATION_SITES_ENV
from fedpeft.common.errors import ConfigError, KeyFileError
from fedpeft.common.trust import SiteTrust, site_trust

#: The ClientApps a site runs unless its policy says otherwise: fedpeft's own, as installed.
DEFAULT_ALLOWED_APPS: tuple[str, ...] = DEFAULT_APPS


@dataclass(frozen=True)
class Partition:
    """A simulation's virtual site: the ``index``-th site of a data set."""

    dataset: str
    index: int


@dataclass(frozen=True)
class SiteSetup:
    """One site's own settings, built once and handed to the ClientApp's handler."""

    #: The site's name (a virtual site's is ``partition-N`` until its rows are read).
    site: str
    #: The site's records file; None for a virtual site (see ``partition``).
    data_file: Path | None
    #: How the records read: columns and the bad-row rule.
    schema: DataSchema
    #: auto (CUDA when present), cpu or cuda.
    device: str
    #: The site's identity key and the coordinator key it trusts.
    trust: SiteTrust
    #: The site ledger (client/ledger.py); None in a simulation.
    ledger: Path | None = None
    #: ClientApp references this site runs (a deployed site's: its policy's ``apps``).
    allowed_apps: tuple[str, ...] = DEFAULT_ALLOWED_APPS
    #: Simulation only: which virtual site this is.
    partition: Partition | None = None
    #: What the site allows a run to do (site.toml's ``[policy]``), checked before any data is
    #: read. None in a simulation: one party runs coordinator and sites there, and its numbers
    #: stay those of the run config (a default policy would refuse ``full`` and cap epochs).
    policy: SitePolicy | None = None
    #: The highest LoRA rank this site trains (a site of less capacity); 0: the run's. A LoRA
    #: run of a higher rank is trained at this one, its first components only
    #: (common/methods/lora.py); other methods ignore it.
    lora_rank: int = 0
    #: How the site holds its frozen base model: ``none`` (as loaded), ``int8`` (weights in
    #: int8, a quarter of the memory) or ``nf4`` (4-bit linear layers; common/quantize.py).
    #: Nothing shared changes.
    quantize: str = "none"
    #: The site's unlabeled notes (a text column, no label), which a schedule's mlm stage
    #: pretrains on beside the training rows' text; None: the training rows alone.
    unlabeled_file: Path | None = None

    def data_key(self) -> tuple[Any, ...]:
        """What decides the site's rows and where they are trained: a session cache key part."""
        return (
            self.site,
            self.data_file,
            self.partition,
            self.schema,
            self.device,
            self.quantize,
            self.unlabeled_file,
        )

    def coordinator_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """The coordinator keys whose global states this site opens, by fingerprint: its
        policy's ``coordinator_keys`` (read anew, so a key file that went missing is noticed),
        or, without a policy, the one key of its trust."""
        if self.policy is not None:
            return read_coordinator_keys(self.policy)
        key = self.trust.coordinator
        return {crypto.fingerprint(key): key}


def write_setup_file(
    path: Path,
    *,
    site: str,
    data_file: Path,
    schema: DataSchema,
    device: str,
    identity_key: Path,
    coordinator_key: Path,
    ledger: Path | None,
    policy: SitePolicy,
    lora_rank: int = 0,
    quantize: str = "none",
    unlabeled_file: Path | None = None,
) -> Path:
    """Write a deployed site's setup (from its site.toml) as JSON: names and absolute paths only,
    the keys stay in their own files; the policy as its fields. Returns ``path``."""
    values = {
        "site": site,
        "data_file": str(Path(data_file).resolve()),
        "schema": dataclasses.asdict(schema),
        "device": device,
        "identity_key": str(Path(identity_key).resolve()),
        "coordinator_key": str(Path(coordinator_key).resolve()),
        "ledger": None if ledger is None else str(Path(ledger).resolve()),
        "policy": _policy_values(policy),
        "lora_rank": lora_rank,
        "quantize": quantize,
        "unlabeled_file": None if unlabeled_file is None else str(Path(unlabeled_file).resolve()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path


def _policy_values(policy: SitePolicy) -> dict[str, Any]:
    """The policy's fields as JSON values: paths absolute, tuples as lists."""
    values = dataclasses.asdict(policy)
    values["coordinator_keys"] = [str(Path(p).resolve()) for p in policy.coordinator_keys]
    values["approvals"] = str(Path(policy.approvals).resolve())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _policy_from(values: dict[str, Any]) -> SitePolicy:
    def names(key: str) -> tuple[str, ...]:
        if not isinstance(values[key], list):
            raise TypeError(f"policy {key} is not a list")
        return tuple(str(v) for v in values[key])

    def number(key: str) -> int:
        if not isinstance(values[key], int) or isinstance(values[key], bool):
            raise TypeError(f"policy {key} is not an integer")
        return int(values[key])

    def flag(key: str) -> bool:
        if not isinstance(values[key], bool):
            raise TypeError(f"policy {key} is not true or false")
        return bool(values[key])

    return SitePolicy(
        coordinator_keys=tuple(Path(p) for p in names("coordinator_keys")),
        methods=names("methods"),
        max_local_epochs=number("max_local_epochs"),
        max_rounds=number("max_rounds"),
        codecs=names("codecs"),
        max_upload_bytes=number("max_upload_bytes"),
        max_full_layers=number("max_full_layers") if "max_full_layers" in values else 0,
        mlm=flag("mlm") if "mlm" in values else False,
        apps=names("apps"),
        require_secure_aggregation=flag("require_secure_aggregation"),
        require_dp=flag("require_dp"),
        approved_runs_only=flag("approved_runs_only"),
        approvals=Path(values["approvals"]),
    )


def read_setup_file(path: Path, allowed_apps: tuple[str, ...] | None = None) -> SiteSetup:
    """The setup :func:`write_setup_file` wrote, with the site's keys read (the policy's
    coordinator keys too: a bad one is named at start, not at the first task);
    ``ConfigError``/``KeyFileError`` naming what is wrong. The ClientApps the site runs are
    ``allowed_apps`` when given (the worker's ``--allow-app``), else its policy's ``apps``."""
    try:
        values = json.loads(Path(path).read_text())
        device = str(values["device"])
        policy = _policy_from(values["policy"])
        lora_rank = values.get("lora_rank", 0)
        if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 0:
            raise TypeError("lora_rank is not a whole number of 0 or more")
        quantize = str(values.get("quantize", "none"))
        unlabeled = values.get("unlabeled_file")
        setup = SiteSetup(
            site=str(values["site"]),
            data_file=Path(values["data_file"]),
            schema=DataSchema(**values["schema"]),
            device=device,
            trust=site_trust(Path(values["identity_key"]), Path(values["coordinator_key"])),
            ledger=None if values["ledger"] is None else Path(values["ledger"]),
            allowed_apps=policy.apps if allowed_apps is None else allowed_apps,
            policy=policy,
            lora_rank=lora_rank,
            quantize=quantize,
            unlabeled_file=None if unlabeled is None else Path(unlabeled),
        )
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the site setup ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a site setup file ({exc!r})") from None
    if device not in DEVICES:
        raise ConfigError(f"{path}: device {device!r} is not one of {', '.join(DEVICES)}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"{path}: quantize {quantize!r} is not one of {', '.join(QUANTIZE)}")
    setup.coordinator_keys()
    return setup


def simulation_sites_env(
    data: DataConfig,
    device: str,
    lora_ranks: tuple[int, ...] = (),
    quantize: tuple[str, ...] = (),
) -> str:
    """The value of :data:`SIMULATION_SITES_ENV` for a simulation over ``data`` on ``device``,
    virtual site ``i`` training LoRA at rank ``lora_ranks[i]`` at most (0 or none: the run's)
    on a base held as ``quantize[i]`` (none past the list)."""
    return json.dumps(
        {
            "dataset": data.dataset,
            "schema": dataclasses.asdict(data.schema),
            "device": device,
            "lora_ranks": list(lora_ranks),
            "quantize": list(quantize),
        },
        sort_keys=True,
    )


def setup_for_partition(index: int) -> SiteSetup:
    """A simulation's virtual site ``index``: its key and the coordinator's from the simulation's
    key folder, its data set, columns and device from the simulation's config (environment)."""
    folder, sites = os.environ.get(SIMULATION_KEYS_ENV), os.environ.get(SIMULATION_SITES_ENV)
    if not folder:
        raise KeyFileError(f"a virtual site needs {SIMULATION_KEYS_ENV} (fedpeft simulate sets it)")
    if not sites:
        raise ConfigError(f"a virtual site needs {SIMULATION_SITES_ENV} (fedpeft simulate sets it)")
    values = json.loads(sites)
    device = str(values["device"])
    if device not in DEVICES:
        raise ConfigError(f"{SIMULATION_SITES_ENV}: device {device!r} is not one of {DEVICES}")
    return SiteSetup(
        site=f"partition-{index}",
        data_file=None,
        schema=DataSchema(**values["schema"]),
        device=device,
        trust=site_trust(Path(folder) / f"partition-{index}.key", Path(folder) / "coordinator.pub"),
        partition=Partition(str(values["dataset"]), index),
        lora_rank=int(ranks[index]) if index < len(ranks := values.get("lora_ranks", [])) else 0,
        quantize=str(q[index]) if index < len(q := values.get("quantize", [])) else "none",
    )


def site_name(node_config: dict[str, Any]) -> str:
    """The name a reply carries before the setup is read (deployment: the SuperNode's
    ``site``; simulation: ``partition-N``)."""
    return str(node_config.get(keys.NODE_SITE, f"partition-{node_config.get(keys.PARTITION_ID)}"))


_SETUPS: dict[tuple[str, ...], SiteSetup] = {}


def setup_from_node_config(node_config: dict[str, Any]) -> SiteSetup:
    """The setup of the site a Flower ClientApp runs at, from its node config: ``site-setup``
    (deployment) or ``partition-id`` (simulation). Built once per process and source
    (a simulation's key folder is part of the key: each simulation makes new keys)."""
    if keys.NODE_SITE_SETUP in node_config:
        path = str(node_config[keys.NODE_SITE_SETUP])
        key: tuple[str, ...] = ("file", path)
        if key not in _SETUPS:
            _SETUPS[key] = read_setup_file(Path(path))
        return _SETUPS[key]
    if keys.PARTITION_ID in node_config:
        index = int(node_config[keys.PARTITION_ID])
        env = tuple(os.environ.get(v, "") for v in (SIMULATION_KEYS_ENV, SIMULATION_SITES_ENV))
        key = ("partition", str(index), *env)
        if key not in _SETUPS:
            _SETUPS[key] = setup_for_partition(index)
        return _SETUPS[key]
    raise KeyFileError(
        f"node config names no site settings: set {keys.NODE_SITE_SETUP!r} to the site's setup "
        "file (fedpeft site start writes it from site.toml)"
    )
