"""Engine conformance suite: every engine, every result checked against numpy (SPEC 3 and 4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine_core import RetentionPolicy
from tests.engine.reference import (
    ModelSeries,
    assert_all_windows_match,
    assert_stats_match,
    assert_window_matches,
)

SEED_BATCH = [150.1, 150.5, 151.0, 149.8, 150.2, 151.1, 151.2, 152.0, 151.5, 151.9]

finite_values = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
batches = st.lists(
    arrays(np.float64, st.integers(1, 150), elements=finite_values), min_size=1, max_size=25
)
_hypothesis = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def test_seed_example_matches_numpy_and_the_documented_variance(make_series):
    series = make_series()
    series.append(np.array(SEED_BATCH))
    stats = series.stats(10)
    assert stats.count == 10
    assert stats.min == 149.8 and stats.max == 152.0 and stats.last == 151.9
    assert stats.avg == pytest.approx(np.mean(SEED_BATCH), rel=1e-12)
    assert stats.var == pytest.approx(0.5201, rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(
    current=st.integers(0, 1000),
    incoming=st.integers(1, 1000),
    max_values=st.integers(1, 1000),
    keep_fraction=st.floats(0.0, 1.0),
)
def test_retention_rule_matches_the_spec_model(current, incoming, max_values, keep_fraction):
    """The rule itself, against the model written from SPEC section 4 (no engine involved)."""
    current = min(current, max_values)
    policy = RetentionPolicy(max_values, int(max_values * keep_fraction))
    model = ModelSeries(policy)
    model.values = np.arange(float(current))
    evicted = model.append(np.arange(float(current), float(current + incoming)))
    kept_old, kept_new = policy.retained_after(current, incoming)
    assert evicted == current - kept_old
    assert len(model.values) == kept_old + kept_new <= max_values
    assert model.values[-1] == current + incoming - 1  # the newest value always survives


@_hypothesis
@given(batches=batches)
def test_random_batches_match_numpy_for_every_window(make_series, batches):
    series = make_series()
    model = np.empty(0)
    for batch in batches:
        series.append(batch)
        model = np.concatenate([model, batch])
        assert_all_windows_match(series, model)


@_hypothesis
@given(
    batches=batches,
    max_values=st.integers(1, 400),
    keep_fraction=st.floats(0.0, 1.0),
)
def test_retention_policy_matches_the_model(make_series, batches, max_values, keep_fraction):
    keep = int(max_values * keep_fraction)
    series = make_series(max_values, keep)
    model = ModelSeries(RetentionPolicy(max_values, keep))
    for batch in batches:
        assert series.append(batch) == model.append(batch)
        assert len(series) <= max_values
        assert_all_windows_match(series, model.values)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000, 4096])
def test_many_appends_across_block_and_page_boundaries(make_series, batch_size):
    rng = np.random.default_rng(batch_size)
    series = make_series()
    model = []
    for _ in range(40):
        batch = rng.uniform(0, 1000, batch_size)
        series.append(batch)
        model.append(batch)
    assert_all_windows_match(series, np.concatenate(model))


def test_one_batch_larger_than_a_page(make_series):
    values = np.random.default_rng(3).uniform(0, 50, make_series.multi_page_batch)
    series = make_series()
    series.append(values)
    assert_all_windows_match(series, values)


def test_single_value_has_zero_variance(make_series):
    series = make_series()
    series.append(np.array([42.5]))
    stats = series.stats(10**8)
    assert (stats.count, stats.min, stats.max, stats.last, stats.avg, stats.var) == (
        1,
        42.5,
        42.5,
        42.5,
        42.5,
        0.0,
    )


def test_constant_series_has_exactly_zero_variance(make_series):
    series = make_series()
    for _ in range(5):
        series.append(np.full(777, 101.25))
    for exponent in range(1, 9):
        assert series.stats(10**exponent).var == 0.0


def test_variance_stays_accurate_on_a_large_offset(make_series):
    """SPEC 3: values 1e9 + uniform(0, 1e-3) must keep var to relative 1e-4."""
    values = 1e9 + np.random.default_rng(7).uniform(0, 1e-3, 120_000)
    series = make_series()
    for batch in np.array_split(values, 13):
        series.append(batch)
    for exponent in range(1, 6):
        expected = values[-(10**exponent) :].var()
        got = series.stats(10**exponent).var
        assert abs(got - expected) <= 1e-4 * expected


@pytest.mark.parametrize("length", [2, 101, 100_000, 100_001])
def test_alternating_values_have_variance_exactly_one(make_series, length):
    """SPEC 3: 1e9+1, 1e9-1, ... gives var 1.0 to 1e-9 where E[x^2]-E[x]^2 collapses."""
    values = np.where(np.arange(length) % 2 == 0, 1e9 + 1, 1e9 - 1)
    series = make_series()
    for batch in np.array_split(values, 3):
        if len(batch):
            series.append(batch)
    for exponent in range(1, 9):
        window = min(10**exponent, length)
        if window % 2:
            continue  # an odd window of two alternating values has variance 1 - 1/n^2
        assert series.stats(window).var == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("scale", [1e17, 1e-15])
def test_huge_and_tiny_magnitudes(make_series, scale):
    values = np.random.default_rng(11).uniform(1, 2, 5000) * scale
    series = make_series()
    series.append(values[:1234])
    series.append(values[1234:])
    assert_all_windows_match(series, values)


def test_zero_and_negative_zero_values(make_series):
    series = make_series()
    series.append(np.array([0.0, 0.0, 3.0]))
    stats = series.stats(10)
    assert stats.min == 0.0 and stats.max == 3.0 and stats.avg == 1.0 and stats.var == 2.0


def test_window_larger_than_series_covers_the_whole_series(make_series):
    series = make_series()
    series.append(np.array([1.0, 2.0, 3.0]))
    assert series.stats(10**8).count == 3
    assert series.stats(10**8).avg == 2.0


def test_append_returns_the_number_evicted_and_bounds_the_series(make_series):
    series = make_series(max_values=100, keep=30)
    assert series.append(np.arange(90.0)) == 0
    assert series.append(np.arange(20.0)) == 60  # 90 + 20 > 100: keep 30, then append
    assert len(series) == 50
    assert series.append(np.arange(500.0)) == 50  # batch alone overflows: newest 100 only
    assert len(series) == 100
    stats = series.stats(1000)
    assert (stats.min, stats.max, stats.last) == (400.0, 499.0, 499.0)


def test_engine_keeps_no_reference_to_the_callers_array(make_series):
    batch = np.array([1.0, 2.0, 3.0])
    series = make_series()
    series.append(batch)
    batch[:] = 1000.0
    assert series.stats(10).max == 3.0


def test_starting_capacity_is_a_hint_not_a_cap(make_series):
    series = make_series(capacity=16)
    values = np.arange(10_000.0)
    series.append(values)
    assert len(series) == 10_000
    assert_all_windows_match(series, values)


def test_stats_on_an_empty_series_or_a_bad_window_raise_value_error(make_series):
    series = make_series()
    with pytest.raises(ValueError):
        series.stats(10)
    series.append(np.array([1.0]))
    with pytest.raises(ValueError):
        series.stats(0)


def test_empty_append_changes_nothing(make_series):
    series = make_series()
    series.append(np.array([5.0]))
    assert series.append(np.empty(0)) == 0
    assert len(series) == 1


def test_windows_right_after_a_cleanup_are_exact(make_series):
    rng = np.random.default_rng(5)
    series = make_series(max_values=5000, keep=3333)
    model = ModelSeries(RetentionPolicy(5000, 3333))
    for _ in range(30):
        batch = rng.uniform(0, 10, int(rng.integers(1, 900)))
        series.append(batch)
        model.append(batch)
        for window in (1, 9, 10, 11, 255, 256, 257, 3333, 4999, 5000):
            assert_window_matches(series, model.values, window)


# -- tail: the raw values a hot-tier checkpoint saves (issue 5) -------------------------------


@_hypothesis
@given(
    batches=batches,
    max_values=st.integers(1, 400),
    keep_fraction=st.floats(0.0, 1.0),
    counts=st.lists(st.integers(0, 500), min_size=1, max_size=5),
)
def test_tail_matches_the_model_under_retention(
    make_series, batches, max_values, keep_fraction, counts
):
    keep = int(max_values * keep_fraction)
    series = make_series(max_values, keep)
    model = ModelSeries(RetentionPolicy(max_values, keep))
    for batch in batches:
        series.append(batch)
        model.append(batch)
        for count in counts:
            expected = model.values[len(model.values) - min(count, len(model.values)) :]
            got = series.tail(count)
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got, expected)  # raw values: bit-exact


def test_tail_across_pages_is_a_copy_oldest_first(make_series):
    values = np.random.default_rng(11).uniform(0, 50, make_series.multi_page_batch)
    series = make_series()
    series.append(values[:7])
    series.append(values[7:])
    whole = series.tail(len(values) + 10)
    np.testing.assert_array_equal(whole, values)
    whole[:] = -1.0  # the caller owns the copy: the series is unchanged
    np.testing.assert_array_equal(series.tail(len(values)), values)
    np.testing.assert_array_equal(series.tail(3), values[-3:])


def test_tail_of_an_empty_series_and_bad_counts(make_series):
    series = make_series()
    assert series.tail(5).shape == (0,)
    series.append(np.array([1.0, 2.0]))
    assert series.tail(0).shape == (0,)
    with pytest.raises(ValueError):
        series.tail(-1)


def test_tail_views_keep_their_values_through_later_appends_and_evictions(make_series):
    """The zero-copy snapshot (numpy engine only): views of pages that later appends,
    cleanups and page frees must never change, since checkpoints write them meanwhile."""
    m = make_series.multi_page_batch
    series = make_series(3 * m, m)
    if not hasattr(series, "tail_views"):
        pytest.skip("this engine has no tail_views; checkpoints use tail (tested above)")
    rng = np.random.default_rng(13)
    series.append(rng.uniform(0, 9, 7))
    series.append(rng.uniform(0, 9, m))
    expected = series.tail(len(series))
    views = series.tail_views(len(series) + 5)
    np.testing.assert_array_equal(np.concatenate(views), expected)
    np.testing.assert_array_equal(np.concatenate(series.tail_views(3)), expected[-3:])
    assert series.tail_views(0) == []
    with pytest.raises(ValueError):
        views[0][0] = 1.0  # read-only
    for _ in range(8):  # cleanups retire the viewed pages, later appends free them
        series.append(rng.uniform(10, 20, m))
    np.testing.assert_array_equal(np.concatenate(views), expected)


# --- stats_many: many (series, window) queries in one call (POST /stats/batch) ---------------


@_hypothesis
@given(
    contents=st.lists(batches, min_size=1, max_size=4),
    picks=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 8)), max_size=60),
)
def test_stats_many_answers_every_query_like_numpy(engine, make_series, contents, picks):
    """Random series, random queries (repeats included, windows past the series too): every
    answer is the numpy answer on the same window, in request order."""
    series, models = [], []
    for batch_list in contents:
        one = make_series()
        for batch in batch_list:
            one.append(batch)
        series.append(one)
        models.append(np.concatenate(batch_list))
    requests = [(series[i % len(series)], 10**k) for i, k in picks]
    answers = engine.stats_many(requests)
    assert len(answers) == len(requests)
    for (i, k), got in zip(picks, answers, strict=True):
        assert_stats_match(got, models[i % len(series)], 10**k)


def test_stats_many_across_pages_and_after_a_cleanup_matches_numpy(engine, make_series):
    m = make_series.multi_page_batch
    rng = np.random.default_rng(21)
    a, b = make_series(3 * m, m), make_series()
    model_a = ModelSeries(RetentionPolicy(3 * m, m))
    for _ in range(4):  # past one cleanup
        batch = rng.uniform(100, 200, m + 3)
        a.append(batch)
        model_a.append(batch)
    b.append(np.array(SEED_BATCH))
    requests = [(a, 10**k) for k in range(1, 9)] + [(b, 10), (a, 10), (b, 10**8)]
    answers = engine.stats_many(requests)
    assert len(answers) == len(requests)
    for (one, window), got in zip(requests, answers, strict=True):
        assert_stats_match(got, model_a.values if one is a else np.array(SEED_BATCH), window)
    assert engine.stats_many([]) == []
