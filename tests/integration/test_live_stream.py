"""Live statistics on a real server: GET /stream (Server-Sent Events) and the stats PUB socket.

A real appliance subprocess, real sockets: an SSE reader (tests/integration/sse_client.py) reads
events while the test publishes over REST and ZeroMQ; a real SUB socket reads the PUB socket.
Every number an event carries is checked against GET /stats/ and numpy on the same values.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import zmq
from server_harness import Server, running_server
from sse_client import SseClient, StreamError, open_stream

from appliance.auth import new_token, tokens_file_entry
from tests.waiting import wait_until
from transport.zmq.publisher import ZmqPublisher

RATE_HZ = 10


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def pub_endpoint(cwd: Path) -> str:
    path = cwd.resolve() / "stats.sock"
    if len(str(path)) <= 100:
        return f"ipc://{path}"
    from server_harness import free_port

    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server streaming at RATE_HZ per symbol, with the PUB socket on."""
    cwd = tmp_path_factory.mktemp("live")
    env = {
        "APP_STREAM__MAX_RATE_HZ": str(RATE_HZ),
        "APP_STREAM__HEARTBEAT_S": "0.2",
        "APP_STREAM__PUB_EXPONENT": "2",
        "APP_STORE__MAX_SYMBOLS": "100000",
        "APP_TRANSPORT__ZMQ__STATS_PUB_ENDPOINT": pub_endpoint(cwd),
    }
    with running_server(cwd, env) as server:
        server.stats_pub_endpoint = env["APP_TRANSPORT__ZMQ__STATS_PUB_ENDPOINT"]
        yield server


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a fast ticker, short client queues and three stream slots."""
    env = {
        "APP_STREAM__MAX_RATE_HZ": "500",
        "APP_STREAM__QUEUE_EVENTS": "16",
        "APP_STREAM__MAX_CLIENTS": "3",
        "APP_STORE__MAX_SYMBOLS": "100000",
    }
    with running_server(tmp_path_factory.mktemp("busy"), env) as server:
        yield server


def stats_of(server: Server, symbol: str, exponent: int = 8) -> dict:
    response = server.stats(symbol, exponent)
    assert response.status == 200, response
    return response.json


def assert_event_matches(data: dict, expected: dict, values: np.ndarray) -> None:
    """An event's statistics equal GET /stats/'s answer and numpy on the window's values."""
    for key in ("min", "max", "last"):
        assert data[key] == expected[key], (key, data, expected)
    assert data["avg"] == pytest.approx(expected["avg"], rel=1e-12)
    assert data["var"] == pytest.approx(expected["var"], rel=1e-9, abs=1e-12)
    assert data["count"] == values.size
    assert data["min"] == values.min() and data["max"] == values.max()
    assert data["last"] == values[-1]
    assert data["avg"] == pytest.approx(values.mean(), rel=1e-9)
    assert data["var"] == pytest.approx(values.var(), rel=1e-9, abs=1e-12)


def test_initial_event_then_one_per_change_matching_stats(live: Server) -> None:
    known, later = unique("LIVE"), unique("LATER")
    first = np.array([10.0, 12.5, 11.0])
    assert live.post_batch(known, first.tolist()).status == 200
    with open_stream(live, f"symbols={known},{later}&exponent=2") as client:
        assert client.content_type.startswith("text/event-stream")
        initial = client.next_event()
        assert initial.name == "stats" and initial.data["symbol"] == known
        assert initial.data["exponent"] == 2 and initial.data["version"] == 1
        assert isinstance(initial.data["timestamp"], int) and initial.data["timestamp"] > 0
        assert_event_matches(initial.data, stats_of(live, known, 2), first)

        # A symbol unknown when the stream opened: its events start with its first batch.
        assert live.post_batch(later, [3.0]).status == 200
        event = client.next_event()
        assert event.data["symbol"] == later and event.data["count"] == 1
        assert event.data["last"] == 3.0

        more = np.arange(1.0, 201.0)
        assert live.post_batch(known, more.tolist()).status == 200
        event = client.next_event()
        assert event.data["symbol"] == known and event.data["version"] == 2
        window = np.concatenate([first, more])[-100:]  # exponent 2: the last 100 values
        assert_event_matches(event.data, stats_of(live, known, 2), window)


def test_idle_stream_sends_heartbeat_comments(live: Server) -> None:
    with open_stream(live, f"symbols={unique('IDLE')}&exponent=1") as client:
        wait_until(lambda: _read_comment(client) and len(client.comments) >= 3, "heartbeats")
        assert client.comments.count("heartbeat") >= 2


def _read_comment(client: SseClient) -> bool:
    line = client.response.readline().decode()
    if line.startswith(":"):
        client.comments.append(line[1:].strip())
    return True


def test_seconds_window_counts_the_values_in_time(live: Server) -> None:
    symbol = unique("SECS")
    values = np.array([5.0, 1.0, 7.0, 3.0])
    assert live.post_batch(symbol, values[:2].tolist()).status == 200
    assert live.post_batch(symbol, values[2:].tolist()).status == 200
    with open_stream(live, f"symbols={symbol}&seconds=3600") as client:
        event = client.next_event()
    assert event.data["window_ns"] == 3600 * 10**9 and "exponent" not in event.data
    assert event.data["count"] == 4 and event.data["version"] == 2
    assert_event_matches(event.data, stats_of(live, symbol, 1), values)


def _numpy_stats(values: np.ndarray) -> dict:
    return {"min": values.min(), "max": values.max(), "last": values[-1],
            "avg": values.mean(), "var": values.var()}  # fmt: skip


def test_fast_batches_coalesce_to_at_most_the_rate(live: Server) -> None:
    symbol = unique("BURST")
    batches = [[float(i), float(i) + 0.5] for i in range(200)]
    with open_stream(live, f"symbols={symbol}&exponent=3") as client:
        started = time.monotonic()
        for batch in batches:  # as fast as REST takes them
            assert live.post_batch(symbol, batch).status == 200
        events = client.events_until(lambda e: e.data["version"] == 200, timeout_s=15)
        elapsed = time.monotonic() - started
    # At most one event per tick (RATE_HZ per s), plus one for a tick at either end.
    assert len(events) <= elapsed * RATE_HZ + 2, (len(events), elapsed)
    assert len(events) < len(batches) / 2
    versions = [e.data["version"] for e in events]
    assert versions == sorted(set(versions))  # never the same state twice, never backwards
    final = events[-1].data
    values = np.array(batches).ravel()
    assert_event_matches(final, stats_of(live, symbol, 3), values)


def test_zeromq_batches_reach_the_stream(live: Server) -> None:
    symbol = unique("ZMQ")
    values = np.random.default_rng(5).random(3000) * 100
    with (
        open_stream(live, f"symbols={symbol}&exponent=3") as client,
        ZmqPublisher(live.router_endpoint, max_frame_bytes=4096) as publisher,
    ):
        for start in range(0, values.size, 300):
            publisher.publish(symbol, values[start : start + 300])
        publisher.flush()
        events = client.events_until(lambda e: e.data["version"] == 10, timeout_s=15)
    assert_event_matches(events[-1].data, stats_of(live, symbol, 3), values[-1000:])


def test_pub_socket_sends_topic_and_json(live: Server) -> None:
    symbol, other = unique("PUB"), unique("NOTME")
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.RCVTIMEO, 10_000)
        sub.setsockopt(zmq.SUBSCRIBE, symbol.encode())
        sub.connect(live.stats_pub_endpoint)
        values = np.arange(1.0, 151.0)
        # A SUB socket misses what is sent before its subscription reaches the PUB: publish
        # until an event arrives (each batch is a new version, so a new event).
        deadline = time.monotonic() + 10
        sent = []
        assert live.post_batch(other, [1.0]).status == 200
        while True:
            assert time.monotonic() < deadline, "no PUB event"
            sent.extend(values.tolist())
            assert live.post_batch(symbol, values.tolist()).status == 200
            if sub.poll(300):
                break
        topic, body = sub.recv_multipart()
    finally:
        sub.close(0)
        context.term()
    assert topic == symbol.encode()
    data = json.loads(body)
    assert data["symbol"] == symbol and data["exponent"] == 2  # stream.pub_exponent
    # Each batch is 1..150 again: the state of version v holds its first 150 * v values.
    window = np.array(sent[: 150 * data["version"]])[-100:]
    assert_event_matches(data, _numpy_stats(window), window)


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("exponent=1", 400, "missing_parameter"),
        ("symbols=&exponent=1", 400, "missing_parameter"),
        ("symbols=A,,B&exponent=1", 400, "invalid_symbol"),
        ("symbols=A%01&exponent=1", 400, "invalid_symbol"),
        ("symbols=" + "X" * 65 + "&exponent=1", 400, "invalid_symbol"),
        ("symbols=" + ",".join(f"S{i}" for i in range(257)) + "&exponent=1", 400,
         "invalid_symbol"),
        ("symbols=A", 400, "invalid_exponent"),
        ("symbols=A&exponent=9", 400, "invalid_exponent"),
        ("symbols=A&exponent=x", 400, "invalid_exponent"),
        ("symbols=A&seconds=0", 400, "invalid_window"),
        ("symbols=A&seconds=-1", 400, "invalid_window"),
        ("symbols=A&seconds=1e3", 400, "invalid_window"),
        ("symbols=A&exponent=1&seconds=1", 400, "invalid_window"),
    ],
)  # fmt: skip
def test_bad_parameters_are_400(live: Server, query: str, status: int, code: str) -> None:
    response = live.request("GET", "/stream?" + query)
    assert (response.status, response.json["code"]) == (status, code), response


def test_too_many_symbols_for_the_queue_is_400(busy: Server) -> None:
    query = "symbols=" + ",".join(f"Q{i}" for i in range(17)) + "&exponent=1"
    response = busy.request("GET", "/stream?" + query)
    assert response.status == 400 and "stream.queue_events" in response.json["error"]


def test_streams_beyond_max_clients_are_429(busy: Server) -> None:
    query = f"symbols={unique('CAP')}&exponent=1"
    clients = [open_stream(busy, query) for _ in range(3)]
    try:
        with pytest.raises(StreamError) as refused:
            SseClient(busy, query)
        assert refused.value.status == 429
        assert refused.value.body["code"] == "rate_limited"
        clients.pop().close()
        clients.append(open_stream(busy, query))  # the slot is free again once it is seen gone
    finally:
        for client in clients:
            client.close()


@dataclass
class SlowClient:
    sock: socket.socket
    symbols: list[str]
    published: int = 0  # batches published while it filled up
    fast_events: int = 0  # events a healthy client read meanwhile


@contextlib.contextmanager
def dropped_slow_client(busy: Server) -> Iterator[SlowClient]:
    """A raw client of 16 busy symbols that never reads, kept until the server dropped it.

    A ZeroMQ PUSH publisher feeds the symbols as fast as it can, while a healthy client of one
    of them keeps reading: the slow client's socket buffers fill, then its queue, and the
    server drops it (seen in `hft_stream_dropped_total`). Yields with publishing stopped.
    """
    symbols = [unique("SLOW") + "-" + "x" * 40 for _ in range(16)]
    query = "symbols=" + ",".join(symbols) + "&exponent=1"
    # Streams of earlier tests (max_clients) are released once the server sees them go.
    wait_until(lambda: metric(busy, "hft_stream_clients") == 0, "earlier streams to go")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: small window
    slow.connect(("127.0.0.1", busy.port))
    slow.sendall(f"GET /stream?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    slow.settimeout(10)
    assert slow.recv(12, socket.MSG_WAITALL) == b"HTTP/1.1 200"  # a stream, not a 429
    client = SlowClient(slow, symbols)
    stop = threading.Event()

    def publish() -> None:
        with ZmqPublisher(busy.pull_endpoint, mode="push", max_frame_bytes=1024) as publisher:
            i = 0
            while not stop.is_set():
                publisher.publish(symbols[i % 16], np.array([float(i)]))
                i += 1
            publisher.flush()
            client.published = i

    dropped_before = metric(busy, "hft_stream_dropped_total")
    thread = threading.Thread(target=publish)
    try:
        with open_stream(busy, f"symbols={symbols[0]}&exponent=1", timeout_s=10) as fast:
            thread.start()
            deadline = time.monotonic() + 30.0
            while metric(busy, "hft_stream_dropped_total") <= dropped_before:
                assert time.monotonic() < deadline, "the slow client was never dropped"
                for _ in range(20):
                    event = fast.next_event()
                    assert event is not None and event.name == "stats", event
                    client.fast_events += 1
            stop.set()
            thread.join()
        yield client
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        slow.close()


def test_a_slow_client_is_dropped_while_ingest_and_other_clients_go_on(busy: Server) -> None:
    with dropped_slow_client(busy) as slow:
        assert slow.fast_events > 20  # the healthy client was served all along
        # The slow client now reads what was sent to it: events, then `dropped`, then EOF.
        slow.sock.settimeout(10)
        received = b""
        try:
            while chunk := slow.sock.recv(1 << 16):
                received += chunk
        except TimeoutError:
            raise AssertionError(
                f"the slow stream was not closed; {slow.published} batches published, "
                f"{len(received)} bytes received, {received[-300:]!r}"
            ) from None
        # Ingest was never held back: every published value was applied.
        wait_until(
            lambda: sum(hot_count(busy, s) for s in slow.symbols) == slow.published, "ingest"
        )
    assert b"event: stats" in received
    assert b"event: dropped" in received
    tail = received[received.rindex(b"event: dropped") :]
    assert b"stream.queue_events" in tail and b"event: stats" not in tail


def test_a_dropped_client_that_never_reads_is_cut_off(busy: Server) -> None:
    with dropped_slow_client(busy) as slow:
        # It never reads its final event: its slot is freed DROP_GRACE_S (5 s) after the drop.
        wait_until(lambda: metric(busy, "hft_stream_clients") == 0, "the cut-off", 20)
        slow.sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while slow.sock.recv(1 << 16):
                pass  # what was sent before the abort, then EOF or a reset: never a hang


def metric(server: Server, name: str) -> float:
    """A sample of GET /metrics (text, so not through `Server.request`)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in GET /metrics")


def hot_count(server: Server, symbol: str) -> int:
    response = server.request("GET", "/symbols")
    rows = {row["symbol"]: row["hot"] for row in response.json["symbols"]}
    return rows.get(symbol, 0)


def test_stop_ends_streams_with_a_final_event(tmp_path: Path) -> None:
    # graceful_shutdown_s far above the harness's 20 s stop timeout: a held stop would fail.
    env = {"APP_SERVER__GRACEFUL_SHUTDOWN_S": "120", "APP_STREAM__HEARTBEAT_S": "60"}
    with running_server(tmp_path, env) as server:
        symbol = unique("STOP")
        assert server.post_batch(symbol, [1.0]).status == 200
        client = open_stream(server, f"symbols={symbol}&exponent=1", timeout_s=30)
        assert client.next_event().name == "stats"
        assert server.stop() == 0
        final = client.next_event()
        assert final is not None and final.name == "end"
        assert client.next_event() is None  # then the connection closes
        client.close()


def test_stream_with_auth_checks_role_and_symbol_patterns(tmp_path: Path) -> None:
    tokens = {"eur": new_token(), "admin": new_token()}
    entries = [
        tokens_file_entry("eur", tokens["eur"], "read", ["EUR/*"]),
        tokens_file_entry("admin", tokens["admin"], "admin"),
    ]
    (tmp_path / "tokens.toml").write_text("\n".join(entries))
    env = {"APP_AUTH__MODE": "token", "APP_AUTH__TOKENS_FILE": str(tmp_path / "tokens.toml")}
    with running_server(tmp_path, env) as server:
        bearer = {name: {"Authorization": f"Bearer {t}"} for name, t in tokens.items()}
        body = json.dumps({"symbol": "EUR/USD", "values": [1.5]}).encode()
        headers = {"Content-Type": "application/json", **bearer["admin"]}
        assert server.request("POST", "/add_batch/", body, headers).status == 200
        response = server.request("GET", "/stream?symbols=EUR%2FUSD&exponent=1")
        assert response.status == 401
        query = "symbols=" + quote("EUR/USD,GBP/USD", safe=",") + "&exponent=1"
        response = server.request("GET", "/stream?" + query, headers=bearer["eur"])
        assert (response.status, response.json["code"]) == (403, "forbidden")
        with SseClient(server, "symbols=EUR%2FUSD&exponent=1", bearer["eur"]) as client:
            event = client.next_event()
        assert event.data["symbol"] == "EUR/USD" and event.data["last"] == 1.5


def test_the_readme_stream_example_is_a_real_event(live: Server) -> None:
    from server_harness import REPO_ROOT

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Live statistics", 1)[1]
    shown = json.loads(section.split("# data: ", 1)[1].split("\n", 1)[0])
    seed = [150.1, 150.5, 151.0, 149.8, 150.2, 151.1, 151.2, 152.0, 151.5, 151.9]
    symbol = unique("AAPL")
    assert live.post_batch(symbol, seed).status == 200
    with open_stream(live, f"symbols={symbol}&exponent=3") as client:
        event = client.next_event()
    assert list(event.data) == list(shown)  # the same fields, in the same order
    for key in ("symbol", "timestamp"):
        del event.data[key], shown[key]
    assert event.data == shown


def test_head_answers_the_stream_headers_without_opening_one(live: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    try:
        conn.request("HEAD", f"/stream?symbols={unique('HEAD')}&exponent=1")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b""
        assert response.getheader("content-type").startswith("text/event-stream")
    finally:
        conn.close()
    # Nothing is left registered (a stream of an earlier test may take a moment to go).
    wait_until(lambda: metric(live, "hft_stream_clients") == 0, "no open stream")


def test_an_unusable_pub_endpoint_stops_the_start_with_status_2(tmp_path: Path) -> None:
    from server_harness import run_cli

    endpoint = f"ipc://{tmp_path}/missing-dir/stats.sock"
    result = run_cli(tmp_path, "serve", env={"APP_TRANSPORT__ZMQ__STATS_PUB_ENDPOINT": endpoint})
    assert result.returncode == 2, result.stderr
    assert "transport.zmq.stats_pub_endpoint" in result.stderr
