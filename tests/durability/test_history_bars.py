"""OHLC bars over the warm tier (sealed segments and memory pieces) against numpy over the same
values and times; interval parsing; refusals (bad interval, range, too many bars)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.durability.history import HistoryError
from appliance.durability.history_bars import bars_by_time, parse_interval, run_bars_query
from fallback import NumpyEngine
from tests.durability.warm_helpers import Feeder, warm_tier

ENGINE = NumpyEngine()


def numpy_bars(values: np.ndarray, times: np.ndarray, start: int, end: int, interval: int):
    """Bars by materializing one time per value and grouping with np.unique."""
    keep = (times >= start) & (times < end)
    x, t = values[keep], times[keep]
    keys, first = np.unique(t // interval, return_index=True)
    bounds = [*first.tolist(), x.shape[0]]
    rows = []
    for key, lo, hi in zip(keys.tolist(), bounds[:-1], bounds[1:], strict=True):
        bar = x[lo:hi]
        d = bar - bar[0]
        rows.append(
            (
                key * interval,
                bar[0],
                bar.max(),
                bar.min(),
                bar[-1],
                hi - lo,
                bar[0] + d.mean(),
                d.var(),
            )
        )
    return rows


def assert_matches(body: dict, want: list[tuple]) -> None:
    assert body["time"] == [w[0] for w in want]
    for name, column in (("open", 1), ("high", 2), ("low", 3), ("close", 4), ("count", 5)):
        assert body[name] == [w[column] for w in want], name
    np.testing.assert_allclose(body["avg"], [w[6] for w in want], rtol=1e-9, atol=0)
    np.testing.assert_allclose(body["var"], [w[7] for w in want], rtol=1e-9, atol=1e-300)


def _feed(warm, rng: np.random.Generator, batches: int, far: bool = True) -> Feeder:
    feed = Feeder(warm, start_ns=1_000_000_000)
    for _ in range(batches):
        n = int(rng.integers(1, 30))
        values = 1e9 + rng.uniform(0, 1e-3, n) if far else rng.uniform(0, 100, n)
        # Steps of 0 (equal receive times), small and large: bars of one batch, of many,
        # and bars that span a sealed segment's end.
        feed.send("EUR/USD", values, ns_step=int(rng.choice([0, 3, 10, 250])))
    if feed.all_values("EUR/USD").shape[0] % 50 == 0:  # keep an unsealed piece
        feed.send("EUR/USD", np.array([1e9 if far else 1.0]), ns_step=5)
    return feed


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    interval=st.sampled_from([1, 7, 10, 64, 100, 1000, 10**9]),
    cut=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_bars_over_sealed_and_memory_match_numpy(tmp_path_factory, seed, interval, cut) -> None:
    rng = np.random.default_rng(seed)
    with warm_tier(tmp_path_factory.mktemp("warm"), segment_values=50) as warm:
        feed = _feed(warm, rng, 40, far=bool(seed % 2))
        warm.drain()
        view = warm.view("EUR/USD")
        assert view.sealed and view.memory  # both kinds of piece are read
        x, t = feed.all_values("EUR/USD"), feed.all_times("EUR/USD")
        span = int(t[-1] - t[0]) + 2
        start = int(t[0]) - 1 + int(cut[0] * span)
        end = start + 1 + int(cut[1] * span)
        want = numpy_bars(x, t, start, end, interval)
        if not want:
            with pytest.raises(HistoryError) as caught:
                bars_by_time(warm, ENGINE, "EUR/USD", start, end, interval, 10**6)
            assert caught.value.code == "empty_range"
            return
        result = bars_by_time(warm, ENGINE, "EUR/USD", start, end, interval, 10**6)
        body = result.to_dict()
        assert (body["symbol"], body["interval_ns"], body["start"], body["end"]) == (
            "EUR/USD",
            interval,
            start,
            end,
        )
        assert_matches(body, want)
        # The limit: exactly enough bars passes; one fewer is refused before summarizing.
        assert (
            bars_by_time(warm, ENGINE, "EUR/USD", start, end, interval, len(want)).to_dict()[
                "count"
            ]
            == body["count"]
        )
        if len(want) > 1:
            with pytest.raises(HistoryError) as caught:
                bars_by_time(warm, ENGINE, "EUR/USD", start, end, interval, len(want) - 1)
            assert caught.value.code == "batch_too_large"


def test_too_many_bars_is_refused_before_later_segments_are_read(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=20) as warm:
        feed = Feeder(warm, start_ns=0)
        for _ in range(30):
            feed.send("S", np.arange(10.0), ns_step=100)
        warm.drain()
        assert len(warm.view("S").sealed) == 15
        loaded: list[int] = []
        load = warm.load
        warm.load = lambda segment: loaded.append(segment.header.first_index) or load(segment)  # type: ignore[method-assign]
        with pytest.raises(HistoryError) as caught:
            bars_by_time(warm, ENGINE, "S", 0, 10**6, 1, 4)  # one bar per batch: 30 > 4
        assert caught.value.code == "batch_too_large"
        assert loaded == [0, 20, 40]  # stopped at the third segment (bars 5 and 6)


def test_a_bar_spanning_pieces_is_one_bar(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=8) as warm:
        feed = Feeder(warm, start_ns=0)
        for _ in range(5):
            feed.send("S", np.array([1.0, 5.0, 3.0]), ns_step=1)  # times 1..5, all in bar 0
        warm.drain()
        body = bars_by_time(warm, ENGINE, "S", 0, 100, 10, 10).to_dict()
        assert body["time"] == [0] and body["count"] == [15]
        assert (body["open"], body["high"], body["low"], body["close"]) == (
            [1.0],
            [5.0],
            [1.0],
            [3.0],
        )


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1ns", 1),
        ("100ms", 10**8),
        ("1s", 10**9),
        ("1m", 6 * 10**10),
        ("2h", 7_200 * 10**9),
        ("1d", 86_400 * 10**9),
        ("15us", 15_000),
        ("0007s", 7 * 10**9),
        ("0" * 40 + "1ns", 1),
        ("9223372036854775807ns", (1 << 63) - 1),
    ],
)
def test_interval_units(text: str, ns: int) -> None:
    assert parse_interval(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "0s",
        "1",
        "s",
        "-1s",
        "1.5s",
        "1 s",
        "1S",
        "1sec",
        "1y",
        "+1s",
        "106752d",
        "1e3ns",
        "9" * 20 + "ns",
        "1" * 4301 + "s",
        "0" * 30 + "0s",
    ],
)
def test_bad_intervals_are_refused(text: str | None) -> None:
    with pytest.raises(HistoryError) as caught:
        parse_interval(text)
    assert caught.value.code == "invalid_interval"


def test_query_refusals(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=8) as warm:
        Feeder(warm, start_ns=1_000).send("S", np.ones(3))

        def code(**kw: str | None) -> str:
            args = {"interval": "1s", "start": "0", "end": "2000", **kw}
            with pytest.raises(HistoryError) as caught:
                run_bars_query(
                    warm,
                    ENGINE,
                    kw.pop("symbol", "S") or "S",
                    args["interval"],
                    args["start"],
                    args["end"],
                    100,
                )
            return caught.value.code

        assert code(interval="1x") == "invalid_interval"
        assert code(start="5", end="5") == "invalid_range"
        assert code(start="9", end="5") == "invalid_range"
        assert code(start=None) == "invalid_range"
        assert code(end="tomorrow") == "invalid_range"
        assert code(end=str(2**63)) == "invalid_range"
        assert code(start="2000", end="3000") == "empty_range"
        with pytest.raises(HistoryError) as caught:
            run_bars_query(warm, ENGINE, "NOPE", "1s", "0", "10", 100)
        assert caught.value.code == "unknown_symbol"
        body = run_bars_query(
            warm, ENGINE, "S", "1us", "1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000002Z", 100
        ).to_dict()
        assert (body["time"], body["count"], body["start"], body["end"]) == ([1_000], [3], 0, 2_000)
