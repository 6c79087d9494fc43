"""The audit trail behind `appliance.audit.Audit`: a background writer over the hash chain.

Why a queue and a thread: the callers are the ingest paths (a ZeroMQ commit callback per frame,
the shared-memory and RDMA pollers) and REST handlers; each call only appends a tuple to a
deque. The writer thread drains it every `tick`, folds transport frames into one record per
(transport, publisher, who, symbol) per second and repeated denials into one counted record per
(who, where, code) per second, and fsyncs every `fsync_interval_ms` (then rewrites the anchor).
The queue is bounded: past `queue_records` a call is counted, not queued, and the writer
writes one `dropped` record with the count; an audit log that loses records says so.

The second a transport record covers is the second in which the writer drained its frames
(at most one tick after they were applied): stamping each frame would cost the hot path a
clock read. Everything here runs on the writer thread except the five `Audit` methods.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.audit import Audit, NullAudit
from appliance.audit_chain import (
    Anchor,
    AuditError,
    encode,
    file_name,
    line_hash,
    read_tail,
    write_anchor,
)
from appliance.config import AuditConfig

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
MAX_TICK_S = 0.1
LOCK_FILE = ".lock"

# Queue entries: (tag, time_ns or 0, fields...). Tags:
_REST, _TRANSPORT, _ADMIN, _DENIED, _SESSIONS = 0, 1, 2, 3, 4


def iso(time_ns: int) -> str:
    """ISO 8601 UTC with microseconds, e.g. 2025-01-02T03:04:05.678901Z."""
    moment = datetime.fromtimestamp(time_ns / NS_PER_S, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ChainWriter:
    """Appends records to the chain in `directory`; one thread only (the audit writer).

    Continues the chain found on disk (`read_tail`: a torn or cut tail is an AuditError, the
    damage is left in place as evidence) and holds an exclusive lock on the directory so two
    appliances never interleave one chain.
    """

    def __init__(self, directory: Path, max_file_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self._lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tail = read_tail(directory)
        except BlockingIOError:
            os.close(self._lock)
            raise AuditError(f"{directory}: in use by another appliance") from None
        except BaseException:
            os.close(self._lock)
            raise
        self.seq, self.hash = tail.seq, tail.hash
        self.number = max(tail.file_number, 1)
        self.size = tail.file_bytes
        self._file = open(directory / file_name(self.number), "ab")  # noqa: SIM115
        self._synced_seq = tail.seq

    def append(self, time_ns: int, fields: Mapping[str, Any]) -> None:
        """Write one record: seq, time, the fields, prev (buffered until `sync`)."""
        record = {"seq": self.seq + 1, "time": iso(time_ns), **fields, "prev": self.hash}
        line = encode(record)
        if self.size and self.size + len(line) + 1 > self.max_file_bytes:
            self._rotate()
        self._file.write(line + b"\n")
        self.size += len(line) + 1
        self.seq += 1
        self.hash = line_hash(line)

    def _rotate(self) -> None:
        self._fsync()
        self._file.close()
        self.number += 1
        self.size = 0
        self._file = open(self.directory / file_name(self.number), "ab")  # noqa: SIM115
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name survives a crash
        finally:
            os.close(dir_fd)
        log.info(
            "audit log rotated",
            extra={"file": file_name(self.number), "seq": self.seq, "hash": self.hash},
        )

    def _fsync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def sync(self) -> None:
        """fsync what was written, then move the anchor to the last record."""
        if self._synced_seq == self.seq:
            return
        self._fsync()
        write_anchor(self.directory, Anchor(self.seq, self.hash, file_name(self.number)))
        self._synced_seq = self.seq

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self._file.close()
            os.close(self._lock)


class AuditLog:
    """`Audit` over a `ChainWriter` in `directory`, written by its own thread.

    `clock` (wall time in ns) and `start_thread=False` let tests drive `pump` by hand.
    Construction writes the `start` record (and raises AuditError when the chain on disk cannot
    be continued); `close` writes the aggregates still open and the `stop` record.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_file_bytes: int = 64 << 20,
        fsync_interval_ms: int = 1000,
        max_denied_per_s: int = 1,
        queue_records: int = 100_000,
        version: str = "unknown",
        clock: Callable[[], int] = time.time_ns,
        start_thread: bool = True,
    ) -> None:
        self._chain = ChainWriter(Path(directory), max_file_bytes)
        self._clock = clock
        self._queue: deque[tuple[Any, ...]] = deque()
        self._queue_records = queue_records
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._max_denied = max_denied_per_s
        self._fsync_interval_s = fsync_interval_ms / 1000
        self._second = clock() // NS_PER_S
        # (transport, publisher_id, who, symbol) -> [frames, values, first seq, last seq]
        self._frames: dict[tuple[Any, ...], list[int]] = {}
        # (who, where, code) -> [denials this second, detail of the last]
        self._denials: dict[tuple[Any, ...], list[Any]] = {}
        self._stop = threading.Event()
        self._closed = False
        self.write_errors = 0
        self._write(
            clock(),
            {"kind": "start", "appliance": "hft-appliance", "version": version, "pid": os.getpid()},
        )
        self._chain.sync()
        log.info("audit log opened", extra=self._anchor_extra())
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    # --- the Audit methods: callers' threads, one deque append each -------------------------

    def _put(self, item: tuple[Any, ...]) -> None:
        if len(self._queue) < self._queue_records:
            self._queue.append(item)
            return
        with self._dropped_lock:
            self._dropped += 1

    def rest_write(self, who: str | None, symbol: str, values: int, first_index: int) -> None:
        self._put((_REST, self._clock(), who, symbol, values, first_index))

    def transport_write(
        self,
        transport: str,
        publisher_id: int,
        who: str | None,
        symbol: str,
        values: int,
        sequence: int,
    ) -> None:
        self._put((_TRANSPORT, 0, transport, publisher_id, who, symbol, values, sequence))

    def transport_sessions(
        self, transport: str, sessions: Mapping[tuple[int, str], list[int]]
    ) -> None:
        """A poll batch's applied frames already folded by the caller (`fold_sessions`):
        (publisher_id, symbol) -> [frames, values, first seq, last seq]; one queue entry."""
        if sessions:
            self._put((_SESSIONS, 0, transport, sessions))

    def admin(self, who: str, action: str, detail: Mapping[str, Any]) -> None:
        self._put((_ADMIN, self._clock(), who, action, dict(detail)))

    def denied(self, who: str | None, where: str, code: str, detail: str) -> None:
        self._put((_DENIED, self._clock(), who, where, code, detail))

    def close(self) -> None:
        """Stop the writer, write what is queued, the open aggregates and `stop`; fsync."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = self._clock()
        self.pump(now)
        self._end_second(now)
        self._write(now, {"kind": "stop", "write_errors": self.write_errors})
        self._chain.close()
        log.info("audit log closed", extra=self._anchor_extra())

    # --- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        tick_s = min(self._fsync_interval_s, MAX_TICK_S)
        last_sync = time.monotonic()
        while not self._stop.wait(tick_s):
            try:
                self.pump(self._clock())
                if time.monotonic() - last_sync >= self._fsync_interval_s:
                    self._chain.sync()
                    last_sync = time.monotonic()
            except OSError:
                self.write_errors += 1
                log.exception("audit log write failed; records may be lost")

    def pump(self, now_ns: int) -> None:
        """Close the previous second's aggregates if `now_ns` is in a new second, then drain
        the queue into records and aggregates (the writer thread, or a test)."""
        if now_ns // NS_PER_S != self._second:
            self._end_second(now_ns)
            self._second = now_ns // NS_PER_S
        queue = self._queue
        while queue:
            item = queue.popleft()
            tag = item[0]
            if tag == _SESSIONS:
                self._add_sessions(item)
            elif tag == _TRANSPORT:
                self._add_frame(item)
            elif tag == _REST:
                _, at, who, symbol, values, first_index = item
                self._write(
                    at,
                    {
                        "kind": "write",
                        "who": who,
                        "symbol": symbol,
                        "values": values,
                        "first_index": first_index,
                    },
                )
            elif tag == _ADMIN:
                _, at, who, action, detail = item
                self._write(at, {"kind": "admin", "who": who, "action": action, "detail": detail})
            else:
                self._add_denial(item)
        with self._dropped_lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self._write(now_ns, {"kind": "dropped", "count": dropped})
            log.error("audit queue full; records dropped", extra={"count": dropped})

    def _add_frame(self, item: tuple[Any, ...]) -> None:
        _, _, transport, publisher_id, who, symbol, values, sequence = item
        key = (transport, publisher_id, who, symbol)
        entry = self._frames.get(key)
        if entry is None:
            self._frames[key] = [1, values, sequence, sequence]
        else:
            entry[0] += 1
            entry[1] += values
            entry[3] = sequence

    def _add_sessions(self, item: tuple[Any, ...]) -> None:
        _, _, transport, sessions = item
        for (publisher_id, symbol), (frames, values, first, last) in sessions.items():
            key = (transport, publisher_id, None, symbol)
            entry = self._frames.get(key)
            if entry is None:
                self._frames[key] = [frames, values, first, last]
            else:
                entry[0] += frames
                entry[1] += values
                entry[3] = last

    def _add_denial(self, item: tuple[Any, ...]) -> None:
        _, at, who, where, code, detail = item
        key = (who, where, code)
        entry = self._denials.setdefault(key, [0, 0, detail])
        entry[0] += 1
        if entry[0] <= self._max_denied:
            self._write(
                at,
                {
                    "kind": "denied",
                    "who": who,
                    "where": where,
                    "code": code,
                    "detail": detail,
                    "count": 1,
                },
            )
        else:
            entry[1] += 1  # folded into the second's count record
            entry[2] = detail

    def _end_second(self, now_ns: int) -> None:
        """One record per transport session and per folded denial key of the second."""
        second = iso(self._second * NS_PER_S)
        for (transport, publisher_id, who, symbol), entry in self._frames.items():
            frames, values, first, last = entry
            self._write(
                now_ns,
                {
                    "kind": "transport_write",
                    "second": second,
                    "transport": transport,
                    "publisher_id": publisher_id,
                    "who": who,
                    "symbol": symbol,
                    "frames": frames,
                    "values": values,
                    "first_sequence": first,
                    "last_sequence": last,
                },
            )
        self._frames.clear()
        for (who, where, code), (_, folded, detail) in self._denials.items():
            if folded:
                self._write(
                    now_ns,
                    {
                        "kind": "denied",
                        "second": second,
                        "who": who,
                        "where": where,
                        "code": code,
                        "detail": detail,
                        "count": folded,
                        "folded": True,
                    },
                )
        self._denials.clear()

    def _write(self, time_ns: int, fields: Mapping[str, Any]) -> None:
        self._chain.append(time_ns, fields)

    def _anchor_extra(self) -> dict[str, Any]:
        return {
            "audit_dir": str(self._chain.directory),
            "audit_seq": self._chain.seq,
            "audit_hash": self._chain.hash,
        }


def open_audit(config: AuditConfig, version: str = "unknown") -> Audit:
    """The appliance's audit trail: an `AuditLog` in `config.dir`, or `NullAudit` when off.

    Raises AuditError (one line) when the chain on disk cannot be continued.
    """
    if not config.enabled:
        return NullAudit()
    return AuditLog(
        config.dir,
        max_file_bytes=config.max_file_bytes,
        fsync_interval_ms=config.fsync_interval_ms,
        max_denied_per_s=config.max_denied_per_s,
        queue_records=config.queue_records,
        version=version,
    )
