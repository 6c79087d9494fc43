"""Tick timestamps: int64 ns since the epoch per value, never going backwards per symbol.

Why one module: the order rule is applied in two places that must agree to the bit, the store
(no write-ahead log) and the log's writer (which must refuse a batch *before* logging it, and
logs the timestamps it resolved, so a replay applies exactly what was acknowledged). Both call
`resolve`; the hot tier's `TimeIndex` and the warm tier keep the result as marks.

A batch without timestamps gets its receive time, moved forward to the symbol's newest timestamp
when the wall clock is behind it (a batch without times is never refused for order). A batch with
timestamps must be non-decreasing and start at or after the newest timestamp; otherwise it is
refused whole (`out_of_order = "reject"`) or every value that goes back is stored at the
previous timestamp and counted (`"clamp"`).

Marks: a symbol's timestamps are a non-decreasing step function of the value index, kept as
(first index of a run, its time) pairs. A batch without timestamps adds at most one mark, so the
default path stores O(batches), not O(values); a batch of distinct event times adds one mark per
value. `searchsorted` over the marks maps a time to an index in O(log marks).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import NamedTuple

import numpy as np

MAX_TIMESTAMP_NS = (1 << 63) - 1
_I8 = np.dtype(np.int64)
_EMPTY = np.empty(0, _I8)
CHUNK_MARKS = 1 << 16  # marks per chunk of a TimeIndex: 1 MiB of indexes and times


class OutOfOrderError(ValueError):
    """A batch whose timestamps go backwards (against the symbol's newest, or within itself)."""


class Resolved(NamedTuple):
    """A batch's timestamps as stored: `timestamps` (int64, non-decreasing, >= the symbol's
    previous newest), or None when every value has the one time `stamp`. `newest` is the
    symbol's newest timestamp after the batch; `clamped` counts values moved forward;
    `distinct` says every step within `timestamps` is > 0 (one mark per value, no search for
    runs)."""

    timestamps: np.ndarray | None
    stamp: int
    newest: int
    clamped: int
    distinct: bool = False


def check_timestamps(timestamps: np.ndarray, count: int) -> np.ndarray:
    """A decoder's check: 1-D int64 (little-endian native), `count` long, every value in
    [0, 2**63 - 1]. Returns the array; raises ValueError naming the problem."""
    array = np.asarray(timestamps)
    if array.ndim != 1 or array.shape[0] != count:
        raise ValueError(f"`timestamps` has {array.shape[0] if array.ndim == 1 else '?'} items, "
                         f"`values` has {count}: send one timestamp per value")  # fmt: skip
    if array.dtype != _I8:
        if array.dtype.kind not in "iu":
            raise ValueError("timestamps must be integers (ns since the epoch)")
        if array.dtype.kind == "u" and count and int(array.max()) > MAX_TIMESTAMP_NS:
            raise ValueError("a timestamp is above 2**63 - 1 ns")
        array = array.astype(_I8)
    if count and int(array.min()) < 0:
        index = int(np.flatnonzero(array < 0)[0])
        raise ValueError(f"timestamps[{index}] is negative: times are ns since the epoch")
    return np.ascontiguousarray(array)


def resolve(
    timestamps: np.ndarray | None, received_ns: int, newest: int | None, clamp: bool
) -> Resolved:
    """The timestamps to store for a batch, given the symbol's `newest` (None: no value yet).

    Raises OutOfOrderError (the message names the first value that goes back) unless `clamp`.
    Hot path (no timestamps): two integer comparisons.
    """
    if timestamps is None:
        stamp = received_ns if newest is None or received_ns > newest else newest
        return Resolved(None, stamp, stamp, 0)
    first = int(timestamps[0])
    # Both in [0, 2**63 - 1]: a step cannot overflow int64. One pass gives both answers.
    lowest_step = int((timestamps[1:] - timestamps[:-1]).min()) if timestamps.shape[0] > 1 else 1
    back_within = lowest_step < 0
    if not back_within and (newest is None or first >= newest):
        return Resolved(timestamps, first, int(timestamps[-1]), 0, lowest_step > 0)
    if not clamp:
        if newest is not None and first < newest:
            raise OutOfOrderError(
                f"timestamps[0] = {first} is before the symbol's newest timestamp {newest}; "
                'timestamps of a symbol never go backwards (store.out_of_order = "reject")'
            )
        index = int(np.flatnonzero(timestamps[1:] < timestamps[:-1])[0]) + 1
        raise OutOfOrderError(
            f"timestamps[{index}] = {int(timestamps[index])} is before timestamps[{index - 1}] "
            f"= {int(timestamps[index - 1])}; timestamps never go backwards"
        )
    floor = np.maximum.accumulate(timestamps)
    if newest is not None:
        np.maximum(floor, newest, out=floor)
    clamped = int(np.count_nonzero(floor != timestamps))
    return Resolved(floor, int(floor[0]), int(floor[-1]), clamped)


def run_starts(timestamps: np.ndarray, previous: int | None) -> np.ndarray:
    """Offsets within a resolved batch where a new run of equal times begins (a run continuing
    the previous mark's time adds none)."""
    changes = np.flatnonzero(timestamps[1:] != timestamps[:-1]) + 1
    if previous is None or int(timestamps[0]) != previous:
        return np.concatenate((np.zeros(1, np.int64), changes))
    return changes


class TimeIndex:
    """The hot tier's marks of one symbol; the store calls it under the symbol's lock.

    Indexes are the store's own count of values appended to this series (`end` after the
    newest); the values below `end - len(series)` were evicted, and marks that only cover them
    are dropped by `evict_to`.

    Why fixed-size chunks that are recycled, not one growing array: a batch of distinct event
    times adds a mark per value, and a growing array rewrites every mark into fresh memory at
    each doubling; on this class of VM a never-touched 4 KiB page costs ~8 us to fault in, which
    made a 10k-value timed batch 20x dearer than its values' append. Chunks dropped by eviction
    are kept for reuse (as the engine keeps its pages), so a long-running symbol allocates
    nothing after its first retention cycle. A time is found by bisecting the chunks' first
    times (a Python list), then `searchsorted` inside one chunk: O(log marks).
    """

    __slots__ = ("_chunks", "_fill", "_first_index", "_first_ns", "_head", "_spare",
                 "chunk_marks", "end", "newest")  # fmt: skip

    def __init__(self, chunk_marks: int = CHUNK_MARKS) -> None:
        self.chunk_marks = chunk_marks
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (first value index, time)
        self._first_index: list[int] = []  # of each chunk's first stored mark (bisect keys)
        self._first_ns: list[int] = []
        self._head = 0  # first live mark of chunks[0]
        self._fill = 0  # marks written in chunks[-1]
        self._spare: list[tuple[np.ndarray, np.ndarray]] = []
        self.end = 0
        self.newest: int | None = None  # the newest timestamp, a Python int (hot path)

    def append(self, count: int, resolved: Resolved) -> None:
        """Record the marks of a resolved batch of `count` values appended at `end`."""
        if resolved.timestamps is None:
            if resolved.stamp != self.newest:  # the same time: the run goes on
                self._put(self.end, resolved.stamp)
        else:
            times = resolved.timestamps
            if times.shape[0] == 1 or resolved.distinct:  # no runs to find: a mark per value
                skip = int(times[0]) == self.newest  # continues the previous run
                if times.shape[0] == 1:
                    if not skip:
                        self._put(self.end, int(times[0]))
                else:
                    self._put_many(np.arange(self.end + skip, self.end + count), times[skip:])
            else:
                starts = run_starts(times, self.newest)
                if starts.shape[0]:
                    self._put_many(starts + self.end, times[starts])
        self.newest = resolved.newest
        self.end += count

    def stamp(self, count: int, received_ns: int) -> None:
        """`append` of a batch without timestamps: every value at max(received_ns, newest)."""
        newest = self.newest
        if newest is None or received_ns > newest:
            self._put(self.end, received_ns)
            self.newest = received_ns
        self.end += count

    def _next_chunk(self, index: int, ns: int) -> tuple[np.ndarray, np.ndarray]:
        size = self.chunk_marks
        chunk = self._spare.pop() if self._spare else (np.empty(size, _I8), np.empty(size, _I8))
        self._chunks.append(chunk)
        self._first_index.append(index)
        self._first_ns.append(ns)
        self._fill = 0
        return chunk

    def _put(self, index: int, ns: int) -> None:
        fill = self._fill
        if not self._chunks or fill == self.chunk_marks:
            chunk, fill = self._next_chunk(index, ns), 0
        else:
            chunk = self._chunks[-1]
        chunk[0][fill] = index
        chunk[1][fill] = ns
        self._fill = fill + 1

    def _put_many(self, index: np.ndarray, ns: np.ndarray) -> None:
        done, total, size = 0, int(index.shape[0]), self.chunk_marks
        while done < total:
            fill = self._fill
            if not self._chunks or fill == size:
                chunk, fill = self._next_chunk(int(index[done]), int(ns[done])), 0
            else:
                chunk = self._chunks[-1]
            take = min(size - fill, total - done)
            chunk[0][fill : fill + take] = index[done : done + take]
            chunk[1][fill : fill + take] = ns[done : done + take]
            self._fill = fill + take
            done += take

    def _span(self, c: int) -> tuple[int, int]:
        """The live positions [lo, hi) of chunk `c`."""
        lo = self._head if c == 0 else 0
        hi = self._fill if c == len(self._chunks) - 1 else self.chunk_marks
        return lo, hi

    def evict_to(self, start: int) -> None:
        """Forget marks that only cover values below `start` (the oldest value still held)."""
        c = bisect_right(self._first_index, start) - 1  # the chunk holding start's mark
        if c < 0:
            return
        lo, hi = self._span(c)
        at = int(np.searchsorted(self._chunks[c][0][lo:hi], start, side="right")) - 1
        if c:
            self._spare.extend(self._chunks[:c])  # kept for the regrowth, never freed
            del self._chunks[:c], self._first_index[:c], self._first_ns[:c]
        self._head = lo + max(at, 0)

    def count_since(self, cutoff_ns: int, start: int) -> int:
        """How many held values (index >= `start`) have a timestamp >= `cutoff_ns`."""
        c = bisect_left(self._first_ns, cutoff_ns)  # chunks before c start below the cutoff
        if c:
            lo, hi = self._span(c - 1)
            index, ns = self._chunks[c - 1]
            at = lo + int(np.searchsorted(ns[lo:hi], cutoff_ns, side="left"))
            if at < hi:
                return self.end - max(int(index[at]), start)
        if c == len(self._chunks):
            return 0
        first = self._chunks[0][0][self._head] if c == 0 else self._first_index[c]
        return self.end - max(int(first), start)

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [(chunk, *self._span(c)) for c, chunk in enumerate(self._chunks)]
        index = np.concatenate([chunk[0][lo:hi] for chunk, lo, hi in parts] or [_EMPTY])
        ns = np.concatenate([chunk[1][lo:hi] for chunk, lo, hi in parts] or [_EMPTY])
        return index, ns

    def marks(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the marks covering the values from `start`, indexes relative to `start`
        (the first mark moved up to 0): what a checkpoint saves beside the hot values."""
        index, ns = self._live()
        keep = max(int(np.searchsorted(index, start, side="right")) - 1, 0)
        index, ns = index[keep:] - start, ns[keep:]
        if index.shape[0]:
            index[0] = max(int(index[0]), 0)
        return index, ns

    def restore(self, index: np.ndarray, ns: np.ndarray, count: int) -> None:
        """Replace the marks with a checkpoint's (relative to the first of `count` values)."""
        self._spare.extend(self._chunks)
        self._chunks, self._first_index, self._first_ns = [], [], []
        self._head = self._fill = 0
        self._put_many(np.asarray(index, _I8), np.asarray(ns, _I8))
        self.end = count
        self.newest = int(ns[-1]) if len(ns) else None
