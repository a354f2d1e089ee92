"""The site ledger: an append-only, hash-chained record of every task a site received and every
reply it sent. This is what a hospital's data-protection officer reads.

One JSON object per line (JSON Lines, UTF-8, keys sorted, no spaces). Each line holds
``seq`` (1, 2, ...), ``time`` (UTC, ISO-8601), ``prev`` (the SHA-256 of the previous line's bytes,
without its newline; 64 zeros on line 1), the fields of a :class:`LedgerEntry`, and ``hash``: the
SHA-256 of the canonical JSON of the line without ``hash``. ``prev`` chains the lines, so an
edited, deleted or moved line breaks the chain at the next one; ``hash`` makes the last line
tamper-evident too, which no later ``prev`` covers.

The ledger holds hashes, sizes and names only: never patient data, key material or deltas.

It proves the order and integrity of the file, not that the file is the one the site wrote:
whoever can rewrite the whole file can recompute every hash. Keeping the head (the hash of the
last line, :attr:`VerifyResult.head`) somewhere else closes that gap up to the moment it was copied.

Appends are safe against crashes and concurrent writers: an exclusive ``flock`` is held while the
tail is read and the line written; the line goes out in one ``write`` on an ``O_APPEND``
descriptor and is ``fsync``-ed before :meth:`Ledger.append` returns. A crash mid-write leaves a last
line without its newline: :func:`verify` names it, and the ledger refuses to grow past it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedpeft.common.errors import FedpeftError

#: ``prev`` of the first line.
GENESIS = "0" * 64

# Events: a message arrived; a reply with the site's result left; the site refused the task.
TASK = "task"
UPLOAD = "upload"
REFUSED = "refused"
EVENTS = (TASK, UPLOAD, REFUSED)

# Outcomes: the site's decision on the task ("" on a task line: not decided yet).
ACCEPTED = "accepted"
OUTCOMES = {TASK: "", UPLOAD: ACCEPTED, REFUSED: "refused"}

# What a coordinator sends is bounded before it is written down: a hostile or broken coordinator
# must not be able to grow the ledger by megabytes per message.
MAX_TOKEN = 128
MAX_NAME = 64
MAX_REASON = 500

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MESSAGE_TYPE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_HEADER_KEYS = ("seq", "time", "prev", "hash")
#: Entry fields added after the first ledgers were written: an older line may lack them.
_LATER_FIELDS = {"data_sha256"}


class LedgerError(FedpeftError):
    """The ledger cannot be read or extended. The message names the file and, where one is at
    fault, its line."""


class TornLedger(LedgerError):
    """The ledger's last line has no newline: a write was cut short (a crash or a full disk).
    Nothing is appended after it until someone has looked."""


def sha256_hex(data: bytes | str) -> str:
    """Hex SHA-256 of ``data`` (a str is hashed as UTF-8)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def canonical(obj: dict[str, Any]) -> bytes:
    """The one serialization that is hashed and written: keys sorted, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class LedgerEntry:
    """What the site worker records about one message: names, hashes and sizes, nothing more."""

    #: ``task`` (a message arrived), ``upload`` (a reply left), ``refused`` (the site refused).
    event: str
    #: The run token the task names ("" if the message did not say one the site could read).
    run_token: str
    #: The federated round.
    round: int
    #: The Flower message type: ``train`` or ``evaluate``.
    message_type: str
    #: SHA-256 of the run config the site acted on ("" if it had none).
    config_sha256: str = ""
    #: SHA-256 of the sealed upload that left the site ("" if none did).
    upload_sha256: str = ""
    #: Size of the sealed upload in bytes (0 if none left).
    upload_bytes: int = 0
    #: The delta codec (fp32, fp16, int8) and the fine-tuning method, as the task asked.
    codec: str = ""
    method: str = ""
    #: ``accepted`` on an upload, ``refused`` on a refusal, "" on a task.
    outcome: str = ""
    #: Why the site refused (a short reason with no local detail: no paths, no rows).
    reason: str = ""
    #: The data fingerprint that left beside the upload (common/data.py ``data_fingerprint``,
    #: its hex digest; "" if none did). Lines written before it existed lack the field and
    #: read as "".
    data_sha256: str = ""

    def __post_init__(self) -> None:
        problems = _entry_problems(self)
        if problems:
            raise LedgerError("invalid ledger entry: " + "; ".join(problems))


def _entry_problems(e: LedgerEntry) -> list[str]:
    p = []
    if e.event not in EVENTS:
        p.append(f"event {e.event!r} is not one of {', '.join(EVENTS)}")
    elif e.outcome != OUTCOMES[e.event]:
        p.append(f"outcome {e.outcome!r} on a {e.event} entry (expected {OUTCOMES[e.event]!r})")
    if e.event == REFUSED and not e.reason:
        p.append("a refusal needs a reason")
    if not isinstance(e.round, int) or isinstance(e.round, bool) or e.round < 0:
        p.append(f"round {e.round!r} is not a non-negative integer")
    if not isinstance(e.message_type, str) or not _MESSAGE_TYPE.fullmatch(e.message_type):
        p.append(f"message type {e.message_type!r} is not a Flower message type")
    for name in ("config_sha256", "upload_sha256", "data_sha256"):
        value = getattr(e, name)
        if not isinstance(value, str) or (value and not _HEX64.fullmatch(value)):
            p.append(f"{name} is neither empty nor a hex SHA-256")
    size = e.upload_bytes
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        p.append(f"upload_bytes {size!r} is not a non-negative integer")
    if isinstance(size, int) and bool(size) != bool(e.upload_sha256):
        p.append("upload_bytes and upload_sha256 must both be set or both be empty")
    limits = {"run_token": MAX_TOKEN, "codec": MAX_NAME, "method": MAX_NAME, "reason": MAX_REASON}
    for name, limit in limits.items():
        value = getattr(e, name)
        if not isinstance(value, str) or len(value) > limit:
            p.append(f"{name} is not a string of at most {limit} characters")
    return p


@dataclass(frozen=True)
class Record:
    """One line of the ledger, as written and read back."""

    seq: int
    #: UTC, ISO-8601 with milliseconds (``2026-03-01T10:15:02.123Z``).
    time: str
    prev: str
    #: SHA-256 of the canonical JSON of the line without ``hash``.
    hash: str
    entry: LedgerEntry
    #: SHA-256 of the line's bytes without its newline: the next line's ``prev``.
    line_hash: str


@dataclass(frozen=True)
class VerifyResult:
    """The verdict on a ledger: intact, or the first bad line and why."""

    ok: bool
    #: Lines that verified (all of them when ``ok``).
    entries: int
    #: SHA-256 of the last line that verified (``GENESIS`` for an empty ledger): the head to
    #: keep offsite.
    head: str
    #: The first bad line, 1-based (None when ok, or when only ``expect_head`` failed).
    line: int | None = None
    #: The seq written on that line, when it could be read.
    seq: int | None = None
    #: Why it is bad.
    why: str = ""

    @property
    def message(self) -> str:
        if self.ok:
            return f"{self.entries} entries, chain intact"
        return f"line {self.line}: {self.why}" if self.line is not None else self.why


class _Bad(Exception):
    def __init__(self, why: str, seq: int | None = None):
        super().__init__(why)
        self.why, self.seq = why, seq


def parse_line(line: bytes) -> Record:
    """One ledger line (with or without its newline) as a :class:`Record`; ``LedgerError``
    saying why it is not a valid, unedited entry. Its place in the chain is not checked here."""
    try:
        return _parse(line)
    except _Bad as bad:
        raise LedgerError(bad.why) from None


def _parse(line: bytes) -> Record:
    body = line.removesuffix(b"\n")
    if not body.strip():
        raise _Bad("empty line")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Bad("not valid JSON") from None
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object")
    seq = obj.get("seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    if canonical(obj) != body:
        raise _Bad("not in canonical form (the line was edited)", seq)
    names = {f.name for f in fields(LedgerEntry)}
    missing = sorted((names | set(_HEADER_KEYS)) - set(obj) - _LATER_FIELDS)
    unknown = sorted(set(obj) - names - set(_HEADER_KEYS))
    if missing or unknown:
        what = [f"missing {', '.join(missing)}"] if missing else []
        what += [f"unknown {', '.join(unknown)}"] if unknown else []
        raise _Bad(f"fields: {'; '.join(what)}", seq)
    claimed = obj.pop("hash")
    if claimed != sha256_hex(canonical(obj)):
        raise _Bad("its hash does not match its contents (the entry was edited)", seq)
    if seq is None or seq < 1:
        raise _Bad(f"seq {obj['seq']!r} is not a positive integer")
    if not isinstance(obj["prev"], str) or not _HEX64.fullmatch(obj["prev"]):
        raise _Bad("prev is not a hex SHA-256", seq)
    if not isinstance(obj["time"], str) or not _utc_time(obj["time"]):
        raise _Bad(f"time {obj['time']!r} is not a UTC ISO-8601 time", seq)
    try:
        entry = LedgerEntry(**{n: obj[n] for n in names if n in obj})
    except LedgerError as exc:
        raise _Bad(str(exc), seq) from None
    return Record(seq, obj["time"], obj["prev"], claimed, entry, sha256_hex(body))


def _utc_time(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).utcoffset() == UTC.utcoffset(None)
    except ValueError:
        return False


def verify(lines: Sequence[bytes], expect_head: str | None = None) -> VerifyResult:
    """Check a ledger's lines (as ``readlines()`` of the file opened in binary mode gives them,
    newlines kept): each line a valid, unedited entry; seq 1, 2, ... in order; each ``prev``
    the hash of the line before. Pure: no file is read.

    ``expect_head``, a head taken earlier (:attr:`VerifyResult.head`), must be the hash of one of
    the lines: otherwise the file was rewritten or cut short since.
    """
    prev, seen = GENESIS, {GENESIS}
    for number, line in enumerate(lines, start=1):
        done = number - 1
        if not line.endswith(b"\n"):
            why = "torn: no newline at its end (a write was cut short)"
            return VerifyResult(False, done, prev, number, None, why)
        try:
            record = _parse(line)
        except _Bad as bad:
            return VerifyResult(False, done, prev, number, bad.seq, bad.why)
        if record.seq != number:
            why = f"seq {record.seq} where {number} was expected"
            if record.seq < number:
                why += " (an earlier entry repeated or moved)"
            elif _later(lines, number):
                why += " (entries out of order)"
            else:
                why += " (an entry is missing)"
            return VerifyResult(False, done, prev, number, record.seq, why)
        if record.prev != prev:
            why = "hash chain broken " + (
                f"(prev does not match line {number - 1})" if number > 1 else "(prev is not zero)"
            )
            return VerifyResult(False, done, prev, number, record.seq, why)
        prev = record.line_hash
        seen.add(prev)
    if expect_head is not None and expect_head.lower() not in seen:
        why = (
            f"head {expect_head[:16]}... matches no entry: the ledger was rewritten or cut short "
            "since that head was taken"
        )
        return VerifyResult(False, len(lines), prev, None, None, why)
    return VerifyResult(True, len(lines), prev)


def _later(lines: Sequence[bytes], seq: int) -> bool:
    """Whether a line after line ``seq`` holds seq ``seq``: moved, not deleted."""
    for line in lines[seq:]:
        try:
            if _parse(line).seq == seq:
                return True
        except _Bad:
            continue
    return False


def split_lines(data: bytes) -> list[bytes]:
    """``data`` cut after each newline (only ``\\n``: a JSON line holds no other line break)."""
    lines = data.split(b"\n")
    last = lines.pop()
    return [line + b"\n" for line in lines] + ([last] if last else [])


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Ledger:
    """The site's ledger file. Every method opens the file afresh: a process may hold a
    ``Ledger`` for its lifetime while others append to the same file."""

    def __init__(self, path: Path | str, clock: Callable[[], datetime] = _utc_now):
        self.path = Path(path)
        self._clock = clock

    def append(self, entry: LedgerEntry) -> Record:
        """Write ``entry`` as the next line, on disk before this returns. ``TornLedger`` if the
        last line is incomplete, ``LedgerError`` if it is not a valid entry or the file cannot
        be written: the ledger is never extended past a line it cannot chain to."""
        with self._locked(fcntl.LOCK_EX, create=True) as fd:
            last = self._last_line(fd)
            top = self._tail_record(fd, last) if last else None
            now = self._clock().astimezone(UTC).isoformat(timespec="milliseconds")
            obj: dict[str, Any] = {
                **asdict(entry),
                "seq": top.seq + 1 if top else 1,
                "time": now.replace("+00:00", "Z"),
                "prev": top.line_hash if top else GENESIS,
            }
            obj["hash"] = sha256_hex(canonical(obj))
            line = canonical(obj) + b"\n"
            try:
                if os.write(fd, line) != len(line):
                    raise OSError("short write")
                os.fsync(fd)
            except OSError as exc:
                raise LedgerError(f"{self.path}: cannot append ({exc})") from None
        return _parse(line)

    def lines(self) -> list[bytes]:
        """The file's lines, newlines kept, read under a shared lock (no half-written line)."""
        with self._locked(fcntl.LOCK_SH) as fd:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        return split_lines(b"".join(chunks))

    def entries(self) -> list[Record]:
        """Every entry, in file order; ``LedgerError`` naming the first line that is not one.
        The chain is not checked: :meth:`verify` does that."""
        records = []
        for number, line in enumerate(self.lines(), start=1):
            try:
                records.append(_parse(line))
            except _Bad as bad:
                raise LedgerError(f"{self.path}: line {number}: {bad.why}") from None
        return records

    def verify(self, expect_head: str | None = None) -> VerifyResult:
        """:func:`verify` on this file."""
        return verify(self.lines(), expect_head)

    # What the site worker calls: one line per message received and per reply sent.

    def record_task(
        self,
        *,
        run_token: str,
        round: int,
        message_type: str,
        config: bytes | str | None = None,
        method: str = "",
        codec: str = "",
    ) -> Record:
        """A message arrived. ``config``: the run config as it came (hashed, never stored)."""
        return self.append(
            LedgerEntry(
                event=TASK,
                run_token=_clip(run_token, MAX_TOKEN),
                round=round,
                message_type=message_type,
                config_sha256=sha256_hex(config) if config is not None else "",
                method=_clip(method, MAX_NAME),
                codec=_clip(codec, MAX_NAME),
            )
        )

    def record_upload(
        self,
        *,
        run_token: str,
        round: int,
        message_type: str,
        config: bytes | str,
        sealed: bytes | None,
        method: str,
        codec: str,
        data_fingerprint: str = "",
    ) -> Record:
        """A reply left with the site's result: ``sealed``, the sealed delta exactly as sent
        (hashed and measured, never stored), or None for a reply without one (evaluate), and
        the data fingerprint sent beside it, if any."""
        return self.append(
            LedgerEntry(
                event=UPLOAD,
                run_token=_clip(run_token, MAX_TOKEN),
                round=round,
                message_type=message_type,
                config_sha256=sha256_hex(config),
                upload_sha256=sha256_hex(sealed) if sealed else "",
                upload_bytes=len(sealed) if sealed else 0,
                method=_clip(method, MAX_NAME),
                codec=_clip(codec, MAX_NAME),
                outcome=ACCEPTED,
                data_sha256=data_fingerprint.rpartition(":")[2],  # sha256:HEX -> HEX
            )
        )

    def record_refusal(
        self,
        *,
        run_token: str,
        round: int,
        message_type: str,
        reason: str,
        config: bytes | str | None = None,
        method: str = "",
        codec: str = "",
    ) -> Record:
        """The site refused the task; ``reason`` is what the coordinator is told (no local
        detail)."""
        return self.append(
            LedgerEntry(
                event=REFUSED,
                run_token=_clip(run_token, MAX_TOKEN),
                round=round,
                message_type=message_type,
                config_sha256=sha256_hex(config) if config is not None else "",
                method=_clip(method, MAX_NAME),
                codec=_clip(codec, MAX_NAME),
                outcome=OUTCOMES[REFUSED],
                reason=_clip(reason, MAX_REASON) or "no reason given",
            )
        )

    @contextmanager
    def _locked(self, kind: int, create: bool = False) -> Iterator[int]:
        try:
            if create:
                fd, made = _open_for_append(self.path)
            else:
                fd, made = os.open(self.path, os.O_RDONLY), False
        except FileNotFoundError:
            raise LedgerError(f"{self.path}: no such ledger") from None
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            if made:  # the new name must survive a crash too
                _fsync_folder(self.path.parent)
            fcntl.flock(fd, kind)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _last_line(self, fd: int) -> bytes:
        """The last line (with its newline, if it has one), read backwards from the end."""
        pos = os.fstat(fd).st_size
        tail = b""
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            tail = os.pread(fd, step, pos) + tail
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0:
                return tail[cut + 1 :]
        return tail

    def _tail_record(self, fd: int, last: bytes) -> Record:
        if not last.endswith(b"\n"):
            raise TornLedger(
                f"{self.path}: line {self._count_lines(fd)} is torn (no newline at its end: a "
                "write was cut short); not appending after it. Move the file aside (keep it) and "
                "let a new ledger start."
            )
        try:
            return _parse(last)
        except _Bad as bad:
            raise LedgerError(
                f"{self.path}: line {self._count_lines(fd)}: {bad.why}; not appending after it"
            ) from None

    @staticmethod
    def _count_lines(fd: int) -> int:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        return len(split_lines(data))


def _open_for_append(path: Path) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        return os.open(path, flags), False


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shown(text: str) -> str:
    """Control characters escaped: a run token or method from a coordinator must not drive the
    reader's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def format_table(records: Sequence[Record]) -> str:
    """The ledger as a table a person reads: one row per entry, run tokens shortened."""
    header = (
        "time (UTC)",
        "seq",
        "event",
        "run",
        "round",
        "type",
        "method",
        "codec",
        "bytes",
        "outcome",
        "reason",
    )
    rows: list[tuple[str, ...]] = [header]
    for r in records:
        e = r.entry
        rows.append(
            (
                r.time.replace("T", " ").removesuffix("Z")[:19],
                str(r.seq),
                e.event,
                e.run_token[:8] or "-",
                str(e.round),
                e.message_type,
                e.method or "-",
                e.codec or "-",
                f"{e.upload_bytes:,}" if e.upload_bytes else "-",
                e.outcome or "-",
                e.reason,
            )
        )
    rows = [tuple(_shown(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    numeric = {1, 4, 8}
    out = []
    for row in rows:
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        out.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(out)
