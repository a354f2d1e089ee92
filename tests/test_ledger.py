"""The site ledger: a hash chain that names the first edited, deleted, moved or torn entry."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.client.ledger import (
    GENESIS,
    Ledger,
    LedgerEntry,
    LedgerError,
    TornLedger,
    format_table,
    split_lines,
    verify,
)
from fedpeft.common.errors import FedpeftError
from fedpeft.settings import load_site_config, site_ledger_path

TOKEN = "3f2a9c0d" + "e" * 24
CONFIG = '{"method":{"name":"lora"},"federation":{"codec":"fp16"}}'


def _clock(start: datetime = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)) -> Callable[[], datetime]:
    """One second per call, so times are predictable."""
    ticks = iter(range(10_000))
    return lambda: start + timedelta(seconds=next(ticks))


def _three_rounds(path: Path, token: str = TOKEN) -> Ledger:
    """Task and upload entries of 3 train rounds: 6 lines."""
    ledger = Ledger(path, clock=_clock())
    for rnd in (1, 2, 3):
        ledger.record_task(
            run_token=token, round=rnd, message_type="train", config=CONFIG, method="lora"
        )
        ledger.record_upload(
            run_token=token,
            round=rnd,
            message_type="train",
            config=CONFIG,
            sealed=bytes([rnd]) * 1000,
            method="lora",
            codec="fp16",
        )
    return ledger


@pytest.fixture
def lines(tmp_path: Path) -> list[bytes]:
    return _three_rounds(tmp_path / "ledger.jsonl").lines()


def _edit(line: bytes, old: bytes, new: bytes) -> bytes:
    assert line.count(old) == 1
    return line.replace(old, new)


def test_three_rounds_of_tasks_and_uploads_verify(tmp_path: Path) -> None:
    ledger = _three_rounds(tmp_path / "ledger.jsonl")
    records = ledger.entries()
    result = ledger.verify()
    assert result.ok and result.entries == 6 and result.message == "6 entries, chain intact"
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.entry.event for r in records] == ["task", "upload"] * 3
    assert records[0].prev == GENESIS
    assert all(b.prev == a.line_hash for a, b in zip(records, records[1:], strict=False))
    raw = ledger.path.read_bytes()
    assert result.head == hashlib.sha256(raw.rstrip(b"\n").split(b"\n")[-1]).hexdigest()
    upload = records[1]
    assert upload.entry.upload_sha256 == hashlib.sha256(b"\x01" * 1000).hexdigest()
    assert upload.entry.upload_bytes == 1000 and upload.entry.outcome == "accepted"
    assert upload.entry.config_sha256 == hashlib.sha256(CONFIG.encode()).hexdigest()
    assert records[0].time == "2026-03-01T10:00:00.000Z"
    # The format: JSON Lines, keys sorted, no spaces; only hashes, sizes and names.
    first = json.loads(raw.split(b"\n")[0])
    assert raw.split(b"\n")[0] == json.dumps(first, sort_keys=True, separators=(",", ":")).encode()
    assert b"\x01" * 16 not in raw and CONFIG.encode() not in raw and b"lora" in raw


def test_an_edited_byte_in_a_middle_entry_names_that_entry(lines: list[bytes]) -> None:
    lines[2] = _edit(lines[2], b'"round":2', b'"round":7')
    result = verify(lines)
    assert not result.ok and (result.line, result.seq, result.entries) == (3, 3, 2)
    assert result.message == "line 3: its hash does not match its contents (the entry was edited)"


def test_an_edited_byte_in_the_last_entry_is_caught_by_its_own_hash(lines: list[bytes]) -> None:
    lines[5] = _edit(lines[5], b'"upload_bytes":1000', b'"upload_bytes":1001')
    result = verify(lines)
    assert (result.ok, result.line, result.seq) == (False, 6, 6)
    assert "hash does not match its contents" in result.why


def test_an_edit_that_breaks_the_json_or_its_form_names_the_line(lines: list[bytes]) -> None:
    broken = list(lines)
    broken[1] = broken[1].replace(b"{", b"[", 1)
    assert verify(broken).message == "line 2: not valid JSON"
    spaced = list(lines)
    spaced[3] = spaced[3].replace(b'":', b'": ', 1)
    assert verify(spaced).message == "line 4: not in canonical form (the line was edited)"


def test_a_deleted_entry_is_named_by_seq(lines: list[bytes]) -> None:
    del lines[3]
    result = verify(lines)
    assert (result.line, result.seq) == (4, 5)
    assert result.message == "line 4: seq 5 where 4 was expected (an entry is missing)"


def test_swapped_entries_are_named(lines: list[bytes]) -> None:
    repeated = [*lines[:3], lines[1]]
    lines[1], lines[2] = lines[2], lines[1]
    result = verify(lines)
    assert result.message == "line 2: seq 3 where 2 was expected (entries out of order)"
    assert verify(repeated).message == (
        "line 4: seq 2 where 4 was expected (an earlier entry repeated or moved)"
    )


def test_an_upload_records_the_data_fingerprint_that_left_and_older_lines_still_read(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl", clock=_clock())
    fingerprint = "sha256:" + "5e" * 32
    ledger.record_upload(
        run_token=TOKEN,
        round=1,
        message_type="train",
        config=CONFIG,
        sealed=b"\x02" * 10,
        method="lora",
        codec="fp32",
        data_fingerprint=fingerprint,
    )
    assert ledger.entries()[0].entry.data_sha256 == "5e" * 32
    # A line written before the field existed: the same entry without it, hashed as it was.
    old = json.loads(ledger.lines()[0])
    del old["data_sha256"], old["hash"]
    old["upload_sha256"] = hashlib.sha256(b"x").hexdigest()
    old["hash"] = hashlib.sha256(
        json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    older = tmp_path / "older.jsonl"
    older.write_bytes(json.dumps(old, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    result = Ledger(older).verify()
    assert result.ok, result.message
    assert Ledger(older).entries()[0].entry.data_sha256 == ""


def test_an_entry_from_another_ledger_breaks_the_chain(tmp_path: Path) -> None:
    """A valid line with the right seq, but chained to another history."""
    ours = _three_rounds(tmp_path / "a.jsonl").lines()
    theirs = _three_rounds(tmp_path / "b.jsonl", token="0" * 32).lines()
    ours[2] = theirs[2]
    assert verify(ours).message == "line 3: hash chain broken (prev does not match line 2)"


def test_a_torn_last_line_is_reported_and_never_appended_to(tmp_path: Path) -> None:
    ledger = _three_rounds(tmp_path / "ledger.jsonl")
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data[:-40])  # a crash in the middle of the last write
    result = ledger.verify()
    assert (result.ok, result.line, result.entries) == (False, 6, 5)
    assert result.message == "line 6: torn: no newline at its end (a write was cut short)"
    with pytest.raises(TornLedger, match=r"ledger\.jsonl: line 6 is torn") as caught:
        ledger.record_task(run_token=TOKEN, round=4, message_type="train")
    assert isinstance(caught.value, FedpeftError)
    assert ledger.path.read_bytes() == data[:-40]  # nothing was added


def test_append_refuses_to_chain_to_an_edited_last_line(tmp_path: Path) -> None:
    ledger = _three_rounds(tmp_path / "ledger.jsonl")
    ledger.path.write_bytes(ledger.path.read_bytes().replace(b'"round":3', b'"round":9'))
    with pytest.raises(LedgerError, match=r"line 6: its hash does not match"):
        ledger.record_task(run_token=TOKEN, round=4, message_type="train")


def test_a_head_kept_elsewhere_catches_a_rewritten_file(tmp_path: Path) -> None:
    ledger = _three_rounds(tmp_path / "ledger.jsonl")
    head = ledger.verify().head
    ledger.record_task(run_token=TOKEN, round=4, message_type="evaluate")
    assert ledger.verify(expect_head=head).ok  # appending keeps an old head in the chain
    # Rewritten from scratch (every hash recomputed): the chain is intact, the old head gone.
    forged = _three_rounds(tmp_path / "forged.jsonl", token="f" * 32)
    assert forged.verify().ok
    result = forged.verify(expect_head=head)
    assert not result.ok and result.line is None and "matches no entry" in result.why
    # Cut short: the last entries deleted.
    assert not verify(ledger.lines()[:4], expect_head=head).ok


def test_refusals_and_evaluate_replies(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record_task(run_token=TOKEN, round=1, message_type="evaluate", config=CONFIG)
    done = ledger.record_upload(
        run_token=TOKEN,
        round=1,
        message_type="evaluate",
        config=CONFIG,
        sealed=None,
        method="lora",
        codec="fp32",
    )
    assert (done.entry.upload_bytes, done.entry.upload_sha256) == (0, "")
    refused = ledger.record_refusal(
        run_token="x" * 10_000, round=2, message_type="train", reason="policy: method full"
    )
    assert refused.entry.outcome == "refused" and refused.entry.reason == "policy: method full"
    assert len(refused.entry.run_token) == 128  # what a coordinator sends is bounded
    assert ledger.verify().entries == 3


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"event": "refused"}, "a refusal needs a reason"),
        ({"event": "sent"}, "event 'sent'"),
        ({"event": "upload"}, "outcome '' on a upload entry"),
        ({"round": -1}, "round -1"),
        ({"message_type": "Train; rm"}, "not a Flower message type"),
        ({"upload_sha256": "ab"}, "upload_sha256 is neither empty nor a hex SHA-256"),
        ({"upload_bytes": 5}, "both be set or both be empty"),
    ],
)
def test_an_invalid_entry_is_refused(fields: dict[str, object], problem: str) -> None:
    values: dict[str, object] = {
        "event": "task",
        "run_token": TOKEN,
        "round": 1,
        "message_type": "train",
        **fields,
    }
    with pytest.raises(LedgerError, match=problem):
        LedgerEntry(**values)  # type: ignore[arg-type]


def test_the_file_is_made_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Ledger(tmp_path / "ledger.jsonl").record_task(run_token="", round=0, message_type="train")
    finally:
        os.umask(old)
    assert (tmp_path / "ledger.jsonl").stat().st_mode & 0o777 == 0o600


def test_the_table_escapes_what_a_coordinator_could_use_against_a_terminal(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record_task(run_token="\x1b[2J", round=1, message_type="train", method="lora\x07")
    table = format_table(ledger.entries())
    assert "\x1b" not in table and "\x07" not in table
    assert "\\x1b[2J" in table and "lora\\x07" in table


def test_split_lines_keeps_a_torn_tail_apart() -> None:
    assert split_lines(b"") == []
    assert split_lines(b"a\nb\n") == [b"a\n", b"b\n"]
    assert split_lines(b"a\nb") == [b"a\n", b"b"]
    assert verify([]).ok and verify([]).head == GENESIS


def _append_many(path: str, site: str, count: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    ledger = Ledger(path)
    for i in range(count):
        ledger.record_task(run_token=site * 32, round=i, message_type="train")


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [ctx.Process(target=_append_many, args=(str(path), site, 50, start)) for site in "ab"]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    result = Ledger(path).verify()
    assert result.ok and result.entries == 100, result.message
    tokens = [r.entry.run_token[0] for r in Ledger(path).entries()]
    assert tokens.count("a") == tokens.count("b") == 50


def _fedpeft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_verify_exit_codes_and_messages(tmp_path: Path) -> None:
    path = _three_rounds(tmp_path / "ledger.jsonl").path
    good = _fedpeft("site", "ledger", "--ledger", str(path), "--verify")
    assert (good.returncode, good.stdout) == (0, f"ledger {path}: 6 entries, chain intact\n")
    lines = path.read_bytes().split(b"\n")
    del lines[1]
    path.write_bytes(b"\n".join(lines))
    bad = _fedpeft("site", "ledger", "--ledger", str(path), "--verify")
    assert bad.returncode == 1
    assert f"ledger {path}: line 2: seq 3 where 2 was expected (an entry is missing)" in bad.stdout
    assert "Traceback" not in bad.stderr


def test_cli_prints_the_table_and_the_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = _three_rounds(tmp_path / "ledger.jsonl")
    assert main(["site", "ledger", "--ledger", str(ledger.path)]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    columns = ["time", "(UTC)", "seq", "event", "run", "round", "type", "method", "codec"]
    assert header.split() == [*columns, "bytes", "outcome", "reason"]
    assert rows[1].split() == [
        "2026-03-01",
        "10:00:01",
        "2",
        "upload",
        TOKEN[:8],
        "1",
        "train",
        "lora",
        "fp16",
        "1,000",
        "accepted",
    ]
    assert out.rstrip().endswith("6 entries, chain intact")
    head = ledger.verify().head
    assert main(["site", "ledger", "--ledger", str(ledger.path), "--head"]) == 0
    assert capsys.readouterr().out == f"ledger {ledger.path}: head {head} (entry 6)\n"
    other = "0" * 63 + "1"
    assert main(["site", "ledger", "--ledger", str(ledger.path), "--expect-head", other]) == 1
    assert "matches no entry" in capsys.readouterr().out
    assert main(["site", "ledger", "--ledger", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such ledger" in capsys.readouterr().err


def _site_toml(folder: Path, extra: str = "") -> Path:
    for name in ("ca.crt", "A.key", "c.pub", "records.csv"):
        (folder / name).write_text("x")
    toml = folder / "site.toml"
    toml.write_text(
        '[site]\nname = "A"\ncoordinator = "127.0.0.1:1"\nca = "ca.crt"\n'
        'identity_key = "A.key"\ncoordinator_key = "c.pub"\ndata = "records.csv"\n' + extra
    )
    return toml


def test_the_ledger_lives_beside_site_toml_unless_it_says_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = _site_toml(tmp_path)
    assert load_site_config(toml).ledger == tmp_path / "ledger.jsonl"
    assert site_ledger_path(toml) == tmp_path / "ledger.jsonl"
    (tmp_path / "audit").mkdir()
    toml = _site_toml(tmp_path, 'ledger = "audit/site.jsonl"\n')
    assert load_site_config(toml).ledger == tmp_path / "audit" / "site.jsonl"
    _three_rounds(tmp_path / "audit" / "site.jsonl")
    (tmp_path / "records.csv").unlink()  # reading the ledger needs nothing else in site.toml
    assert main(["site", "ledger", "--config", str(toml), "--verify"]) == 0
    said = capsys.readouterr().out
    assert said == f"ledger {tmp_path / 'audit' / 'site.jsonl'}: 6 entries, chain intact\n"
    toml = _site_toml(tmp_path, 'ledger = "nowhere/site.jsonl"\n')
    with pytest.raises(FedpeftError, match=r"\[site\] ledger: .*nowhere: no such folder"):
        load_site_config(toml)


def test_the_secure_aggregation_stages_are_recorded_by_their_message_type(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for kind in ("query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"):
        ledger.record_task(run_token=TOKEN, round=1, message_type=kind)
    assert ledger.verify().ok
    kinds = [json.loads(line)["message_type"] for line in ledger.path.read_text().splitlines()]
    assert kinds == ["query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"]
    with pytest.raises(LedgerError, match="is not a Flower message type"):
        ledger.record_task(run_token=TOKEN, round=1, message_type="Query Secagg")
