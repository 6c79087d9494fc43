"""`Engine.stats_table`, the columnar batch, on every engine of the conformance suite: each row
is checked against numpy on the same window, and against the engine's own `stats_many` answer
bit for bit (the store serves both, so they must never disagree)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_core import RetentionPolicy
from engine_core.contract import STATS_COLUMNS, WindowStats
from tests.engine.reference import ModelSeries, assert_stats_match
from tests.engine.test_conformance import batches

_hypothesis = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _row_stats(row: np.ndarray) -> WindowStats:
    count, lo, hi, last, avg, var = row.tolist()
    assert count == int(count)
    return WindowStats(count=int(count), min=lo, max=hi, last=last, avg=avg, var=var)


def _check(engine, series, models, which, windows) -> None:
    which = np.asarray(which, dtype=np.int64)
    windows = np.asarray(windows, dtype=np.int64)
    table = engine.stats_table(series, which, windows)
    assert table.shape == (which.shape[0], STATS_COLUMNS)
    assert table.dtype == np.float64
    expected = engine.stats_many(
        [(series[i], w) for i, w in zip(which.tolist(), windows.tolist(), strict=True)]
    )
    for row, i, w, same in zip(table, which.tolist(), windows.tolist(), expected, strict=True):
        got = _row_stats(row)
        assert_stats_match(got, models[i], w)
        assert got == same  # bit for bit the engine's own per-query answer


@_hypothesis
@given(
    contents=st.lists(batches, min_size=1, max_size=4),
    picks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 8)), max_size=60),
)
def test_stats_table_rows_match_numpy_and_stats_many(engine, make_series, contents, picks):
    """Random series and queries (repeats, windows of 1 and past the series' length)."""
    series, models = [], []
    for batch_list in contents:
        one = make_series()
        for batch in batch_list:
            one.append(batch)
        series.append(one)
        models.append(np.concatenate(batch_list))
    which = [i % len(series) for i, _ in picks]
    _check(engine, series, models, which, [10**k for _, k in picks])


def test_stats_table_across_pages_after_a_cleanup_and_pending_ticks(engine, make_series):
    """Multi-page series past a cleanup, a tiny one, a series never queried (unused slot), and
    ticks appended after a first batch of queries (coalesced on the GPU engine: the table must
    see them)."""
    m = make_series.multi_page_batch
    rng = np.random.default_rng(7)
    a, b, c = make_series(3 * m, m), make_series(), make_series()
    model_a = ModelSeries(RetentionPolicy(3 * m, m))
    for _ in range(4):
        batch = rng.uniform(1e9, 1e9 + 1e-3, m + 3)  # 1e9-scale prices, 1e-3 noise
        a.append(batch)
        model_a.append(batch)
    b.append(np.array([150.1, 150.5, 151.0]))
    c.append(np.array([1.0]))
    series = [a, c, b]
    which = [0, 2, 0, 0, 2, 0, 2]
    windows = [1, 1, 10, 10**8, 10**8, m + 7, 2]
    _check(
        engine,
        series,
        [model_a.values, np.array([1.0]), np.array([150.1, 150.5, 151.0])],
        which,
        windows,
    )
    for tick in (152.0, 149.0):
        b.append(np.array([tick]))
    _check(
        engine,
        series,
        [model_a.values, np.array([1.0]), np.array([150.1, 150.5, 151.0, 152.0, 149.0])],
        which,
        windows,
    )


def test_stats_table_of_no_queries_is_an_empty_table(engine, make_series):
    one = make_series()
    one.append(np.array([1.0, 2.0]))
    empty = np.empty(0, dtype=np.int64)
    assert engine.stats_table([one], empty, empty).shape == (0, STATS_COLUMNS)
    assert engine.stats_table([], empty, empty).shape == (0, STATS_COLUMNS)
