"""The key that encrypts global-state checkpoints in the store, and where it comes from.

Never a built-in default: ``--store-key-file`` (or ``FEDPEFT_STORE_KEY_FILE``), else
``FEDPEFT_STORE_KEY`` (base64 of 32 bytes), else, for a SQLite file store only, ``DB.key``
beside the database, made once (0600) by the first run that needs it. A PostgreSQL store needs
an explicit key: its server may sit on another machine than the key should.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from sqlalchemy.engine import make_url

from fedpeft.common import crypto
from fedpeft.common.environment import STORE_KEY_ENV, STORE_KEY_FILE_ENV
from fedpeft.common.errors import KeyFileError, StoreError
from fedpeft.common.state import State, state_from_bytes, state_to_bytes

KEY_BYTES = 32


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{where}: expected the base64 of {KEY_BYTES} random bytes")
    return key


def write_store_key(path: Path) -> bytes:
    key = os.urandom(KEY_BYTES)
    crypto.write_secret(path, base64.b64encode(key) + b"\n")
    return key


def read_store_key(path: Path) -> bytes:
    try:
        mode, text = path.stat().st_mode, path.read_text()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the store key ({exc.strerror})") from None
    if mode & 0o077:
        raise KeyFileError(f"{path}: store key is readable by others; chmod 600 {path}")
    return _decode(text, str(path))


def default_key_path(db_url: str) -> Path | None:
    """``DB.key`` beside a SQLite database file; None for other stores."""
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database + ".key")


def resolve_store_key(
    db_url: str, key_file: Path | None = None, create: bool = False
) -> tuple[bytes, str]:
    """The store key and where it came from (for messages). ``create`` makes ``DB.key`` for a
    SQLite file store that has none yet (a run that is about to write checkpoints)."""
    key_file = key_file or (
        Path(os.environ[STORE_KEY_FILE_ENV]) if os.environ.get(STORE_KEY_FILE_ENV) else None
    )
    if key_file is not None:
        return read_store_key(key_file), str(key_file)
    if os.environ.get(STORE_KEY_ENV):
        return _decode(os.environ[STORE_KEY_ENV], STORE_KEY_ENV), STORE_KEY_ENV
    path = default_key_path(db_url)
    if path is not None and path.exists():
        return read_store_key(path), str(path)
    if path is not None and create:
        return write_store_key(path), f"{path} (new)"
    if make_url(db_url).get_backend_name() == "sqlite" and create:  # in memory: dies with it
        return os.urandom(KEY_BYTES), "a key for this in-memory store only"
    raise KeyFileError(
        f"no key for the checkpoints in {make_url(db_url).render_as_string()}: give "
        f"--store-key-file, or set {STORE_KEY_FILE_ENV} or {STORE_KEY_ENV}"
    )


#: The prefix of the server optimizer's moments in a checkpoint (server/aggregation.py
#: ``server_step``): kept beside the global state so that a resumed run goes on with them.
MOMENTS = "server-optimizer/"


def seal_state(
    key: bytes, run_id: int, round_: int, state: State, moments: State | None = None
) -> bytes:
    full = dict(state)
    full.update({MOMENTS + name: value for name, value in (moments or {}).items()})
    return crypto.seal_checkpoint(key, run_id, round_, state_to_bytes(full))


def open_checkpoint(key: bytes, run_id: int, round_: int, blob: bytes) -> tuple[State, State]:
    """What a checkpoint holds, opened once: the global state, and the server optimizer's
    moments (empty: none, as with fedavg)."""
    data = crypto.open_checkpoint(key, run_id, round_, blob)
    if data is None:
        raise StoreError(
            f"run {run_id} round {round_}: the stored global state does not open with this "
            "store key (another key, or altered bytes)"
        )
    state: State = {}
    moments: State = {}
    for name, value in state_from_bytes(data).items():
        if name.startswith(MOMENTS):
            moments[name.removeprefix(MOMENTS)] = value
        else:
            state[name] = value
    return state, moments


def open_state(key: bytes, run_id: int, round_: int, blob: bytes) -> State:
    """The global state a checkpoint holds (without the server optimizer's moments)."""
    return open_checkpoint(key, run_id, round_, blob)[0]
