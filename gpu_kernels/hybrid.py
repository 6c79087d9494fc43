"""Hybrid placement (issue 13, item 1): the compiled CPU tree answers what one query or one
append needs, the device answers bulk work: large query batches on a device mirror of each
series, bars and rolling statistics over long histories on the values passed in (the mirrors
are not used for those).

Why: on the H200 one GPU query costs at least a kernel launch plus an 8-byte copy back (23 us
through CuPy), which is slower than the compiled engine's whole window query, and a small
append costs the device more than the host. A large batch of distinct queries, and bars and
rolling statistics over long histories, are where the device pays. So a `HybridSeries` is a
`CompiledSeries` (every append, `stats`, `tail`, `tail_views` and `len` touch only it:
`gpu`/`auto` are never slower than `cpu` on those) plus a `GpuSeries` mirror that is brought
up to date lazily, only when a device-routed query batch needs it, by appending the host
values it has not seen.

Why the mirror answers exactly what the host would (the proof the tests check with hypothesis).
Let S be the sequence of values the host has stored, each at its absolute index (the host's
`end_index` is one past the newest; values a batch larger than the bound drops before storing
them get no index). The host holds S[head, end) with head = end - len(host): retention only
ever drops from the front, so `head` never decreases, and len(host) <= max_values. The mirror is
created at some index `base` (0, or `head` at a rebuild) and is synced to `seen` <= end; it
uses `sliding_policy(retention)`: the same `max_values` with `keep_after_cleanup =
max_values`, under which appending m values to n gives min(n + m, max_values) whatever the
batch sizes, so the mirror always holds S[max(base, seen - max_values), seen) however many host
batches a sync appends as one.
  A sync appends S[seen, end) when head <= seen: the mirror then holds
  S[max(base, end - max_values), end), which contains the host's S[head, end) because
  head >= end - max_values and head >= base. When head > seen the host has evicted values the
  mirror never saw; the mirror is rebuilt from the host alone (base = head) and equals it.
So the host's values are the mirror's newest len(host) values, and a query over
count = min(window, len(host)) values of the mirror is the host's query: windows are clamped to
the host's length before the device sees them.

Why not the host's own policy, as first planned: with keep_after_cleanup < max_values a
longer series can end up shorter after the same append (max 10, keep 2: 9 + 1 -> 10, but
10 + 1 -> 3), so a mirror that once saw two host batches as one (and kept more than the host)
can later evict values the host still holds. `test_hybrid.py` shows the counterexample.

Device memory failure: a sync that cannot allocate leaves the mirror as it was (the mirror's
append is all or nothing; it is kept, not dropped) and the operation is answered on the host;
the host series is never touched. After such a failure the series is "host only" for
`HOST_ONLY_BATCHES` device-routed batches (no retry, no log line, on each of them), and the
warning is logged at most once per series per minute (`DeviceBackoff`, held by the engine).
Any other device error during a sync drops the mirror (rebuilt whole next time). A batch whose
own device call (`new_output`, the query table, a directory rebuilt after a drop) runs out of
memory is answered on the host too, nothing changed.

Pinned pages (item 3, review finding 6): a host series' value pages are plain np.empty until
its mirror's first successful sync; from then on new pages come from
`Device.new_pinned_values` (page-locked where the device has such memory) and are copied to
the device straight from the page (`upload_direct`, no staging memcpy). Pages from before,
and `starting_capacity` pages, stay plain and go through the staged `upload` (parallel
staging; a direct copy from pageable memory is serialized by the driver). So a series that
never meets a large batch never pins, and a tick never pays a page-locked allocation before
the first sync. After each sync one pinned page is made ahead (when the series has no spare
page to recycle) so that the next page boundary an append crosses finds it ready: that
cudaHostAlloc lands in the sync, on the batch path, not in the tick. Where the cost still
lands in an append: a second page boundary crossed before the next sync (more than one page,
1M values at the default geometry, of ticks between two device batches) allocates its page
pinned inside the append. Retired pages are recycled (CompiledSeries), so either way the cost
is paid once per page of a series' peak, never again in steady state.
`pinned_host_pages=False` turns pinning off.

First sync cost (a known cost, not redesigned): the first device-routed batch over a series
copies its whole history to the device (up to max_values values: 1.2 GB at the default
1.5e8) while the store holds that series' lock and the batch runs on the event loop; later
syncs copy only the values appended since.

Answers: count, min, max and last are bit for bit the host's; avg and var of a
device-answered query may differ in the last bits from a host-answered query of the same
state (the two engines combine partial sums in different orders), within the 1e-12 relative
the engines are tested to agree to.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine_core.bars import Bars
from engine_core.contract import Engine, RetentionPolicy, Series, WindowStats
from engine_core.layout import Geometry
from engine_core.rolling import Rolling
from fallback.compiled import CompiledEngine, CompiledSeries
from gpu_kernels.device import Device
from gpu_kernels.engine import CupyEngine
from gpu_kernels.series import GpuSeries

log = logging.getLogger(__name__)

# Documented default of `[engine] gpu_batch_min_queries`. NOT a measured crossover: no GPU was
# available when it was chosen. Reasoning: one device batch costs at least ~23 us (a launch and
# a copy back, measured on the H200) and the compiled engine answers a query in about a
# microsecond, so the device cannot win below a few dozen queries; 512 leaves room for the
# mirror sync and the copies in and out. benches/bench_gpu.py's crossover sweep measures it.
DEFAULT_BATCH_MIN_QUERIES = 512

# Documented default of `[engine] gpu_history_min_values`: bars and rolling statistics over
# fewer values are computed on the host. Reasoned, NOT measured on a GPU (none here): the
# compiled engine's bars read 1e7 values in 13.7 ms (benches/RESULTS.md, issue 17), so 1e6
# values cost the host ~1.4 ms; the device must first get the values (8 MB through the pinned
# staging at the ~6-8 GB/s one fill thread reaches: ~1-1.3 ms) plus launches and the copy
# back, so below ~1e6 values it cannot win, and above it the host's time grows while the
# device's fixed costs do not. benches/bench_gpu.py does not sweep this yet.
DEFAULT_HISTORY_MIN_VALUES = 1_000_000

# After a mirror sync runs out of device memory its series is answered on the host for this
# many device-routed batches before a sync is tried again. Why a count of batches rather than
# "until an allocation of at least that size succeeds": the engine would need to see every
# device allocation (other mirrors, bars, rolling, the pool's own frees) to know when room
# came back; a count bounds the retries to one in 64 of the batches that want the series,
# needs no such coupling, and still recovers on its own when memory frees up.
HOST_ONLY_BATCHES = 64

# At most one out-of-memory warning per series (or per kind of operation) per this interval.
WARN_INTERVAL_S = 60.0


def sliding_policy(retention: RetentionPolicy) -> RetentionPolicy:
    """The mirror's policy: the newest `max_values` values, whatever the batch sizes (see the
    module docstring for why not the host's own policy)."""
    return RetentionPolicy(retention.max_values, retention.max_values)


class HostSeries(CompiledSeries):
    """The hybrid's host series: a `CompiledSeries` whose value pages become page-locked once
    its mirror exists (`pin_new_pages`), which says which of its pages are pinned and where
    its values sit in its absolute index space (`end_index`), as the mirror sync needs.

    A page that cannot be pinned is made as the compiled engine makes it (np.empty): pinning
    is an optimisation of the mirror's copies, never a reason for an append to fail.
    `starting_capacity` pages stay plain (np.empty maps them lazily; pinning them would
    commit memory for values that may never come).
    """

    def __init__(
        self,
        retention: RetentionPolicy,
        starting_capacity: int,
        geometry: Geometry,
        allocate: Callable[[int], np.ndarray] = np.empty,
    ) -> None:
        self._allocate_pinned = allocate
        self._pinning = False  # set by the first mirror sync (`pin_new_pages`)
        # id -> page for every page that came from `allocate`; weak, so a page the series let
        # go is forgotten with it (and a reused id never matches: the identity is checked).
        self._pinned: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        super().__init__(retention, starting_capacity, geometry)

    @property
    def end_index(self) -> int:
        """The absolute index one past the newest value (values ever stored)."""
        return self._end

    def pin_new_pages(self) -> None:
        """From now on new value pages are page-locked; one is made ahead (see the module
        docstring) when no retired page is waiting to be reused. Called with the series held
        still (the store's entry lock), as an append would be."""
        self._pinning = True
        spare = self._spare[0]
        if not spare:
            page = self._new_pinned_page(self._values.rows_per_page)
            if page is not None:
                spare.append(page)

    def sync_parts(self, count: int) -> tuple[list[np.ndarray], list[bool]]:
        """`tail_views(count)` and, per view, whether its page is page-locked."""
        views = self.tail_views(count)
        rows = self._values.rows_per_page
        position = self._end - sum(view.shape[0] for view in views)
        pinned = []
        for view in views:
            page = self._values.pages[position // rows]
            pinned.append(self._pinned.get(id(page)) is page)
            position += view.shape[0]
        return views, pinned

    def _new_pinned_page(self, rows: int) -> np.ndarray | None:
        try:
            page = self._allocate_pinned(rows)
        except Exception:  # MemoryError, or the driver's error for page-locked memory
            return None
        self._pinned[id(page)] = page
        return page

    def _value_page(self, rows: int) -> np.ndarray:
        spare = self._spare[0]
        if spare:
            return spare.pop()
        page = self._new_pinned_page(rows) if self._pinning else None
        return page if page is not None else np.empty(rows)


class HybridSeries:
    """A compiled host series plus a lazily synced device mirror (module docstring)."""

    def __init__(self, host: HostSeries, device: CupyEngine, pin_pages: bool = True) -> None:
        self.host = host
        self._pin_pages = pin_pages
        self.retention = host.retention
        self._device = device
        self._mirror: GpuSeries | None = None
        self._seen = 0  # the host's end_index when the mirror was last synced
        # Two device batches over one series may sync it at the same time (readers share it).
        self._sync_lock = threading.Lock()
        # The hot paths are the host's own bound methods: no extra Python frame per tick or
        # query, so they cost exactly what they cost on the cpu engine.
        self.append = host.append
        self.stats = host.stats

    # -- host side: the Series protocol (append and stats: the host's, bound above) ----------

    def tail(self, count: int) -> np.ndarray:
        return self.host.tail(count)

    def tail_views(self, count: int) -> list[np.ndarray]:
        return self.host.tail_views(count)

    def __len__(self) -> int:
        return len(self.host)

    @property
    def nbytes(self) -> int:
        mirror = self._mirror  # one read: a sync may replace it meanwhile
        return self.host.nbytes + (mirror.nbytes if mirror is not None else 0)

    # -- device side --------------------------------------------------------------------------

    def synced_mirror(self) -> GpuSeries | None:
        """The mirror holding every host value (module docstring), or None when the device
        could not allocate what the sync needed; then the mirror is kept as it was (the next
        sync retries the same values) and the host is as it was.

        The caller holds the series still (no append meanwhile)."""
        with self._sync_lock:
            end = self.host.end_index
            mirror = self._mirror
            if mirror is not None and end == self._seen:
                return mirror
            size = len(self.host)
            delta = end - self._seen
            if mirror is None or delta > size:  # the host evicted values the mirror never saw
                mirror = self._device.new_series(sliding_policy(self.retention), 0)
                delta = size
            try:
                # One append of the host's own pages, oldest first: pinned pages copied
                # without staging, plain ones staged (parallel pinned buffers). They must stay
                # unchanged until the copies finish, hence the synchronize before the views
                # are let go (a recycled page is rewritten by later appends).
                parts, pinned = self.host.sync_parts(delta)
                mirror.append_parts(parts, stable_source=True, pinned=pinned)
                with self._device.lock:  # the device's methods run under its engine's lock
                    self._device.device.synchronize()
            except MemoryError:
                # `append_parts` is all or nothing: a mirror that was in sync stays as it was
                # (the next sync retries the same values); a new one was never kept.
                return None
            except BaseException:
                # A device error after copies began: the mirror's state is unknown, so it is
                # dropped and rebuilt whole next time.
                self._mirror = None
                self._seen = 0
                raise
            self._mirror = mirror
            self._seen = end
            if self._pin_pages:
                self.host.pin_new_pages()
            return mirror


class DeviceBackoff:
    """The hybrid engine's memory of device out-of-memory failures (one per engine, no
    global state): which series are host only and until which batch, when each warning was
    last logged, and how many operations were answered on the host.

    `clock` is injectable so that tests can move time; series are held weakly, so a series
    the store dropped is forgotten."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.fallbacks = 0
        self.batches = 0  # device-routed batches so far
        self._lock = threading.Lock()
        self._host_until: weakref.WeakKeyDictionary[HybridSeries, int] = weakref.WeakKeyDictionary()
        self._warned_series: weakref.WeakKeyDictionary[HybridSeries, float] = (
            weakref.WeakKeyDictionary()
        )
        self._warned_what: dict[str, float] = {}

    def next_batch(self) -> int:
        with self._lock:
            self.batches += 1
            return self.batches

    def host_only(self, series: HybridSeries, batch: int) -> bool:
        with self._lock:
            until = self._host_until.get(series)
            if until is None:
                return False
            if batch > until:
                del self._host_until[series]
                return False
            return True

    def sync_failed(self, series: HybridSeries, batch: int) -> bool:
        """Mark `series` host only; True when a warning is due (none for it in the last
        `WARN_INTERVAL_S`)."""
        with self._lock:
            self.fallbacks += 1
            self._host_until[series] = batch + HOST_ONLY_BATCHES
            return self._due(self._warned_series, series)

    def answered_on_host(self, what: str) -> bool:
        with self._lock:
            self.fallbacks += 1
            return self._due(self._warned_what, what)

    def _due(self, last_warned, key) -> bool:
        now = self.clock()
        last = last_warned.get(key)
        if last is not None and now - last < WARN_INTERVAL_S:
            return False
        last_warned[key] = now
        return True


@dataclass(frozen=True, slots=True)
class HybridEngine(Engine):
    """Routes each operation to the compiled host engine or the CuPy device engine.

    - appends, `stats`, `tail`: host only (HybridSeries);
    - `stats_many` / `stats_table` with fewer than `batch_min_queries` distinct (series,
      window) queries: host engine; larger batches: device engine, on mirrors synced first,
      windows clamped to the host's length (host engine when a mirror is host only or the
      device runs out of memory);
    - `bars`, `rolling` over at least `history_min_values` values: device engine, on the
      values passed in (not the mirrors); fewer values, or device out of memory: host engine.
    """

    host: CompiledEngine
    device: CupyEngine
    batch_min_queries: int = DEFAULT_BATCH_MIN_QUERIES
    pinned_host_pages: bool = True
    history_min_values: int = DEFAULT_HISTORY_MIN_VALUES
    name: str = "hybrid"
    backoff: DeviceBackoff = field(default_factory=DeviceBackoff, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_min_queries < 1:
            raise ValueError("batch_min_queries must be >= 1")
        if self.history_min_values < 1:
            raise ValueError("history_min_values must be >= 1")

    @property
    def geometry(self) -> Geometry:
        return self.host.geometry

    @property
    def device_name(self) -> str:
        return self.device.device_name

    @property
    def host_fallbacks(self) -> int:
        """Device operations answered on the host because device memory ran out (a series
        marked host only counts once, at its failure)."""
        return self.backoff.fallbacks

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> HybridSeries:
        device: Device = self.device.device
        allocate = device.new_pinned_values if self.pinned_host_pages else np.empty
        host = HostSeries(retention, starting_capacity, self.host.geometry, allocate)
        return HybridSeries(host, self.device, self.pinned_host_pages)

    # -- batches ------------------------------------------------------------------------------

    def _device_mirrors(
        self, series: Sequence[HybridSeries], distinct_queries: int
    ) -> list[GpuSeries] | None:
        """The routing both batch calls share: the synced mirrors of `series` (distinct) when
        the batch goes to the device, None when the host answers it: fewer than
        `batch_min_queries` distinct queries, a series host only after an out-of-memory
        sync, or a sync that runs out of memory now."""
        if distinct_queries < self.batch_min_queries:
            return None
        batch = self.backoff.next_batch()
        if any(self.backoff.host_only(one, batch) for one in series):
            return None  # already counted and logged when it was marked
        mirrors = []
        for one in series:
            mirror = one.synced_mirror()
            if mirror is None:
                if self.backoff.sync_failed(one, batch):
                    self._warn(
                        "a batch of queries (mirror sync; series host only for "
                        f"{HOST_ONLY_BATCHES} batches)"
                    )
                return None
            mirrors.append(mirror)
        return mirrors

    def stats_many(self, requests: Sequence[tuple[Series, int]]) -> list[WindowStats]:
        pairs: Sequence[tuple[HybridSeries, int]] = requests  # type: ignore[assignment]
        unique = list({id(s): s for s, _ in pairs}.values())
        distinct = len({(id(s), window) for s, window in pairs})
        mirrors = self._device_mirrors(unique, distinct)
        if mirrors is not None:
            by_id = {id(s): m for s, m in zip(unique, mirrors, strict=True)}
            try:
                return self.device.stats_many(
                    [(by_id[id(s)], min(window, len(s))) for s, window in pairs]
                )
            except MemoryError:  # allocations come before any launch: nothing changed
                self._host_instead("a batch of queries")
        return self.host.stats_many([(s.host, window) for s, window in pairs])

    def stats_table(
        self, series: Sequence[Series], which: np.ndarray, windows: np.ndarray
    ) -> np.ndarray:
        """`which` rows are distinct (series, window) pairs when the store calls it (its
        misses), so `which.shape[0]` is the count the threshold is compared with."""
        hybrid: Sequence[HybridSeries] = series  # type: ignore[assignment]
        mirrors = self._device_mirrors(hybrid, which.shape[0])
        if mirrors is not None:
            sizes = np.fromiter((len(s) for s in hybrid), np.int64, len(hybrid))
            clamped = np.minimum(windows, sizes[which])
            try:
                return self.device.stats_table(mirrors, which, clamped)
            except MemoryError:  # allocations come before any launch: nothing changed
                self._host_instead("a batch of queries")
        return self.host.stats_table([s.host for s in hybrid], which, windows)

    # -- history analytics: by size, the host when the device is out of memory ---------------

    def _host_instead(self, what: str) -> None:
        if self.backoff.answered_on_host(what):
            self._warn(what)

    def _warn(self, what: str) -> None:
        log.warning(
            "device memory exhausted: %s answered on the host",
            what,
            extra={"engine": self.name, "host_fallbacks": self.backoff.fallbacks},
        )

    def bars(self, values: np.ndarray, offsets: np.ndarray) -> Bars:
        if values.shape[0] < self.history_min_values:
            return self.host.bars(values, offsets)
        try:
            return self.device.bars(values, offsets)
        except MemoryError:  # the device engine's bars allocate before changing anything
            self._host_instead("bars")
            return self.host.bars(values, offsets)

    def rolling(self, values: np.ndarray, window: int, step: int) -> Rolling:
        if values.shape[0] < self.history_min_values:
            return self.host.rolling(values, window, step)
        try:
            return self.device.rolling(values, window, step)
        except MemoryError:
            self._host_instead("rolling")
            return self.host.rolling(values, window, step)
