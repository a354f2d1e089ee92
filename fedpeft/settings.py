"""coordinator.toml and site.toml: the settings of ``fedpeft coordinator start`` and
``fedpeft site start``, one TOML file each.

coordinator.toml has a ``[coordinator]`` table (the fields of :class:`CoordinatorConfig`) and,
for TLS, a ``[tls]`` table (:class:`Tls`); site.toml has a ``[site]`` table (the fields of
:class:`SiteConfig`), an optional ``[data]`` table (how the site's records file reads: its
columns and whether bad rows are skipped, the site's to say, never the coordinator's) and an
optional ``[policy]`` table: what the site allows a run to do
(:class:`~fedpeft.client.policy.SitePolicy`, safe defaults). ``fedpeft rehearsal init`` writes
a complete example of each.

Every path in a config file is relative to that file's folder. Everything a process needs is
checked before it starts, and each problem is named: a missing file, a value of the wrong type,
a setting nobody reads.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from fedpeft.client.policy import DEFAULT_APPROVALS, SitePolicy
from fedpeft.common.config import DEVICES, QUANTIZE, DataSchema
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import method_names
from fedpeft.common.tomlfile import read_toml
from fedpeft.common.wire import CODECS


def _read_table(path: Path, table: str) -> dict[str, Any]:
    values = read_toml(path)
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

    def flag(self, key: str, default: bool) -> bool:
        self.known.add(key)
        value = self.values.get(key, default)
        if not isinstance(value, bool):
            self.problems.append(f"{self.path}: [{self.table}] {key}: expected true or false")
            return default
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        if value and value not in choices:
            self.problems.append(
                f"{self.path}: [{self.table}] {key}: expected one of {', '.join(choices)}"
            )
            return default
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

    def count(self, key: str, default: int, least: int = 1) -> int:
        """A positive integer (``least`` 0: or 0)."""
        self.known.add(key)
        value = self.values.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            expected = "a positive integer" if least else "0 or a positive integer"
            self.problems.append(f"{self.path}: [{self.table}] {key}: expected {expected}")
            return default
        return value

    def names(
        self, key: str, default: tuple[str, ...], known: Sequence[str] | None = None
    ) -> tuple[str, ...]:
        """A list of strings, each one of ``known`` when given (an empty list is allowed)."""
        self.known.add(key)
        value = self.values.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{self.path}: [{self.table}] {key}: expected a list of strings")
            return default
        for v in value:
            if known is not None and v not in known:
                self.problems.append(
                    f"{self.path}: [{self.table}] {key}: unknown {v!r}; known: {', '.join(known)}"
                )
        return tuple(dict.fromkeys(value))

    def files(self, key: str, default: tuple[Path, ...]) -> tuple[Path, ...]:
        """A list of existing files, relative to the config's folder."""
        texts = self.names(key, tuple(str(p) for p in default))
        paths = tuple(self.folder / t for t in texts)
        for path in paths:
            if not path.is_file():
                self.problems.append(f"{self.path}: [{self.table}] {key}: {path}: no such file")
        return paths

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
    """coordinator.toml's ``[tls]`` table; without it the coordinator starts only with
    ``--insecure``."""

    #: The CA certificate that signed the server certificate (every site has a copy).
    ca: Path
    #: The server certificate (PEM), naming every host name sites dial.
    certificate: Path
    #: The server certificate's private key.
    key: Path


@dataclass(frozen=True)
class CoordinatorConfig:
    """coordinator.toml's ``[coordinator]`` table (defaults in brackets)."""

    #: The only address sites reach: the Fleet API (gRPC, TLS) ["0.0.0.0:9092"].
    fleet_address: str
    #: The Control and Runtime APIs ["127.0.0.1:8000"]. Open-source Flower does not authenticate
    #: them: whoever reaches them submits runs. Loopback only, unless :attr:`expose_api`.
    api_address: str
    #: The SuperLink's state (SQLite), kept across restarts ["superlink.db"].
    state: Path
    #: The coordinator's private identity key ["keys/coordinator.key"].
    identity_key: Path
    #: The register of sites (``fedpeft coordinator add-site``) ["sites.txt"].
    sites: Path
    #: The key of the store's encrypted checkpoints ["store.key"].
    store_key_file: Path
    tls: Tls | None
    #: Serve the Control and Runtime APIs on a non-loopback ``api_address`` (a private network
    #: of the consortium's operators); needs ``[tls]``, and warns at every start [false].
    expose_api: bool = False
    #: The run store, a SQLAlchemy URL; a relative SQLite file is beside coordinator.toml
    #: ["sqlite:///runs.db"]. It reaches the ServerApp through the coordinator's environment
    #: only: never a run config, an app bundle or a message (it may carry a password).
    store: str = "sqlite:///runs.db"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """Read and check coordinator.toml; ``ConfigError`` listing every problem."""
    values = _read_table(path, "coordinator")
    r = _Reader(path, values, "coordinator")
    cfg_fleet = r.text("fleet_address", "0.0.0.0:9092")
    cfg_api = r.text("api_address", "127.0.0.1:8000")
    state = r.file("state", "superlink.db", must_exist=False)
    identity = r.file("identity_key", "keys/coordinator.key")
    sites = r.file("sites", "sites.txt")
    store_key = r.file("store_key_file", "store.key")
    expose_api = r.flag("expose_api", False)
    tls, tls_problems = None, []
    if "tls" in values:
        t = _Reader(path, values, "tls")
        tls = Tls(t.file("ca"), t.file("certificate"), t.file("key"))
        tls_problems = t.collect()
    if cfg_api and ":" in cfg_api and not is_loopback(cfg_api.rpartition(":")[0].strip("[]")):
        if not expose_api:
            tls_problems.append(
                f"{path}: [coordinator] api_address: {cfg_api} is not loopback; the Control and "
                "Runtime APIs have no authentication of their own (whoever reaches them submits "
                "runs and reads their output): keep them on 127.0.0.1, or set expose_api = true "
                "to serve them, with TLS, on a private network only operators reach"
            )
        elif tls is None:
            tls_problems.append(
                f"{path}: [coordinator] expose_api: needs a [tls] table (the exposed APIs would "
                "otherwise travel in clear text)"
            )
    store = absolute_store(r.text("store", "sqlite:///runs.db"), r.folder, r.problems, path)
    r.done(tls_problems)
    return CoordinatorConfig(
        cfg_fleet, cfg_api, state, identity, sites, store_key, tls, expose_api, store
    )


def shown_url(url: str) -> str:
    """A store URL as it may be shown or logged: its password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(a store URL that does not parse)"


def absolute_store(url: str, folder: Path, problems: list[str], path: Path) -> str:
    """``url`` with a relative SQLite file made absolute under ``folder``: the ServerApp process
    does not run in the folder of coordinator.toml. A URL that does not parse is a problem
    (named without the URL, which may hold a password)."""
    if not url:
        return url
    try:
        parsed = make_url(url)
    except ArgumentError:
        problems.append(f"{path}: [coordinator] store: not a SQLAlchemy URL")
        return url
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return url
    if parsed.database == ":memory:" or Path(parsed.database).is_absolute():
        return url
    return parsed.set(database=str(folder / parsed.database)).render_as_string(hide_password=False)


DEFAULT_LEDGER = "ledger.jsonl"


@dataclass(frozen=True)
class SiteConfig:
    """site.toml's ``[site]`` table (defaults in brackets)."""

    #: The site's name, as the coordinator registered it.
    name: str
    #: The coordinator's Fleet API, HOST:PORT.
    coordinator: str
    #: The CA certificate of the coordinator's TLS; None only with ``--insecure``.
    ca: Path | None
    #: The site's private identity key (``fedpeft site enroll``).
    identity_key: Path
    #: The coordinator's public key, which signs the global states.
    coordinator_key: Path
    #: The site's records (.csv, .jsonl or .parquet: a text and a label per row).
    data: Path
    #: The SuperNode's own local API (loopback) [9094].
    api_port: int
    #: The site ledger: every task received and upload sent, hash-chained (client/ledger.py)
    #: ["ledger.jsonl"]. Made on first use; its folder must exist.
    ledger: Path
    #: What the site allows a run to do (the ``[policy]`` table; client/policy.py).
    policy: SitePolicy
    #: site.toml itself.
    path: Path
    #: Where the site trains: auto (CUDA when present), cpu or cuda ["auto"].
    device: str = "auto"
    #: How the records file reads (the ``[data]`` table: text_column ["text"], label_column
    #: ["label"], split_column ["split"], skip_bad_rows [false]).
    schema: DataSchema = DataSchema()
    #: The highest LoRA rank the site trains, for a site of less capacity than the others: a
    #: LoRA run of a higher rank trains its first components only here [0: the run's rank].
    lora_rank: int = 0
    #: How the site holds the frozen base model: none, int8 (a quarter of the memory) or nf4
    #: (a fifth; bitsandbytes); no method that trains base weights, ``full`` ["none"].
    quantize: str = "none"
    #: The site's unlabeled notes (.csv, .jsonl or .parquet; the ``[data]`` text column, no
    #: label), which a schedule's mlm stage pretrains on beside the training rows; never the
    #: records' test rows [none].
    unlabeled: Path | None = None


def load_site_config(path: Path, insecure: bool = False) -> SiteConfig:
    """Read and check site.toml; ``ConfigError`` listing every problem. ``ca`` may be left out
    only when ``insecure``."""
    values = _read_table(path, "site")
    r = _Reader(path, values, "site")
    p = _policy_reader(path, values)
    d = _Reader(path, values, "data")
    if not isinstance(values.get("data", {}), dict):
        d.values = {}
        d.problems.append(f"{path}: [data] must be a table")
    name = r.text("name")
    coordinator = r.text("coordinator")
    coordinator_key = r.file("coordinator_key")
    ca = None
    if "ca" in r.values or not insecure:
        ca = r.file("ca")
    cfg = SiteConfig(
        name=name,
        coordinator=coordinator,
        ca=ca,
        identity_key=r.file("identity_key"),
        coordinator_key=coordinator_key,
        data=r.file("data"),
        api_port=r.number("api_port", 9094),
        ledger=r.file("ledger", DEFAULT_LEDGER, must_exist=False),
        policy=_site_policy(p, coordinator_key),
        path=Path(path).resolve(),
        device=r.choice("device", "auto", DEVICES),
        schema=_data_schema(d),
        lora_rank=r.count("lora_rank", 0, least=0),
        quantize=r.choice("quantize", "none", QUANTIZE),
        unlabeled=r.file("unlabeled") if "unlabeled" in r.values else None,
    )
    if not cfg.ledger.parent.is_dir():
        r.problems.append(f"{path}: [site] ledger: {cfg.ledger.parent}: no such folder")
    r.done(p.collect(), d.collect())
    return cfg


def _data_schema(r: _Reader) -> DataSchema:
    """site.toml's ``[data]`` table (every key optional)."""
    default = DataSchema()
    return DataSchema(
        text_column=r.text("text_column", default.text_column),
        label_column=r.text("label_column", default.label_column),
        split_column=r.text("split_column", default.split_column),
        skip_bad_rows=r.flag("skip_bad_rows", default.skip_bad_rows),
    )


#: A ClientApp reference: ``package.module:attribute``.
_APP_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def _policy_reader(path: Path, values: dict[str, Any]) -> _Reader:
    p = _Reader(path, values, "policy")
    if not isinstance(values.get("policy", {}), dict):
        p.values = {}
        p.problems.append(f"{path}: [policy] must be a table")
    return p


def _site_policy(p: _Reader, coordinator_key: Path) -> SitePolicy:
    """site.toml's ``[policy]`` table; every key optional, every default the safe one."""
    default = SitePolicy(coordinator_keys=(coordinator_key,))
    policy = SitePolicy(
        coordinator_keys=p.files("coordinator_keys", default.coordinator_keys),
        methods=p.names("methods", default.methods, method_names()),
        max_local_epochs=p.count("max_local_epochs", default.max_local_epochs),
        max_rounds=p.count("max_rounds", default.max_rounds),
        codecs=p.names("codecs", default.codecs, CODECS),
        max_upload_bytes=p.count("max_upload_bytes", default.max_upload_bytes),
        max_full_layers=p.count("max_full_layers", default.max_full_layers, least=0),
        mlm=p.flag("mlm", False),
        apps=p.names("apps", default.apps),
        require_secure_aggregation=p.flag("require_secure_aggregation", False),
        require_dp=p.flag("require_dp", False),
        approved_runs_only=p.flag("approved_runs_only", False),
        approvals=p.file("approvals", DEFAULT_APPROVALS, must_exist=False),
    )
    for ref in policy.apps:
        if not _APP_REF.fullmatch(ref):
            p.problems.append(f"{p.path}: [policy] apps: {ref!r} is not a module:attribute")
    if not policy.coordinator_keys:
        p.problems.append(f"{p.path}: [policy] coordinator_keys: needs at least one key")
    if not policy.approvals.parent.is_dir():
        p.problems.append(
            f"{p.path}: [policy] approvals: {policy.approvals.parent}: no such folder"
        )
    return policy


def site_ledger_path(path: Path) -> Path:
    """The ``ledger`` of site.toml's [site] table, without checking the rest of the file: whoever
    reads the ledger (the data-protection officer) needs neither the keys nor the data."""
    r = _Reader(path, _read_table(path, "site"), "site")
    ledger = r.file("ledger", DEFAULT_LEDGER, must_exist=False)
    if r.problems:
        raise ConfigError(r.problems)
    return ledger


def site_approvals_path(path: Path) -> Path:
    """The ``approvals`` file of site.toml's [policy] table, without checking the rest of the
    file (``fedpeft site approve`` needs nothing else)."""
    values = _read_table(path, "site")
    p = _policy_reader(path, values)
    approvals = p.file("approvals", DEFAULT_APPROVALS, must_exist=False)
    if p.problems:
        raise ConfigError(p.problems)
    return approvals


def host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) as host and port; ``ConfigError`` otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
