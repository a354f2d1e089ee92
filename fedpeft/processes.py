"""Starting Flower's processes: the SuperLink for ``fedpeft coordinator start``, the SuperNode for
``fedpeft site start``, with fedpeft's keys, certificates and settings (fedpeft/settings.py),
and the environment every process fedpeft starts gets (:func:`child_env`).

Without TLS nothing starts unless ``--insecure`` is given (then a loud warning, and no site
authentication: Flower needs TLS for it).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedpeft.common import keys
from fedpeft.common.environment import (
    COORDINATOR_KEY_ENV,
    FLWR_HOME_ENV,
    QUIET,
    SITES_ENV,
    STORE_ENV,
    STORE_KEY_ENV,
    STORE_KEY_FILE_ENV,
)
from fedpeft.common.errors import ConfigError
from fedpeft.settings import CoordinatorConfig, SiteConfig, host_port

#: The SuperNode's runtime API listens here only: the site worker is its one client.
RUNTIME_HOST = "127.0.0.1"

#: Where this Python's scripts are (flower-superlink, flower-supernode, flwr, fedpeft).
BIN = Path(sys.executable).parent

INSECURE_WARNING = (
    "\n"
    "!! INSECURE MODE: no TLS. Anyone on the path between sites and coordinator can read\n"
    "!! everything that travels (configs, metrics, sealed deltas) and alter it, and sites are\n"
    "!! NOT authenticated (Flower's node authentication needs TLS): anyone can join as a site.\n"
    "!! With stock Flower (a per-message flwr-clientapp) whoever reaches the link can also run\n"
    "!! code at every site; fedpeft's site worker refuses any app the site did not allow, and\n"
    "!! deltas stay sealed and signed, but use this only for a rehearsal on a machine or\n"
    "!! network you own, never between hospitals.\n"
)

EXPOSED_API_WARNING = (
    "\n"
    "!! The Control and Runtime APIs are served on {address}, beyond this machine. Open-source\n"
    "!! Flower does not authenticate them: anyone who reaches that address can submit runs to\n"
    "!! the consortium's sites and read their output. Keep it on a network only the\n"
    "!! coordinator's operators reach.\n"
)

#: What the ServerApp process may inherit of the operator's environment (besides fedpeft's
#: own variables and :data:`QUIET`): what Python, Flower and the model loader need. Anything
#: else (cloud credentials, database passwords, a raw store key) stays out of it.
COORDINATOR_INHERITS = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TERM",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "TOKENIZERS_PARALLELISM",
    }
)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process fedpeft starts: this process's own, with this Python's
    scripts first on ``PATH``, :data:`~fedpeft.common.environment.QUIET` (no telemetry, no hub
    downloads) and then ``extra`` on top."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **QUIET,
        **(extra or {}),
    }


def superlink_command(cfg: CoordinatorConfig, insecure: bool) -> list[str]:
    """The ``flower-superlink`` command line for ``cfg``; ``ConfigError`` without TLS unless
    ``insecure``."""
    host, port = host_port(cfg.api_address)
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


def supernode_command(
    cfg: SiteConfig,
    insecure: bool,
    auth_secret_file: Path | None = None,
    worker: bool = True,
    setup_file: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for ``cfg``: its node config tells a ClientApp the
    site's name and its setup file (``setup_file``: data, schema, device and key paths, written
    from site.toml by :func:`write_site_setup`); ``ConfigError`` without a CA unless
    ``insecure``.

    With ``worker`` (the default) the SuperNode runs no ClientApp itself (``--isolation
    process``): fedpeft's site worker (:func:`worker_command`) takes its tasks from the runtime
    API, which listens on 127.0.0.1 only, and ``auth_secret_file`` lets only the worker acquire
    them. Without it, stock Flower starts a ``flwr-clientapp`` per message (kept for the
    benchmark only: it installs and runs whatever app the coordinator ships)."""
    node_config = {keys.NODE_SITE: (cfg.name, f"{cfg.path}: [site] name")}
    if setup_file is not None:
        node_config[keys.NODE_SITE_SETUP] = (
            str(setup_file),
            f"{cfg.path}: the path of the site setup file (in flwr-home beside it, or "
            f"${FLWR_HOME_ENV})",
        )
    cmd = [
        *(str(BIN / "flower-supernode"), "--superlink", cfg.coordinator),
        *("--node-config", node_config_arg(node_config)),
        *("--host", RUNTIME_HOST, "--port", str(cfg.api_port)),
    ]
    if worker:
        cmd += ["--isolation", "process"]
        if auth_secret_file is not None:
            cmd += ["--superexec-auth-secret-file", str(auth_secret_file)]
    if cfg.ca is None:
        if not insecure:
            raise ConfigError("no ca: a site does not start without TLS unless --insecure")
        return [*cmd, "--insecure"]
    return [
        *cmd,
        *("--root-certificates", str(cfg.ca)),
        *("--auth-supernode-private-key", str(cfg.identity_key)),
    ]


def node_config_arg(values: Mapping[str, tuple[str, str]]) -> str:
    """``flower-supernode --node-config`` for ``values`` (key: the value and the setting it
    comes from, for an error), read back exactly by Flower's own parser.

    Flower 1.39 (``flwr.common.config.parse_config_args``) finds ``key=value`` pairs with a
    regular expression (a double-quoted value ends at the next ``"``, an unquoted one at the
    next white space) and reads each pair as a TOML line. So each value goes as a TOML basic
    string holding no ``"`` and nothing but printable ASCII: a quote, a backslash, a control
    character (tab, newline) or any non-ASCII character is a TOML escape (``\\uXXXX``), so
    that no value can end early or add a key. A value TOML cannot hold (a lone surrogate: a
    path that is not valid UTF-8) is refused, as is anything Flower's parser would not give
    back unchanged; ``ConfigError`` naming the setting."""
    from click import ClickException
    from flwr.common.config import parse_config_args

    pairs = []
    for key, (value, setting) in values.items():
        try:
            pairs.append(f"{key}={_toml_string(value)}")
        except ValueError as exc:
            raise ConfigError(
                f"{setting}: {value!r} cannot be a node-config value: {exc}"
            ) from None
    text = " ".join(pairs)
    try:
        parsed = parse_config_args([text])
    except ClickException:  # what Flower raises for a line TOML refuses
        parsed = {}
    for key, (value, setting) in values.items():
        if parsed.get(key) != value or len(parsed) != len(values):
            raise ConfigError(
                f"{setting}: {value!r} does not survive Flower's --node-config parser "
                f"(read back as {parsed!r})"
            )
    return text


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string of printable ASCII without an inner ``"`` (see
    :func:`node_config_arg`); ValueError for a character TOML cannot hold."""
    out = []
    for char in value:
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"a lone surrogate (U+{code:04X}): not valid Unicode")
        if char == "\\":
            out.append("\\\\")
        elif 0x20 <= code < 0x7F and char != '"':
            out.append(char)
        else:
            out.append(f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}")
    return '"' + "".join(out) + '"'


def write_site_setup(cfg: SiteConfig, folder: Path) -> Path:
    """The site's own settings from site.toml, as the worker and a ClientApp read them
    (client/setup.py): ``folder``/site-setup.json, written anew at every start."""
    from fedpeft.client.setup import write_setup_file

    return write_setup_file(
        folder / "site-setup.json",
        site=cfg.name,
        data_file=cfg.data,
        schema=cfg.schema,
        device=cfg.device,
        identity_key=cfg.identity_key,
        coordinator_key=cfg.coordinator_key,
        ledger=cfg.ledger,
        policy=cfg.policy,
        lora_rank=cfg.lora_rank,
        quantize=cfg.quantize,
        unlabeled_file=cfg.unlabeled,
    )


def worker_command(
    cfg: SiteConfig,
    auth_secret_file: Path | None,
    allowed_apps: Sequence[str] = (),
    poll_interval: float = 0.2,
    setup_file: Path | None = None,
) -> list[str]:
    """The site worker's command line: it serves the SuperNode of ``cfg`` on 127.0.0.1 with the
    site's own settings (``setup_file``, :func:`write_site_setup`) and exits when the process
    that started it does."""
    cmd = [
        *(sys.executable, "-m", "fedpeft.client.worker"),
        *("--runtime-api-address", f"{RUNTIME_HOST}:{cfg.api_port}"),
        *("--poll-interval", str(poll_interval), "--parent-pid", str(os.getpid())),
    ]
    if setup_file is not None:
        cmd += ["--site-setup", str(setup_file)]
    if auth_secret_file is not None:
        cmd += ["--superexec-auth-secret-file", str(auth_secret_file)]
    for ref in allowed_apps:
        cmd += ["--allow-app", ref]
    return cmd


def write_auth_secret(folder: Path) -> Path:
    """A fresh random SuperExec secret (0600) in ``folder``, made new at every start: only the
    SuperNode and the worker started with it can take the site's tasks."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "superexec-auth.secret"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def supervise_site(
    supernode: list[str],
    worker: list[str],
    env: dict[str, str],
    cwd: Path,
    say: Callable[[str], None],
    max_backoff: float = 60.0,
) -> int:
    """Run the SuperNode and the site worker; restart the worker whenever it exits (with
    backoff: 1 s doubling to ``max_backoff``, back to 1 s once it has run for a minute; the
    SuperNode keeps pending messages meanwhile). Returns the SuperNode's exit code when it ends;
    SIGINT/SIGTERM stop both (by PID: only the processes started here)."""
    node = subprocess.Popen(supernode, env=env, cwd=cwd)
    work: subprocess.Popen[bytes] | None = None
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    backoff, started, restart_at = 1.0, 0.0, 0.0
    try:
        while not stopping and node.poll() is None:
            now = time.monotonic()
            if work is not None and work.poll() is not None:
                if now - started > 60:
                    backoff = 1.0
                say(
                    f"site worker exited with code {work.returncode}; restarting in {backoff:.0f} s"
                )
                work, restart_at = None, now + backoff
                backoff = min(backoff * 2, max_backoff)
            if work is None and now >= restart_at:
                work, started = subprocess.Popen(worker, env=env, cwd=cwd), now
            time.sleep(0.2)
        if node.returncode is not None and not stopping:
            say(f"SuperNode exited with code {node.returncode}")
    finally:
        for proc in (work, node):
            if proc is not None and proc.poll() is None:
                proc.send_signal(stopping[0] if stopping else signal.SIGTERM)
        for proc in (work, node):
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return node.returncode


def wait_for(
    address: str, say: Callable[[str], None], attempts: int = 0, first_wait: float = 2.0
) -> None:
    """Block until ``address`` accepts TCP connections, retrying with exponential backoff
    (capped at 60 s) and saying so; ``attempts`` > 0 bounds the tries."""
    host, port = host_port(address)
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
    if os.environ.get(FLWR_HOME_ENV):
        return Path(os.environ[FLWR_HOME_ENV])
    return Path(config_path).resolve().parent / "flwr-home"


def coordinator_env(cfg: CoordinatorConfig, flwr_home: Path) -> dict[str, str]:
    """What the SuperLink passes on to the ServerApp process it starts for each run: only what
    it uses. Of the operator's environment, :data:`COORDINATOR_INHERITS`, ``LC_*``, Flower's
    ``FLWR_*`` and fedpeft's ``FEDPEFT_*`` settings pass; a raw store key
    (``FEDPEFT_STORE_KEY``) does not, since the coordinator reads its key file."""
    inherited = {
        name: value
        for name, value in child_env().items()
        if name in COORDINATOR_INHERITS
        or name.startswith(("LC_", "FLWR_", "FEDPEFT_"))
        and name != STORE_KEY_ENV
    }
    return {
        **inherited,
        **QUIET,
        FLWR_HOME_ENV: str(flwr_home),
        COORDINATOR_KEY_ENV: str(cfg.identity_key),
        SITES_ENV: str(cfg.sites),
        STORE_ENV: cfg.store,  # the store URL travels this way only (never a bundle or config)
        STORE_KEY_FILE_ENV: str(cfg.store_key_file),
    }


def site_env(flwr_home: Path) -> dict[str, str]:
    """The SuperNode's environment; the ClientApp processes it starts inherit it."""
    return child_env({FLWR_HOME_ENV: str(flwr_home)})
