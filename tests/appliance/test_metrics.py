"""The metrics collector in-process: families built from the appliance's own counters, the
latency histograms, the error counter, and `[metrics] enabled = false` installing nothing.

The same exposition is scraped from a real server in tests/integration/test_metrics_api.py.
"""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sanic.response import HTTPResponse

from appliance.app import create_app, error_response
from appliance.config import AppConfig, build_config
from appliance.errors import ApiError
from appliance.latency import LatencyHistogram, WalTimings
from appliance.metrics import (
    CONTENT_TYPE,
    OTHER_CODE,
    UNMATCHED_ROUTE,
    RestMetrics,
    ingest_families,
    route_label,
)
from appliance.openapi import build_openapi


def new_app(config: AppConfig | None = None):
    return create_app(config or AppConfig(), name=f"test_{uuid.uuid4().hex[:12]}")


def scrape(app: Any) -> dict[str, dict[tuple, float]]:
    """What GET /metrics would answer, parsed by the Prometheus text parser: sample name ->
    {sorted label items: value}."""
    from prometheus_client.exposition import generate_latest

    text = generate_latest(app.ctx.metrics_registry).decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 5.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert histogram.sum == pytest.approx(5.0035)


def test_commit_lag_is_zero_once_an_fsync_started_after_the_last_write() -> None:
    timings = WalTimings()
    timings.committed(received_ns=timings.sync_started_ns)
    write = timings.last_write_ns
    assert timings.commit_lag_s(now_ns=write + 2_000_000_000) >= 2.0
    timings.fsync_done(timings.fsync_started())
    assert timings.commit_lag_s() == 0.0
    assert timings.fsync.cumulative()[-1] == ("+Inf", 1)
    assert timings.apply.cumulative()[-1] == ("+Inf", 1)


def test_route_labels_drop_the_app_prefix() -> None:
    assert route_label("hft_appliance.stats", "hft_appliance") == "stats"
    assert route_label(None, "hft_appliance") == UNMATCHED_ROUTE


def test_errors_are_counted_by_code_from_the_rendered_body() -> None:
    rest = RestMetrics()
    rest.count_error(error_response(ApiError("invalid_exponent", "x")).body)
    rest.count_error(error_response(ApiError("invalid_exponent", "y")).body)
    rest.count_error(b"<html>not ours</html>")
    rest.count_error(b'{"code": "made_up"}')  # never a label outside the table
    assert rest.errors == {"invalid_exponent": 2, OTHER_CODE: 2}


def test_ingest_families_label_every_transport_socket_and_reason() -> None:
    zmq_socket = {"messages": 3, "frames_applied": 5, "values_applied": 50, "rejected": {}}
    snapshot = {
        "zmq": {
            "router": {**zmq_socket, "rejected": {"gap": 2, "duplicate": 1}},
            "pull": zmq_socket,
            "control": {"requests": 1},
        },
        "shm": {
            "totals": {
                "messages": 7,
                "frames_applied": 7,
                "values_applied": 70,
                "rejected.bad_value": 4,
            }
        },
        "rdma": {"status": "unavailable", "reason": "no device"},
    }
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in ingest_families(snapshot)
        for s in family.samples
    }
    router = (("socket", "router"), ("transport", "zmq"))
    rings = (("socket", "rings"), ("transport", "shm"))
    assert samples[("hft_ingest_values_total", router)] == 50
    assert samples[("hft_ingest_frames_total", rings)] == 7
    assert samples[("hft_ingest_values_total", rings)] == 70
    assert samples[("hft_ingest_rejected_frames_total", (("reason", "gap"), *router))] == 2
    assert samples[("hft_ingest_rejected_frames_total", (("reason", "bad_value"), *rings))] == 4
    assert not any(dict(labels).get("transport") == "rdma" for _, labels in samples)
    assert not any(dict(labels).get("socket") == "control" for _, labels in samples)


def test_collector_reads_the_store_the_transports_and_the_rest_counters() -> None:
    app = new_app()
    assert scrape(app)["hft_ready"] == {(): 0}  # starting
    app.ctx.readiness.mark_ready()
    app.ctx.store.ingest("AAA", np.arange(1.0, 8.0))
    app.ctx.store.ingest("BBB", np.ones(3), timestamps=np.array([5, 6, 7]) * 10**9)
    app.ctx.store.clamp_out_of_order = True
    app.ctx.store.ingest("BBB", np.ones(3), timestamps=np.array([1, 8, 2]) * 10**9)
    app.ctx.transports = SimpleNamespace(
        snapshot=lambda: {
            "zmq": {
                "router": {"messages": 1, "frames_applied": 2, "values_applied": 9, "rejected": {}}
            }
        }
    )
    handler = next(r.handler for r in app.router.routes if r.path.strip("/") == "stats")
    request = SimpleNamespace(
        query_string="symbol=NOPE&exponent=1", app=app, stream=None, name=None, route=None
    )
    with pytest.raises(ApiError):  # the timed handler re-raises; the error handler renders it
        asyncio.run(handler(request))
    app.error_handler.response(request, ApiError("unknown_symbol", "no"))
    scraped = scrape(app)
    assert scraped["hft_series_hot_values"] == {(("symbol", "AAA"),): 7, (("symbol", "BBB"),): 6}
    assert scraped["hft_timestamps_clamped_total"] == {
        (("symbol", "AAA"),): 0, (("symbol", "BBB"),): 2,
    }  # fmt: skip
    assert scraped["hft_series_newest_timestamp_seconds"][(("symbol", "BBB"),)] == 8.0
    assert scraped["hft_symbols"] == {(): 2}
    labels = (("socket", "router"), ("transport", "zmq"))
    rest = (("socket", "http"), ("transport", "rest"))  # no POST yet: there, at zero
    assert scraped["hft_ingest_values_total"] == {labels: 9, rest: 0}
    route = (("route", "stats"), ("status", "404"))
    assert scraped["hft_http_request_duration_seconds_count"] == {route: 1}
    assert scraped["hft_errors_total"] == {(("code", "unknown_symbol"),): 1}
    assert scraped["hft_ready"] == {(): 1}
    assert scraped["process_resident_memory_bytes"][()] > 0
    # Durability is off here: no log families, no totals per symbol, but the histograms exist.
    assert "hft_wal_written_bytes_total" not in scraped
    assert "hft_series_total_values" not in scraped
    assert scraped["hft_apply_latency_seconds_count"] == {(): 0}


def test_each_app_has_its_own_registry() -> None:
    first, second = new_app(), new_app()
    first.ctx.store.ingest("ONLY-FIRST", np.ones(2))
    assert first.ctx.metrics_registry is not second.ctx.metrics_registry
    assert scrape(first)["hft_series_hot_values"]
    assert not scrape(second).get("hft_series_hot_values")


def test_the_route_answers_the_text_format() -> None:
    app = new_app()
    handler = next(r.handler for r in app.router.routes if r.path.strip("/") == "metrics")
    response: HTTPResponse = asyncio.run(handler(SimpleNamespace(app=app)))
    assert response.content_type == CONTENT_TYPE
    assert b"hft_ready" in response.body


def test_disabled_installs_no_route_no_middleware_no_timings() -> None:
    config = build_config({}, {"APP_METRICS__ENABLED": "false"})
    app = new_app(config)
    assert all(r.path.strip("/") != "metrics" for r in app.router.routes)
    assert all(r.handler.__name__ == getattr(r.handler, "__wrapped__", r.handler).__name__
               for r in app.router.routes)  # fmt: skip
    assert not any(hasattr(r.handler, "__wrapped__") for r in app.router.routes)
    assert app.ctx.metrics_registry is None and app.ctx.wal_timings is None
    assert "/metrics" not in build_openapi(config)["paths"]
    assert "/metrics" in build_openapi(AppConfig())["paths"]
