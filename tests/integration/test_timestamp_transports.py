"""Event times over the binary transports, end to end against a real server (issue 17).

Version-2 frames (values plus a timestamp column) go through a real ZeroMQ DEALER/ROUTER pair
and a real shared-memory ring into a server subprocess, and are read back over REST:
`GET /metrics` gives per symbol the values kept (`hft_series_hot_values`), the newest timestamp
(`hft_series_newest_timestamp_seconds`) and the clamped count (`hft_timestamps_clamped`);
`GET /stats/` the statistics, checked against numpy on the values that must be there. Also the
order rule (OUT_OF_ORDER, nothing of the frame applied; `store.out_of_order = "clamp"`: applied
and clamped), INVALID_TIMESTAMP, and the `publish` / `replay` CLIs with times.

The `GET /stats/?seconds=` checks need the time-window parameter on the REST API (helper C's
work on issue 17): they are skipped, saying so, while appliance.openapi does not document it.
"""

from __future__ import annotations

import http.client
import math
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import Server, appliance_command, running_server, subprocess_env

from transport.publisher import Publisher, PublishError
from transport.shm.publisher import ShmPublisher
from transport.shm.server import DEFAULT_DIRECTORY
from transport.wire import Reason
from transport.zmq.publisher import ZmqPublisher

ENV = {
    "APP_STORE__MAX_SYMBOLS": "100000",
    "APP_STORE__STARTING_CAPACITY": "1024",
    "APP_TRANSPORT__SHM__ENABLED": "true" if DEFAULT_DIRECTORY.is_dir() else "false",
    "APP_TRANSPORT__SHM__SLOTS": "64",
    "APP_TRANSPORT__SHM__SLOT_BYTES": "4096",
}
TIMEOUT_S = 20.0
T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
MS = 1_000_000
TRANSPORTS = [
    "zmq",
    pytest.param(
        "shm", marks=pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")
    ),
]


def _has_seconds_parameter() -> bool:
    # the documented API is the served one (tests/appliance check OpenAPI against the routes)
    from appliance.config import AppConfig
    from appliance.openapi import build_openapi

    parameters = build_openapi(AppConfig())["paths"]["/stats/"]["get"].get("parameters", [])
    return any(parameter.get("name") == "seconds" for parameter in parameters)


def has_seconds() -> bool:
    try:
        return _has_seconds_parameter()
    except (ImportError, KeyError, TypeError):
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("ts-reject"), ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def clamping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {**ENV, "APP_STORE__OUT_OF_ORDER": "clamp"}
    with running_server(tmp_path_factory.mktemp("ts-clamp"), env) as srv:
        yield srv


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def connect(server: Server, transport: str, **options: Any) -> Publisher:
    if transport == "shm":
        return ShmPublisher(server.control_endpoint, timeout_s=TIMEOUT_S, **options)
    return ZmqPublisher(server.router_endpoint, timeout_s=TIMEOUT_S, **options)


def metrics(server: Server, symbol: str) -> dict[str, float]:
    """This symbol's samples of GET /metrics, by metric name."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        raw = conn.getresponse()
        text = raw.read().decode()
        assert raw.status == 200, text
    finally:
        conn.close()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("symbol") == symbol:
                found[sample.name] = sample.value
    return found


def assert_stored(server: Server, symbol: str, values: np.ndarray, newest_ns: int) -> None:
    """Exactly `values` are stored for `symbol` (statistics equal numpy), newest at `newest_ns`."""
    samples = metrics(server, symbol)
    assert samples["hft_series_hot_values"] == values.size
    assert samples["hft_series_newest_timestamp_seconds"] == pytest.approx(
        newest_ns / 1e9, abs=1e-6
    )
    exponent = max(1, math.ceil(math.log10(values.size)))
    response = server.stats(symbol, exponent)
    assert response.status == 200, response.body
    body = response.json
    assert (body["min"], body["max"], body["last"]) == (values.min(), values.max(), values[-1])
    assert body["avg"] == pytest.approx(values.mean(), rel=1e-12)
    assert body["var"] == pytest.approx(values.var(), rel=1e-9, abs=1e-12)


def stats_seconds(server: Server, symbol: str, seconds: float) -> dict[str, Any]:
    response = server.request(
        "GET", "/stats/?" + urlencode({"symbol": symbol, "seconds": repr(seconds)})
    )
    assert response.status == 200, response.body
    return response.json


def rejected(publisher: Publisher) -> list[Reason]:
    with pytest.raises(PublishError) as info:
        publisher.flush(TIMEOUT_S)
    return [rejection.reason for rejection in info.value.rejections]


# --- timestamps arrive ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_split_timestamps_arrive_in_the_store(server: Server, transport: str) -> None:
    symbol = unique(f"ts-{transport}")
    rng = np.random.default_rng(17)
    values = rng.random(2_000) * 100
    stamps = T0 + MS * np.cumsum(rng.integers(0, 3, values.size))
    # 1 KiB frames (60-odd values with timestamps): the batch is split into many frames
    options = {"max_frame_bytes": 1024} if transport == "zmq" else {}
    with connect(server, transport, **options) as publisher:
        publisher.publish(symbol, values, stamps)
        publisher.flush(TIMEOUT_S)
        assert publisher.frames_sent > 1
    assert_stored(server, symbol, values, int(stamps[-1]))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timestamps_window_statistics_over_rest(server: Server, transport: str) -> None:
    if not has_seconds():
        pytest.skip("GET /stats/?seconds= is not on this branch yet (helper C, issue 17)")
    symbol = unique(f"win-{transport}")
    values = np.arange(1.0, 101.0)
    stamps = T0 + 1_000 * MS * np.arange(100)  # one value a second
    with connect(server, transport) as publisher:
        publisher.publish(symbol, values, stamps)
    for seconds in (0.5, 4.5, 9.0, 1000.0):  # a window is at least 1 ns: 0 is invalid_window
        inside = values[stamps >= stamps[-1] - int(seconds * 1e9)]
        body = stats_seconds(server, symbol, seconds)
        assert body["count"] == inside.size
        assert (body["min"], body["max"], body["last"]) == (inside.min(), inside.max(), 100.0)
        assert body["avg"] == pytest.approx(inside.mean(), rel=1e-12)


# --- the order rule -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_out_of_order_frames_are_nacked_and_nothing_of_them_is_applied(
    server: Server, transport: str
) -> None:
    symbol = unique(f"ooo-{transport}")
    first = np.array([1.0, 2.0, 3.0])
    newest = T0 + 30 * MS
    with connect(server, transport) as publisher:
        publisher.publish(symbol, first, [T0 + 10 * MS, T0 + 20 * MS, newest])
        publisher.flush(TIMEOUT_S)
        publisher.publish(symbol, [50.0, 60.0], [newest - 1, newest + MS])  # starts before newest
        publisher.publish(symbol, [70.0, 80.0], [newest + 5 * MS, newest + 4 * MS])  # goes back
        assert rejected(publisher) == [Reason.OUT_OF_ORDER, Reason.OUT_OF_ORDER]
        # the publisher goes on: an in-order frame after them is applied
        publisher.publish(symbol, [4.0, 5.0], [newest, newest + MS])  # equal to newest is fine
        publisher.flush(TIMEOUT_S)
    assert_stored(server, symbol, np.array([1.0, 2.0, 3.0, 4.0, 5.0]), newest + MS)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_clamp_applies_out_of_order_frames_at_the_previous_time(
    clamping: Server, transport: str
) -> None:
    symbol = unique(f"clamp-{transport}")
    newest = T0 + 30 * MS
    with connect(clamping, transport) as publisher:
        publisher.publish(symbol, [1.0, 2.0], [T0, newest])
        publisher.publish(symbol, [3.0, 4.0, 5.0], [newest - MS, newest + MS, newest])
        publisher.flush(TIMEOUT_S)
    # 3.0 goes back before `newest`: clamped to it; 5.0 goes back within the frame: clamped
    assert_stored(clamping, symbol, np.arange(1.0, 6.0), newest + MS)
    assert metrics(clamping, symbol)["hft_timestamps_clamped_total"] == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_negative_timestamp_is_nacked_invalid_timestamp(server: Server, transport: str) -> None:
    symbol = unique(f"neg-{transport}")
    with connect(server, transport) as publisher:
        publisher.publish(symbol, [1.0], [T0])
        publisher.flush(TIMEOUT_S)
        publisher.publish(symbol, [2.0, 3.0], [T0, -1])
        assert rejected(publisher) == [Reason.INVALID_TIMESTAMP]
    assert_stored(server, symbol, np.array([1.0]), T0)


def test_frames_without_timestamps_still_get_receive_times(server: Server) -> None:
    """A version-1 publisher (no column) next to timed ones: its batch gets the receive time,
    moved forward to the symbol's newest timestamp, and is never refused for order."""
    symbol = unique("mixed")
    future = T0 + 10 * 365 * 86_400 * 10**9  # 2036: ahead of any receive time here
    with connect(server, "zmq") as publisher:
        publisher.publish(symbol, [1.0], [future])
        publisher.publish(symbol, [2.0])  # no column: receive time, moved forward to `future`
        publisher.flush(TIMEOUT_S)
    assert_stored(server, symbol, np.array([1.0, 2.0]), future)


# --- the CLIs -------------------------------------------------------------------------------


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        appliance_command(*args),
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_publish_with_timestamps(tmp_path: Path, server: Server, transport: str) -> None:
    symbol = unique(f"cli-{transport}")
    result = cli(
        tmp_path, "publish", "--transport", transport, "--endpoint", server.router_endpoint,
        "--control-endpoint", server.control_endpoint, symbol, "1.5", "2.5", "4",
        "--timestamps", f"{T0},2026-01-01T00:00:00.001Z,2026-01-01T00:00:00.002",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_stored(server, symbol, np.array([1.5, 2.5, 4.0]), T0 + 2 * MS)


def test_publish_refuses_bad_timestamps_before_sending(tmp_path: Path, server: Server) -> None:
    symbol = unique("cli-bad")
    for times, message in (
        ("1,2", "2 times for 3 values"),
        ("1,yesterday,3", "time 2 ('yesterday') must be integer ns since the epoch or ISO 8601"),
        ("1,-5,3", "time 2 ('-5') is not in 1970..2262"),
    ):
        result = cli(
            tmp_path, "publish", "--endpoint", server.router_endpoint, symbol, "1", "2", "3",
            "--timestamps", times,
        )  # fmt: skip
        assert result.returncode == 1
        assert message in result.stderr, result.stderr
    assert server.stats(symbol, 1).status == 404  # nothing was sent


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_replay_with_a_timestamp_column(tmp_path: Path, server: Server, transport: str) -> None:
    a, b = unique("wide-a"), unique("wide-b")
    rows = [f"ts,{a},{b}"]
    expected: dict[str, list[float]] = {a: [], b: []}
    for i in range(300):
        cells = [f"{i}.5" if i % 3 else "", f"{2 * i}" if i % 2 else ""]
        rows.append(f"{T0 + i * MS},{cells[0]},{cells[1]}")
        for symbol, cell in zip((a, b), cells, strict=True):
            if cell:
                expected[symbol].append(float(cell))
    path = tmp_path / "ticks.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = cli(
        tmp_path, "replay", "--transport", transport, "--endpoint", server.router_endpoint,
        "--control-endpoint", server.control_endpoint, "--batch", "50", "--quiet", str(path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_stored(server, a, np.array(expected[a]), T0 + 299 * MS)
    assert_stored(server, b, np.array(expected[b]), T0 + 299 * MS)


def test_replay_long_file_with_iso_times_and_a_bad_cell(tmp_path: Path, server: Server) -> None:
    symbol = unique("long")
    lines = ["symbol,value,timestamp"]
    lines += [f"{symbol},{i},2026-01-01T00:00:{i:02d}Z" for i in range(1, 6)]
    lines.append(f"{symbol},6,not-a-time")
    lines.append(f"{symbol},7,2026-01-01T00:00:07Z")
    path = tmp_path / "long.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = cli(tmp_path, "replay", "--endpoint", server.router_endpoint, "--quiet", str(path))
    assert result.returncode == 1
    assert "long.csv:7: timestamp: 'not-a-time' must be integer ns" in result.stderr
    assert "--start-line 7" in result.stderr
    # the rows before the bad line were applied, with their times; none from it on
    assert_stored(server, symbol, np.arange(1.0, 6.0), T0 + 5 * 10**9)
