"""The appliance's Prometheus metrics: GET /metrics (issue 14, SPEC section 10).

Why a custom collector: the appliance already counts what matters (the transports' frames,
values and rejections, the store's series, the log's writer, the warm tier), so a scrape reads
those counters (`ApplianceCollector.collect`) and the hot paths pay nothing for them. The only
recording added for metrics is once per REST request (the app's route hook,
`appliance.app._route`, filling `RestMetrics`) and once per log commit and fsync
(`appliance.latency.WalTimings`); both are plain Python objects that the collector turns into
families at scrape time.

Every app has its own `CollectorRegistry` (`app.ctx.metrics_registry`), never the library's
global one: a test or benchmark can build many apps in one process. With `[metrics] enabled =
false`, `install_metrics` does nothing at all: no route (GET /metrics answers 404 not_found),
no request timing (`app.ctx.rest_metrics` is None), no log timings.

Names: `hft_` prefix, base units, `_total` for counters; per-symbol labels are bounded by
`store.max_symbols`, error codes by the table in `appliance.errors`, routes by the app's routes.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sanic import Request, Sanic
from sanic.response import HTTPResponse

from appliance.errors import ERROR_CODES
from appliance.latency import REQUEST_BUCKETS_S, LatencyHistogram, WalTimings

# The Prometheus text exposition format (the library's CONTENT_TYPE_LATEST may name 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
UNMATCHED_ROUTE = "unmatched"  # a request no route matched (404 not_found, 405)
OTHER_CODE = "other"  # an error body without a known code (never expected)

_ZMQ_SOCKETS = ("router", "pull", "sub")
_RING_TRANSPORTS = ("shm", "rdma")
_ERROR_BODY = msgspec.json.Decoder(dict[str, Any])


class RestMetrics:
    """Per (route name, status): a latency histogram; per error code: a count.

    Filled by the app's route hook and its error handler on the event loop (one thread), read
    at scrape time.
    """

    __slots__ = ("errors", "latency")

    def __init__(self) -> None:
        self.latency: dict[tuple[str | None, int], LatencyHistogram] = {}
        self.errors: Counter[str] = Counter()

    def observe(self, route: str | None, status: int, seconds: float | None) -> None:
        key = (route, status)
        histogram = self.latency.get(key)
        if histogram is None:
            histogram = self.latency[key] = LatencyHistogram(REQUEST_BUCKETS_S)
        if seconds is not None:
            histogram.observe(seconds)

    def count_error(self, body: bytes | None) -> None:
        """Count an error response by the `code` of its JSON body (`appliance.errors` table)."""
        code = OTHER_CODE
        try:
            found = _ERROR_BODY.decode(body or b"").get("code")
        except msgspec.DecodeError:
            found = None
        if isinstance(found, str) and found in ERROR_CODES:
            code = found
        self.errors[code] += 1


def route_label(name: str | None, app_name: str) -> str:
    """Sanic's route name without the app's prefix (`hft_appliance.stats` -> `stats`)."""
    if not name:
        return UNMATCHED_ROUTE
    prefix = app_name + "."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _histogram(
    name: str, doc: str, labels: list[str], series: Iterable[tuple[list[str], LatencyHistogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, histogram in series:
        buckets = histogram.cumulative()
        # The sum is read after the counts: a racing observe may move it, never the count.
        family.add_metric(values, buckets, histogram.sum)
    return family


class ApplianceCollector(Collector):
    """Reads the appliance's own counters at scrape time (nothing here runs on a hot path)."""

    def __init__(self, app: Sanic, rest: RestMetrics, wal: WalTimings) -> None:
        self._app = app
        self._rest = rest
        self._wal = wal

    def collect(self) -> Iterator[Metric]:
        ctx = self._app.ctx
        yield GaugeMetricFamily(
            "hft_ready",
            "1 when the appliance accepts reads and writes (GET /health and /ready answer 200)",
            value=ctx.readiness.ready,
        )
        yield from self._rest_families()
        snapshot = ctx.transports.snapshot() if ctx.transports else {}
        yield from ingest_families({**snapshot, "rest": ctx.rest_ingest.snapshot()})
        yield from self._store_families()
        yield from self._wal_families()
        yield from self._warm_families()
        yield from live_families(getattr(ctx, "live", None))
        cluster = getattr(ctx, "cluster", None)
        if cluster is not None:
            yield from cluster_families(cluster.node.snapshot())

    def _rest_families(self) -> Iterator[Metric]:
        app_name = self._app.name
        series = sorted(
            ([route_label(route, app_name), str(status)], histogram)
            for (route, status), histogram in list(self._rest.latency.items())
        )
        yield _histogram(
            "hft_http_request_duration_seconds",
            "REST request latency, from routing to the response (seconds), by route and status",
            ["route", "status"],
            series,
        )
        errors = CounterMetricFamily(
            "hft_errors", "Error responses by machine-readable code", labels=["code"]
        )
        for code, count in sorted(dict(self._rest.errors).items()):
            errors.add_metric([code], count)
        yield errors

    def _store_families(self) -> Iterator[Metric]:
        ctx = self._app.ctx
        store = ctx.store
        durable = ctx.durable
        warm = ctx.warm
        symbols = store.symbols()
        yield GaugeMetricFamily("hft_symbols", "Symbols in the hot tier", value=len(symbols))
        yield GaugeMetricFamily(
            "hft_symbols_max", "The symbol limit (store.max_symbols)", value=store.max_symbols
        )
        hot = GaugeMetricFamily(
            "hft_series_hot_values", "Values kept in the hot tier, per symbol", labels=["symbol"]
        )
        total = GaugeMetricFamily(
            "hft_series_total_values",
            "Values ever accepted per symbol (evicted ones included; with durability on)",
            labels=["symbol"],
        )
        clamped = CounterMetricFamily(
            "hft_timestamps_clamped",
            'Values whose timestamp store.out_of_order = "clamp" moved forward, per symbol',
            labels=["symbol"],
        )
        newest = GaugeMetricFamily(
            "hft_series_newest_timestamp_seconds",
            "The newest tick timestamp per symbol (event time, or receive time)",
            labels=["symbol"],
        )
        warm_totals = warm.symbols() if warm is not None else {}
        for name in symbols:
            try:
                length = store.length(name)
                clamped.add_metric([name], store.clamped(name))
                newest.add_metric([name], store.newest_timestamp(name) / 1e9)
            except KeyError:  # deleted (DELETE /symbols/{symbol}) since the list was taken
                continue
            hot.add_metric([name], length)
            if durable is not None:
                total.add_metric([name], max(durable.total(name), length))
            elif name in warm_totals:
                total.add_metric([name], max(warm_totals[name].total, length))
        yield hot
        yield total
        yield clamped
        yield newest

    def _wal_families(self) -> Iterator[Metric]:
        durable = self._app.ctx.durable
        wal = self._wal
        yield _histogram(
            "hft_apply_latency_seconds",
            "From a batch's receipt until it is logged and applied to the hot tier (seconds), "
            "once per log commit, for its oldest batch",
            [],
            [([], wal.apply)],
        )
        yield _histogram(
            "hft_wal_fsync_duration_seconds",
            "Duration of each fsync of the write-ahead log (seconds)",
            [],
            [([], wal.fsync)],
        )
        if durable is None:
            return
        yield CounterMetricFamily(
            "hft_wal_written_bytes",
            "Bytes appended to the write-ahead log by this process",
            value=durable.bytes_written,
        )
        yield CounterMetricFamily(
            "hft_wal_fsyncs", "fsyncs of the write-ahead log", value=durable.fsyncs
        )
        yield CounterMetricFamily(
            "hft_wal_commits", "Log commits (groups and inline commits)", value=durable.groups
        )
        yield GaugeMetricFamily(
            "hft_wal_last_lsn", "The newest log sequence number", value=durable.next_lsn - 1
        )
        yield GaugeMetricFamily(
            "hft_wal_commit_lag_seconds",
            "How long the disk may lag the log: seconds since the last fsync started while "
            "writes are not covered by one (0 when all is synced)",
            value=wal.commit_lag_s(),
        )
        checkpointer = durable.checkpointer
        written = getattr(checkpointer, "last_written_unix", None)
        if written is not None:
            yield GaugeMetricFamily(
                "hft_checkpoint_age_seconds",
                "Seconds since the newest hot-tier checkpoint was written",
                value=max(0.0, time.time() - written),
            )
            yield GaugeMetricFamily(
                "hft_checkpoint_last_duration_seconds",
                "How long the newest checkpoint written by this process took (seconds)",
                value=checkpointer.last_duration_s,
            )

    def _warm_families(self) -> Iterator[Metric]:
        warm = self._app.ctx.warm
        if warm is None:
            return
        yield GaugeMetricFamily(
            "hft_warm_backlog_bytes",
            "Bytes of values handed to the warm tier's sealer and not sealed yet",
            value=warm.backlog_bytes,
        )
        unsealed = GaugeMetricFamily(
            "hft_warm_unsealed_values",
            "Values in the warm tier held only in memory (not sealed into segments), per symbol",
            labels=["symbol"],
        )
        for name, totals in sorted(warm.symbols().items()):
            unsealed.add_metric([name], totals.total - totals.sealed_end)
        yield unsealed


def cluster_families(snapshot: Mapping[str, Any]) -> Iterator[Metric]:
    """Cluster mode (appliance.cluster.node.ClusterNode.snapshot): what this node serves, how
    far each owned partition's apply is behind its stream (as of the last renew tick), what
    it forwarded, and how many partitions it took over."""
    yield GaugeMetricFamily(
        "hft_cluster_partitions_owned",
        "Partitions this node owns and serves (restored and replayed)",
        value=len(snapshot["owned"]),
    )
    lag = GaugeMetricFamily(
        "hft_cluster_apply_lag_messages",
        "Stream messages of an owned partition not yet applied here (last sequence - applied)",
        labels=["partition"],
    )
    for partition, behind in sorted(snapshot["lag"].items()):
        lag.add_metric([str(partition)], behind)
    yield lag
    forwarded = CounterMetricFamily(
        "hft_cluster_forwarded_requests",
        "Requests this node forwarded to another node's partition, by operation",
        labels=["op"],
    )
    for op, count in sorted(snapshot["forwarded"].items()):
        forwarded.add_metric([op], count)
    yield forwarded
    yield CounterMetricFamily(
        "hft_cluster_failovers",
        "Partitions this node took over (restore from the checkpoint + replay, then serve)",
        value=snapshot["failovers"],
    )
    yield CounterMetricFamily(
        "hft_cluster_replay_gaps",
        "Takeovers refused because the stream was purged past the checkpoint (data missing)",
        value=snapshot.get("replay_gaps", 0),
    )


def live_families(hub: Any) -> Iterator[Metric]:
    """Live statistics (appliance.live): open streams, events queued, clients dropped, PUB
    messages sent."""
    if hub is None:
        return
    yield GaugeMetricFamily(
        "hft_stream_clients", "Open GET /stream clients", value=len(hub.clients)
    )
    for name, what, value in (
        ("hft_stream_events_total", "Events queued for GET /stream clients", hub.events_sent),
        ("hft_stream_dropped_total", "GET /stream clients dropped for falling behind "
         "(stream.queue_events)", hub.dropped),
        ("hft_stream_pub_messages_total", "Messages sent on the stats PUB socket", hub.pub_sent),
    ):  # fmt: skip
        yield CounterMetricFamily(name, what, value=value)


def ingest_families(snapshot: Mapping[str, Any]) -> Iterator[Metric]:
    """The transports' counters (`Transports.snapshot()`, GET /ingest) as counter families.

    ZeroMQ is labelled by socket kind (router, pull, sub); shared memory and RDMA by `rings`
    (their totals, closed rings included: per-publisher labels would be unbounded over time);
    REST's accepted batches (`POST /add_batch/`) by `http` (its refusals are counted by code in
    hft_errors_total, like every REST error).
    """
    labels = ["transport", "socket"]
    messages = CounterMetricFamily("hft_ingest_messages", "Messages received", labels=labels)
    frames = CounterMetricFamily("hft_ingest_frames", "Frames applied to the store", labels=labels)
    values = CounterMetricFamily("hft_ingest_values", "Values applied to the store", labels=labels)
    rejected = CounterMetricFamily(
        "hft_ingest_rejected_frames",
        "Frames not applied (or duplicates acked), by reason",
        labels=[*labels, "reason"],
    )
    for transport, socket, counters, reasons in _ingest_rows(snapshot):
        messages.add_metric([transport, socket], counters.get("messages", 0))
        frames.add_metric([transport, socket], counters.get("frames_applied", 0))
        values.add_metric([transport, socket], counters.get("values_applied", 0))
        for reason, count in sorted(reasons.items()):
            rejected.add_metric([transport, socket, reason], count)
    yield from (messages, frames, values, rejected)


def _ingest_rows(
    snapshot: Mapping[str, Any],
) -> Iterator[tuple[str, str, Mapping[str, Any], Mapping[str, int]]]:
    rest = snapshot.get("rest")
    if rest:
        yield "rest", "http", rest, {}
    zmq = snapshot.get("zmq") or {}
    for socket in _ZMQ_SOCKETS:
        counters = zmq.get(socket)
        if counters:
            yield "zmq", socket, counters, counters.get("rejected", {})
    for transport in _RING_TRANSPORTS:
        totals = (snapshot.get(transport) or {}).get("totals")
        if totals is None:  # not running (e.g. RDMA without a device)
            continue
        reasons = {
            key.partition(".")[2]: count
            for key, count in totals.items()
            if key.startswith("rejected.")
        }
        yield transport, "rings", totals, reasons


def install_metrics(app: Sanic, register: Any) -> None:
    """Give `app` GET /metrics and the per-request timing, per `[metrics]` (call once, from
    `create_app`, before the server starts). Disabled: nothing is installed.

    Sets `app.ctx.metrics_registry` (None when disabled) and `app.ctx.wal_timings`, which
    `attach_durability` hands to the log's writer (None: the writer records nothing).
    """
    app.ctx.metrics_registry = None
    app.ctx.wal_timings = None
    app.ctx.rest_metrics = None
    if not app.ctx.config.metrics.enabled:
        return
    rest = RestMetrics()
    wal = WalTimings()
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, open fds
    PlatformCollector(registry=registry)  # python_info
    registry.register(ApplianceCollector(app, rest, wal))
    app.ctx.metrics_registry = registry
    app.ctx.wal_timings = wal
    # The app's route hook times every request and counts error bodies into it; its error
    # handler counts the errors it renders (appliance.app).
    app.ctx.rest_metrics = rest

    async def metrics(request: Request) -> HTTPResponse:
        # On the loop: the families are built from in-memory counters (bounded by max_symbols).
        return HTTPResponse(generate_latest(registry), content_type=CONTENT_TYPE)

    register(METRICS_PATH)(metrics)  # through the app's route hook: auth, request id
