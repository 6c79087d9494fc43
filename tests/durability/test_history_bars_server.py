"""GET /history/bars on a real server (a real socket, the write-ahead log, sealed warm segments
and memory pieces), on the numpy engine and on the GPU engine over the CPU build of its kernels,
compared with numpy over the same values and times."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from appliance.durability.warm import symbol_key
from tests.durability.test_history_bars import assert_matches, numpy_bars
from tests.integration.server_harness import REPO_ROOT, Server
from tests.waiting import wait_until

ENV = {
    "APP_DURABILITY__WARM_SEGMENT_VALUES": "100",
    "APP_DURABILITY__SYNC": "always",
    "APP_STORE__MAX_DATA_RETENTION": "150",  # most bars come from values the hot tier evicted
    "APP_STORE__CLEANUP_KEEP_COUNT": "100",
    "APP_HISTORY__MAX_BARS": "12",
}
SERVE_GPU = [sys.executable, str(REPO_ROOT / "tests/integration/serve_emulated_gpu.py")]


@pytest.fixture(params=["numpy", "gpu-emulated"])
def server(request, tmp_path: Path):
    command = None
    if request.param == "gpu-emulated":
        if shutil.which("g++") is None:
            pytest.skip("gpu-emulated: g++ not found (apt install g++)")
        command = SERVE_GPU
    server = Server(tmp_path, ENV, command=command)
    try:
        server.wait_ready(timeout_s=60)
        yield server
    finally:
        server.stop()


def _get(server: Server, path: str, **params: str):
    return server.request("GET", f"{path}?{urlencode(params)}")


def test_bars_over_sealed_and_memory_match_numpy(server: Server, tmp_path: Path) -> None:
    rng = np.random.default_rng(17)
    batches = [1e9 + np.round(rng.uniform(0, 1e-3, 37), 9) for _ in range(20)]  # 740 values
    for batch in batches:
        assert server.post_batch("EUR/USD", batch.tolist()).status == 200
    values = np.concatenate(batches)
    # Each batch's time as the server holds it (its receive time here), read back through
    # /history/stats: the time of the batch holding its first index.
    firsts = np.cumsum([0] + [b.shape[0] for b in batches[:-1]])
    batch_ns = []
    for first in firsts.tolist():
        response = _get(server, "/history/stats", symbol="EUR/USD", start=str(first))
        assert response.status == 200, response
        batch_ns.append(response.json["first_ns"])
    times = np.repeat(np.array(batch_ns, dtype=np.int64), [b.shape[0] for b in batches])
    assert np.all(np.diff(times) >= 0)
    warm_dir = tmp_path / "data" / "warm" / symbol_key("EUR/USD")
    # 700 values sealed (by a background thread), 40 in memory.
    wait_until(lambda: len(list(warm_dir.glob("*.seg"))) == 7, what="seven sealed segments")

    t0, t_end = int(times[0]), int(times[-1]) + 1
    quarter = max(1, (t_end - t0) // 4)
    for interval, interval_ns, start, end in [
        (f"{quarter}ns", quarter, t0, t_end),  # about five bars over everything
        ("1ns", 1, int(times[3 * 37]), int(times[13 * 37])),  # one bar per batch: 10
        ("1d", 86_400 * 10**9, t0 - 1, t_end),  # one bar
        (f"{quarter}ns", quarter, int(times[100]) + 1, int(times[700])),  # cuts inside batches
    ]:
        want = numpy_bars(values, times, start, end, interval_ns)
        if not want:
            continue
        response = _get(
            server,
            "/history/bars",
            symbol="EUR/USD",
            interval=interval,
            start=str(start),
            end=str(end),
        )
        assert response.status == 200, response
        assert_matches(response.json, want)
    # The same range by ISO 8601 bounds.
    iso = np.datetime_as_string(np.array([t0, t_end], dtype="datetime64[ns]"), unit="ns")
    response = _get(
        server,
        "/history/bars",
        symbol="EUR/USD",
        interval="1d",
        start=f"{iso[0]}Z",
        end=f"{iso[1]}Z",
    )
    assert response.status == 200, response
    assert response.json["count"] == [740]
    # 20 bars (one per batch) against max_bars = 12: 413.
    assert len(set(batch_ns)) > 12  # sequential POSTs: distinct receive times
    response = _get(
        server, "/history/bars", symbol="EUR/USD", interval="1ns", start=str(t0), end=str(t_end)
    )
    assert (response.status, response.json["code"]) == (413, "batch_too_large")
    response = _get(server, "/history/bars", symbol="EUR/USD", interval="1 s", start="0", end="1")
    assert (response.status, response.json["code"]) == (400, "invalid_interval")


def test_bars_over_event_timestamps_sent_over_rest_match_numpy(
    server: Server, tmp_path: Path
) -> None:
    """Ticks with their own event times (irregular gaps, repeats, a gap of several bars) sent
    in POST /add_batch/'s `timestamps`: bars group by those times, not by receive time."""
    rng = np.random.default_rng(23)
    base = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
    steps = rng.choice([0, 1, 7, 250_000_000, 1_000_000_000, 61 * 10**9], size=700)
    times = base + np.cumsum(steps).astype(np.int64)
    values = 1e9 + np.round(rng.uniform(0, 1e-3, 700), 9)
    for lo in range(0, 700, 70):
        body = json.dumps(
            {
                "symbol": "EVT",
                "values": values[lo : lo + 70].tolist(),
                "timestamps": times[lo : lo + 70].tolist(),
            }
        ).encode()
        response = server.request("POST", "/add_batch/", body, {"Content-Type": "application/json"})
        assert response.status == 200, response
    warm_dir = tmp_path / "data" / "warm" / symbol_key("EVT")
    wait_until(lambda: len(list(warm_dir.glob("*.seg"))) == 7, what="seven sealed segments")
    t0, t_end = int(times[0]), int(times[-1]) + 1
    for interval, interval_ns, start, end in [
        ("1h", 3_600 * 10**9, t0, t_end),
        ("30m", 1_800 * 10**9, t0 + 1, int(times[450])),
        ("5m", 300 * 10**9, int(times[300]), int(times[400])),
        ("1s", 10**9, int(times[300]), int(times[330])),
    ]:
        want = numpy_bars(values, times, start, end, interval_ns)
        assert 0 < len(want) <= 12
        response = _get(
            server, "/history/bars", symbol="EVT", interval=interval, start=str(start), end=str(end)
        )
        assert response.status == 200, response
        assert_matches(response.json, want)
