"""The audit trail's file format: JSON lines, each carrying the SHA-256 of the line before.

Why a hash chain and not signatures: the appliance holds no key an intruder on the same host
could not read, so a signature would add nothing a hash chain does not already give, which is
*detection*: an edited, deleted or reordered record breaks the chain at that record. What it
cannot show alone is a cut tail (the last records deleted); the anchor (`anchor.json`, beside
the files, rewritten after every fsync, and the hash logged to the app log at start and stop)
covers that as far as the anchor itself is out of an intruder's reach (docs/security.md).

Layout: `DIR/audit-000001.jsonl`, `audit-000002.jsonl`, ... (a new file past `max_file_bytes`;
the chain runs on across files), `DIR/anchor.json` = {"seq", "hash", "file"} of the last
record known to be on disk. A line is compact JSON, `seq` first and `prev` last:
`{"seq":7,"time":"...Z","kind":"write",...,"prev":"<sha256 hex of line 6's bytes>"}`; the hash
of a line is SHA-256 of its bytes without the newline; the first record's prev is 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from appliance.durability.fsutil import replace_private

GENESIS = "0" * 64
ANCHOR_FILE = "anchor.json"
_FILE_RE = re.compile(r"^audit-(\d{6,})\.jsonl$")
EXIT_INTACT = 0
EXIT_BROKEN = 1


class AuditError(Exception):
    """The audit log cannot be continued (a damaged or truncated tail); one line of text."""


def file_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def line_hash(line: bytes) -> str:
    """The chain's hash of one record: SHA-256 of its bytes, without the newline."""
    return hashlib.sha256(line).hexdigest()


def encode(record: dict[str, Any]) -> bytes:
    """One record as one compact JSON line (no newline); `record` already ends with `prev`."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


def list_files(directory: Path) -> list[tuple[int, Path]]:
    """The chain's files in order (by number)."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _FILE_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass(frozen=True)
class Anchor:
    """The last record known to be on disk (after an fsync)."""

    seq: int
    hash: str
    file: str


def read_anchor(directory: Path) -> Anchor | None:
    """`anchor.json`, or None when absent; an unreadable anchor is an AuditError."""
    path = directory / ANCHOR_FILE
    try:
        data = json.loads(path.read_bytes())
        return Anchor(int(data["seq"]), str(data["hash"]), str(data["file"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"{path}: unreadable anchor: {exc}") from None


def write_anchor(directory: Path, anchor: Anchor) -> None:
    """Replace `anchor.json` atomically and durably (the rename too: a power loss must not
    leave an anchor older than the records fsynced before it)."""
    body = json.dumps({"seq": anchor.seq, "hash": anchor.hash, "file": anchor.file})
    replace_private(directory / ANCHOR_FILE, (body + "\n").encode())


@dataclass(frozen=True)
class Tail:
    """Where a chain on disk ends: the next record continues it."""

    file_number: int  # 0: no file yet
    file_bytes: int
    seq: int  # 0: empty chain
    hash: str


def read_tail(directory: Path) -> Tail:
    """The last record of the chain in `directory`, checked just enough to continue it.

    Raises AuditError when the last line is torn or not a record, or when the anchor names a
    later record than the files hold (the tail was cut): continuing would bury the damage.
    """
    files = list_files(directory)
    anchor = read_anchor(directory)
    if not files:
        if anchor is not None:
            raise AuditError(
                f"{directory}: no audit file but {ANCHOR_FILE} names record {anchor.seq}: the log "
                "was removed"
            )
        return Tail(0, 0, 0, GENESIS)
    number, path = files[-1]
    data = path.read_bytes()
    if not data:
        previous = read_tail_of(files[:-1])
        tail = Tail(number, 0, previous[0], previous[1])
    else:
        if not data.endswith(b"\n"):
            raise AuditError(
                f"{path}: the last line is torn (no newline); run "
                "`hft-appliance audit verify` and keep the file as evidence"
            )
        last = data[:-1].rsplit(b"\n", 1)[-1]
        seq = _seq_of(last, path)
        tail = Tail(number, len(data), seq, line_hash(last))
    if anchor is not None and anchor.seq > tail.seq:
        raise AuditError(
            f"{directory}: {ANCHOR_FILE} names record {anchor.seq} but the log ends "
            f"at record {tail.seq}: records were removed from its tail"
        )
    return tail


def read_tail_of(files: list[tuple[int, Path]]) -> tuple[int, str]:
    """(seq, hash) of the last record in the last non-empty of `files` (0, GENESIS if none)."""
    for _, path in reversed(files):
        data = path.read_bytes()
        if data:
            last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
            return _seq_of(last, path), line_hash(last)
    return 0, GENESIS


def _seq_of(line: bytes, path: Path) -> int:
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, KeyError, TypeError):
        raise AuditError(f"{path}: the last line is not an audit record") from None
    if not isinstance(seq, int) or seq < 1:
        raise AuditError(f"{path}: the last line's seq is not a positive integer")
    return seq


# --- verify ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line of the chain on disk, where it is, and what it claims."""

    file: str
    number: int  # line number in its file, from 1
    raw: bytes
    hash: str
    seq: int | None  # None: not a record (invalid JSON, no integer seq)
    prev: str | None
    torn: bool  # the file's last line, without a newline


@dataclass(frozen=True)
class Verdict:
    """The first bad record (None: intact) and the summary."""

    ok: bool
    message: str


def _lines(directory: Path) -> Iterator[Line]:
    for _, path in list_files(directory):
        data = path.read_bytes()
        parts = data.split(b"\n")
        torn_last = parts[-1] != b""
        if not torn_last:
            parts.pop()
        for index, raw in enumerate(parts):
            seq, prev = _claims(raw)
            torn = torn_last and index == len(parts) - 1
            yield Line(path.name, index + 1, raw, line_hash(raw), seq, prev, torn)


def _claims(raw: bytes) -> tuple[int | None, str | None]:
    try:
        record = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(record, dict):
        return None, None
    seq, prev = record.get("seq"), record.get("prev")
    return (
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        prev if isinstance(prev, str) else None,
    )


def _where(line: Line) -> str:
    return f"(file {line.file}, line {line.number})"


def verify(directory: Path) -> Verdict:
    """Walk every file in order; name the first record changed, missing or out of order.

    At each line: the link (its `prev` equals the hash of the line before) and the sequence (its
    `seq` is one more). Link fine, seq wrong: this record's seq was changed. Link broken, seq
    right: the line before changed, unless the next link is broken too (then this line's own
    `prev` was changed); the chain's last line is settled by the anchor. Seq wrong and link
    broken: the expected record appears later (out of order) or nowhere (missing).
    """
    if not directory.is_dir():
        return Verdict(False, "no such directory (was the audit log removed?)")
    lines = list(_lines(directory))
    files = len(list_files(directory))
    anchor = read_anchor(directory)
    if not lines:
        if anchor is not None:
            return Verdict(
                False,
                f"records 1..{anchor.seq} missing: no audit file, but "
                f"{ANCHOR_FILE} names record {anchor.seq}",
            )
        return Verdict(True, f"0 records in {files} files, chain empty")
    seen = {line.seq for line in lines if line.seq is not None}
    bad = _first_bad(lines, seen, anchor)
    if bad is not None:
        return Verdict(False, bad)
    last = lines[-1]
    tail = _check_anchor(lines, anchor)
    if tail is not None:
        return Verdict(False, tail)
    anchored = "anchored" if anchor is not None and anchor.seq == last.seq else "tail not anchored"
    return Verdict(
        True,
        f"{len(lines)} records in {files} files, chain intact ({anchored}), last hash {last.hash}",
    )


def _first_bad(lines: list[Line], seen: set[int | None], anchor: Anchor | None) -> str | None:
    previous_hash = GENESIS
    for index, line in enumerate(lines):
        expected = index + 1
        if line.torn:
            return f"record {expected} {_where(line)}: changed (torn: the file ends mid-line)"
        if line.seq is None or line.prev is None:
            return f"record {expected} {_where(line)}: changed (not a valid record)"
        link_ok = line.prev == previous_hash
        if link_ok and line.seq == expected:
            previous_hash = line.hash
            continue
        if link_ok:
            return (
                f"record {expected} {_where(line)}: changed (its seq says {line.seq}, but "
                "it links to the record before)"
            )
        if line.seq == expected:
            return _blame_link(lines, index, anchor)
        if line.seq > expected and expected not in seen:
            return (
                f"record {expected} missing: record {line.seq} {_where(line)} follows "
                f"record {expected - 1}"
            )
        return (
            f"record {line.seq} {_where(line)}: out of order (found where record "
            f"{expected} belongs)"
        )
    return None


def _blame_link(lines: list[Line], index: int, anchor: Anchor | None) -> str:
    """Line `index` does not link to the line before: which of the two changed?"""
    line = lines[index]
    if index == 0:
        return f"record 1 {_where(line)}: changed (its prev is not the chain's start)"
    before = lines[index - 1]
    if index + 1 < len(lines):
        own_prev_changed = lines[index + 1].prev != line.hash
    else:
        own_prev_changed = (
            anchor is not None and anchor.seq == line.seq and (anchor.hash != line.hash)
        )
    if own_prev_changed:
        return f"record {index + 1} {_where(line)}: changed (its prev does not match)"
    return (
        f"record {index} {_where(before)}: changed (record {index + 1}'s prev does not "
        "match its hash)"
    )


def _check_anchor(lines: list[Line], anchor: Anchor | None) -> str | None:
    if anchor is None:
        return None
    last = lines[-1]
    if anchor.seq > len(lines):
        return (
            f"records {len(lines) + 1}..{anchor.seq} missing: the chain ends at record "
            f"{len(lines)} {_where(last)} but {ANCHOR_FILE} names record {anchor.seq} "
            "(the tail was cut)"
        )
    if anchor.seq >= 1 and lines[anchor.seq - 1].hash != anchor.hash:
        line = lines[anchor.seq - 1]
        return (
            f"record {anchor.seq} {_where(line)}: changed (its hash does not match {ANCHOR_FILE})"
        )
    return None


def run_verify(directory: str | os.PathLike[str], out: TextIO) -> int:
    """`hft-appliance audit verify`: 0 and a summary when intact, 1 and the first bad record."""
    try:
        verdict = verify(Path(directory))
    except AuditError as exc:
        print(f"audit log {directory}: {exc}", file=out)
        return EXIT_BROKEN
    print(f"audit log {directory}: {verdict.message}", file=out)
    return EXIT_INTACT if verdict.ok else EXIT_BROKEN
