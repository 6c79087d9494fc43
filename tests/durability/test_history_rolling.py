"""Rolling statistics over a WarmTier (appliance.durability.history_rolling) vs the reference
on the values fed: ranges across sealed segments and memory pieces, steps, defaults, every
refusal decided before a value is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.durability.history import HistoryError
from appliance.durability.history_rolling import (
    parse_positive,
    rolling_by_index,
    run_rolling_query,
)
from engine_core.contract import Engine
from engine_core.rolling import Rolling, rolling_reference
from tests.durability.warm_helpers import Feeder, random_batches, warm_tier

SEGMENT = 64
TOTAL = 1000  # 15 sealed segments and 40 values in memory


class CountingEngine(Engine):
    """The contract's default `rolling` (the reference), counting calls and their inputs."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def rolling(self, values: np.ndarray, window: int, step: int) -> Rolling:
        assert values.dtype == np.float64 and values.flags.c_contiguous
        self.calls.append((values.shape[0], window, step))
        return super().rolling(values, window, step)


def assert_rolling(got: Rolling, values: np.ndarray, window: int, step: int) -> None:
    want = rolling_reference(values, window, step)
    assert got.min.shape == want.min.shape
    np.testing.assert_array_equal(got.min, want.min)
    np.testing.assert_array_equal(got.max, want.max)
    np.testing.assert_allclose(got.avg, want.avg, rtol=1e-9, atol=0)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-9, atol=1e-300)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory):
    """1e9-scale prices with 1e-3 noise, fed in random batches; most of it sealed."""
    rng = np.random.default_rng(5)
    with warm_tier(tmp_path_factory.mktemp("warm"), segment_values=SEGMENT) as warm:
        feed = Feeder(warm)
        for batch in random_batches(rng, TOTAL, scale=1e-3):
            feed.send("BIG", 1e9 + batch)
        warm.drain()
        view = warm.view("BIG")
        assert len(view.sealed) == TOTAL // SEGMENT and view.memory  # both kinds are read
        yield warm, feed.all_values("BIG")


def _query(warm, engine, window, start=None, end=None, step=1, **limits):
    limits = {"max_positions": 10**6, "max_values": 10**7, **limits}
    return rolling_by_index(warm, engine, "BIG", window, start, end, step, **limits)


@pytest.mark.parametrize(
    ("window", "start", "end", "step"),
    [
        (1, 0, TOTAL, 1),
        (10, 0, TOTAL, 1),
        (64, 30, 990, 1),  # from inside a segment into memory
        (66, 63, 129, 1),  # exactly one window, across a segment boundary
        (7, 63, 129, 3),  # one segment boundary, step > 1
        (200, 5, 1000, 17),
        (960, 0, 1000, 1000),  # one output, step past the end
        (5, 970, 1000, 2),  # memory only
    ],
)
def test_matches_the_reference(history, window, start, end, step) -> None:
    warm, x = history
    engine = CountingEngine()
    result = _query(warm, engine, window, start, end, step)
    assert (result.symbol, result.window, result.start, result.end, result.step) == (
        "BIG",
        window,
        start,
        end,
        step,
    )
    assert_rolling(result.rolling, x[start:end], window, step)
    want_positions = np.arange(start + window - 1, end, step)
    np.testing.assert_array_equal(result.positions(), want_positions)
    assert engine.calls == [(end - start, window, min(step, end - start))]  # ONE engine call
    body = result.to_dict()
    assert list(body) == [
        "symbol", "window", "start", "end", "step", "positions", "min", "max", "avg", "var",
    ]  # fmt: skip
    assert body["positions"] == want_positions.tolist()
    for column in ("min", "max", "avg", "var"):
        assert len(body[column]) == want_positions.shape[0]


def test_defaults_are_the_held_range_and_step_one(history) -> None:
    warm, x = history
    result = run_rolling_query(
        warm, CountingEngine(), "BIG", "25", None, "", None, max_positions=10**6, max_values=10**7
    )
    assert (result.start, result.end, result.step) == (0, TOTAL, 1)
    assert_rolling(result.rolling, x, 25, 1)


def test_stable_on_large_prices(history) -> None:
    """The noise's variance survives the 1e9 offset (the cumsum formula would lose it)."""
    warm, x = history
    result = _query(warm, CountingEngine(), 100, 0, TOTAL, 50)
    for m, p in enumerate(result.positions().tolist()):
        w = x[p - 99 : p + 1]
        assert result.rolling.var[m] == pytest.approx((w - w[0]).var(), rel=1e-9)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"window": None}, "invalid_window"),
        ({"window": ""}, "invalid_window"),
        ({"window": "0"}, "invalid_window"),
        ({"window": "-3"}, "invalid_window"),
        ({"window": "2.5"}, "invalid_window"),
        ({"window": "1e3"}, "invalid_window"),
        ({"window": "٣"}, "invalid_window"),  # a non-ASCII digit
        ({"window": "9" * 5000}, "invalid_window"),
        ({"step": "0"}, "invalid_window"),
        ({"step": "x"}, "invalid_window"),
        ({"start": "x"}, "invalid_range"),
        ({"start": "-1"}, "invalid_range"),
        ({"end": "9" * 5000}, "invalid_range"),
        ({"start": "500", "end": "500"}, "invalid_range"),
        ({"start": "600", "end": "500"}, "invalid_range"),
        ({"end": str(TOTAL + 1)}, "invalid_range"),
        ({"start": "995"}, "invalid_range"),  # 5 values < window 10
        ({"window": str(TOTAL + 1)}, "invalid_range"),
        ({"step": "1", "end": "800"}, "batch_too_large"),  # 791 positions > 500
        ({"start": "0", "end": "1000", "step": "100"}, "batch_too_large"),  # 1000 values > 900
    ],
)
def test_refusals_read_nothing(history, monkeypatch, args, code) -> None:
    warm, _ = history
    engine = CountingEngine()
    loads: list[object] = []
    monkeypatch.setattr(warm, "load", lambda piece: loads.append(piece))
    params = {"window": "10", "start": None, "end": None, "step": None, **args}
    with pytest.raises(HistoryError) as caught:
        run_rolling_query(
            warm,
            engine,
            "BIG",
            params["window"],
            params["start"],
            params["end"],
            params["step"],
            max_positions=500,
            max_values=900,
        )
    assert caught.value.code == code, caught.value.message
    assert (loads, engine.calls) == ([], [])


def test_range_errors_say_what_is_held(history) -> None:
    warm, _ = history
    with pytest.raises(HistoryError) as caught:
        _query(warm, CountingEngine(), 10, 0, TOTAL + 5)
    assert f"[0, {TOTAL})" in caught.value.message
    with pytest.raises(HistoryError) as caught:
        _query(warm, CountingEngine(), 10, 995, TOTAL)
    assert "fewer than one window of 10" in caught.value.message


def test_unknown_symbol(history) -> None:
    warm, _ = history
    with pytest.raises(HistoryError) as caught:
        rolling_by_index(warm, CountingEngine(), "NOPE", 1, None, None, 1, max_positions=1,
                         max_values=1)  # fmt: skip
    assert caught.value.code == "unknown_symbol"


def test_a_segment_deleted_mid_read_is_retried(history, monkeypatch) -> None:
    """Retention deleting a segment between the snapshot and its read: one fresh retry."""
    warm, x = history
    real_load, failures = warm.load, []

    def flaky(piece):
        if not failures:
            failures.append(piece)
            raise FileNotFoundError(piece)
        return real_load(piece)

    monkeypatch.setattr(warm, "load", flaky)
    result = run_rolling_query(
        warm, CountingEngine(), "BIG", "8", "3", "300", "4", max_positions=10**6, max_values=10**7
    )
    assert len(failures) == 1
    assert_rolling(result.rolling, x[3:300], 8, 4)


def test_parse_positive() -> None:
    assert parse_positive("w", "007", code="invalid_window") == 7
    assert parse_positive("w", str(2**63 - 1), code="invalid_window") == 2**63 - 1
    for bad in ("0", "000", "+1", " 1", "1 ", "99999999999999999999"):
        with pytest.raises(HistoryError):
            parse_positive("w", bad, code="invalid_window")


def test_overflowing_windows_answer_null(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=8) as warm:
        Feeder(warm).send("HUGE", np.array([1.7e308, 1.7e308, 1.0, 2.0, 3.0]))
        body = rolling_by_index(
            warm, CountingEngine(), "HUGE", 2, None, None, 1, max_positions=10, max_values=10
        ).to_dict()
    assert body["max"] == [1.7e308, 1.7e308, 2.0, 3.0]
    assert body["min"] == [1.7e308, 1.0, 1.0, 2.0]
    # (8.5e307)**2 overflows M2; the mean, taken around the window's first value, does not.
    assert body["var"] == [0.0, None, 0.25, 0.25]
    assert body["avg"] == [1.7e308, pytest.approx(8.5e307, rel=1e-12), 1.5, 2.5]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    segment=st.integers(2, 12),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=25),
)
def test_any_range_matches_the_reference(tmp_path_factory, data, segment, sizes) -> None:
    rng = np.random.default_rng(len(sizes) * 31 + segment)
    with warm_tier(tmp_path_factory.mktemp("h"), segment_values=segment) as warm:
        feed = Feeder(warm)
        for size in sizes:
            feed.send("S", 1e9 + np.round(rng.uniform(0, 1e-3, size), 9))
        warm.drain()
        x = feed.all_values("S")
        n = x.shape[0]
        start = data.draw(st.integers(0, n - 1))
        end = data.draw(st.integers(start + 1, n))
        window = data.draw(st.integers(1, end - start))
        step = data.draw(st.integers(1, end - start + 2))
        result = rolling_by_index(
            warm, CountingEngine(), "S", window, start, end, step, max_positions=n, max_values=n
        )
    assert_rolling(result.rolling, x[start:end], window, step)
    np.testing.assert_array_equal(result.positions(), np.arange(start + window - 1, end, step))


def _without(warm, drop: set[int]):
    """warm.view with the sealed segments at positions `drop` gone (retention, a late start)."""
    real_view = warm.view

    def view(symbol: str):
        full = real_view(symbol)
        sealed = tuple(s for i, s in enumerate(full.sealed) if i not in drop)
        return full._replace(sealed=sealed)

    return view


def test_start_before_the_held_history_is_refused(history, monkeypatch) -> None:
    warm, x = history
    monkeypatch.setattr(warm, "view", _without(warm, {0, 1}))  # retention deleted [0, 128)
    with pytest.raises(HistoryError) as caught:
        _query(warm, CountingEngine(), 10, 100, 300)
    assert caught.value.code == "invalid_range"
    assert f"holds indexes [{2 * SEGMENT}, {TOTAL})" in caught.value.message
    result = _query(warm, CountingEngine(), 10)  # the default start is the held one
    assert result.start == 2 * SEGMENT
    assert_rolling(result.rolling, x[2 * SEGMENT :], 10, 1)


def test_a_gap_in_the_history_is_refused_before_reading(history, monkeypatch) -> None:
    warm, x = history
    monkeypatch.setattr(warm, "view", _without(warm, {3}))  # [192, 256) missing
    engine = CountingEngine()
    with pytest.raises(HistoryError) as caught:
        _query(warm, engine, 10, 100, 300)
    assert caught.value.code == "invalid_range"
    assert "[192, 256) are not held" in caught.value.message
    assert engine.calls == []
    assert_rolling(_query(warm, engine, 10, 256, 400).rolling, x[256:400], 10, 1)


def test_a_symbol_whose_values_were_all_deleted_is_empty_range(history, monkeypatch) -> None:
    warm, _ = history
    real_view = warm.view
    monkeypatch.setattr(warm, "view", lambda s: real_view(s)._replace(sealed=(), memory=()))
    with pytest.raises(HistoryError) as caught:
        _query(warm, CountingEngine(), 10)
    assert caught.value.code == "empty_range"
