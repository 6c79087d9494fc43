"""History statistics vs numpy over ranges crossing segment and sealed/unsealed boundaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.durability import warm_segment
from appliance.durability.history import (
    HistoryError,
    index_at_time,
    parse_index,
    parse_time,
    stats_by_index,
    stats_by_time,
)
from appliance.durability.records import BatchRecord
from appliance.durability.warm import WarmTier
from tests.durability.warm_helpers import Feeder, random_batches, warm_tier

N = 100
TOTAL = 2345  # 23 sealed segments and 45 unsealed values


def _reference(x: np.ndarray) -> tuple[float, float]:
    """numpy mean and variance, computed around x[0] (exact shifts) so the reference itself
    does not lose the digits that 1e9-scale prices put at risk."""
    shifted = x - x[0]
    return float(x[0] + shifted.mean()), float(shifted.var())


def _check(stats, x: np.ndarray, first_index: int, times: np.ndarray | None = None) -> None:
    mean, var = _reference(x)
    assert stats.count == x.shape[0]
    assert (stats.min, stats.max) == (x.min(), x.max())
    assert (stats.first, stats.last) == (x[0], x[-1])
    assert stats.avg == pytest.approx(mean, rel=1e-12, abs=0)
    assert stats.var == pytest.approx(var, rel=1e-9, abs=1e-300)
    assert (stats.first_index, stats.last_index) == (first_index, first_index + x.shape[0] - 1)
    if times is not None:
        assert (stats.first_ns, stats.last_ns) == (times[0], times[-1])


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory):
    """One symbol of random batches (1e9-scale prices with 1e-3 noise) and one of 0..100."""
    directory = tmp_path_factory.mktemp("warm")
    rng = np.random.default_rng(7)
    warm = WarmTier(directory, segment_values=N)
    feed = Feeder(warm)
    with pytest.MonkeyPatch.context() as patch:
        # Blocks of 8 (12 whole and a short one per segment): edge cuts use block summaries.
        patch.setattr(warm_segment, "BLOCK_VALUES", 8)
        for batch in random_batches(rng, TOTAL):
            feed.send("PLAIN", batch)
            feed.send("BIG", 1e9 + rng.uniform(0, 1e-3, batch.shape[0]))
        warm.drain()
    assert warm.view("PLAIN").sealed[0].header.block_values == 8  # type: ignore[union-attr]
    assert warm.symbols()["PLAIN"].sealed_end == 2300
    yield warm, feed
    warm.close()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_index_ranges_match_numpy(history, data: st.DataObject) -> None:
    warm, feed = history
    symbol = data.draw(st.sampled_from(["PLAIN", "BIG"]))
    start = data.draw(st.integers(0, TOTAL - 1))
    end = data.draw(st.integers(start + 1, TOTAL))
    x = feed.all_values(symbol)[start:end]
    times = feed.all_times(symbol)[start:end]
    _check(stats_by_index(warm, symbol, start, end), x, start, times)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_time_ranges_match_numpy(history, data: st.DataObject) -> None:
    warm, feed = history
    times = feed.all_times("BIG")
    t0 = data.draw(st.integers(int(times[0]) - 5, int(times[-1])))
    t1 = data.draw(st.integers(t0 + 1, int(times[-1]) + 5))
    mask = (times >= t0) & (times < t1)
    if not mask.any():
        with pytest.raises(HistoryError) as info:
            stats_by_time(warm, "BIG", t0, t1)
        assert info.value.code == "empty_range"
        return
    first = int(np.argmax(mask))
    x = feed.all_values("BIG")[mask]
    _check(stats_by_time(warm, "BIG", t0, t1), x, first, times[mask])


def test_whole_history_and_open_bounds(history) -> None:
    warm, feed = history
    x = feed.all_values("PLAIN")
    _check(stats_by_index(warm, "PLAIN"), x, 0)
    _check(stats_by_index(warm, "PLAIN", 2299), x[2299:], 2299)  # sealed/unsealed edge
    _check(stats_by_index(warm, "PLAIN", None, 2301), x[:2301], 0)
    _check(stats_by_index(warm, "PLAIN", 5, 10**12), x[5:], 5)  # end past the newest: clipped
    _check(stats_by_time(warm, "PLAIN"), x, 0)
    t = feed.all_times("PLAIN")
    _check(
        stats_by_time(warm, "PLAIN", int(t[1000])), x[t >= t[1000]], int(np.argmax(t >= t[1000]))
    )


def test_exact_segment_boundaries_and_single_values(history) -> None:
    warm, feed = history
    x = feed.all_values("BIG")
    for start, end in [(0, 100), (100, 2300), (300, 301), (299, 300), (2300, 2301), (2344, 2345)]:
        _check(stats_by_index(warm, "BIG", start, end), x[start:end], start)
    one = stats_by_index(warm, "BIG", 1234, 1235)
    assert one.var == 0.0 and one.avg == x[1234] == one.min == one.max


def test_precision_where_naive_formulas_collapse(tmp_path: Path) -> None:
    alternating = np.tile([1e9 + 1, 1e9 - 1], 500)
    with warm_tier(tmp_path, segment_values=N) as warm:
        feed = Feeder(warm)
        for chunk in np.split(alternating, 40):
            feed.send("ALT", chunk)
        warm.drain()
        stats = stats_by_index(warm, "ALT", 0, 1000)
        assert stats.var == pytest.approx(1.0, rel=1e-9)
        assert stats.avg == pytest.approx(1e9, rel=1e-15)
        stats = stats_by_index(warm, "ALT", 37, 937)  # edges inside segments
        assert stats.var == pytest.approx(1.0, rel=1e-9)


def test_errors_are_clear(history) -> None:
    warm, _ = history
    cases = [
        (lambda: stats_by_index(warm, "NOPE"), "unknown_symbol"),
        (lambda: stats_by_index(warm, "PLAIN", 10, 10), "invalid_range"),
        (lambda: stats_by_index(warm, "PLAIN", 20, 10), "invalid_range"),
        (lambda: stats_by_index(warm, "PLAIN", TOTAL, TOTAL + 5), "empty_range"),
        (lambda: stats_by_time(warm, "PLAIN", 50, 50), "invalid_range"),
        (lambda: stats_by_time(warm, "PLAIN", 0, 5), "empty_range"),
        (lambda: parse_index("start", "1.5"), "invalid_range"),
        (lambda: parse_index("start", "-3"), "invalid_range"),
        (lambda: parse_time("end", "yesterday"), "invalid_range"),
    ]
    for call, code in cases:
        with pytest.raises(HistoryError) as info:
            call()
        assert info.value.code == code
        assert info.value.message
    with pytest.raises(HistoryError, match=r"holds indexes \[0, 2345\)"):
        stats_by_index(warm, "PLAIN", 3000, 4000)


def test_parse_time_iso_and_ns() -> None:
    assert parse_time("t", "1700000000123456789") == 1700000000123456789
    assert parse_time("t", "1970-01-01T00:00:01Z") == 10**9
    assert parse_time("t", "1970-01-01T00:00:01.000000007Z") == 10**9 + 7
    assert parse_time("t", "1970-01-01T01:00:00.5+01:00") == 500_000_000
    assert parse_time("t", "2026-01-02") == parse_time("t", "2026-01-02T00:00:00+00:00")
    assert parse_time("t", "2026-01-02T03:04:05.25") == 1767323045_250_000_000


def test_index_at_time_across_pieces(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=N) as warm:
        for i in range(30):  # 10 values per batch at 100, 110, ...: 3 sealed segments
            warm.on_record(BatchRecord(i + 1, "S", 10 * i, 100 + 10 * i, 0, 0, np.ones(10)))
        warm.drain()
        view = warm.view("S")
        assert view is not None
        assert index_at_time(warm, view, 0) == 0
        assert index_at_time(warm, view, 100) == 0
        assert index_at_time(warm, view, 101) == 10
        assert index_at_time(warm, view, 195) == 100  # the first value of segment 2
        assert index_at_time(warm, view, 250) == 150
        assert index_at_time(warm, view, 390) == 290
        assert index_at_time(warm, view, 391) == 300  # after the newest: the end


def test_block_summaries_match_numpy() -> None:
    rng = np.random.default_rng(2)
    values = 1e9 + rng.uniform(0, 1e-3, 8 * 5 + 3)
    rows = warm_segment.block_summaries(values, 8)
    assert rows.shape == (6, 6)
    for k, row in enumerate(rows):
        chunk = values[8 * k : 8 * k + 8]
        count, ref, mean, m2, lo, hi = row
        assert (count, lo, hi) == (chunk.shape[0], chunk.min(), chunk.max())
        assert ref + mean == pytest.approx(chunk.mean(), rel=1e-15)
        assert m2 / count == pytest.approx((chunk - chunk[0]).var(), rel=1e-9)
