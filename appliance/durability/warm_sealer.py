"""Sealing warm segments in a separate, low-priority process that reads the values from the log.

Why a process, and why from the log: compressing and summarizing 1M values costs about 4.5 ms
of CPU, paid on the core that ingests. A thread cannot be demoted (it shares the GIL with the
log's writer: preempted while holding it, it stalls the writer), and handing 8 MB to a process
through a pipe costs the parent more (~12 ms per block, measured) than sealing it. The values
are already in the write-ahead log, which is not retired past an unsealed block
(`WarmTier.oldest_unsealed_lsn`), so the parent sends only the block's coordinates (symbol,
index range, lsn range), its batch marks and a CRC32C of its values; the child, at nice 19,
reads the values from the log's segment files (page cache), checks the CRC, and writes the
segment exactly as the thread would (`build_segment`, `write_atomically`).

The CRC makes the child's answer independent of how it found the values: any mismatch, a
retired or damaged segment, or a dead child raises, and the caller seals the block from memory
on its own thread instead. The child dies with the parent (PR_SET_PDEATHSIG): a kill -9 of the
appliance leaves at most a `*.tmp` file, which the next start deletes.

Encryption at rest: the child needs the data key to read encrypted log records and to write
encrypted segments. It gets the `DataCipher` as an argument of each seal, pickled through the
pool's pipe (never on a command line or in the environment); the child's copy draws its own
random nonce start (see `encryption`). It then decrypts each whole record it needs (the GCM tag
covers the record, so a slice cannot be decrypted alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import crc32c
import numpy as np

from appliance.durability import wal
from appliance.durability.encryption import DataCipher
from appliance.durability.fsutil import fsync_dir, make_private_dir
from appliance.durability.warm_segment import (
    SegmentHeader,
    build_segment,
    segment_name,
    write_atomically,
)

if TYPE_CHECKING:
    from appliance.durability.warm import MemoryPiece

_PR_SET_PDEATHSIG = 1
CHILD_NICE = 19


def values_crc(values: np.ndarray) -> int:
    return crc32c.crc32c(memoryview(np.ascontiguousarray(values, dtype="<f8")).cast("B"))


class LogSealer:
    """The parent's handle: one child process, started at the first seal."""

    def __init__(self, log_dir: Path, cipher: DataCipher | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.cipher = cipher
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.sealed = 0  # segments the child wrote (tests, observability)

    def seal(
        self, directory: Path, symbol: str, piece: MemoryPiece, first_lsn: int, last_lsn: int
    ) -> tuple[SegmentHeader, Path]:
        """Have the child write the segment of the piece's values; raises if it could not."""
        values = piece.values
        crc = values_crc(values)
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_child_init,
                )
            pool = self._pool
        future = pool.submit(
            seal_from_log,
            str(self.log_dir),
            str(directory),
            symbol,
            piece.first_index,
            int(values.shape[0]),
            crc,
            np.ascontiguousarray(piece.mark_index),
            np.ascontiguousarray(piece.mark_ns),
            first_lsn,
            last_lsn,
            self.cipher,
        )
        try:
            header, path = future.result()
        except BaseException:
            self._reset_if_broken(pool)
            raise
        self.sealed += 1
        return header, Path(path)

    def _reset_if_broken(self, pool: ProcessPoolExecutor) -> None:
        """A dead child breaks the pool for good: the next seal starts a new one."""
        if getattr(pool, "_broken", False):
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _child_init() -> None:
    """In the child: lowest CPU priority, and die with the parent."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, CHILD_NICE)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child stops


# --- the child ---------------------------------------------------------------------------------

# Per segment file: (bytes indexed so far, [(lsn, offset, first_index, count, symbol)]). A sealed
# segment is indexed once; the tail is indexed further as it grows.
_Entry = tuple[int, int, int, int, str]
_INDEX: dict[str, tuple[int, list[_Entry]]] = {}
# The child's block buffer, reused from block to block: memory touched once, not per block
# (on the build machine's VM a never-touched page costs ~8 us, ~160 us per 10k values).
_SCRATCH = np.empty(0, dtype="<f8")


def _scratch(count: int) -> np.ndarray:
    global _SCRATCH
    if _SCRATCH.shape[0] < count:
        _SCRATCH = np.empty(count, dtype="<f8")
    return _SCRATCH[:count]


def _index(path: Path) -> list[_Entry]:
    """Record headers of one segment (no CRC: the values' CRC is checked at the end)."""
    key = str(path)
    scanned, entries = _INDEX.get(key, (0, []))
    size = path.stat().st_size
    if size > scanned:
        with open(path, "rb") as handle:
            handle.seek(scanned)
            data = handle.read(size - scanned)
        at = 0
        while at + wal.HEADER_SIZE <= len(data):
            fields = wal.HEADER.unpack_from(data, at)
            length, sym_len, lsn, first, count = (
                fields[1], fields[4], fields[6], fields[7], fields[11],
            )  # fmt: skip
            if length != wal.header_record_size(fields) or at + length > len(data):
                break  # torn, damaged or still being written: indexed up to here
            try:
                symbol = data[at + wal.HEADER_SIZE : at + wal.HEADER_SIZE + sym_len].decode()
            except UnicodeDecodeError:
                break
            entries.append((lsn, scanned + at, first, count, symbol))
            at += length
        scanned += at
        _INDEX[key] = (scanned, entries)
    return entries


def _decrypted(
    handle: BinaryIO, offset: int, symbol: str, count: int, cipher: DataCipher
) -> np.ndarray:
    """The values of the encrypted record at `offset`, authenticated (raises if not)."""
    handle.seek(offset)
    head = handle.read(wal.HEADER_SIZE)
    length = wal.header_record_size(wal.HEADER.unpack(head)) if len(head) == wal.HEADER_SIZE else 0
    data = head + handle.read(max(0, (length or 0) - wal.HEADER_SIZE))
    try:
        record, _ = wal.decode(data, 0, cipher)
    except wal.RecordError as exc:
        raise ValueError(f"log record at offset {offset}: {exc.reason}") from None
    return record.values


def seal_from_log(
    log_dir: str,
    directory: str,
    symbol: str,
    first_index: int,
    count: int,
    crc: int,
    mark_index: np.ndarray,
    mark_ns: np.ndarray,
    first_lsn: int,
    last_lsn: int,
    cipher: DataCipher | None = None,
) -> tuple[SegmentHeader, str]:
    """Child: gather the block's values from the log, check them, write the segment."""
    segments = wal.list_segments(Path(log_dir))
    live = {str(p) for p in segments}
    for gone in [k for k in _INDEX if k not in live]:  # retired segments
        del _INDEX[gone]
    values = _scratch(count)  # nothing keeps it past this call: build_segment copies
    filled = 0
    end_index = first_index + count
    for at, path in enumerate(segments):
        following = segments[at + 1] if at + 1 < len(segments) else None
        if wal.segment_first_lsn(path) > last_lsn:
            break
        if following is not None and wal.segment_first_lsn(following) <= first_lsn:
            continue  # every record of this segment is older than the block
        wanted = [
            e
            for e in _index(path)
            if first_lsn <= e[0] <= last_lsn
            and e[4] == symbol
            and e[2] < end_index
            and e[2] + e[3] > first_index
        ]
        if not wanted:
            continue
        with open(path, "rb") as handle:
            for _, offset, rec_first, rec_count, _ in wanted:
                lo = max(rec_first, first_index)
                hi = min(rec_first + rec_count, end_index)
                target = values[lo - first_index : hi - first_index]
                if cipher is not None:
                    target[:] = _decrypted(handle, offset, symbol, rec_count, cipher)[
                        lo - rec_first : hi - rec_first
                    ]
                else:
                    values_at = offset + wal.values_offset(len(symbol.encode()))
                    handle.seek(values_at + 8 * (lo - rec_first))
                    if handle.readinto(memoryview(target).cast("B")) != 8 * (hi - lo):
                        raise OSError(f"{path}: short read")
                filled += hi - lo
    if filled != count or values_crc(values) != crc:
        raise ValueError(
            f"the log does not hold the block exactly ({filled} of {count} values found)"
        )
    target_dir = Path(directory)
    if not target_dir.is_dir():
        make_private_dir(target_dir)
        fsync_dir(target_dir.parent)
    header, data = build_segment(
        symbol, first_index, values, mark_index, mark_ns, first_lsn, last_lsn, cipher
    )
    path = write_atomically(target_dir, segment_name(first_index), data)
    return header, str(path)
