"""The one writer thread: log, then apply, then ack.

Why one thread owns everything: the order of records in the log must be the order in which
batches reach the store, and the lsn / first_index counters must never be handed out twice.
A single thread that logs, applies and resolves gives all three without locks on the hot path.
It also makes the symbol limit race-free: this thread is the only creator of symbols, so it can
refuse a batch *before* logging it (a refused batch never reaches the log).

Group commit: callers `submit()` and get a `concurrent.futures.Future`. The thread takes every
batch queued at the moment it wakes, encodes them, writes them with one write, then (policy
`always`) one fsync covers the whole group before any of its futures resolves.

Transports hand over a whole poll batch with `submit_group(items, done)`: no future and no
blocked thread per frame; `done(results)` runs once on this thread when the commit covering
every item of the group completed (same moment a future would resolve), and the transport's
loop sends the acks. Within a group, once an item of a publisher fails, the later items of the
same publisher are not applied (they fail too), so a transport never acks a frame that follows
an unapplied one.

Under `interval` the periodic fsync runs on a second thread (`_IntervalSyncer`), so the writer
is not blocked for its duration; the checkpoint's sync and the final one stay on this thread.

Inline commits (`commit()`, and `ingest()`, the shared-memory and RDMA pollers' call): under
`interval` and `never` an ack waits for no fsync, so the calling thread does the whole commit
itself (encode, write, apply, listeners) with no hand-off to this thread, which costs two
thread wake-ups per batch. One commit lock (`_commit_lock`) orders them with this thread's
groups: lsns are assigned, the record written, applied and its listeners run under it, and this
thread takes it around each group's write and apply, around a checkpoint and around the
interval sync's hand-over of the tail. So the log's order is still the order of application and
the counters are never handed out twice. An inline commit that leaves the log dirty (the first
since the last interval sync) or finds a checkpoint due wakes this thread once (`_WAKE`), which
schedules the sync / runs the checkpoint as for its own groups. Under `always` an ack must wait
for an fsync, and one fsync per group is what makes that affordable: `commit()` queues the batch
and waits for the group commit, as before.

Invariants (checked by tests/durability):
- a future resolves (an inline commit returns) with a record only after its bytes are written
  (and, under `always`, fsynced) and the batch is applied to the store;
- lsn order is apply order and listener order, across this thread and inline committers;
- a failed write or fsync truncates the segment back to its last good size, fails the whole
  group with `StorageUnavailableError`, applies nothing and hands back the group's lsns; the
  next submission tries again (the service recovers by itself once space returns);
- listeners run after the store is updated; one that raises is logged, never propagated.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from appliance.durability import tombstones, wal
from appliance.durability.encryption import DataCipher
from appliance.durability.fsutil import make_private_dir, open_private
from appliance.durability.records import BatchRecord
from appliance.durability.tombstones import Tombstone
from appliance.latency import WalTimings
from appliance.store import Store, SymbolLimitError, UnknownSymbolError
from appliance.timestamps import OutOfOrderError, resolve

log = logging.getLogger(__name__)

SyncPolicy = Literal["always", "interval", "never"]


class StorageUnavailableError(Exception):
    """The log could not be written or synced (disk full, file too large, I/O error).

    Nothing of the batch was applied; retrying later is safe.
    """


class RecordListener(Protocol):
    """Told of every record once it is applied (and of every replayed one at recovery)."""

    def on_record(self, record: BatchRecord) -> None: ...


class _Batch:
    """One batch to log: what its record is made of, stamped when it was received."""

    __slots__ = ("clamped", "publisher_id", "received_ns", "sequence", "symbol", "timestamps",
                 "values")  # fmt: skip
    group: _Group | None = None  # only `_GroupRequest`s belong to a transport's group

    def __init__(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int,
        sequence: int,
        timestamps: np.ndarray | None = None,
    ) -> None:
        self.symbol = symbol
        self.values = values
        self.publisher_id = publisher_id
        self.sequence = sequence
        self.timestamps = timestamps
        self.received_ns = time.time_ns()
        self.clamped = 0  # values whose timestamp the commit moved forward (out_of_order clamp)
        self._unresolved()

    def _unresolved(self) -> None:
        """Set the outcome fields of a subclass to 'not resolved yet'."""


class _Request(_Batch):
    """A batch whose caller waits on a future (REST, `submit`)."""

    __slots__ = ("future",)

    def _unresolved(self) -> None:
        self.future: Future[BatchRecord] = Future()

    def succeed(self, record: BatchRecord) -> None:
        self.future.set_result(record)

    def fail(self, exc: BaseException) -> None:
        self.future.set_exception(exc)


# One item of a transport's group: (symbol, values, publisher_id, sequence, timestamps).
GroupItem = tuple[str, np.ndarray, int, int, "np.ndarray | None"]
# Per item: None when applied, else the exception that refused or failed it.
GroupDone = Callable[[list[BaseException | None]], None]


class _Group:
    """A transport's poll batch: one `done` call once every item is resolved."""

    __slots__ = ("done", "results")

    def __init__(self, size: int, done: GroupDone) -> None:
        self.done = done
        # Unresolved until the commit says otherwise: a writer fault never reads as "applied".
        self.results: list[BaseException | None] = [_UNRESOLVED] * size

    def finish(self) -> None:
        try:
            self.done(self.results)
        except Exception:
            log.exception("write-ahead log group completion failed")


class _InlineRequest(_Batch):
    """The batch of an inline commit (`DurableWriter.commit`): the caller reads the outcome."""

    __slots__ = ("error", "record")

    def _unresolved(self) -> None:
        self.record: BatchRecord | None = None
        self.error: BaseException | None = _UNRESOLVED

    def succeed(self, record: BatchRecord) -> None:
        self.record = record
        self.error = None

    def fail(self, exc: BaseException) -> None:
        self.error = exc


class _GroupRequest:
    """One item of a `_Group`; resolves into the group's result list (no future)."""

    __slots__ = ("clamped", "group", "index", "publisher_id", "received_ns", "sequence",
                 "symbol", "timestamps", "values")  # fmt: skip

    def __init__(self, group: _Group, index: int, item: GroupItem, received_ns: int) -> None:
        self.group = group
        self.index = index
        self.symbol, self.values, self.publisher_id, self.sequence, self.timestamps = item
        self.received_ns = received_ns
        self.clamped = 0

    def succeed(self, record: BatchRecord) -> None:
        self.group.results[self.index] = None

    def fail(self, exc: BaseException) -> None:
        self.group.results[self.index] = exc


class _OrderBroken(RuntimeError):
    """An earlier item of the same publisher in the group was not applied."""


def _in(broken: set[tuple[int, int]], request: _GroupRequest | _Request) -> bool:
    return (id(request.group), request.publisher_id) in broken


_UNRESOLVED = RuntimeError("the write-ahead log writer stopped before this batch")


_Item = _Request | _GroupRequest | _InlineRequest


_STOP = object()
_WAKE = object()  # an inline commit asks the writer thread to schedule a sync or checkpoint
IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


def timed_fsync(timings: WalTimings | None, fd: int) -> None:
    """fsync `fd`, recording its duration for GET /metrics when `timings` is given."""
    if timings is None:
        os.fsync(fd)
        return
    started = timings.fsync_started()
    os.fsync(fd)
    timings.fsync_done(started)


class SegmentFile:
    """The open tail segment: appends, truncation back to the last good size, rotation."""

    def __init__(self, directory: Path, segment_bytes: int, sync: SyncPolicy) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.fd: int | None = None
        self.path: Path | None = None
        self.size = 0  # bytes known good (written completely) in the current segment
        self.written_total = 0  # bytes appended by this process, all segments (GET /metrics)

    def open_existing(self, path: Path) -> None:
        """Continue appending to `path` (recovery has verified and trimmed it)."""
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.path = path
        self.size = os.fstat(self.fd).st_size

    def _create(self, first_lsn: int) -> None:
        make_private_dir(self.directory)
        path = self.directory / wal.segment_name(first_lsn)
        fd = open_private(path, os.O_WRONLY | os.O_APPEND)
        try:
            # The new name must survive a crash before any record in it is acknowledged.
            wal.fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        self.close()
        self.fd, self.path, self.size = fd, path, os.fstat(fd).st_size

    def append(self, first_lsn: int, chunks: Sequence[bytes | memoryview]) -> None:
        """Write `chunks` at the end in one write; on error restore the last good size."""
        total = sum(len(c) for c in chunks)
        if self.fd is None or (self.size > 0 and self.size + total > self.segment_bytes):
            if self.fd is not None and self.sync != "never":
                os.fsync(self.fd)  # the sealed segment is complete on disk before the next one
            self._create(first_lsn)
        assert self.fd is not None
        try:
            # One writev per IOV_MAX records (a larger iovec is EINVAL); O_APPEND keeps them
            # contiguous, and any short write fails the whole group (truncated below).
            for at in range(0, len(chunks), IOV_MAX):
                part = chunks[at : at + IOV_MAX]
                expected = sum(len(c) for c in part)
                written = os.writev(self.fd, part)
                if written != expected:  # e.g. the file-size limit reached mid-way
                    raise OSError(errno.ENOSPC, f"short write: {written} of {expected} bytes")
        except OSError:
            self.truncate_to_good()
            raise
        self.size += total
        self.written_total += total

    def fsync(self, timings: WalTimings | None = None) -> None:
        if self.fd is not None:
            timed_fsync(timings, self.fd)

    def truncate_to_good(self) -> None:
        """Drop a torn write: the file ends at the last record written completely."""
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as exc:  # recovery would trim the torn tail anyway
                log.error("cannot truncate write-ahead log", extra={"reason": str(exc)})

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _IntervalSyncer:
    """The `interval` fsync, off the writer thread: the writer hands over a duplicate of the
    tail's descriptor (`kick`) and goes on writing while this thread syncs it. A duplicate, so
    a segment rotated or closed meanwhile never leaves a stale descriptor number here. Kicks
    that arrive during an fsync coalesce into the next one (it covers them all)."""

    def __init__(self, owner: DurableWriter) -> None:
        self._owner = owner
        self._cond = threading.Condition()
        self._pending: int | None = None  # a dup'ed fd to sync next
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="wal-sync", daemon=True)
        self._thread.start()

    def kick(self, fd: int | None) -> None:
        if fd is None:
            return
        try:
            dup = os.dup(fd)
        except OSError as exc:
            log.error("write-ahead log fsync failed", extra={"reason": str(exc)})
            return
        with self._cond:
            stale, self._pending = self._pending, dup
            self._cond.notify()
        if stale is not None:  # not synced yet: the new one covers its writes too
            os.close(stale)

    def stop(self) -> None:
        """Finish the pending fsync, if any, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                fd, self._pending = self._pending, None
                if fd is None:
                    return
            try:
                timed_fsync(self._owner.timings, fd)
                self._owner.fsyncs += 1
            except OSError as exc:  # acknowledged already: logged, as the writer's own sync
                log.error("write-ahead log fsync failed", extra={"reason": str(exc)})
            finally:
                os.close(fd)


class DurableWriter:
    """Owns the write-ahead log tail and the order of every accepted batch.

    Construct it after recovery with the restored counters (`next_lsn`, `totals`), then
    `start()`. `submit()` is thread-safe and never blocks; `commit()` and `ingest()` are the
    blocking forms (`ingest`: the same contract as `Store.ingest`) for transport threads, inline
    on the calling thread under `interval` / `never`.
    """

    def __init__(
        self,
        store: Store,
        directory: Path,
        *,
        sync: SyncPolicy = "interval",
        interval_ms: int = 5,
        segment_bytes: int = 64 << 20,
        next_lsn: int = 1,
        totals: dict[str, int] | None = None,
        tail: Path | None = None,
        checkpointer: Any = None,
        lock_fd: int | None = None,
        timings: WalTimings | None = None,
        retired_totals: dict[str, int] | None = None,
        cipher: DataCipher | None = None,
    ) -> None:
        self.store = store
        # AES-256-GCM for every record (None: plain); one call per record, on the thread that
        # commits it (this one, or an inline committer), never per value.
        self._cipher = cipher
        self.sync = sync
        self.interval_s = interval_ms / 1000.0
        self._segment = SegmentFile(directory, segment_bytes, sync)
        if tail is not None:
            self._segment.open_existing(tail)
        self._next_lsn = next_lsn
        # Per symbol: values ever accepted (evicted ones included); its keys are exactly the
        # store's symbols, so the symbol limit is checked here, before logging.
        self._totals: dict[str, int] = dict(totals or {})
        # Deleted symbols' totals (appliance.durability.tombstones): a batch that brings one
        # back continues its index numbering instead of starting again at 0.
        self._retired_totals: dict[str, int] = dict(retired_totals or {})
        self._data_dir = Path(directory).parent  # where the tombstones file lives
        self._listeners: list[RecordListener] = []
        # appliance.durability.checkpoint.Checkpointer (or None): asked `due()` between groups,
        # where the store is exactly the log up to next_lsn - 1.
        self._checkpointer = checkpointer
        self._lock_fd = lock_fd  # the directory lock (wal.lock_dir), released by close()
        self._queue: queue.SimpleQueue[_Request | list[_GroupRequest] | object] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="wal-writer", daemon=True)
        self._started = False
        self._closed = False
        # Orders this thread's groups with inline commits (see the module docstring). Under it:
        # the segment, _next_lsn, _totals, the store's appends, listeners and the fields below.
        self._commit_lock = threading.Lock()
        self._inline = sync != "always"
        self._dirty = False  # written but not yet fsynced (policy `interval`)
        self._last_sync = time.monotonic()
        self.fsyncs = 0  # counters for /ingest-style reporting and tests
        self.groups = 0
        self.inline_commits = 0
        self.recovery: Any = None  # the RecoveryResult this writer continues from, if any
        # GET /metrics: apply latency, fsync durations, commit lag (None: not recorded at all).
        self.timings = timings

    # --- public API ----------------------------------------------------------------------------

    def add_listener(self, listener: RecordListener) -> None:
        """Register before `start()` (or accept that records already applied are not seen)."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def submit(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
    ) -> Future[BatchRecord]:
        """Queue a validated batch; the future resolves with its record once logged and applied.

        It fails with `SymbolLimitError` or `OutOfOrderError` (never logged),
        `StorageUnavailableError` (nothing applied) or `RuntimeError` when the writer is closed.
        """
        request = _Request(symbol, values, publisher_id, sequence, timestamps)
        if self._closed:
            request.future.set_exception(RuntimeError("the write-ahead log is closed"))
        else:
            self._queue.put(request)
        return request.future

    def submit_group(self, items: list[GroupItem], done: GroupDone) -> None:
        """Queue a transport's validated batches as one unit; never blocks.

        `done(results)` is called once, on the writer thread (or here, when the writer is
        closed), with one entry per item: None when it is logged (fsynced under `always`) and
        applied, else the exception (as `submit`'s futures would carry). It must not block.
        """
        group = _Group(len(items), done)
        if self._closed:
            error = RuntimeError("the write-ahead log is closed")
            group.results = [error] * len(items)
            group.finish()
            return
        now = time.time_ns()
        self._queue.put([_GroupRequest(group, i, item, now) for i, item in enumerate(items)])

    def commit(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
    ) -> BatchRecord:
        """Log and apply a validated batch before returning its record (blocking).

        Under `interval` and `never` the calling thread commits it inline: encode, write,
        apply, listeners, under the commit lock that the writer thread's groups also take (no
        thread hand-off). Under `always` (and before `start()`) it is `submit().result()`: the
        group commit's fsync covers it before it returns. Raises what `submit`'s future would:
        `SymbolLimitError`, `StorageUnavailableError` (nothing applied; retry later),
        `RuntimeError` when the writer is closed.
        """
        if not self._inline or not self._started:
            return self.submit(symbol, values, publisher_id, sequence, timestamps).result()
        request = _InlineRequest(symbol, values, publisher_id, sequence, timestamps)
        wake = False
        with self._commit_lock:
            if self._closed:
                raise RuntimeError("the write-ahead log is closed")
            if self._commit_one(request):
                self.inline_commits += 1
                if self.sync == "interval" and not self._dirty:
                    self._dirty = True
                    wake = True  # the writer thread schedules the interval fsync
                checkpointer = self._checkpointer
                if checkpointer is not None and checkpointer.due():
                    wake = True  # the writer thread takes it (under this lock)
        if wake:
            self._queue.put(_WAKE)
        if request.error is not None:
            raise request.error
        assert request.record is not None
        return request.record

    def ingest(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
    ) -> int:
        """Blocking `commit`: the drop-in for `Store.ingest` on transport threads."""
        return int(self.commit(symbol, values, publisher_id, sequence, timestamps).values.shape[0])

    def __contains__(self, symbol: object) -> bool:
        return symbol in self.store

    def delete_symbol(self, symbol: str) -> tuple[int, Tombstone]:
        """Drop `symbol` from the hot tier and free its slot, durably: returns (values dropped,
        its tombstone). Raises UnknownSymbolError; OSError if the tombstone cannot be written
        (then nothing changed).

        Under the commit lock: every batch logged so far is applied, none is half-way, so
        "batches up to lsn N are gone" is exactly what the store drops; a batch logged later
        brings the symbol back (and the replay does the same).
        """
        with self._commit_lock:
            total = self._totals.get(symbol)
            if total is None:
                raise UnknownSymbolError(symbol)
            tombstone = Tombstone(self._next_lsn - 1, total)
            tombstones.record(self._data_dir, symbol, tombstone)
            dropped = self.store.delete(symbol)
            del self._totals[symbol]
            self._retired_totals[symbol] = total
        return dropped, tombstone

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish everything queued, sync (unless `never`) and close the segment.

        An inline commit in progress completes first; any later one raises `RuntimeError`."""
        with self._commit_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._fail_leftovers()
        else:  # never started
            self._segment.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _fail_leftovers(self) -> None:
        """Anything queued after the stop (a submit racing close) is failed, never left hanging."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, list) and item:
                item[0].group.finish()  # every result is still _UNRESOLVED
            elif isinstance(item, _Request):
                item.fail(RuntimeError("the write-ahead log is closed"))

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def bytes_written(self) -> int:
        """Bytes this process appended to the log (a failed group's dropped bytes excluded)."""
        return self._segment.written_total

    @property
    def checkpointer(self) -> Any:
        """The `Checkpointer` (or None), for GET /metrics' checkpoint age; read-only use."""
        return self._checkpointer

    def total(self, symbol: str) -> int:
        return self._totals.get(symbol, 0)

    # --- the thread ----------------------------------------------------------------------------

    def _take_group(self, timeout: float | None) -> tuple[list[_Item], bool, bool]:
        """Everything queued now (waiting up to `timeout` for the first); whether to stop; and
        whether an inline commit asked for the housekeeping (`_WAKE`)."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], False, False
        group: list[_Item] = []
        stopping = woken = False
        while True:
            if item is _STOP:
                stopping = True
            elif item is _WAKE:
                woken = True
            elif isinstance(item, list):  # a transport's group: its items, in order
                group.extend(item)
            else:
                group.append(item)  # type: ignore[arg-type]
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return group, stopping, woken

    def _run(self) -> None:
        syncer = _IntervalSyncer(self) if self.sync == "interval" else None
        try:
            self._loop(syncer)
        finally:
            with self._commit_lock:
                self._closed = True  # no inline commit after this (also if the loop failed)
            if syncer is not None:
                syncer.stop()  # before the final fsync and close in _shutdown
            with self._commit_lock:
                self._shutdown()

    def _loop(self, syncer: _IntervalSyncer | None) -> None:
        stopping = False
        while not stopping:
            timeout = None
            if self._dirty:  # wake up in time for the interval fsync even if nothing arrives
                timeout = max(0.0, self._last_sync + self.interval_s - time.monotonic())
            group, stopping, woken = self._take_group(timeout)
            if group:
                self._commit(group)
            with self._commit_lock:  # the store is exactly the log up to _next_lsn - 1 here
                self._housekeeping(syncer, stopping, bool(group) or woken)

    def _housekeeping(
        self, syncer: _IntervalSyncer | None, stopping: bool, committed: bool
    ) -> None:
        """Between groups, under the commit lock: a due checkpoint (after a group or inline
        commits), the interval fsync."""
        checkpointer = self._checkpointer
        if committed and checkpointer is not None and checkpointer.due():
            # A checkpoint must never be ahead of the log on disk: after a power loss the hot
            # tier would hold records that the log (and so the warm tier) lost.
            if self._dirty:
                self._dirty = not self._sync_quietly()
                self._last_sync = time.monotonic()
            if not self._dirty:
                checkpointer.run(self.store, self._next_lsn - 1, self._totals)
        if self._dirty and (stopping or time.monotonic() - self._last_sync >= self.interval_s):
            if stopping or syncer is None:
                self._sync_quietly()
            else:  # the syncer thread fsyncs while this one (and inline commits) go on writing
                syncer.kick(self._segment.fd)
            self._dirty = False
            self._last_sync = time.monotonic()

    def _shutdown(self) -> None:
        """Final fsync, close, final checkpoint (under the commit lock)."""
        try:
            if self.sync != "never":
                self._segment.fsync()
        except OSError as exc:
            log.error("final fsync of the write-ahead log failed", extra={"reason": str(exc)})
        self._segment.close()
        if self._checkpointer is not None:
            try:  # the final checkpoint: the next start replays nothing
                self._checkpointer.close(self.store, self._next_lsn - 1, self._totals)
            except Exception:
                log.exception("final checkpoint failed")
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: another process may open the log
            self._lock_fd = None

    def _sync_quietly(self) -> bool:
        """Interval fsync: the batches are already acknowledged, so a failure is only logged.
        Returns whether the log is now on disk."""
        try:
            self._segment.fsync(self.timings)
            self.fsyncs += 1
        except OSError as exc:
            log.error("write-ahead log fsync failed", extra={"reason": str(exc)})
            return False
        return True

    def _commit(self, group: list[_Item]) -> bool:
        """Log, apply and resolve one group; return whether anything was written."""
        try:
            with self._commit_lock:
                wrote = self._commit_items(group)
                if wrote and self.sync == "interval":
                    self._dirty = True
                return wrote
        finally:
            # Every item is resolved by now: each transport group is told once.
            groups = {id(r.group): r.group for r in group if r.group is not None}
            for done in groups.values():
                done.finish()

    def _commit_items(self, group: list[_Item]) -> bool:
        """Encode, write, apply, notify and resolve (the caller holds the commit lock)."""
        broken: set[tuple[int, int]] = set()  # (id of the group, publisher) no longer in order
        accepted, chunks, lsn, new_totals = self._encode(group, broken)
        if not accepted or not self._write(accepted, chunks):
            return False
        self.groups += 1
        self._next_lsn = lsn
        self._totals.update(new_totals)
        if self._retired_totals:
            for symbol in new_totals:
                self._retired_totals.pop(symbol, None)
        for request, record in accepted:
            if request.group is not None and broken and _in(broken, request):
                # Logged, but applying it would put it after an unapplied frame of its
                # publisher; it fails like that one (and replays from the log like it).
                request.fail(_OrderBroken("an earlier frame of this publisher failed"))
                continue
            if not self._apply(request, record) and request.group is not None:
                broken.add((id(request.group), request.publisher_id))
        if self.timings is not None:  # once per group: its oldest batch waited longest
            self.timings.committed(accepted[0][0].received_ns)
        return True

    def _apply(self, request: _Item, record: BatchRecord) -> bool:
        """Apply a logged record, tell the listeners and the caller; False on an engine fault,
        which is logged and reported to this caller only (the record replays from the log)."""
        try:
            self.store.ingest(
                record.symbol, record.values, 0, 0, record.timestamps, record.received_ns
            )
            if request.clamped:
                self.store.count_clamped(record.symbol, request.clamped)
        except Exception as exc:
            log.exception("applying a logged batch failed", extra={"lsn": record.lsn})
            request.fail(exc)
            return False
        self._notify(record)
        request.succeed(record)
        return True

    def _resolve(self, request: _Item, newest: int | None) -> int | None:
        """The timestamps to log for `request` (None: its receive time) and the symbol's newest
        timestamp after it, or fail the request with OutOfOrderError (nothing logged)."""
        try:
            resolved = resolve(
                request.timestamps, request.received_ns, newest, self.store.clamp_out_of_order
            )
        except OutOfOrderError as exc:
            request.fail(exc)
            return None
        request.clamped = resolved.clamped
        request.timestamps = resolved.timestamps
        return resolved.newest

    def _newest(self, symbol: str) -> int | None:
        """The symbol's newest timestamp as applied (the store is the log up to now)."""
        return self.store.newest_timestamp(symbol) if symbol in self.store else None

    @staticmethod
    def _record(request: _Item, lsn: int, total: int) -> BatchRecord:
        return BatchRecord(
            lsn,
            request.symbol,
            total,
            request.received_ns,
            request.publisher_id,
            request.sequence,
            request.values,
            request.timestamps,
        )

    def _commit_one(self, request: _InlineRequest) -> bool:
        """`_commit_items` for the one batch of an inline commit, without a group's
        bookkeeping (the hot path of a ring's frame); the caller holds the commit lock."""
        symbol = request.symbol
        total = self._totals.get(symbol)
        if total is None:  # a new symbol: the limit is checked before anything is logged
            known, limit = len(self._totals), self.store.max_symbols
            if known >= limit:
                request.fail(SymbolLimitError.at(known, limit))
                return False
            total = self._retired_totals.get(symbol, 0)
        if self._resolve(request, self._newest(symbol)) is None:
            return False
        record = self._record(request, self._next_lsn, total)
        try:
            chunks = wal.encode_parts(record, self._cipher)
        except ValueError as exc:  # a symbol the validators should have refused
            request.fail(exc)
            return False
        if not self._write([(request, record)], chunks):
            return False
        self.groups += 1
        self._next_lsn = record.lsn + 1
        self._totals[symbol] = total + int(request.values.shape[0])
        if self._retired_totals:
            self._retired_totals.pop(symbol, None)
        self._apply(request, record)
        if self.timings is not None:
            self.timings.committed(request.received_ns)
        return True

    def _encode(
        self, group: list[_Item], broken: set[tuple[int, int]]
    ) -> tuple[list[tuple[_Item, BatchRecord]], list[bytes | memoryview], int, dict[str, int]]:
        """Records for the items that may be logged (the symbol limit is checked here), their
        bytes, the next lsn after them and the new per-symbol totals."""
        accepted: list[tuple[_Item, BatchRecord]] = []
        chunks: list[bytes | memoryview] = []
        lsn = self._next_lsn
        new_totals: dict[str, int] = {}
        newest: dict[str, int] = {}  # per symbol, after the group's items accepted so far
        limit = self.store.max_symbols
        known = len(self._totals)
        for request in group:
            if request.group is not None and broken and _in(broken, request):
                request.fail(_OrderBroken("an earlier frame of this publisher failed"))
                continue
            symbol = request.symbol
            total = new_totals.get(symbol, self._totals.get(symbol))
            is_new = total is None
            if is_new:
                if known >= limit:
                    request.fail(SymbolLimitError.at(known, limit))
                    continue
                total = self._retired_totals.get(symbol, 0)
            after = self._resolve(request, newest[symbol] if symbol in newest else
                                  self._newest(symbol))  # fmt: skip
            if after is None:  # refused for order: final, like the symbol limit (no gap after it)
                continue
            record = self._record(request, lsn, total)
            try:
                chunks.extend(wal.encode_parts(record, self._cipher))
            except ValueError as exc:  # a symbol the validators should have refused
                request.fail(exc)
                if request.group is not None:
                    broken.add((id(request.group), request.publisher_id))
                continue
            newest[symbol] = after
            known += is_new
            new_totals[symbol] = total + int(request.values.shape[0])
            accepted.append((request, record))
            lsn += 1
        return accepted, chunks, lsn, new_totals

    def _write(
        self,
        accepted: list[tuple[_Item, BatchRecord]],
        chunks: Sequence[bytes | memoryview],
    ) -> bool:
        """One write (and under `always` one fsync) for the group; on failure fail it all."""
        written = False
        try:
            self._segment.append(accepted[0][1].lsn, chunks)
            written = True
            if self.sync == "always":
                # One fsync covers the whole group: this is the group commit.
                self._segment.fsync(self.timings)
                self.fsyncs += 1
        except OSError as exc:
            # Nothing of the group is kept or applied; its lsns are handed out again later.
            if written:  # the fsync failed: its pages may or may not reach the disk, drop them
                dropped = sum(len(c) for c in chunks)
                self._segment.size -= dropped
                self._segment.written_total -= dropped
                self._segment.truncate_to_good()
            log.error(
                "write-ahead log unavailable",
                extra={
                    "reason": str(exc),
                    "batches": len(accepted),
                    "path": str(self._segment.path),
                },
            )
            error = StorageUnavailableError(
                f"cannot write the write-ahead log: {exc.strerror or exc}; nothing was applied, "
                "retry later"
            )
            for request, _ in accepted:
                request.fail(error)
            return False
        return True

    def _notify(self, record: BatchRecord) -> None:
        for listener in self._listeners:
            try:
                listener.on_record(record)
            except Exception:
                log.exception("write-ahead log listener failed", extra={"lsn": record.lsn})
