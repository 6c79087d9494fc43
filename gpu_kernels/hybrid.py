"""Hybrid placement (issue 13, item 1): the compiled CPU tree answers what one query or one
append needs, a device mirror answers bulk work.

Why: on the H200 one GPU query costs at least a kernel launch plus an 8-byte copy back (23 us
through CuPy), which is slower than the compiled engine's whole window query, and a small
append costs the device more than the host. A large batch of queries, bars and rolling
statistics are where the device pays. So a `HybridSeries` is a `CompiledSeries` (every append,
`stats`, `tail`, `tail_views` and `len` touch only it: `gpu`/`auto` are never slower than `cpu`
on those) plus a `GpuSeries` mirror that is brought up to date lazily, only when a device
operation needs it, by appending the host values it has not seen.

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
append is all or nothing) and the operation is answered on the host; the host series is never
touched. Any other device error during a sync drops the mirror (rebuilt whole next time).

Pinned pages (item 3): the host series' value pages come from `Device.new_pinned_values`
(page-locked where the device has such memory), so a sync copies each page straight to the
device (`upload_direct`, no staging memcpy). A page's first allocation then costs a pinned
allocation instead of a plain one; retired pages are recycled (CompiledSeries), so that cost is
paid once per page of a series' peak. `pinned_host_pages=False` turns it off.
"""

from __future__ import annotations

import logging
import threading
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


def sliding_policy(retention: RetentionPolicy) -> RetentionPolicy:
    """The mirror's policy: the newest `max_values` values, whatever the batch sizes (see the
    module docstring for why not the host's own policy)."""
    return RetentionPolicy(retention.max_values, retention.max_values)


class HostSeries(CompiledSeries):
    """The hybrid's host series: a `CompiledSeries` whose new value pages come from
    `allocate` (page-locked memory from the device, or np.empty) and that says where its
    values sit in its absolute index space (`end_index`), which the mirror sync needs.

    A page that cannot be pinned is made as the compiled engine makes it (np.empty): pinning
    is an optimisation of the mirror's copies, never a reason for an append to fail.
    Pre-created `starting_capacity` pages stay plain (np.empty maps them lazily; pinning them
    would commit memory for values that may never come).
    """

    def __init__(
        self,
        retention: RetentionPolicy,
        starting_capacity: int,
        geometry: Geometry,
        allocate: Callable[[int], np.ndarray] = np.empty,
    ) -> None:
        self._allocate_pinned = allocate
        super().__init__(retention, starting_capacity, geometry)

    @property
    def end_index(self) -> int:
        """The absolute index one past the newest value (values ever stored)."""
        return self._end

    def _value_page(self, rows: int) -> np.ndarray:
        spare = self._spare[0]
        if spare:
            return spare.pop()
        try:
            return self._allocate_pinned(rows)
        except Exception:  # MemoryError, or the driver's error for page-locked memory
            return np.empty(rows)


class HybridSeries:
    """A compiled host series plus a lazily synced device mirror (module docstring)."""

    def __init__(self, host: HostSeries, device: CupyEngine) -> None:
        self.host = host
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
        could not allocate it; then the mirror is dropped and the host is as it was.

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
                # One append of the host's own pages (pinned where possible), oldest first,
                # copied without staging; they must stay unchanged until the copies finish,
                # hence the synchronize before the views are let go (a recycled page is
                # rewritten by later appends).
                mirror.append_parts(self.host.tail_views(delta), stable_source=True)
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
            return mirror


@dataclass(frozen=True, slots=True)
class HybridEngine(Engine):
    """Routes each operation to the compiled host engine or the CuPy device engine.

    - appends, `stats`, `tail`: host only (HybridSeries);
    - `stats_many` / `stats_table` with fewer than `batch_min_queries` queries: host engine;
      larger batches: device engine, on mirrors synced first, windows clamped to the host's
      length;
    - `bars`, `rolling`: device engine (history analytics, values passed in).
    """

    host: CompiledEngine
    device: CupyEngine
    batch_min_queries: int = DEFAULT_BATCH_MIN_QUERIES
    pinned_host_pages: bool = True
    name: str = "hybrid"
    _fallbacks: list[int] = field(default_factory=lambda: [0], compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_min_queries < 1:
            raise ValueError("batch_min_queries must be >= 1")

    @property
    def geometry(self) -> Geometry:
        return self.host.geometry

    @property
    def device_name(self) -> str:
        return self.device.device_name

    @property
    def host_fallbacks(self) -> int:
        """Device operations answered on the host because device memory ran out."""
        return self._fallbacks[0]

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> HybridSeries:
        device: Device = self.device.device
        allocate = device.new_pinned_values if self.pinned_host_pages else np.empty
        host = HostSeries(retention, starting_capacity, self.host.geometry, allocate)
        return HybridSeries(host, self.device)

    # -- batches ------------------------------------------------------------------------------

    def _mirrors(self, series: Sequence[HybridSeries]) -> list[GpuSeries] | None:
        mirrors = []
        for one in series:
            mirror = one.synced_mirror()
            if mirror is None:
                self._host_instead("a batch of queries (mirror sync)")
                return None
            mirrors.append(mirror)
        return mirrors

    def stats_many(self, requests: Sequence[tuple[Series, int]]) -> list[WindowStats]:
        pairs: Sequence[tuple[HybridSeries, int]] = requests  # type: ignore[assignment]
        if len(pairs) >= self.batch_min_queries:
            unique = list({id(s): s for s, _ in pairs}.values())
            mirrors = self._mirrors(unique)
            if mirrors is not None:
                by_id = {id(s): m for s, m in zip(unique, mirrors, strict=True)}
                return self.device.stats_many(
                    [(by_id[id(s)], min(window, len(s))) for s, window in pairs]
                )
        return self.host.stats_many([(s.host, window) for s, window in pairs])

    def stats_table(
        self, series: Sequence[Series], which: np.ndarray, windows: np.ndarray
    ) -> np.ndarray:
        hybrid: Sequence[HybridSeries] = series  # type: ignore[assignment]
        if which.shape[0] >= self.batch_min_queries:
            mirrors = self._mirrors(hybrid)
            if mirrors is not None:
                sizes = np.fromiter((len(s) for s in hybrid), np.int64, len(hybrid))
                clamped = np.minimum(windows, sizes[which])
                return self.device.stats_table(mirrors, which, clamped)
        return self.host.stats_table([s.host for s in hybrid], which, windows)

    # -- history analytics: the device, the host when the device is out of memory ------------

    def _host_instead(self, what: str) -> None:
        self._fallbacks[0] += 1
        log.warning(
            "device memory exhausted: %s answered on the host",
            what,
            extra={"engine": self.name, "host_fallbacks": self._fallbacks[0]},
        )

    def bars(self, values: np.ndarray, offsets: np.ndarray) -> Bars:
        try:
            return self.device.bars(values, offsets)
        except MemoryError:  # the device engine's bars allocate before changing anything
            self._host_instead("bars")
            return self.host.bars(values, offsets)

    def rolling(self, values: np.ndarray, window: int, step: int) -> Rolling:
        try:
            return self.device.rolling(values, window, step)
        except MemoryError:
            self._host_instead("rolling")
            return self.host.rolling(values, window, step)
