"""Timestamps and time windows over a real socket: POST /add_batch/ with `timestamps`, GET
/stats/?seconds=, POST /stats/batch with `seconds` items; with durability on and off, and with
`store.out_of_order` "reject" and "clamp". Every statistic is checked against numpy."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import Response, Server, running_server

JSON_CT = {"Content-Type": "application/json"}
BASE = 1_764_892_800_000_000_000  # 2025-12-05T00:00:00Z in ns
S = 1_000_000_000

CONFIGS = {
    "durable-reject": {},
    "memory-reject": {"APP_DURABILITY__ENABLED": "false"},
    "durable-clamp": {"APP_STORE__OUT_OF_ORDER": "clamp"},
    "memory-clamp": {"APP_DURABILITY__ENABLED": "false", "APP_STORE__OUT_OF_ORDER": "clamp"},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def any_server(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"APP_STORE__MAX_SYMBOLS": "100000", "APP_STORE__STARTING_CAPACITY": "64",
           **CONFIGS[request.param]}  # fmt: skip
    with running_server(tmp_path_factory.mktemp(request.param), env) as srv:
        srv.clamps = "clamp" in request.param  # type: ignore[attr-defined]
        yield srv


def unique() -> str:
    return f"TS-{uuid.uuid4().hex[:12]}"


def post(server: Server, symbol: str, values: list, timestamps: object = None) -> Response:
    body: dict = {"symbol": symbol, "values": values}
    if timestamps is not None:
        body["timestamps"] = timestamps
    return server.request("POST", "/add_batch/", json.dumps(body).encode(), JSON_CT)


def stats_seconds(server: Server, symbol: str, seconds: str) -> Response:
    return server.request("GET", "/stats/?" + urlencode({"symbol": symbol, "seconds": seconds}))


def assert_error(response: Response, status: int, code: str) -> str:
    assert response.status == status, response.body
    body = response.json
    assert set(body) == {"error", "code"} and body["code"] == code and body["error"]
    return body["error"]


def assert_window(body: dict, window: np.ndarray, seconds: float) -> None:
    assert set(body) == {"min", "max", "last", "avg", "var", "count", "seconds"}
    assert body["count"] == window.size
    assert (body["min"], body["max"], body["last"]) == (window.min(), window.max(), window[-1])
    assert body["avg"] == pytest.approx(window.mean(), rel=1e-9)
    assert body["var"] == pytest.approx(window.var(), rel=1e-6, abs=1e-9)
    assert body["seconds"] == seconds


def test_timestamps_are_accepted_and_windows_follow_them(any_server: Server) -> None:
    symbol = unique()
    values = np.array([10.0, 11.0, 12.0, 13.0, 14.0])
    times = [BASE, BASE + S, BASE + 2 * S, BASE + 3 * S, BASE + 3 * S]  # equal times are fine
    response = post(any_server, symbol, values.tolist(), times)
    assert response.status == 200, response.body
    assert response.json == {"status": "ok", "symbol": symbol, "added": 5}
    for text, seconds, count in (("1", 1, 3), ("0.5", 0.5, 2), (".5", 0.5, 2), ("3", 3, 5),
                                 ("2.999999999", 2.999999999, 4), ("100", 100, 5)):  # fmt: skip
        response = stats_seconds(any_server, symbol, text)
        assert response.status == 200, response.body
        assert_window(response.json, values[-count:], seconds)
    # The count window is unchanged by the timestamps, and answers its five keys only.
    assert set(any_server.stats(symbol, 1).json) == {"min", "max", "last", "avg", "var"}


def test_the_window_is_anchored_at_the_symbols_newest_tick_not_the_clock(
    any_server: Server,
) -> None:
    """Ticks from 2001: a wall-clock window would hold none of them."""
    symbol = unique()
    old = 1_000_000_000 * S
    assert post(any_server, symbol, [1.0, 2.0, 3.0], [old, old + S, old + 2 * S]).status == 200
    assert stats_seconds(any_server, symbol, "1").json["count"] == 2


def test_backwards_timestamps_are_refused_whole_or_clamped(any_server: Server) -> None:
    symbol = unique()
    assert post(any_server, symbol, [1.0, 2.0], [BASE + 10 * S, BASE + 20 * S]).status == 200
    before = stats_seconds(any_server, symbol, "1000").json
    # Goes back against the newest (first item) and within itself (second batch).
    back = [([3.0, 4.0], [15, 30]), ([5.0, 6.0, 7.0], [40, 35, 50])]
    for values, seconds in back:
        response = post(any_server, symbol, values, [BASE + t * S for t in seconds])
        if not any_server.clamps:  # type: ignore[attr-defined]
            message = assert_error(response, 400, "out_of_order")
            assert "nothing of the batch was applied" in message
            assert stats_seconds(any_server, symbol, "1000").json == before
        else:
            assert response.status == 200, response.body
    if any_server.clamps:  # type: ignore[attr-defined]
        # Stored times: 10, 20, 20 (15 clamped), 30, 40, 40 (35 clamped), 50 (x S).
        values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
        times = np.array([10, 20, 20, 30, 40, 40, 50])
        for seconds in (10, 20, 30, 40):
            body = stats_seconds(any_server, symbol, str(seconds)).json
            assert_window(body, values[times >= 50 - seconds], seconds)


def test_a_batch_without_timestamps_is_never_refused_for_order(any_server: Server) -> None:
    """Event times far in the future, then a batch at receive time: it takes the newest time."""
    symbol = unique()
    future = BASE + 10**6 * S * 1000  # ~32 years ahead
    assert post(any_server, symbol, [1.0, 2.0], [future, future + S]).status == 200
    assert post(any_server, symbol, [3.0]).status == 200
    assert_window(stats_seconds(any_server, symbol, "0.5").json, np.array([2.0, 3.0]), 0.5)


@pytest.mark.parametrize(
    "timestamps", [[1], [1, -1], [1, 2**63], [1, 1.5], ["1", "2"], "12", [1, None], [1, True]]
)
def test_bad_timestamps_are_400_and_change_nothing(server: Server, timestamps) -> None:
    symbol = unique()
    assert_error(post(server, symbol, [1.0, 2.0], timestamps), 400, "invalid_timestamps")
    assert_error(server.stats(symbol, 1), 404, "unknown_symbol")


@pytest.mark.parametrize(
    "query",
    ["seconds=0", "seconds=-1", "seconds=%2B1", "seconds=1e3", "seconds=abc", "seconds=",
     "seconds=0.0000000001", "seconds=9223372036.854775808", "seconds=%FF", "seconds=1%2C5",
     "seconds=1&exponent=1", "exponent=1&seconds=1", "exponent=9&seconds=1", "seconds=NaN",
     "seconds=" + "9" * 5000],
)  # fmt: skip
def test_bad_windows_are_400_invalid_window_never_500(server: Server, query: str) -> None:
    symbol = unique()
    assert post(server, symbol, [1.0]).status == 200
    assert_error(server.request("GET", f"/stats/?symbol={symbol}&{query}"), 400, "invalid_window")


def test_neither_exponent_nor_seconds_is_still_invalid_exponent(server: Server) -> None:
    symbol = unique()
    assert post(server, symbol, [1.0]).status == 200
    assert_error(server.request("GET", f"/stats/?symbol={symbol}"), 400, "invalid_exponent")


def test_a_time_window_of_an_unknown_symbol_is_404(server: Server) -> None:
    assert_error(stats_seconds(server, unique(), "1"), 404, "unknown_symbol")
    assert_error(stats_seconds(server, "", "1"), 400, "invalid_symbol")


def test_batch_mixes_count_and_time_windows(any_server: Server) -> None:
    symbol, other = unique(), unique()
    values = np.arange(1.0, 21.0)
    times = BASE + np.arange(20, dtype=np.int64) * (S // 4)  # 4 ticks a second
    assert post(any_server, symbol, values.tolist(), times.tolist()).status == 200
    assert post(any_server, other, [7.0, 8.0]).status == 200
    queries = [
        {"symbol": symbol, "seconds": 1},
        {"symbol": symbol, "exponent": 1},
        {"symbol": other, "seconds": 0.25},
        {"symbol": symbol, "seconds": 0.25, "exponent": 1},
        {"symbol": symbol, "seconds": "1"},
        {"symbol": symbol, "seconds": 0},
        {"symbol": unique(), "seconds": 1},
        {"symbol": symbol, "seconds": 4.75},
    ]
    response = any_server.request(
        "POST", "/stats/batch", json.dumps({"queries": queries}).encode(), JSON_CT
    )
    assert response.status == 200, response.body
    results = response.json["results"]
    assert_window(results[0], values[-5:], 1)
    assert results[0] == stats_seconds(any_server, symbol, "1").json  # GET /stats/'s body
    assert results[1] == any_server.stats(symbol, 1).json
    assert_window(results[2], np.array([7.0, 8.0]), 0.25)  # one receive time for both
    assert [r.get("code") for r in results[3:7]] == [
        "invalid_window", "invalid_window", "invalid_window", "unknown_symbol"]  # fmt: skip
    assert_window(results[7], values, 4.75)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(
        st.tuples(
            st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30),
            st.lists(st.integers(0, S), min_size=30, max_size=30),
        ),
        min_size=1,
        max_size=5,
    ),
    window_ns=st.integers(1, 20 * S),
)
def test_time_windows_match_numpy_for_random_ticks(server: Server, batches, window_ns) -> None:
    symbol = unique()
    values: list[float] = []
    times: list[int] = []
    clock = BASE
    for batch, gaps in batches:
        stamps = (clock + np.cumsum(gaps[: len(batch)])).tolist()
        assert post(server, symbol, batch, stamps).status == 200
        values += batch
        times += stamps
        clock = stamps[-1]
    seconds = f"{window_ns // S}.{window_ns % S:09d}"
    held = np.array(values)
    window = held[np.array(times) >= times[-1] - window_ns]
    assert_window(stats_seconds(server, symbol, seconds).json, window, window_ns / S)
    # The same window as a JSON number, written with all its digits (read exactly).
    batch_body = f'{{"queries": [{{"symbol": "{symbol}", "seconds": {seconds}}}]}}'.encode()
    got = server.request("POST", "/stats/batch", batch_body, JSON_CT)
    assert_window(got.json["results"][0], window, window_ns / S)


def test_timestamps_and_windows_survive_a_restart(tmp_path: Path) -> None:
    symbol = "EUR/USD"
    values = [1.0850, 1.0851, 1.0849, 1.0853]
    times = [BASE, BASE + S // 2, BASE + S, BASE + 3 * S]
    with running_server(tmp_path, {"APP_DURABILITY__SYNC": "always"}) as srv:
        assert post(srv, symbol, values, times).status == 200
        before = [stats_seconds(srv, symbol, s).json for s in ("0.5", "2", "3")]
    with running_server(tmp_path, {"APP_DURABILITY__SYNC": "always"}) as srv:
        after = [stats_seconds(srv, symbol, s).json for s in ("0.5", "2", "3")]
        assert after == before
        assert [body["count"] for body in after] == [1, 2, 4]
        # Order is judged against the replayed newest timestamp.
        assert_error(post(srv, symbol, [1.0], [BASE + 2 * S]), 400, "out_of_order")
        encoded = quote(symbol, safe="")
        assert srv.request("GET", f"/stats/?symbol={encoded}&seconds=3").json == before[2]
