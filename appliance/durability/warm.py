"""The warm tier: every accepted value, per symbol, in immutable compressed segments on disk.

Why a superset of what the hot tier evicts: holding every value is the simplest rule that can
never lose one, and history queries then read one place. Values arrive through `on_record`
(called by the write-ahead log's writer under its commit lock, in lsn order, and again for every
record still in the log during recovery). Each symbol buffers its newest values in memory
until `warm_segment_values` are held; that block is handed to one background sealing thread,
which compresses it and writes `DIR/warm/<hex of the UTF-8 symbol>/<first index>.seg`
(see `warm_segment`). Until a block's file is durable it stays in memory, queryable and
counted by `oldest_unsealed_lsn()`, so the log that also holds it is not retired.

Time marks: (first index, timestamp) pairs so that a time maps to an index. A value's timestamp
is its event time when its batch carried timestamps (`BatchRecord.timestamps`: one mark per run
of equal times, `appliance.timestamps.run_starts`), else its batch's receive time (one mark per
batch). Marks are clamped to be non-decreasing per symbol (a wall clock stepping back, or a
symbol deleted and created again with earlier event times, would otherwise break the binary
search); a clamped value is reported at its predecessor's time. Every block (so every segment)
starts with a mark at its first index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from appliance.config import DurabilityConfig
from appliance.durability.encryption import DataCipher
from appliance.durability.fsutil import fsync_dir, make_private_dir
from appliance.durability.keycheck import check_data_dir
from appliance.durability.records import BatchRecord
from appliance.durability.warm_sealer import LogSealer
from appliance.durability.warm_segment import (
    SUFFIX,
    TMP_SUFFIX,
    SealedSegment,
    SegmentCorruptError,
    SegmentData,
    SegmentHeader,
    build_segment,
    read_header,
    read_segment,
    segment_name,
    write_atomically,
)
from appliance.timestamps import run_starts

log = logging.getLogger(__name__)

NS_PER_DAY = 86_400 * 1_000_000_000
RETRY_AFTER_S = 1.0  # a failed seal (disk full) is retried no sooner than this
MAX_QUEUED_SEALS = 4  # per symbol; beyond it (and the backlog) the writer waits for the sealer
# Blocks waiting for their seal, all symbols together, before the writer waits: a burst of
# ingest is absorbed in memory instead of holding the log's writer behind the sealer (the
# 10k-value DEALER path went from ~17M to ~30M values/s with the writer alone on one core).
BACKLOG_BYTES = 256 << 20
SEAL_WAIT_S = 30.0
_INITIAL_CAPACITY = 1024
_DECODED_CACHE = 4  # decompressed edge segments kept for repeated queries


class WarmTierError(Exception):
    """The warm directory cannot be used as found (names the file and the problem)."""


def symbol_key(symbol: str) -> str:
    """Filesystem-safe directory name: lower-case hex of the UTF-8 bytes (<= 128 chars)."""
    return symbol.encode("utf-8").hex()


def symbol_from_key(key: str) -> str:
    return bytes.fromhex(key).decode("utf-8")


class MemoryPiece(NamedTuple):
    """Values not yet in a sealed file (a block being sealed, or the live buffer)."""

    first_index: int
    values: np.ndarray
    mark_index: np.ndarray
    mark_ns: np.ndarray

    @property
    def end_index(self) -> int:
        return self.first_index + int(self.values.shape[0])


class SymbolView(NamedTuple):
    """A consistent snapshot of one symbol for a query: sealed segments, then memory pieces,
    in index order (pieces never overlap; a gap is possible after retention or a late start)."""

    sealed: tuple[SealedSegment, ...]
    memory: tuple[MemoryPiece, ...]


class SymbolTotals(NamedTuple):
    total: int  # values ever accepted (absolute index after the newest value)
    warm_start: int  # oldest index still held by the warm tier
    sealed_end: int  # index after the newest sealed value
    segments: int


@dataclass
class _Block:
    """A full (or gap-cut) block handed to the sealing thread; stays until its file is durable."""

    piece: MemoryPiece
    first_lsn: int
    last_lsn: int
    failed_at: float | None = None
    in_flight: bool = False
    future: Future[None] | None = None


@dataclass
class _Buffer:
    """The live, append-only buffer. Appends write past `n` only, and a full array is handed
    off (never reused), so a view of `[:n]` taken under the lock stays valid without a copy."""

    first_index: int = 0
    n: int = 0
    values: np.ndarray = field(default_factory=lambda: np.empty(_INITIAL_CAPACITY))
    n_marks: int = 0
    mark_index: np.ndarray = field(default_factory=lambda: np.empty(_INITIAL_CAPACITY, np.int64))
    mark_ns: np.ndarray = field(default_factory=lambda: np.empty(_INITIAL_CAPACITY, np.int64))
    first_lsn: int = 0
    last_lsn: int = 0

    @property
    def end_index(self) -> int:
        return self.first_index + self.n

    def piece(self) -> MemoryPiece:
        m = self.n_marks
        return MemoryPiece(
            self.first_index, self.values[: self.n], self.mark_index[:m], self.mark_ns[:m]
        )


@dataclass
class _Symbol:
    sealed: list[SealedSegment] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    buffer: _Buffer | None = None
    last_ns: int = 0  # newest (clamped) timestamp: marks never go back
    # Index after the newest value ever taken (kept when retention deletes segments): values
    # below it are already held, or were, so a replayed record never brings them back.
    end: int = 0
    sealed_end: int = 0  # index after the newest sealed value (also kept across retention)


def _nbytes(piece: MemoryPiece) -> int:
    return piece.values.nbytes + piece.mark_index.nbytes + piece.mark_ns.nbytes


_ONE_MARK = np.zeros(1, np.int64)  # the offset of a batch's one mark within what it appends


def _older_than(segment: SealedSegment, cutoff_ns: int) -> bool:
    """Both the newest timestamp and the file's modification time are before `cutoff_ns`."""
    if segment.header.last_received_ns >= cutoff_ns:
        return False
    try:
        return segment.path.stat().st_mtime_ns < cutoff_ns
    except FileNotFoundError:
        return True


_FULL_AFTER = 1 << 16  # values: past this, grow straight to the block size (see _grow)


def _grow(array: np.ndarray, needed: int, limit: int) -> np.ndarray:
    """Room for `needed` items. Doubling up to `_FULL_AFTER`, then the whole block at once:
    a symbol that receives big batches fills a block with one copy of at most 512 KiB instead
    of ten doublings (22% of the writer's time in the 10k-value ZeroMQ profile), and memory not
    yet written is not committed, so a mostly empty block costs little more than its values."""
    if needed <= array.shape[0]:
        return array
    size = max(needed, 2 * array.shape[0])
    if size > _FULL_AFTER:
        size = max(limit, needed)
    bigger = np.empty(min(size, max(limit, needed)), array.dtype)
    bigger[: array.shape[0]] = array
    return bigger


class WarmTier:
    """Per-symbol warm storage. Thread-safe: one writer (`on_record`), any number of readers.

    `clock` returns wall-clock ns (tests fake it for `retain_days`).
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        segment_values: int = 1_000_000,
        retain_days: int = 0,
        clock: Callable[[], int] = time.time_ns,
        log_dir: Path | str | None = None,
        cipher: DataCipher | None = None,
    ) -> None:
        if segment_values < 1:
            raise ValueError("segment_values must be >= 1")
        self.directory = Path(directory)
        self.cipher = cipher  # AES-256-GCM for every segment written and read (None: plain)
        self.segment_values = segment_values
        self.retain_days = retain_days
        self._clock = clock
        self._lock = threading.Lock()
        self._symbols: dict[str, _Symbol] = {}
        self._decoded: OrderedDict[Path, SegmentData] = OrderedDict()
        # Not at a lower priority: this thread shares the GIL with the log's writer, and when
        # it is preempted while holding it (by any other process on a busy core) the writer
        # waits with it. On the shared build machine SCHED_IDLE took the writer path from
        # 28-37M to 4-7M values/s and nice 19 to 5-10M in one series, and changed nothing
        # visible in another (benches/bench_wal_path.py --sealer-priority, 2026-12-04).
        self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-seal")
        self._backlog = 0  # bytes of blocks handed to the sealer and not yet finished
        # With the log's directory, the compression runs in a nice-19 child process that reads
        # the values from the log (warm_sealer); this thread only waits for it.
        self._process = LogSealer(Path(log_dir), cipher) if log_dir is not None else None
        self._closed = False
        make_private_dir(self.directory)
        self._scan()
        self.apply_retention()

    @classmethod
    def from_config(
        cls,
        durability: DurabilityConfig,
        clock: Callable[[], int] = time.time_ns,
        cipher: DataCipher | None = None,
    ) -> WarmTier:
        """Build from `config.durability`: the segments live in `<dir>/warm`.

        Raises `DataKeyError` before touching anything when the data directory was written
        with another key (or not encrypted as configured)."""
        check_data_dir(durability.dir, cipher)
        return cls(
            Path(durability.dir) / "warm",
            segment_values=durability.warm_segment_values,
            retain_days=durability.retain_days,
            clock=clock,
            log_dir=Path(durability.dir) / "wal",
            cipher=cipher,
        )

    # ----------------------------------------------------------------- startup scan

    def _scan(self) -> None:
        """Rebuild every symbol's sealed segments (and so its sealed end) from the directory.

        Leftover `*.tmp` files are crashes mid-seal: never visible, deleted here.
        """
        for sub in sorted(self.directory.iterdir()):
            if not sub.is_dir():
                continue
            try:
                symbol = symbol_from_key(sub.name)
            except (ValueError, UnicodeDecodeError):
                log.warning("warm tier: ignoring a foreign directory", extra={"path": str(sub)})
                continue
            for tmp in sub.glob("*" + TMP_SUFFIX):
                log.warning("warm tier: removing an unfinished seal", extra={"path": str(tmp)})
                tmp.unlink()
            segments: list[SealedSegment] = []
            for path in sorted(sub.glob("*" + SUFFIX)):
                try:
                    header = read_header(path, self.cipher)
                except SegmentCorruptError as exc:
                    raise WarmTierError(str(exc)) from None
                if header.symbol != symbol or path.name != segment_name(header.first_index):
                    raise WarmTierError(
                        f"{path}: header names {header.symbol!r} at "
                        f"{header.first_index}, not this file"
                    )
                if segments and header.first_index < segments[-1].header.end_index:
                    raise WarmTierError(f"{path}: overlaps {segments[-1].path.name}")
                segments.append(SealedSegment(path, header))
            if segments:
                last = segments[-1].header
                state = _Symbol(
                    sealed=segments,
                    last_ns=last.last_received_ns,
                    end=last.end_index,
                    sealed_end=last.end_index,
                )
                self._symbols[symbol] = state

    # ----------------------------------------------------------------- writer side

    def on_record(self, record: BatchRecord) -> None:
        """Take one accepted batch (writer thread, lsn order; replays included).

        Idempotent across recovery: values below what this tier already holds are skipped
        (a record straddling that point is sliced), so a replay after a restart or of records
        already buffered changes nothing.
        """
        values = record.values
        with self._lock:
            state = self._symbols.get(record.symbol)
            if state is None:
                state = self._symbols[record.symbol] = _Symbol()
            start = record.first_index
            skip = max(0, state.end - start)
            if skip >= values.shape[0]:
                return
            times = record.timestamps
            if skip:
                values = values[skip:]
                times = None if times is None else times[skip:]
                start += skip
            if times is None:
                ns: int | np.ndarray = max(int(record.received_ns), int(state.last_ns))
                state.last_ns = ns
            else:
                if int(times[0]) < state.last_ns:  # resolved times only go back after a delete
                    times = np.maximum(times, state.last_ns)
                ns = times
                state.last_ns = int(times[-1])
            buf = state.buffer
            if buf is not None and buf.n and start != buf.end_index:
                # A gap (values this tier never saw): the buffer is sealed short so that every
                # piece stays contiguous, and a new one starts at the record.
                log.warning(
                    "warm tier: gap in a symbol's history",
                    extra={"symbol": record.symbol, "expected": buf.end_index, "got": start},
                )
                self._hand_off(record.symbol, state, buf)
                buf = None
            if buf is None or buf.n == 0:
                buf = state.buffer = _Buffer(first_index=start, first_lsn=record.lsn)
            self._append(record.symbol, state, buf, values, start, ns, record.lsn)
            self._retry_failed(record.symbol, state)
            in_flight = [b.future for b in state.blocks if b.in_flight and b.future is not None]
        # Back-pressure, outside the lock (the sealer needs it to publish): a writer that
        # outruns compression waits for the oldest seals rather than growing memory without
        # bound. Failed seals do not count (they wait for their retry, not for the writer).
        if self._backlog > BACKLOG_BYTES:
            for future in in_flight[: max(0, len(in_flight) - MAX_QUEUED_SEALS)]:
                wait([future], timeout=SEAL_WAIT_S)

    def _append(
        self,
        symbol: str,
        state: _Symbol,
        buf: _Buffer,
        values: np.ndarray,
        start: int,
        ns: int | np.ndarray,
        lsn: int,
    ) -> None:
        """Append values at `start` with their time: one `ns` for all (a batch without
        timestamps: one mark per block it touches) or per-value times (one mark per run)."""
        limit = self.segment_values
        while values.shape[0]:
            take = min(values.shape[0], limit - buf.n)
            buf.values = _grow(buf.values, buf.n + take, limit)
            buf.values[buf.n : buf.n + take] = values[:take]
            if not isinstance(ns, np.ndarray):
                offsets, times = _ONE_MARK, np.array([ns], np.int64)
            else:
                times = ns[:take]
                # A block's first value always has a mark; later runs only where time changes.
                previous = int(buf.mark_ns[buf.n_marks - 1]) if buf.n_marks else None
                offsets = run_starts(times, previous)
                times = times[offsets]
                ns = ns[take:]
            k = int(offsets.shape[0])
            buf.mark_index = _grow(buf.mark_index, buf.n_marks + k, limit)
            buf.mark_ns = _grow(buf.mark_ns, buf.n_marks + k, limit)
            buf.mark_index[buf.n_marks : buf.n_marks + k] = offsets + start
            buf.mark_ns[buf.n_marks : buf.n_marks + k] = times
            buf.n_marks += k
            buf.n += take
            buf.last_lsn = lsn
            values = values[take:]
            start += take
            state.end = start
            if buf.n == limit:
                self._hand_off(symbol, state, buf)
                buf = state.buffer = _Buffer(first_index=start, first_lsn=lsn)

    def _hand_off(self, symbol: str, state: _Symbol, buf: _Buffer) -> None:
        """Move the buffer's values into a block and queue its seal (caller holds the lock)."""
        block = _Block(buf.piece(), buf.first_lsn, buf.last_lsn)
        state.blocks.append(block)
        state.buffer = None
        self._submit(symbol, block)

    def _submit(self, symbol: str, block: _Block) -> None:
        if self._closed:
            return
        block.in_flight = True
        block.failed_at = None
        self._backlog += _nbytes(block.piece)
        block.future = self._sealer.submit(self._seal, symbol, block)

    def _retry_failed(self, symbol: str, state: _Symbol) -> None:
        now = time.monotonic()
        for block in state.blocks:
            if (
                not block.in_flight
                and block.failed_at is not None
                and now - block.failed_at >= RETRY_AFTER_S
            ):
                self._submit(symbol, block)

    def _seal(self, symbol: str, block: _Block) -> None:
        """Sealing thread: write the file, then publish it and drop the block, in that order.

        Invariant: a block leaves memory only after its file is durable; on any error it stays
        (queryable, and still holding back log retirement) and is retried later.
        """
        piece = block.piece
        try:
            directory = self.directory / symbol_key(symbol)
            sealed = self._seal_elsewhere(directory, symbol, block)
            if sealed is not None:
                header, path = sealed
                self._publish(symbol, block, header, path)
                return
            if not directory.is_dir():
                make_private_dir(directory)
                fsync_dir(self.directory)
            header, data = build_segment(
                symbol,
                piece.first_index,
                piece.values,
                piece.mark_index,
                piece.mark_ns,
                block.first_lsn,
                block.last_lsn,
                self.cipher,
            )
            path = write_atomically(directory, segment_name(piece.first_index), data)
        except Exception:
            log.exception(
                "warm tier: sealing failed; the values stay in memory and the log",
                extra={"symbol": symbol, "first_index": piece.first_index},
            )
            with self._lock:
                block.in_flight = False
                block.failed_at = time.monotonic()
                self._backlog -= _nbytes(piece)
            return
        self._publish(symbol, block, header, path)

    def _seal_elsewhere(
        self, directory: Path, symbol: str, block: _Block
    ) -> tuple[SegmentHeader, Path] | None:
        """The child process's seal of `block`, or None: sealed here instead (logged)."""
        if self._process is None:
            return None
        piece = block.piece
        try:
            return self._process.seal(directory, symbol, piece, block.first_lsn, block.last_lsn)
        except Exception as exc:
            log.warning(
                "warm tier: the sealing process could not seal a block; sealing it here",
                extra={"symbol": symbol, "first_index": piece.first_index, "reason": str(exc)},
            )
            return None

    def _publish(self, symbol: str, block: _Block, header: SegmentHeader, path: Path) -> None:
        """The block's file is durable: make it visible and drop the block from memory."""
        with self._lock:
            state = self._symbols[symbol]
            state.sealed.append(SealedSegment(path, header))
            state.sealed_end = max(state.sealed_end, header.end_index)
            state.blocks.remove(block)
            block.in_flight = False
            self._backlog -= _nbytes(block.piece)
        log.debug("warm segment sealed", extra={"symbol": symbol, "path": str(path)})
        self.apply_retention()

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued seal has run (retrying failed ones once). For tests/shutdown."""
        with self._lock:
            for symbol, state in self._symbols.items():
                for block in state.blocks:
                    if not block.in_flight:
                        self._submit(symbol, block)
        if not self._closed:
            marker: Future[None] = self._sealer.submit(lambda: None)
            marker.result(timeout_s)

    def close(self) -> None:
        """Finish queued seals and stop the sealing thread. The unsealed buffers are dropped:
        their values are in the write-ahead log, which is not retired past them."""
        if self._closed:
            return
        self._sealer.shutdown(wait=True)
        if self._process is not None:
            self._process.close()
        self._closed = True

    # ----------------------------------------------------------------- retention

    def apply_retention(self, now_ns: int | None = None) -> list[Path]:
        """Delete sealed segments older than `retain_days` (0: never): those whose newest value's
        timestamp AND whose file (written when the segment was sealed, or restored) are both
        older than the cut-off.

        Why both: timestamps are event times when publishers send them, and a replay of old
        market data (event times years back) must not be deleted the moment it is sealed; the
        file's time says when the appliance took it. Only whole sealed segments go, and only
        those entirely older than the cut-off: a segment holding one newer value is kept. Each
        deletion is logged at INFO.
        """
        if self.retain_days <= 0:
            return []
        cutoff = (self._clock() if now_ns is None else now_ns) - self.retain_days * NS_PER_DAY
        doomed: list[tuple[str, SealedSegment]] = []
        with self._lock:
            for symbol, state in self._symbols.items():
                old = [s for s in state.sealed if _older_than(s, cutoff)]
                if old:
                    doomed += [(symbol, s) for s in old]
                    state.sealed = [s for s in state.sealed if s not in old]
        for symbol, segment in doomed:
            segment.path.unlink(missing_ok=True)
            fsync_dir(segment.path.parent)
            with self._lock:
                self._decoded.pop(segment.path, None)
            log.info(
                "warm tier: retention deleted a segment",
                extra={
                    "symbol": symbol,
                    "path": str(segment.path),
                    "first_index": segment.header.first_index,
                    "count": segment.header.count,
                    "last_received_ns": segment.header.last_received_ns,
                    "retain_days": self.retain_days,
                },
            )
        return [segment.path for _, segment in doomed]

    # ----------------------------------------------------------------- readers

    @property
    def backlog_bytes(self) -> int:
        """Bytes of values handed to the sealer and not sealed yet (GET /metrics; racy read)."""
        return self._backlog

    def oldest_unsealed_lsn(self) -> int | None:
        """The smallest lsn whose values are only in memory here; None when nothing is."""
        oldest: int | None = None
        with self._lock:
            for state in self._symbols.values():
                candidates = [b.first_lsn for b in state.blocks]
                if state.buffer is not None and state.buffer.n:
                    candidates.append(state.buffer.first_lsn)
                for lsn in candidates:
                    if oldest is None or lsn < oldest:
                        oldest = lsn
        return oldest

    def view(self, symbol: str) -> SymbolView | None:
        """A snapshot for a query; None for a symbol this tier has never held."""
        with self._lock:
            state = self._symbols.get(symbol)
            if state is None:
                return None
            memory = [b.piece for b in state.blocks]
            if state.buffer is not None and state.buffer.n:
                memory.append(state.buffer.piece())
            return SymbolView(tuple(state.sealed), tuple(memory))

    def symbols(self) -> dict[str, SymbolTotals]:
        with self._lock:
            out: dict[str, SymbolTotals] = {}
            for symbol, state in self._symbols.items():
                sealed_end = state.sealed_end
                starts = [s.header.first_index for s in state.sealed[:1]]
                starts += [b.piece.first_index for b in state.blocks[:1]]
                if state.buffer is not None and state.buffer.n:
                    starts.append(state.buffer.first_index)
                total = state.end
                out[symbol] = SymbolTotals(
                    total, min(starts) if starts else total, sealed_end, len(state.sealed)
                )
            return out

    def total(self, symbol: str) -> int | None:
        """Values ever accepted for `symbol` as far as this tier knows; None if never seen."""
        with self._lock:
            state = self._symbols.get(symbol)
            return None if state is None else state.end

    def load(self, segment: SealedSegment) -> SegmentData:
        """Decompress a sealed segment (a few recently used ones are kept decoded)."""
        with self._lock:
            cached = self._decoded.get(segment.path)
            if cached is not None:
                self._decoded.move_to_end(segment.path)
                return cached
        data = read_segment(segment.path, segment.header, self.cipher)
        with self._lock:
            self._decoded[segment.path] = data
            while len(self._decoded) > _DECODED_CACHE:
                self._decoded.popitem(last=False)
        return data
