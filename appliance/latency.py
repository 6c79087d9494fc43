"""Plain-Python latency histograms that hot paths update and GET /metrics reads at scrape time.

Why not `prometheus_client.Histogram` on the hot paths: its `observe()` takes a lock and walks
the buckets in Python; `LatencyHistogram.observe` is one `bisect` and two additions, and the
objects carry no dependency on the metrics library, so the write-ahead log's writer and the REST
middleware can own them while `appliance.metrics` turns them into Prometheus families.

Thread safety: each histogram has a single writer thread in practice (the REST loop, the log's
writer, its interval syncer). Where two threads may update one (an fsync of the writer thread
during a checkpoint while the syncer fsyncs), a lost increment only makes one observation
vanish; the exported count is always the sum of the bucket counts, so it stays consistent.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence

# Seconds. REST requests and log commits: 50 us .. 10 s.
REQUEST_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
)  # fmt: skip
# Seconds. fsync of the log's tail: 10 us (page cache on tmpfs) .. 10 s (a stalled disk).
FSYNC_BUCKETS_S = (
    0.00001, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
)  # fmt: skip


class LatencyHistogram:
    """Counts per bucket (upper bounds in seconds, +Inf implied) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = REQUEST_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus `le`).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (`le` label, observations <= it), ending with "+Inf"."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), list(self.counts), strict=True):
            running += count
            out.append((bound, running))
        return out


class WalTimings:
    """What the log's writer records for /metrics, once per commit and per fsync (never per value).

    - `apply`: from a batch's receipt (its `received_ns` stamp) until it is logged and applied to
      the hot tier, observed for the oldest batch of each commit (a group or an inline commit):
      what an acknowledging publisher waits for, less the network.
    - `fsync`: the duration of each fsync of the log's tail.
    - `last_write_ns` / `sync_started_ns`: wall-clock stamps of the newest write and of the start
      of the newest fsync; `commit_lag_s` derives how long the disk may lag the log from them.
    """

    __slots__ = ("apply", "fsync", "last_write_ns", "sync_started_ns")

    def __init__(self) -> None:
        self.apply = LatencyHistogram(REQUEST_BUCKETS_S)
        self.fsync = LatencyHistogram(FSYNC_BUCKETS_S)
        self.last_write_ns = 0
        self.sync_started_ns = time.time_ns()

    def committed(self, received_ns: int) -> None:
        """A commit was written and applied; `received_ns`: its oldest batch's receipt stamp."""
        now = time.time_ns()
        self.last_write_ns = now
        self.apply.observe((now - received_ns) / 1e9)

    def fsync_started(self) -> int:
        """Call right before an fsync; pass the result to `fsync_done`."""
        started = time.time_ns()
        self.sync_started_ns = started
        return started

    def fsync_done(self, started_ns: int) -> None:
        self.fsync.observe((time.time_ns() - started_ns) / 1e9)

    def commit_lag_s(self, now_ns: int | None = None) -> float:
        """0 when everything written is covered by an fsync that has started; else the seconds
        since the last fsync started: an upper bound on the age of the oldest write not yet on
        disk (what a power loss could lose under `interval`; it only grows under `never`)."""
        if self.last_write_ns <= self.sync_started_ns:
            return 0.0
        now = time.time_ns() if now_ns is None else now_ns
        return max(0.0, (now - self.sync_started_ns) / 1e9)
