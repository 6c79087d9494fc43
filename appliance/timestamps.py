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

from typing import NamedTuple

import numpy as np

MAX_TIMESTAMP_NS = (1 << 63) - 1
_I8 = np.dtype(np.int64)
_INITIAL_MARKS = 16


class OutOfOrderError(ValueError):
    """A batch whose timestamps go backwards (against the symbol's newest, or within itself)."""


class Resolved(NamedTuple):
    """A batch's timestamps as stored: `timestamps` (int64, non-decreasing, >= the symbol's
    previous newest), or None when every value has the one time `stamp`. `newest` is the
    symbol's newest timestamp after the batch; `clamped` counts values moved forward."""

    timestamps: np.ndarray | None
    stamp: int
    newest: int
    clamped: int


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
    back_within = timestamps.shape[0] > 1 and bool((timestamps[1:] < timestamps[:-1]).any())
    if not back_within and (newest is None or first >= newest):
        return Resolved(timestamps, first, int(timestamps[-1]), 0)
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
    are dropped lazily (a head offset, compacted when it passes half the array).
    """

    __slots__ = ("_head", "_index", "_n", "_ns", "end", "newest")

    def __init__(self) -> None:
        self._index = np.empty(_INITIAL_MARKS, _I8)
        self._ns = np.empty(_INITIAL_MARKS, _I8)
        self._head = 0  # first live mark
        self._n = 0  # marks held (live ones are [_head, _n))
        self.end = 0
        self.newest: int | None = None  # the newest timestamp, a Python int (hot path)

    def append(self, count: int, resolved: Resolved) -> None:
        """Record the marks of a resolved batch of `count` values appended at `end`."""
        n = self._n
        if resolved.timestamps is None:
            if resolved.stamp != self.newest:  # the same time: the run goes on
                if n == self._index.shape[0]:
                    self._grow(1)
                    n = self._n
                self._index[n] = self.end
                self._ns[n] = resolved.stamp
                self._n = n + 1
        else:
            times = resolved.timestamps
            starts = run_starts(times, self.newest)
            k = starts.shape[0]
            if k:
                if n + k > self._index.shape[0]:
                    self._grow(k)
                    n = self._n
                self._index[n : n + k] = starts + self.end
                self._ns[n : n + k] = times[starts]
                self._n = n + k
        self.newest = resolved.newest
        self.end += count

    def _grow(self, extra: int) -> None:
        live = self._n - self._head
        size = max(_INITIAL_MARKS, 2 * (live + extra))
        index, ns = np.empty(size, _I8), np.empty(size, _I8)
        index[:live] = self._index[self._head : self._n]
        ns[:live] = self._ns[self._head : self._n]
        self._index, self._ns, self._head, self._n = index, ns, 0, live

    def evict_to(self, start: int) -> None:
        """Forget marks that only cover values below `start` (the oldest value still held)."""
        if self._n - self._head < 2 or self._index[self._head + 1] > start:
            return
        live = self._index[self._head : self._n]
        self._head += int(np.searchsorted(live, start, side="right")) - 1
        if self._head > _INITIAL_MARKS and 2 * self._head > self._n:
            self._grow(0)

    def count_since(self, cutoff_ns: int, start: int) -> int:
        """How many held values (index >= `start`) have a timestamp >= `cutoff_ns`."""
        live_ns = self._ns[self._head : self._n]
        run = int(np.searchsorted(live_ns, cutoff_ns, side="left"))
        if run == live_ns.shape[0]:
            return 0
        first = max(int(self._index[self._head + run]), start)
        return self.end - first

    def marks(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the marks covering the values from `start`, indexes relative to `start`
        (the first mark moved up to 0): what a checkpoint saves beside the hot values."""
        index = self._index[self._head : self._n].copy()
        ns = self._ns[self._head : self._n].copy()
        keep = int(np.searchsorted(index, start, side="right")) - 1
        index, ns = index[max(keep, 0) :], ns[max(keep, 0) :]
        index -= start
        if index.shape[0]:
            index[0] = max(int(index[0]), 0)
        return index, ns

    def restore(self, index: np.ndarray, ns: np.ndarray, count: int) -> None:
        """Replace the marks with a checkpoint's (relative to the first of `count` values)."""
        self._index = np.array(index, _I8, copy=True)
        self._ns = np.array(ns, _I8, copy=True)
        self._head, self._n = 0, int(self._index.shape[0])
        self._grow(0)  # room to append
        self.end = count
        self.newest = int(self._ns[self._n - 1]) if self._n else None
