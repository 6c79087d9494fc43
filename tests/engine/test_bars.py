"""OHLC bars: the numpy reference, the compiled engine's kernel and the GPU engine's kernel (on
the CPU build of segment_tree.cu, and through CupyDevice over the fake CuPy) against a plain
numpy grouping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_core.bars import Bars, bar_starts, count_bars
from tests.engine.conftest import TINY, emulated_engine

RTOL = 1e-9


def reference(values: np.ndarray, offsets: np.ndarray) -> list[tuple]:
    """Per bar, a Python loop over numpy slices: (open, high, low, close, count, avg, var),
    avg and var around the bar's open so 1e9-scale prices keep their digits."""
    ends = [*offsets[1:].tolist(), values.shape[0]]
    out = []
    for lo, hi in zip(offsets.tolist(), ends, strict=True):
        bar = values[lo:hi]
        shifted = bar - bar[0]
        out.append(
            (bar[0], bar.max(), bar.min(), bar[-1], hi - lo, bar[0] + shifted.mean(), shifted.var())
        )
    return out


def assert_bars_match(got: Bars, values: np.ndarray, offsets: np.ndarray) -> None:
    want = reference(values, offsets)
    assert got.count.tolist() == [w[4] for w in want]
    for name, column in zip(("open", "high", "low", "close"), range(4), strict=True):
        assert getattr(got, name).tolist() == [w[column] for w in want], name  # exact
    np.testing.assert_allclose(got.avg, [w[5] for w in want], rtol=RTOL, atol=0)
    np.testing.assert_allclose(got.var, [w[6] for w in want], rtol=RTOL, atol=1e-300)


@pytest.fixture
def engine(history_engine):
    """Every engine that answers history analytics (tests/engine/conftest.py)."""
    return history_engine


@st.composite
def bars_input(draw) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 120))
    kind = draw(st.sampled_from(["small", "far", "wide", "ties"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "small":
        values = rng.uniform(0, 10, n)
    elif kind == "far":  # 1e9-scale prices with 1e-3 noise
        values = 1e9 + rng.uniform(0, 1e-3, n)
    elif kind == "wide":
        values = rng.uniform(0, 1e12, n)
    else:
        values = rng.integers(0, 3, n).astype(np.float64)
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else set()
    return values, np.array([0, *sorted(cuts)], dtype=np.int64)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=bars_input())
def test_bars_match_a_numpy_grouping(engine, data) -> None:
    values, offsets = data
    assert_bars_match(engine.bars(values, offsets), values, offsets)


def test_one_long_bar_of_far_prices_keeps_its_variance(engine) -> None:
    rng = np.random.default_rng(1)
    values = 1e9 + rng.uniform(0, 1e-3, 100_000)
    offsets = np.array([0, 1, 50_000], dtype=np.int64)
    got = engine.bars(values, offsets)
    assert_bars_match(got, values, offsets)
    assert got.var[2] == pytest.approx(1e-6 / 12, rel=0.05)  # the noise, not rounding


def test_gpu_kernel_is_one_upload_and_one_launch(emulated_device_library) -> None:
    engine = emulated_engine(emulated_device_library, TINY, 5)
    values = np.arange(1000, dtype=np.float64)
    engine.bars(values, np.arange(0, 1000, 7, dtype=np.int64))
    assert engine.device.launches["bar_summaries"] == 1
    assert (engine.device.uploads, engine.device.uploaded_values) == (1, 1000)


@st.composite
def runs(draw) -> tuple[np.ndarray, np.ndarray, int]:
    lengths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=30))
    steps = draw(st.lists(st.integers(0, 40), min_size=len(lengths), max_size=len(lengths)))
    origin = draw(st.integers(0, 10**12))
    run_ns = origin + np.cumsum(steps).astype(np.int64)
    run_pos = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
    return run_pos, run_ns, int(sum(lengths))


@settings(max_examples=200, deadline=None)
@given(data=runs(), interval=st.integers(1, 100))
def test_bar_starts_match_times_per_value(data, interval) -> None:
    """Cutting on the runs gives what materializing one time per value and grouping gives."""
    run_pos, run_ns, n = data
    per_value = np.repeat(run_ns, np.diff(np.append(run_pos, n)))
    keys, first = np.unique(per_value // interval, return_index=True)
    offsets, times = bar_starts(run_pos, run_ns, interval)
    assert offsets.tolist() == first.tolist()
    assert times.tolist() == (keys * interval).tolist()
    # Counting piece by piece (split anywhere) gives the same number of bars.
    for split in range(run_ns.shape[0] + 1):
        a, key = count_bars(run_ns[:split], interval, None)
        b, _ = count_bars(run_ns[split:], interval, key)
        assert a + b == offsets.shape[0]


def test_bars_align_to_the_epoch() -> None:
    offsets, times = bar_starts(
        np.array([0, 2, 3, 5]), np.array([59_999, 60_000, 119_999, 120_000]), 60_000
    )
    assert offsets.tolist() == [0, 2, 5]
    assert times.tolist() == [0, 60_000, 120_000]
