"""GET /metrics end to end (issue 14): a real server started as users start it, fed over REST and
ZeroMQ, scraped over HTTP and parsed by the Prometheus text parser (`prometheus_client.parser`).

Also the dashboard check: every metric named in any query of
deploy/grafana/hft-appliance-dashboard.json must be in that real scrape.
"""

from __future__ import annotations

import http.client
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import Server, running_server

from tests.waiting import wait_until
from transport.zmq.publisher import ZmqPublisher

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "hft-appliance-dashboard.json"
ENV = {
    "APP_STORE__MAX_SYMBOLS": "1000",
    "APP_STORE__STARTING_CAPACITY": "1024",
    "APP_TRANSPORT__SHM__ENABLED": "false",
    "APP_DURABILITY__ENABLED": "true",
    "APP_DURABILITY__CHECKPOINT_INTERVAL_S": "1",  # so a checkpoint (and its age) exists soon
}

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def mserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("metrics"), ENV) as srv:
        yield srv


def scrape_text(server: Server, method: str = "GET") -> tuple[int, str, str]:
    """GET /metrics over HTTP (not `Server.request`: this body is text, not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, "/metrics")
        raw = conn.getresponse()
        return raw.status, raw.getheader("content-type") or "", raw.read().decode()
    finally:
        conn.close()


def scrape(server: Server) -> Samples:
    status, content_type, text = scrape_text(server)
    assert status == 200, text
    assert content_type.startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_rest_and_zmq_ingest_are_counted_per_transport_and_symbol(mserver: Server) -> None:
    before = scrape(mserver)
    rest_symbol, zmq_symbol = unique("REST"), unique("ZMQ")
    rest_values = np.random.default_rng(1).random(1234) * 100
    assert mserver.post_batch(rest_symbol, rest_values.tolist()).status == 200
    zmq_values = np.random.default_rng(2).random(5000) * 100
    with ZmqPublisher(mserver.router_endpoint, max_frame_bytes=4096) as publisher:
        for start in range(0, zmq_values.size, 700):
            publisher.publish(zmq_symbol, zmq_values[start : start + 700])
        publisher.flush()
    after = scrape(mserver)
    router = {"transport": "zmq", "socket": "router"}
    sent_values = value(after, "hft_ingest_values_total", **router) - value(
        before, "hft_ingest_values_total", **router
    )
    assert sent_values == zmq_values.size
    frames = value(after, "hft_ingest_frames_total", **router) - value(
        before, "hft_ingest_frames_total", **router
    )
    assert frames >= len(range(0, zmq_values.size, 700))  # 4 KiB frames split each publish
    for symbol, values in ((rest_symbol, rest_values), (zmq_symbol, zmq_values)):
        assert value(after, "hft_series_hot_values", symbol=symbol) == values.size
        assert value(after, "hft_series_total_values", symbol=symbol) == values.size
    rest = {"transport": "rest", "socket": "http"}
    for name, grew in (
        ("hft_ingest_values_total", rest_values.size),
        ("hft_ingest_frames_total", 1),
    ):
        assert value(after, name, **rest) - value(before, name, **rest) == grew, name
    posts = {"route": "add_batch", "status": "200"}
    assert (
        value(after, "hft_http_request_duration_seconds_count", **posts)
        == value(before, "hft_http_request_duration_seconds_count", **posts) + 1
    )
    # Every batch went through the write-ahead log: its bytes, commits and apply latency grew.
    assert value(after, "hft_wal_written_bytes_total") > value(
        before, "hft_wal_written_bytes_total"
    ) + 8 * (rest_values.size + zmq_values.size)
    assert value(after, "hft_apply_latency_seconds_count") > value(
        before, "hft_apply_latency_seconds_count"
    )
    assert value(after, "hft_ready") == 1
    assert value(after, "process_resident_memory_bytes") > 10 << 20


def test_error_responses_are_counted_by_code(mserver: Server) -> None:
    before = scrape(mserver)
    assert mserver.stats(unique("NEVER"), 1).status == 404
    assert mserver.stats("X", 9).status == 400
    assert mserver.request("GET", "/no/such/path").status == 404
    after = scrape(mserver)
    for code in ("unknown_symbol", "invalid_exponent", "not_found"):
        grew = value(after, "hft_errors_total", code=code) - value(
            before, "hft_errors_total", code=code
        )
        assert grew == 1, code
    assert value(after, "hft_http_request_duration_seconds_count", route="stats", status="404")


def rejected_frames(samples: Samples, transport: str, socket: str) -> float:
    return sum(
        count
        for labels, count in samples.get("hft_ingest_rejected_frames_total", {}).items()
        if dict(labels).get("transport") == transport and dict(labels).get("socket") == socket
    )


def test_rejections_are_counted_by_reason(mserver: Server) -> None:
    before = rejected_frames(scrape(mserver), "zmq", "pull")
    with ZmqPublisher(mserver.pull_endpoint, mode="push") as publisher:
        publisher.publish(unique("BAD"), np.array([-1.0]))  # a negative price: bad value
    wait_until(lambda: rejected_frames(scrape(mserver), "zmq", "pull") == before + 1)
    reasons = {
        dict(labels)["reason"]
        for labels in scrape(mserver)["hft_ingest_rejected_frames_total"]
        if dict(labels)["socket"] == "pull"
    }
    assert reasons and all(re.fullmatch(r"[a-z_]+", reason) for reason in reasons)


def test_head_answers_like_get_without_a_body(mserver: Server) -> None:
    status, content_type, text = scrape_text(mserver, "HEAD")
    assert status == 200 and text == "" and content_type.startswith("text/plain")


def dashboard_metric_names(dashboard: dict) -> dict[str, set[str]]:
    """Per panel title, the metric names its PromQL queries use."""
    functions = r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*\()"
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "and", "or", "unless", "le", "inf", "nan"}  # fmt: skip
    out: dict[str, set[str]] = {}
    for panel in dashboard["panels"]:
        names: set[str] = set()
        for target in panel["targets"]:
            expr = target["expr"]
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)  # labels, ranges, strings
            expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)  # grouping labels
            expr = re.sub(functions, " ", expr)
            for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                if token.lower() not in keywords:
                    names.add(token)
        out[panel["title"]] = names
    return out


def test_dashboard_parses_and_covers_the_issue() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and dashboard["title"] and "schemaVersion" in dashboard
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set().union(*dashboard_metric_names(dashboard).values())
    required = (
        "hft_ingest_values_total", "hft_ingest_rejected_frames_total",
        "hft_apply_latency_seconds_bucket", "hft_http_request_duration_seconds_bucket",
        "hft_series_hot_values", "hft_series_total_values", "process_resident_memory_bytes",
        "hft_wal_written_bytes_total", "hft_wal_fsync_duration_seconds_bucket",
        "hft_wal_commit_lag_seconds", "hft_checkpoint_age_seconds", "hft_warm_backlog_bytes",
        "hft_errors_total",
    )  # fmt: skip
    for name in required:
        assert name in used, name
    assert any("histogram_quantile" in t["expr"] for p in dashboard["panels"] for t in p["targets"])


def test_every_dashboard_query_names_exported_metrics(mserver: Server) -> None:
    # Traffic first, so every labelled family has samples: an error, a rejected frame.
    assert mserver.stats("X", 9).status == 400
    rejected = rejected_frames(scrape(mserver), "zmq", "pull")
    with ZmqPublisher(mserver.pull_endpoint, mode="push") as publisher:
        publisher.publish(unique("BAD"), np.array([-1.0]))
    wait_until(lambda: rejected_frames(scrape(mserver), "zmq", "pull") > rejected)
    symbol = unique("DASH")

    def checkpointed() -> bool:
        # A due checkpoint is taken after a commit: keep committing until one is written.
        assert mserver.post_batch(symbol, [1.0, 2.0]).status == 200
        return "hft_checkpoint_age_seconds" in scrape(mserver)

    wait_until(checkpointed, "a checkpoint", timeout_s=30)
    exported = set(scrape(mserver))  # sample names: histograms as _bucket, _sum, _count
    missing = {
        title: names - exported
        for title, names in dashboard_metric_names(json.loads(DASHBOARD.read_text())).items()
        if names - exported
    }
    assert not missing, missing
