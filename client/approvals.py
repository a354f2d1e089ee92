"""The site's approved runs: the manifests its operator approved (``fedpeft site approve``).

One JSON object per line (JSON Lines): ``approved_at`` (UTC, ISO-8601) and ``manifest`` (a
:class:`~fedpeft.common.manifest.RunManifest`). The file is the site's own (0600, never sent);
appends take an exclusive ``flock``, go out in one ``write`` on an ``O_APPEND`` descriptor and are
``fsync``-ed. With ``approved_runs_only`` the site trains only for runs whose config hash is here
(client/policy.py ``check_task``).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedpeft.common.errors import ConfigError
from fedpeft.common.manifest import RunManifest


@dataclass(frozen=True)
class Approval:
    """One approved run: its manifest and when the operator approved it."""

    manifest: RunManifest
    approved_at: str


def read_approvals(path: Path) -> dict[str, RunManifest]:
    """The approved manifests by config hash (a later approval of the same hash wins); an empty
    mapping when the file does not exist. ``ConfigError`` naming the file and line of an entry
    that is not one."""
    return {a.manifest.config_sha256: a.manifest for a in read_approval_list(path)}


def read_approval_list(path: Path) -> list[Approval]:
    """Every approval in file order."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the approved runs ({exc})") from None
    approvals = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            values = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: not valid JSON") from None
        if not isinstance(values, dict) or not isinstance(values.get("approved_at"), str):
            raise ConfigError(f"{where}: expected an approved_at and a manifest")
        manifest = RunManifest.from_dict(values.get("manifest"), f"{where}: manifest")
        approvals.append(Approval(manifest, values["approved_at"]))
    return approvals


def approve(path: Path, manifest: RunManifest, when: datetime | None = None) -> Approval:
    """Append ``manifest`` as approved now (or ``when``) to the approvals file, made 0600 if it
    is new; the file's mode is checked, so a copy others can read is refused."""
    path = Path(path)
    approved_at = (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    approved_at = approved_at.replace("+00:00", "Z")
    line = json.dumps(
        {"approved_at": approved_at, "manifest": json.loads(manifest.to_json())},
        sort_keys=True,
        separators=(",", ":"),
    )
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the approved runs ({exc.strerror})") from None
    try:
        if os.fstat(fd).st_mode & 0o077:
            raise ConfigError(f"{path}: readable by others; chmod 600 {path}")
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = (line + "\n").encode()
        if os.write(fd, data) != len(data):
            raise ConfigError(f"{path}: short write")
        os.fsync(fd)
    finally:
        os.close(fd)
    return Approval(manifest, approved_at)
