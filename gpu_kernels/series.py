"""The GPU series: the numpy engine's paged pyramid, with its pages in device memory.

Same layout, invariants and retention as `fallback.series.SegmentTreeSeries` (read its module
docstring first); what differs is where the work runs and when:

- Coalescing: an append that fits in the series' host buffer of `coalesce_values` (and evicts
  nothing) only copies into it; values reach the device when the buffer would overflow, when
  an append evicts, or before anything reads the device (a query, `tail`). A tick is then a
  host copy, and a thousand ticks are one upload and one set of launches.
- A device sync is: copies of the pending values (and of a large batch) through the device's
  pinned staging buffers, then `summarize_blocks` over every block they complete and one
  `merge_groups` per level above. Kernels read pages through the series' directory (see
  segment_tree.cu), so one launch covers any number of pages.
- Queries are `window_stats`, one thread per query: `stats` is a batch of one, and the
  engine's `stats_many` answers a whole batch over many series in one launch.
- `last` is kept on the host as a Python float: no device read for it.

Device memory is allocated as values arrive: `starting_capacity` is not pre-allocated (unlike
host pages, device memory is committed when allocated). Every method runs with the engine's
lock held, which serializes the device's stream and staging buffers between symbols.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine_core.contract import (
    STATS_AVG,
    STATS_COLUMNS,
    STATS_COUNT,
    STATS_LAST,
    STATS_MAX,
    STATS_MIN,
    STATS_VAR,
    RetentionPolicy,
    WindowStats,
)
from engine_core.layout import Geometry, PagedLevel
from gpu_kernels.device import Device

_HEADER = 3  # directory: levels, block, fanout
_LEVEL_FIELDS = 4  # per level: span, log2(rows_per_page), first_page, table offset


class GpuSeries:
    """A bounded series whose pyramid lives on a GPU; answers match `SegmentTreeSeries`."""

    def __init__(
        self,
        retention: RetentionPolicy,
        geometry: Geometry,
        device: Device,
        lock: threading.Lock,
        coalesce_values: int,
    ) -> None:
        self.retention = retention
        self.geometry = geometry
        self._device = device
        self._lock = lock
        self._values = PagedLevel(1, geometry.chunk, device.new_values)
        self._levels = [self._values]
        for span in geometry.summary_spans(retention.max_values):
            self._levels.append(PagedLevel(span, geometry.rows_per_page(span), device.new_rows))
        self._head = 0
        self._end = 0
        self._synced = 0  # values before this index are on the device and summarized
        self._pending = np.empty(coalesce_values)  # values [_synced, _end), not yet uploaded
        self._last = float("nan")
        self._directory: Any = None  # rebuilt lazily after pages change

    def __len__(self) -> int:
        return self._end - self._head

    @property
    def nbytes(self) -> int:
        directory = self._directory  # one read: an append may reset it meanwhile
        directory = directory.nbytes if directory is not None else 0
        levels = sum(level.nbytes for level in self._levels)
        return levels + directory + self._pending.nbytes

    # -- append ---------------------------------------------------------------------------

    def append(self, values: np.ndarray) -> int:
        """All or nothing: every device allocation the append needs (its pages, then the
        directory that lists them) happens before any state changes, so a MemoryError leaves
        the series as it was (pages made before the failure are kept, unused, as the numpy
        engine keeps them). Copies and launches after that allocate nothing; they fail only
        on a CUDA error, which leaves the whole device unusable anyway."""
        incoming = values.shape[0]
        if incoming == 0:
            return 0
        values, evicted = self.retention.plan_append(len(self), values)
        kept_new = values.shape[0]
        start, stop = self._end, self._end + kept_new
        with self._lock:
            self._reserve_pages(start, stop)
            self._current_directory()
            capacity = self._pending.shape[0]
            if evicted or kept_new > capacity:
                self._sync((values,))  # evicting pages needs everything before them uploaded
            else:
                if stop - self._synced > capacity:
                    self._sync()
                self._pending[start - self._synced : stop - self._synced] = values
                self._end = stop
            self._last = float(values[-1])
            if evicted:
                self._drop_oldest(evicted)
        return evicted

    def append_parts(
        self,
        parts: Sequence[np.ndarray],
        *,
        stable_source: bool = False,
        pinned: Sequence[bool] | None = None,
    ) -> int:
        """`append` of the concatenation of `parts`, without concatenating them: one page
        reservation, one directory, one copy per part (per page it spans) and one set of
        launches for the whole. Why: the hybrid engine's mirror sync hands over the host's
        value pages (1e8 values are ~100 pages); appending them one by one would rebuild the
        directory and launch the summaries once per page. All or nothing like `append`.

        `stable_source`: the caller keeps the parts unchanged until its next
        `device.synchronize()`, so they are copied straight out of them
        (`Device.upload_direct`: no staging copy; at link speed from pinned memory).
        `pinned` (one flag per part): only the flagged parts are copied directly; the others
        go through the staged `upload`. Why: a direct copy from pageable memory is serialized
        by the driver through its own small bounce buffer (one thread, ~6-8 GB/s), while the
        staged path fills several pinned buffers in parallel; a part that is not page-locked
        gains nothing from skipping the staging (device.py)."""
        incoming = sum(part.shape[0] for part in parts)
        if incoming == 0:
            return 0
        kept_old, kept_new = self.retention.retained_after(len(self), incoming)
        evicted = len(self) - kept_old
        skip = incoming - kept_new  # the oldest values of the batch that retention drops
        flags = [True] * len(parts) if pinned is None else list(pinned)
        kept: list[np.ndarray] = []
        direct: list[bool] = []
        for part, flag in zip(parts, flags, strict=True):
            if skip >= part.shape[0]:
                skip -= part.shape[0]
                continue
            kept.append(part[skip:] if skip else part)
            direct.append(stable_source and flag and part.flags.c_contiguous)
            skip = 0
        with self._lock:
            self._reserve_pages(self._end, self._end + kept_new)
            self._current_directory()
            self._sync(kept, direct=direct)
            self._last = float(kept[-1][-1])
            if evicted:
                self._drop_oldest(evicted)
        return evicted

    def _reserve_pages(self, start: int, stop: int) -> None:
        chunk = self.geometry.chunk
        for first in range(start - start % chunk, stop, chunk):
            for level in self._levels:
                number = first // level.span // level.rows_per_page
                if number not in level.pages:
                    # Stale before allocating: if a later page fails, the pages made so far
                    # are kept and the next directory must list them.
                    self._directory = None
                    level.page(number)

    def _sync(self, batches: Sequence[np.ndarray] = (), direct: Sequence[bool] = ()) -> None:
        """Upload the pending values (then `batches`, appended after them in order; batch i
        copied directly when `direct[i]`, staged otherwise or when `direct` is shorter) and
        summarize every block they complete, so the device holds values and summaries up to
        `_end`.

        Only the directory may allocate (when pages were dropped since it was built), and it
        is built before anything changes: a failure leaves pending values pending."""
        directory = self._current_directory()
        lo = self._synced
        if self._end > lo:
            self._upload(lo, self._pending[: self._end - lo])
        end = self._end
        for i, batch in enumerate(batches):
            self._upload(end, batch, i < len(direct) and direct[i])
            end += batch.shape[0]
        self._summarize(directory, lo, end)
        self._end = self._synced = end

    def _upload(self, start: int, values: np.ndarray, direct: bool = False) -> None:
        """Copy `values` to absolute positions from `start`, one copy per value page
        (straight from `values` when `direct`: see `append_parts`' `stable_source`)."""
        upload = self._device.upload_direct if direct else self._device.upload
        done = 0
        for run in self._values.runs(start, start + values.shape[0]):
            upload(run, values[done : done + run.shape[0]])
            done += run.shape[0]

    def _summarize(self, directory: Any, lo: int, hi: int) -> None:
        """Summarize the whole blocks values [lo, hi) complete, then their ancestors: one
        launch for level 1, one per level above."""
        block, fanout = self.geometry.block, self.geometry.fanout
        first, full_end = lo // block, hi // block
        if full_end <= first:
            return
        count = full_end - first
        self._device.launch("summarize_blocks", count, directory, first, count)
        for depth in range(2, len(self._levels)):
            first, full_end = first // fanout, -(-full_end // fanout)
            count = full_end - first
            self._device.launch("merge_groups", count, directory, depth, first, count)

    def resummarize(self) -> None:
        """Recompute every summary from the values on the device: the bulk build (benches
        time it on values already uploaded). Answers do not change."""
        with self._lock:
            self._sync()
            self._summarize(self._current_directory(), self._head, self._end)

    def _drop_oldest(self, count: int) -> None:
        """Pages wholly before the new head go back to the device's pool at once: it is
        stream-ordered (device.py), so kernels already issued still read them safely."""
        self._head += count
        retired: list[Any] = []
        for level in self._levels:
            level.drop_pages_before(self._head // level.span, retired)
        if retired:
            self._directory = None

    def _current_directory(self) -> Any:
        """The device directory of this series' pages (layout in segment_tree.cu)."""
        if self._directory is None:
            g = self.geometry
            header = [len(self._levels), g.block, g.fanout]
            tables: list[int] = []
            offset = _HEADER + _LEVEL_FIELDS * len(self._levels)
            for level in self._levels:
                first = min(level.pages, default=level.first_page)
                last = max(level.pages, default=first - 1)
                shift = level.rows_per_page.bit_length() - 1  # a power of two (Geometry)
                header += [level.span, shift, first, offset + len(tables)]
                tables += [
                    self._device.address(level.pages[n]) if n in level.pages else 0
                    for n in range(first, last + 1)
                ]
            self._directory = self._device.new_int64(np.array(header + tables, dtype=np.int64))
        return self._directory

    # -- query ----------------------------------------------------------------------------

    def stats(self, window: int) -> WindowStats:
        if len(self) == 0:
            raise ValueError("series is empty")
        if window < 1:
            raise ValueError("window must be >= 1")
        with self._lock:
            return window_stats(self._device, [(self, window)])[0]

    def tail(self, count: int) -> np.ndarray:
        """A host copy of the newest min(count, len) values, one download per value page.

        The caller holds the series still (the store's symbol lock: no append can drop a page
        meanwhile); the engine lock is taken per page, so a checkpoint of 1e8 values lets
        other symbols' appends and queries run between its 8 MiB copies."""
        if count < 0:
            raise ValueError("count must be >= 0")
        start = self._end - min(count, len(self))
        out = np.empty(self._end - start)
        with self._lock:
            self._sync()
            runs = self._values.runs(start, self._end)
        done = 0
        for run in runs:
            with self._lock:
                out[done : done + run.shape[0]] = self._device.download(run)
            done += run.shape[0]
        return out


def query_rows(device: Device, requests: Sequence[tuple[GpuSeries, int]]) -> np.ndarray:
    """The (n, 3) int64 `window_stats` input for (series, window) pairs: each series synced
    once, then (directory address, end, count) per query."""
    seen: dict[int, tuple[int, int, int]] = {}
    rows = []
    for series, window in requests:
        known = seen.get(id(series))
        if known is None:
            series._sync()
            directory = device.address(series._current_directory())
            known = seen[id(series)] = (directory, series._end, len(series))
        rows.append((known[0], known[1], min(window, known[2])))
    return np.array(rows, dtype=np.int64).reshape(len(rows), 3)


def window_stats(device: Device, requests: Sequence[tuple[GpuSeries, int]]) -> list[WindowStats]:
    """Answer (series, window) pairs in one `window_stats` launch; the caller holds the lock
    and guarantees non-empty series and windows >= 1 (the `Engine.stats_many` contract)."""
    queries = query_rows(device, requests)
    # Directories stay referenced by their series until the results are back: the download
    # below waits for the launch, so no directory is replaced while the kernel reads it.
    rows = len(requests)
    out = device.new_output(rows)
    device.launch("window_stats", rows, device.new_int64(queries.ravel()), out, rows)
    lasts = np.fromiter((series._last for series, _ in requests), np.float64, rows)
    table = _results_table(device.download(out).reshape(rows, 5), lasts)
    return [
        WindowStats(count=int(count), min=lo, max=hi, last=last, avg=avg, var=var)
        for count, lo, hi, last, avg, var in table.tolist()
    ]


def _results_table(results: np.ndarray, lasts: np.ndarray) -> np.ndarray:
    """The `Engine.stats_table` table from `window_stats`' (rows, 5) output (count, mean,
    M2, min, max per row) and each row's `last`: the one unpacking both query paths share.

    var = M2 / count as a float64 division: the count is an integer below 2**53, so it is
    exact as a float and the quotient is the one an int division by it gives."""
    rows = results.shape[0]
    table = np.empty((rows, STATS_COLUMNS))
    table[:, STATS_COUNT] = results[:, 0]
    table[:, STATS_AVG] = results[:, 1]
    table[:, STATS_MIN] = results[:, 3]
    table[:, STATS_MAX] = results[:, 4]
    table[:, STATS_LAST] = lasts
    np.divide(results[:, 2], results[:, 0], out=table[:, STATS_VAR])
    return table


def stats_table(
    device: Device, series: Sequence[GpuSeries], which: np.ndarray, windows: np.ndarray
) -> np.ndarray:
    """`Engine.stats_table` on the device: one copy in, one `window_stats` launch, one copy
    out; the caller holds the engine lock and the `Engine.stats_table` contract.

    Per distinct series one (directory address, end, length, last) row is built (each series
    synced once: its pending ticks must reach the device before a query reads it); the (n, 3)
    query table is then numpy fancy indexing of those rows by `which`, so no Python runs per
    query. Why a host table of directories uploaded with the queries rather than a device-
    resident one: a series' directory changes whenever its pages do (growth, eviction), and
    with coalesced ticks the device is only brought up to date when read; a resident table
    would need the same per-series sync at query time anyway, and the few hundred bytes per
    series ride in the one copy the queries need (a 10k-query table is 240 KB; 100 series add
    2.4 KB), so a resident table would save no copy and would add one more structure to keep
    consistent with every append.
    """
    rows = which.shape[0]
    if rows == 0:
        return np.empty((0, STATS_COLUMNS))
    directories = np.empty(len(series), dtype=np.int64)
    ends = np.empty(len(series), dtype=np.int64)
    lengths = np.empty(len(series), dtype=np.int64)
    lasts = np.empty(len(series))
    for slot, one in enumerate(series):
        one._sync()
        directories[slot] = device.address(one._current_directory())
        ends[slot] = one._end
        lengths[slot] = len(one)
        lasts[slot] = one._last
    queries = np.empty((rows, 3), dtype=np.int64)
    queries[:, 0] = directories[which]
    queries[:, 1] = ends[which]
    np.minimum(windows, lengths[which], out=queries[:, 2])
    out = device.new_output(rows)
    # As in `window_stats`: the download waits for the launch, and every directory stays
    # referenced by its series (held still by the caller) until then.
    device.launch("window_stats", rows, device.new_int64(queries.ravel()), out, rows)
    return _results_table(device.download(out).reshape(rows, 5), lasts[which])
