"""The compiled CPU engine (`engine.backend = "cpu"`): the numpy engine's pages and invariants,
with every append and window query done by one numba call that releases the GIL.

`CompiledSeries` inherits the page ownership of `SegmentTreeSeries` (reservation before
writing, retention from the front, bounded freeing of retired pages, `tail` and `tail_views`)
and replaces only the arithmetic: its pages are mirrored in a page directory that the kernels
in `fallback.compiled_kernels` read (see that module for why). The numpy engine stays the
reference; the conformance suite runs both.

First compile must not surprise a user: `prepare_kernels` compiles every kernel for the array
types the appliance passes (writable and read-only batches) before the store exists, with
numba's on-disk cache where it can write (`[engine] compile_cache_dir`, else numba's default
places), and compiles in memory when it cannot, so a read-only install still starts.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import types
from numba.core import config as numba_config

from engine_core.bars import Bars
from engine_core.contract import STATS_COLUMNS, Engine, RetentionPolicy, Series, WindowStats
from engine_core.layout import Geometry, identity_rows
from engine_core.rolling import ROLLING_COLUMNS, Rolling, rolling_count
from engine_core.summary import IDENTITY_ROW
from fallback import compiled_kernels
from fallback.compiled_kernels import (
    CONTROL_SHAPE,
    STATE_END,
    STATE_HEAD,
    STATE_KEEP,
    STATE_MAX_VALUES,
    STATE_RESERVED_END,
    append_fast,
    append_values,
    control_block,
    control_views,
    fill_rows,
    series_window_stats,
    shape_vector,
)
from fallback.series import SegmentTreeSeries

_MIN_SLOTS = 8
_MAX_INITIAL_SLOTS = 1024


def _references(page: np.ndarray) -> int:
    return sys.getrefcount(page)


def _probe_unshared_references() -> int:
    page = np.empty(1)  # held by one local name, as in _free_some_retired_pages
    return _references(page)


# References a retired page has when nothing but the retiring code holds it, measured rather
# than assumed (it depends on the interpreter's calling convention).
_UNSHARED_REFERENCES = _probe_unshared_references()
# Pages retired per level by one append after a cleanup: a few microseconds of dict work, so
# the 150M -> 100M cleanup's ~50 pages per level leave within a few dozen appends.
_RETIRE_PAGES_PER_APPEND = 2


class CompiledSeries(SegmentTreeSeries):
    """A `SegmentTreeSeries` whose writes and queries run in `fallback.compiled_kernels`."""

    def __init__(
        self,
        retention: RetentionPolicy,
        starting_capacity: int = 0,
        geometry: Geometry | None = None,
    ) -> None:
        # True while pages before `head` are still held by their levels (see _drop_oldest).
        self._unretired = False
        # head, end, reserved end, the bound and the keep count, which `append_fast` reads
        # and moves; a view of the control block once that exists (_new_control).
        self._state = np.zeros(CONTROL_SHAPE, dtype=np.int64)
        self._state[STATE_MAX_VALUES] = retention.max_values
        self._state[STATE_KEEP] = retention.keep_after_cleanup
        super().__init__(retention, starting_capacity, geometry)
        # Sized for a full series plus the pages a cleanup leaves behind for a few appends, so
        # that neither growth nor a cleanup rebuilds it (capped: tiny test geometries grow it).
        expected = 2 * -(-retention.max_values // self.geometry.chunk) + 4
        self._new_control(
            min(max(_MIN_SLOTS, 1 << (expected - 1).bit_length()), _MAX_INITIAL_SLOTS)
        )
        # Per level, pages retired since the last cleanup and not yet reused (see
        # _free_some_retired_pages): the levels allocate from them first.
        self._spare: list[list[np.ndarray]] = [[] for _ in self._levels]
        self._values.allocate = self._value_page
        for level, spare in zip(self._levels[1:], self._spare[1:], strict=True):
            level.allocate = self._summary_page_of(spare)

    def _value_page(self, rows: int) -> np.ndarray:
        spare = self._spare[0]
        return spare.pop() if spare else np.empty(rows)

    @staticmethod
    def _summary_page_of(spare: list[np.ndarray]):
        def allocate(rows: int) -> np.ndarray:
            if not spare:
                return identity_rows(rows)
            page = spare.pop()
            fill_rows(page, IDENTITY_ROW)  # the invariant of fresh summary pages
            return page

        return allocate

    # The base class's positions live in the state vector the kernels share.
    @property
    def _head(self) -> int:
        return int(self._state[STATE_HEAD])

    @_head.setter
    def _head(self, index: int) -> None:
        self._state[STATE_HEAD] = index

    @property
    def _end(self) -> int:
        return int(self._state[STATE_END])

    @_end.setter
    def _end(self, index: int) -> None:
        self._state[STATE_END] = index

    def _new_control(self, slots: int) -> None:
        """A control block (the kernels' one argument) with `slots` directory slots per level
        holding the current state and every page; replaced whole, under the caller's lock, so
        a kernel never sees a half-built one."""
        g = self.geometry
        shape = shape_vector(
            g.block,
            g.fanout,
            g.chunk,
            [level.rows_per_page for level in self._levels],
            [level.span for level in self._levels],
            slots,
        )
        control = control_block(self._state, shape, len(self._levels), slots)
        state, shape, directory = control_views(control)
        for depth, level in enumerate(self._levels):
            for number, page in level.pages.items():
                directory[depth, number & (slots - 1)] = page.ctypes.data
        # Nothing above changed the series (a MemoryError leaves the old block in use): switch
        # to the new block in one step.
        self._state, self._shape, self._directory, self._control = state, shape, directory, control
        # Read by `CompiledEngine.stats_table` per query batch: `ctypes.data` costs ~1 us a call.
        self.control_address = control.ctypes.data

    @property
    def slots(self) -> int:
        """Directory slots per level (grows with the number of live pages)."""
        return self._directory.shape[1]

    @property
    def nbytes(self) -> int:
        spare = sum(page.nbytes for pages in self._spare for page in pages)
        return super().nbytes + spare + self._control.nbytes

    # -- page directory ---------------------------------------------------------------------

    def _register(self, depth: int, number: int, page: np.ndarray) -> None:
        """Put `page` (page `number` of level `depth`) in the directory, first growing it if
        the level's live pages would no longer have a slot each."""
        live = number - self._levels[depth].first_page + 1
        if live > self.slots:
            self._new_control(max(_MIN_SLOTS, 1 << (2 * live - 1).bit_length()))
        self._directory[depth, number & (self.slots - 1)] = page.ctypes.data

    def _reserve_pages(self, start: int, stop: int) -> None:
        for depth, level in enumerate(self._levels):
            number = start // level.span // level.rows_per_page
            if number not in level.pages:  # pages already there are in the directory
                page = level.page(number)
                try:
                    self._register(depth, number, page)
                except BaseException:
                    # A page in a level must be in the directory (a retry would skip it and
                    # the kernel would write through another page's slot): take it out again.
                    del level.pages[number]
                    self._spare[depth].append(page)
                    raise
        # Every page of every level is in the directory below this index: an append that ends
        # below it and evicts nothing is one kernel call (`append_fast`).
        chunk = self.geometry.chunk
        reserved = self._state[STATE_RESERVED_END]
        self._state[STATE_RESERVED_END] = max(reserved, start - start % chunk + chunk)

    # -- hot paths --------------------------------------------------------------------------

    def append(self, values: np.ndarray) -> int:
        # Hot path, cleanups included: when every page it writes is in place the append is one
        # kernel call, which cannot fail half-way (it allocates nothing). Otherwise the base
        # class plans it and reserves the pages first.
        if self._unretired:  # before any reservation, so that it can reuse those pages
            self._free_some_retired_pages(values.shape[0])
        evicted = append_fast(self._control, values)
        if evicted < 0:
            return super().append(values)
        if evicted:
            self._unretired = True
        return evicted

    # -- retention: O(1) in the evicting append, pages recycled by the next ones ------------

    def _drop_oldest(self, count: int) -> None:
        """Only move `head`: the kernels never read before it, so the pages wholly before it
        may stay in their levels a little longer. A cleanup append then costs what any append
        costs, instead of retiring ~150 pages (50 per level at the default geometry)."""
        self._head += count
        self._unretired = True

    def _free_some_retired_pages(self, incoming: int = 0) -> None:
        """Take at most `_RETIRE_PAGES_PER_APPEND` pages, plus as many as `incoming` values
        fill (so that retirement keeps pace with eviction whatever the batch size), that lie
        wholly before `head` out of each level and keep them as the level's next pages.

        Why recycle rather than free: freeing a resident 8 MiB page (munmap) costs 40-150 us
        with the GIL held, and a fresh page costs its first-touch faults; after a 150M -> 100M
        cleanup, appends that freed 8 MiB each took 10-30x the median (benches/RESULTS.md).
        The series regrows into exactly the pages it retired, so its memory never exceeds its
        own peak (max_values values and their summaries) and allocation stops after the first
        cycle. A page that a reader still views (a checkpoint's `tail_views`) is not reused:
        writing into it would change values that reader reads; it is left to the reader.
        """
        if not self._unretired:
            return
        head = self._head
        behind = False
        for depth, level in enumerate(self._levels):
            keep_from = head // level.span // level.rows_per_page
            budget = _RETIRE_PAGES_PER_APPEND + incoming // (level.span * level.rows_per_page)
            while level.first_page < keep_from and budget:
                page = level.pages.pop(level.first_page, None)
                level.first_page += 1
                if page is None:
                    continue
                budget -= 1
                if _references(page) <= _UNSHARED_REFERENCES:
                    self._spare[depth].append(page)
            behind = behind or level.first_page < keep_from
        self._unretired = behind

    def _write(self, start: int, segment: np.ndarray) -> None:
        append_values(self._directory, self._shape, segment, start)

    def stats(self, window: int) -> WindowStats:
        if window < 1:
            raise ValueError("window must be >= 1")
        # int64 in the kernel; no series holds 2**62 values
        n, mean, m2, lo, hi, last = series_window_stats(self._control, min(window, 1 << 62))
        if n == 0:
            raise ValueError("series is empty")
        return WindowStats(count=n, min=lo, max=hi, last=last, avg=mean, var=m2 / n)


@dataclass(frozen=True, slots=True)
class CompiledEngine(Engine):
    """Creates `CompiledSeries`. Call `prepare_kernels` once before serving: without it the
    first append and the first query of the process each pay numba's compile (seconds)."""

    geometry: Geometry = field(default_factory=Geometry)
    name: str = "cpu"

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> CompiledSeries:
        return CompiledSeries(retention, starting_capacity, self.geometry)

    def stats_table(
        self, series: Sequence[Series], which: np.ndarray, windows: np.ndarray
    ) -> np.ndarray:
        """`Engine.stats_table` in one nogil call (`compiled_kernels.stats_table`): the
        kernel reads each series' control block through its address.

        `controls` holds the blocks themselves for the call: a block is replaced (never
        mutated in size) only by an append growing the directory, which the caller's locks
        keep out, and the list keeps even a replaced block's memory alive until we return.
        """
        controls = [s._control for s in series]  # type: ignore[attr-defined]
        addresses = np.array([s.control_address for s in series], dtype=np.int64)  # type: ignore[attr-defined]
        out = np.empty((which.shape[0], STATS_COLUMNS))
        compiled_kernels.stats_table(
            addresses,
            np.ascontiguousarray(which, dtype=np.int64),
            np.ascontiguousarray(windows, dtype=np.int64),
            out,
        )
        del controls  # alive until here: the kernel read through their addresses
        return out

    def bars(self, values: np.ndarray, offsets: np.ndarray) -> Bars:
        """`Engine.bars` in one compiled pass pair per bar (`compiled_kernels.bar_rows`):
        no full-size temporaries, unlike the numpy reference's `reduceat` passes."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        rows = np.empty((offsets.shape[0], compiled_kernels.BAR_COLUMNS))
        compiled_kernels.bar_rows(values, offsets, rows)
        return Bars(
            open=rows[:, 0].copy(),
            high=rows[:, 1].copy(),
            low=rows[:, 2].copy(),
            close=rows[:, 3].copy(),
            count=rows[:, 4].astype(np.int64),
            avg=rows[:, 5].copy(),
            var=rows[:, 6].copy(),
        )

    def rolling(self, values: np.ndarray, window: int, step: int) -> Rolling:
        """`Engine.rolling` in one compiled pass (`compiled_kernels.rolling_rows`): Welford
        prefix and suffix summaries streamed block by block, O(window) scratch instead of
        the numpy algorithm's five full-size arrays."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        outputs = rolling_count(values.shape[0], window, step)
        out = np.empty((len(ROLLING_COLUMNS), outputs))
        if outputs:
            scratch = np.empty((compiled_kernels.ROLLING_SCRATCH_ROWS, window))
            compiled_kernels.rolling_rows(values, window, step, out, scratch)
        return Rolling(*out)


# -- compile and cache ------------------------------------------------------------------------

_DIRECTORY = types.Array(types.int64, 2, "C")
_CONTROL = _SHAPE = types.Array(types.int64, 1, "C")
# Batches arrive writable (REST, replay) or read-only (views of received transport frames).
_BATCHES = (types.Array(types.float64, 1, "C"), types.Array(types.float64, 1, "C", readonly=True))
_ROWS = types.Array(types.float64, 2, "C")
_SIGNATURES = {
    "series_window_stats": [(_CONTROL, types.int64)],
    "append_values": [(_DIRECTORY, _SHAPE, batch, types.int64) for batch in _BATCHES],
    "append_fast": [(_CONTROL, batch) for batch in _BATCHES],
    # Engine.stats_table: control block addresses, which, windows, the (n, 6) answer table
    "stats_table": [(_CONTROL, _CONTROL, _CONTROL, types.Array(types.float64, 2, "C"))],
    "fill_rows": [(types.Array(types.float64, 2, "C"), types.Array(types.float64, 1, "C"))],
    # GET /history/bars: values of a warm segment (read-only when a view of a decoded one)
    "bar_rows": [
        (batch, types.Array(types.int64, 1, "C"), types.Array(types.float64, 2, "C"))
        for batch in _BATCHES
    ],
    # GET /history/rolling: (values, window, step, out (4, outputs), scratch (4, window))
    "rolling_rows": [(batch, types.int64, types.int64, _ROWS, _ROWS) for batch in _BATCHES],
}


@dataclass(frozen=True, slots=True)
class KernelReport:
    """What `prepare_kernels` did: how long it took and where the compiled code is cached
    (`cache_dir` None: compiled in memory, `cache_note` says why)."""

    seconds: float
    cache_dir: str | None
    cache_note: str
    loaded_from_cache: bool


def prepare_kernels(cache_dir: str = "") -> KernelReport:
    """Compile (or load from the on-disk cache) every kernel for the types the appliance uses.

    `cache_dir` "" uses numba's default places (the package's __pycache__ if writable, else
    the user's cache directory); a path uses that directory, created if missing. Where no
    place is writable the kernels are compiled in memory, each start pays the compile, and
    the report says why.
    """
    started = time.perf_counter()
    where, note = _enable_cache(cache_dir)
    loaded = True
    # numba leaves LLVM's SLP vectorizer off by default; the kernels' eight explicit
    # accumulation lanes are what it packs into vector registers (the 10k append kernel:
    # ~15 -> ~12 us here). Lanes stay lanes: the order of every addition, and so every
    # result, is the same with it on or off.
    with _numba_config(SLP_VECTORIZE=1):
        for name, signatures in _SIGNATURES.items():
            kernel = getattr(compiled_kernels, name)
            for signature in signatures:
                kernel.compile(signature)  # a no-op for a signature already compiled
            loaded = loaded and _all_from_cache(kernel)
    return KernelReport(time.perf_counter() - started, where, note, loaded and where is not None)


def _all_from_cache(kernel) -> bool:
    return not any(kernel.stats.cache_misses.values())


def _enable_cache(cache_dir: str) -> tuple[str | None, str]:
    """Turn on numba's cache for the public kernels; (directory or None, a note saying why)."""
    kernels = [getattr(compiled_kernels, name) for name in _SIGNATURES]
    if cache_dir:
        path = Path(cache_dir)
        problem = _unwritable(path)
        if problem:
            return None, f"engine.compile_cache_dir {cache_dir!r} is not usable ({problem})"
    try:
        # numba reads its cache directory from its global config when caching is enabled (the
        # locator keeps the path), so it is set only for that moment.
        with _numba_config(CACHE_DIR=cache_dir):
            for kernel in kernels:
                kernel.enable_caching()
    except RuntimeError as exc:  # numba found no writable place for the default cache
        return None, f"no writable place for numba's cache ({exc})"
    return kernels[0]._cache.cache_path, "cached"


@contextmanager
def _numba_config(**values):
    """Set numba's global config options for the duration of the block (compile time only:
    numba reads them when it builds a pass manager or a cache locator)."""
    saved = {name: getattr(numba_config, name) for name in values}
    for name, value in values.items():
        setattr(numba_config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(numba_config, name, value)


def _unwritable(path: Path) -> str:
    """'' when files can be created in `path` (made if missing), else the reason."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(path, os.W_OK):
        return "not writable"
    return ""
