"""Recovery at start: verify the log, trim a torn tail, rebuild the store, restore counters.

Why the store is rebuilt arithmetically and not batch by batch: retention (SPEC section 4) only
ever keeps the newest values of a symbol's series, so the hot tier after any sequence of batches
is a suffix of their concatenation whose length `RetentionPolicy.retained_after` predicts from
the batch sizes alone. Replay therefore runs the arithmetic over the batch sizes, keeps only the
values that can still be in the final window (views into the segment bytes, no copies), and
appends that window once in large chunks: no cleanup ever runs, and 1e8 values cost one pass
of CRC checks plus one append. tests/durability checks the result equals batch-by-batch replay.

What counts as corrupt (refuse to start, exit status 2) versus torn (trim, warn, go on):
a bad stretch at the very end of the *last* segment with no valid record after it is the write
that a crash interrupted; it was never acknowledged (acks wait for the write, and under `always`
for the fsync), so dropping it loses nothing acknowledged. Anything else bad (in an older
segment, or followed by a valid record) is damage to acknowledged data, which only a person may
decide to drop: `hft-appliance fsck --repair`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.durability import tombstones, wal
from appliance.durability.encryption import DataCipher
from appliance.durability.keycheck import check_data_dir
from appliance.durability.records import BatchRecord
from appliance.durability.tombstones import Tombstone
from appliance.durability.writer import DurableWriter, RecordListener
from appliance.readiness import ReplayProgress
from appliance.store import Store, SymbolLimitError
from appliance.timestamps import run_starts

if TYPE_CHECKING:
    from appliance.config import DurabilityConfig
    from appliance.latency import WalTimings

log = logging.getLogger(__name__)

APPEND_CHUNK = 1 << 22  # values per store append when loading a final window


class CorruptLogError(Exception):
    """A bad record that is not a torn tail: the appliance must not start over it."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"corrupt write-ahead log record in {path} at offset {offset}: {reason}; "
            'run "hft-appliance fsck --repair"'
        )


@dataclass
class RecoveryResult:
    next_lsn: int = 1
    totals: dict[str, int] = field(default_factory=dict)
    tail: Path | None = None  # the last segment, to keep appending to
    records: int = 0  # records replayed into the store (after the checkpoint)
    values: int = 0
    segments: int = 0
    truncated: list[tuple[Path, int]] = field(default_factory=list)
    checkpoint_lsn: int | None = None
    seconds: float = 0.0
    # Deleted symbols not brought back since: their totals (index numbering goes on from there).
    retired_totals: dict[str, int] = field(default_factory=dict)


# A batch's times during replay: one time for every value (a batch logged without timestamps,
# at max(received_ns, newest)), its resolved per-value timestamps, or a checkpoint's marks.
_Times = int | np.ndarray | tuple[np.ndarray, np.ndarray]


class _Window:
    """One symbol during replay: its hot length by the retention arithmetic, and the batches
    (oldest first, with their times) that can still hold values of the final window.

    Timestamps are rebuilt as the hot tier's marks, never as a per-value column (1e8 values
    would cost 800 MB): `final_marks` gives exactly the marks the live run had, since the
    live store resolved every batch in log order from the same inputs (`received_ns`, the
    logged timestamps, the symbol's newest) and marks are canonical (one per change of time).
    """

    __slots__ = ("batches", "held", "hot", "newest")

    def __init__(self) -> None:
        self.hot = 0
        self.batches: deque[tuple[np.ndarray, _Times]] = deque()
        self.held = 0  # values in `batches`
        self.newest: int | None = None  # the symbol's newest timestamp so far

    def add(self, values: np.ndarray, store: Store, times: _Times) -> None:
        kept_old, kept_new = store.retention.retained_after(self.hot, int(values.shape[0]))
        self.hot = kept_old + kept_new
        self.batches.append((values, times))
        self.held += int(values.shape[0])
        # The hot length never exceeds max_values: batches wholly older than that can go.
        limit = store.retention.max_values
        while self.held - self.batches[0][0].shape[0] >= limit:
            self.held -= int(self.batches.popleft()[0].shape[0])

    def add_record(self, record: BatchRecord, store: Store) -> None:
        """A logged batch, at the times the live store gave it (`appliance.timestamps`)."""
        newest = self.newest
        if record.timestamps is None:
            received = int(record.received_ns)
            stamp = received if newest is None or received > newest else newest
            self.newest = stamp
            self.add(record.values, store, stamp)
        else:
            last = int(record.timestamps[-1])
            self.newest = last if newest is None or last > newest else newest
            self.add(record.values, store, record.timestamps)

    def add_checkpoint(
        self, values: np.ndarray, store: Store, marks: tuple[np.ndarray, np.ndarray] | None
    ) -> None:
        """A checkpoint's hot window with its marks; a checkpoint written before marks were
        saved has none: its values get the time of this restore (a receive time)."""
        if marks is None or not marks[0].shape[0]:
            stamp = time.time_ns()
            self.newest = stamp
            self.add(values, store, stamp)
        else:
            self.newest = int(marks[1][-1])
            self.add(values, store, marks)

    def final(self) -> np.ndarray:
        parts = [values for values, _ in self.batches]
        window = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return window[window.shape[0] - self.hot :]

    def final_marks(self) -> tuple[np.ndarray, np.ndarray]:
        """The marks of `final()` ((first index of a run relative to its first value, time)),
        as `Store.time_marks` gives them for the live store."""
        index_parts, ns_parts = [], []
        at = 0
        for values, times in self.batches:
            if isinstance(times, int):
                index_parts.append(np.array([at], np.int64))
                ns_parts.append(np.array([times], np.int64))
            elif isinstance(times, tuple):
                index_parts.append(np.asarray(times[0], np.int64) + at)
                ns_parts.append(np.asarray(times[1], np.int64))
            else:
                starts = run_starts(times, None)
                index_parts.append(starts + at)
                ns_parts.append(np.asarray(times[starts], np.int64))
            at += int(values.shape[0])
        index, ns = np.concatenate(index_parts), np.concatenate(ns_parts)
        # Never backwards (a checkpoint without marks is stamped with the restore's time, which
        # later records may precede: they are moved forward, as the store would move them).
        ns = np.maximum.accumulate(ns)
        keep = np.empty(ns.shape[0], bool)
        keep[0] = True
        np.not_equal(ns[1:], ns[:-1], out=keep[1:])
        index, ns = index[keep], ns[keep]
        start = at - self.hot
        first = int(np.searchsorted(index, start, side="right")) - 1
        index, ns = index[first:] - start, ns[first:]
        index[0] = 0
        return index, ns


def _load_checkpoint(data_dir: Path, cipher: DataCipher | None):  # -> Checkpoint | None
    """The newest valid checkpoint, or None (none written, or the module is absent)."""
    try:
        from appliance.durability.checkpoint import load_latest
    except ImportError:  # pragma: no cover - the checkpoint module is optional
        return None
    return load_latest(data_dir, cipher)


def recover(
    store: Store,
    data_dir: str | os.PathLike[str],
    listeners: Iterable[RecordListener] = (),
    *,
    use_checkpoint: bool = True,
    progress: ReplayProgress | None = None,
    cipher: DataCipher | None = None,
) -> RecoveryResult:
    """Rebuild `store` (which must be empty) from the checkpoint and the log under `data_dir`.

    Raises `CorruptLogError` for damage that is not a torn tail. Every verified record is
    passed to the listeners, those covered by the checkpoint included (a listener knows what
    it already has). `progress`, if given, is advanced after each segment (GET /health's body).
    """
    if len(store):
        raise ValueError("recovery needs an empty store")
    started = time.perf_counter()
    data_dir = Path(data_dir)
    result = RecoveryResult()
    listeners = list(listeners)
    windows: dict[str, _Window] = {}
    deleted = tombstones.load(data_dir)

    checkpoint = _load_checkpoint(data_dir, cipher) if use_checkpoint else None
    after = 0
    if checkpoint is not None:
        # Hook: the checkpoint is the starting state; only records after its lsn are replayed.
        after = checkpoint.lsn
        result.checkpoint_lsn = checkpoint.lsn
        for symbol, item in checkpoint.symbols.items():
            result.totals[symbol] = item.total
            gone = deleted.get(symbol)
            if gone is not None and checkpoint.lsn <= gone.lsn:
                continue  # taken before the symbol was deleted: its values are gone
            window = _Window()
            if item.values.shape[0]:
                window.add_checkpoint(np.asarray(item.values), store, item.marks)
            windows[symbol] = window
        result.next_lsn = checkpoint.lsn + 1

    last_lsn = _replay_log(
        data_dir, after, store, windows, result, listeners, progress or ReplayProgress(),
        deleted, cipher,
    )  # fmt: skip
    result.next_lsn = max(result.next_lsn, last_lsn + 1)
    for symbol, gone in deleted.items():
        if symbol not in windows:  # not brought back by a batch after its deletion
            total = max(result.totals.pop(symbol, 0), gone.total)
            result.retired_totals[symbol] = total

    for symbol, window in windows.items():
        if window.hot == 0:
            continue
        values = window.final()
        try:
            for start in range(0, values.shape[0], APPEND_CHUNK):
                store.ingest(symbol, np.ascontiguousarray(values[start : start + APPEND_CHUNK]))
        except SymbolLimitError:  # store.max_symbols was lowered since these were logged
            log.warning("symbol not recovered: over store.max_symbols", extra={"symbol": symbol})
            result.totals.pop(symbol, None)
            continue
        # The appends above gave the values this restore's time; put back the logged ones.
        store.restore_time_marks(symbol, *window.final_marks())
    result.seconds = time.perf_counter() - started
    log.info(
        "write-ahead log replayed",
        extra={
            "segments": result.segments,
            "records": result.records,
            "values": result.values,
            "symbols": len(store),
            "checkpoint_lsn": result.checkpoint_lsn,
            "seconds": round(result.seconds, 3),
        },
    )
    return result


def _replay_log(
    data_dir: Path,
    after: int,
    store: Store,
    windows: dict[str, _Window],
    result: RecoveryResult,
    listeners: list[RecordListener],
    progress: ReplayProgress,
    deleted: dict[str, Tombstone],
    cipher: DataCipher | None = None,
) -> int:
    """Verify and replay every segment in lsn order; trim a torn tail; return the last lsn."""
    segments = wal.list_segments(wal.wal_dir(data_dir))
    progress.segments_total = len(segments)
    if segments and wal.segment_first_lsn(segments[0]) > after + 1:
        # Segments were retired under a checkpoint that is gone (or damaged): records between
        # are lost, and replaying the rest would rebuild a wrong store.
        raise CorruptLogError(
            segments[0],
            0,
            f"the log starts at lsn {wal.segment_first_lsn(segments[0])} but no valid checkpoint "
            f"covers the records before it (newest usable checkpoint: lsn {after})",
        )
    last_lsn = 0
    for index, path in enumerate(segments):
        scan = wal.scan_segment(path, cipher=cipher)
        result.segments += 1
        is_last = index == len(segments) - 1
        for damage in scan.damage:
            if not (is_last and damage is scan.torn_tail):
                raise CorruptLogError(path, damage.offset, damage.reason)
        if scan.records and scan.records[0][1].lsn <= last_lsn:
            offset, record = scan.records[0]
            raise CorruptLogError(
                path, offset, f"lsn {record.lsn} does not follow {last_lsn} of the previous segment"
            )
        for _, record in scan.records:
            gone = deleted.get(record.symbol) if deleted else None
            # A batch logged before its symbol's deletion: history only, not the hot tier.
            floor = after if gone is None else max(after, gone.lsn)
            _replay(record, floor, store, windows, result, listeners)
        if scan.records:
            last_lsn = scan.records[-1][1].lsn
        torn = scan.torn_tail
        if torn is not None:
            log.warning(
                "torn write-ahead log tail truncated",
                extra={"file": str(path), "offset": torn.offset, "reason": torn.reason},
            )
            with open(path, "r+b") as f:
                f.truncate(torn.offset)
                os.fsync(f.fileno())
            result.truncated.append((path, torn.offset))
        result.tail = path
        progress.segments_done, progress.records, progress.values = (
            index + 1,
            result.records,
            result.values,
        )
    return last_lsn


def _replay(
    record: BatchRecord,
    after: int,
    store: Store,
    windows: dict[str, _Window],
    result: RecoveryResult,
    listeners: list[RecordListener],
) -> None:
    if record.lsn > after:
        window = windows.get(record.symbol)
        if window is None:
            window = windows[record.symbol] = _Window()
        window.add_record(record, store)
        count = int(record.values.shape[0])
        result.totals[record.symbol] = max(
            result.totals.get(record.symbol, 0), record.first_index + count
        )
        result.records += 1
        result.values += count
    for listener in listeners:
        try:
            listener.on_record(record)
        except Exception:
            log.exception("listener failed during replay", extra={"lsn": record.lsn})


def replay_batch_by_batch(
    store: Store, data_dir: str | os.PathLike[str], cipher: DataCipher | None = None
) -> None:
    """Reference replay (every record through `Store.ingest`, retention included); for tests."""
    for path in wal.list_segments(wal.wal_dir(data_dir)):
        for _, record in wal.scan_segment(path, cipher=cipher).records:
            store.ingest(
                record.symbol,
                np.ascontiguousarray(record.values),
                0,
                0,
                record.timestamps,
                record.received_ns,
            )


def retire_covered(
    data_dir: str | os.PathLike[str], listeners: Iterable[RecordListener], written_lsn: int
) -> list[Path]:
    """After a checkpoint: delete the log segments that no restart can need any more.

    A record is needed while the oldest checkpoint kept does not cover it (recovery falls back
    to that one if the newest is damaged), or while a listener still holds its values only in
    memory (`oldest_unsealed_lsn()`, the warm tier). Runs on the checkpoint thread; the writer
    only ever appends to the last segment, which is never deleted.
    """
    from appliance.durability.checkpoint import oldest_lsn

    bound = oldest_lsn(data_dir)
    bound = written_lsn if bound is None else min(bound, written_lsn)
    for listener in listeners:
        unsealed = getattr(listener, "oldest_unsealed_lsn", None)
        oldest = unsealed() if unsealed is not None else None
        if oldest is not None:
            bound = min(bound, oldest - 1)
    try:
        removed = wal.retire_segments(wal.wal_dir(data_dir), bound)
    except OSError as exc:  # retried after the next checkpoint; the log only grows meanwhile
        log.error("cannot retire write-ahead log segments", extra={"reason": str(exc)})
        return []
    if removed:
        log.info(
            "write-ahead log segments retired",
            extra={"segments": len(removed), "covered_lsn": bound},
        )
    return removed


def open_log(
    config: DurabilityConfig,
    store: Store,
    listeners: Iterable[RecordListener] = (),
    progress: ReplayProgress | None = None,
    timings: WalTimings | None = None,
    cipher: DataCipher | None = None,
) -> DurableWriter:
    """Recover `store` from `config.dir`, then start the writer that continues the log.

    Raises `CorruptLogError` (the CLI turns it into exit status 2). `listeners` see the replay
    and then every new record. `timings`: where the writer records its latencies for GET
    /metrics (None: nothing is timed). `cipher`: AES-256-GCM for everything read and written
    (`[security] data_key_file`; None: plain); a data directory written with another key (or
    not as configured) raises `encryption.DataKeyError` before anything is changed.
    """
    listeners = list(listeners)
    lock_fd = wal.lock_dir(wal.wal_dir(config.dir))  # LogBusyError if another process has it
    try:
        check_data_dir(config.dir, cipher)
        result = recover(store, config.dir, listeners, progress=progress, cipher=cipher)
    except BaseException:
        os.close(lock_fd)
        raise
    checkpointer = None
    try:
        from appliance.durability.checkpoint import Checkpointer
    except ImportError:  # pragma: no cover - the checkpoint module is optional
        pass
    else:
        checkpointer = Checkpointer(
            config.dir,
            config.checkpoint_interval_s,
            on_written=lambda lsn: retire_covered(config.dir, listeners, lsn),
            cipher=cipher,
        )
    writer = DurableWriter(
        store,
        wal.wal_dir(config.dir),
        sync=config.sync,
        interval_ms=config.interval_ms,
        segment_bytes=config.segment_bytes,
        next_lsn=result.next_lsn,
        totals=result.totals,
        retired_totals=result.retired_totals,
        tail=result.tail,
        checkpointer=checkpointer,
        lock_fd=lock_fd,
        timings=timings,
        cipher=cipher,
    )
    for listener in listeners:
        writer.add_listener(listener)
    writer.recovery = result
    writer.start()
    return writer
