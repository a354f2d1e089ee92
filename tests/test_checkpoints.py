"""Checkpoints of the global state are encrypted at rest under a key that is never a default."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedpeft.common.environment import STORE_KEY_ENV, STORE_KEY_FILE_ENV
from fedpeft.common.errors import KeyFileError, StoreError
from fedpeft.server.checkpoints import (
    open_state,
    read_store_key,
    resolve_store_key,
    seal_state,
    write_store_key,
)

STATE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float32)}


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_KEY_ENV, raising=False)
    monkeypatch.delenv(STORE_KEY_FILE_ENV, raising=False)


def test_a_checkpoint_opens_only_with_its_key_run_and_round() -> None:
    key = os.urandom(32)
    blob = seal_state(key, 7, 2, STATE)
    assert STATE["w"].tobytes() not in blob
    back = open_state(key, 7, 2, blob)
    assert all(np.array_equal(back[k], v) for k, v in STATE.items())
    for args in ((os.urandom(32), 7, 2), (key, 8, 2), (key, 7, 3)):
        with pytest.raises(StoreError, match="does not open"):
            open_state(*args, blob)  # type: ignore[arg-type]
    altered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(StoreError):
        open_state(key, 7, 2, altered)


def test_the_key_comes_from_a_file_the_environment_or_beside_a_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    with pytest.raises(KeyFileError, match="no key for the checkpoints"):
        resolve_store_key(db)  # readers never make one
    made, source = resolve_store_key(db, create=True)
    path = tmp_path / "runs.db.key"
    assert source.startswith(str(path)) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_store_key(db)[0] == made  # the same key from then on
    env_key = os.urandom(32)
    monkeypatch.setenv(STORE_KEY_ENV, base64.b64encode(env_key).decode())
    assert resolve_store_key(db) == (env_key, STORE_KEY_ENV)
    other = write_store_key(tmp_path / "other.key")
    assert resolve_store_key(db, tmp_path / "other.key")[0] == other
    monkeypatch.setenv(STORE_KEY_ENV, "c2hvcnQ=")
    with pytest.raises(KeyFileError, match="32 random bytes"):
        resolve_store_key(db)


def test_postgres_needs_an_explicit_key_and_key_files_must_be_private(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="--store-key-file"):
        resolve_store_key("postgresql+psycopg://u:secret@db/x", create=True)
    with pytest.raises(KeyFileError) as info:
        resolve_store_key("postgresql+psycopg://u:secret@db/x")
    assert "secret" not in str(info.value)  # the password never shows in a message
    path = tmp_path / "k"
    write_store_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        read_store_key(path)
