"""Rolling statistics (`Engine.rolling`): every engine against the per-window oracle
`engine_core.rolling.rolling_reference` on the same data.

Engines: the numpy engine (`rolling_summaries`, the protocol's default), the compiled CPU engine
(`rolling_rows`), the GPU engine's kernels on the CPU build of segment_tree.cu ("gpu-emulated"),
the same through the real `CupyDevice` over the numpy stand-in for CuPy ("gpu-fakecupy"), and
the real GPU (skipped with the reason where there is none).

Stability claim (what the tests hold every engine to): min and max are bit-exact; avg and var
agree with the anchored two-pass oracle to 1e-9 relative, also for 1e9-scale prices whose
variance is 1e-3 noise, a random walk around 1e9, a jump of 1e6 and a lone spike; a window of
equal values has var exactly 0. The naive running-sums formula fails the same data by orders
of magnitude (`test_the_naive_formula_loses_the_variance_the_engines_keep`).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_core.rolling import (
    Rolling,
    rolling_count,
    rolling_naive,
    rolling_reference,
    rolling_summaries,
)
from fallback import NumpyEngine
from tests.engine.conftest import TINY, emulated_engine

RTOL = 1e-9
VAR_FLOOR = 1e-300  # absolute floor: only a var == 0 window needs it (the engines give 0.0 there)


@pytest.fixture
def engine(history_engine):
    """Every engine that answers history analytics (tests/engine/conftest.py)."""
    return history_engine


def assert_rolling_matches(got: Rolling, values: np.ndarray, window: int, step: int) -> None:
    want = rolling_reference(values, window, step)
    outputs = rolling_count(values.shape[0], window, step)
    for name in ("min", "max", "avg", "var"):
        assert getattr(got, name).shape == (outputs,), name
    assert np.array_equal(got.min, want.min)  # exact selections
    assert np.array_equal(got.max, want.max)
    np.testing.assert_allclose(got.avg, want.avg, rtol=RTOL, atol=0)
    np.testing.assert_allclose(got.var, want.var, rtol=RTOL, atol=VAR_FLOOR)


def make_values(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "small":
        return rng.uniform(-10, 10, n)
    if kind == "far":  # 1e9-scale prices with 1e-3 noise
        return 1e9 + rng.uniform(0, 1e-3, n)
    if kind == "walk":  # a random walk around 1e9
        return 1e9 + np.cumsum(rng.normal(0, 1e-2, n))
    if kind == "constant":
        return np.full(n, 1e9 + 0.125)
    if kind == "jump":  # far prices that jump by 1e6 once
        values = 1e9 + rng.uniform(0, 1e-3, n)
        values[rng.integers(0, max(n, 1)) :] += 1e6
        return values
    if kind == "spike":  # far prices with one outlier (an anchor may land on it)
        values = 1e9 + rng.uniform(0, 1e-3, n)
        if n:
            values[rng.integers(0, n)] += 1e6
        return values
    return rng.integers(0, 3, n).astype(np.float64)  # ties


KINDS = ["small", "far", "walk", "constant", "jump", "spike", "ties"]


@st.composite
def rolling_input(draw) -> tuple[np.ndarray, int, int]:
    n = draw(st.integers(0, 150))
    window = draw(
        st.one_of(
            st.just(1),
            st.just(2),
            st.just(max(n, 1)),  # window == n: one output
            st.integers(n + 1, n + 5),  # window > n: no output
            st.integers(1, max(n, 1)),  # mostly not dividing n
        )
    )
    step = draw(st.one_of(st.just(1), st.integers(1, 7), st.integers(window + 1, 2 * window + 3)))
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_values(kind, n, rng), window, step


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=rolling_input())
def test_rolling_matches_the_reference(engine, data) -> None:
    values, window, step = data
    assert_rolling_matches(engine.rolling(values, window, step), values, window, step)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "window", "step"), [(5000, 97, 1), (5000, 1000, 3), (3000, 64, 200)])
def test_longer_series_match_the_reference(engine, kind, n, window, step) -> None:
    """Many blocks and (on the GPU) many tiles per block: 97 and 1000 do not divide 5000."""
    values = make_values(kind, n, np.random.default_rng(n + window))
    assert_rolling_matches(engine.rolling(values, window, step), values, window, step)


def test_window_one_is_each_value(engine) -> None:
    values = make_values("walk", 50, np.random.default_rng(3))
    got = engine.rolling(values, 1, 1)
    assert got.min.tolist() == values.tolist()
    assert got.max.tolist() == values.tolist()
    assert got.avg.tolist() == values.tolist()
    assert got.var.tolist() == [0.0] * 50


@pytest.mark.parametrize("n", [0, 1, 9])
def test_a_window_longer_than_the_values_has_no_outputs(engine, n) -> None:
    got = engine.rolling(np.arange(n, dtype=np.float64), 10, 1)
    assert [column.shape for column in got] == [(0,)] * 4


def test_equal_values_have_exactly_zero_variance(engine) -> None:
    values = np.full(300, 1e9 + 0.1)
    got = engine.rolling(values, 37, 2)
    assert np.all(got.var == 0.0)
    assert np.all(got.avg == values[0])
    assert np.all(got.min == values[0]) and np.all(got.max == values[0])


def test_read_only_values(engine) -> None:
    """Values may be views of decoded segments that nobody may write."""
    values = make_values("far", 200, np.random.default_rng(4))
    values.setflags(write=False)
    assert_rolling_matches(engine.rolling(values, 30, 4), values, 30, 4)


def test_the_naive_formula_loses_the_variance_the_engines_keep(engine) -> None:
    """1e9 + U(0, 1e-3): the true variance is ~8.3e-8; E[x^2] - E[x]^2 rounds at ~1e2."""
    values = make_values("far", 4000, np.random.default_rng(5))
    window = 500
    want = rolling_reference(values, window, 1)
    _, naive_var = rolling_naive(values, window, 1)
    naive_error = np.max(np.abs(naive_var - want.var) / want.var)
    assert naive_error > 1e3  # not a little off: no digit of the variance survives
    got = engine.rolling(values, window, 1)
    engine_error = np.max(np.abs(got.var - want.var) / want.var)
    assert engine_error < RTOL
    assert np.all(np.abs(got.var / (1e-6 / 12) - 1) < 0.2)  # it is the noise's variance


def test_a_lone_spike_at_an_anchor_keeps_the_variance(engine) -> None:
    """The blocked algorithms anchor parts at the first value of a block (prefixes) and the
    last (suffixes). A lone spike exactly there puts every other value of the part 1e6 from
    its anchor: running sums of d and d^2 then cancel (1e-8 relative var error at this
    window, measured with the numpy engine's first version); merges must not."""
    window = 100_000
    values = make_values("far", 3 * window, np.random.default_rng(9))
    values[window] += 1e6  # block 1's first value
    values[2 * window - 1] -= 1e6  # and its last
    got = engine.rolling(values, window, 1)
    picks = [0, 1, 5000, window - 2, window - 1, window, window + 1, 2 * window - 9, 2 * window]
    for m in picks:
        want = rolling_reference(values[m : m + window], window, 1)
        assert got.min[m] == want.min[0] and got.max[m] == want.max[0]
        assert got.avg[m] == pytest.approx(want.avg[0], rel=RTOL, abs=0)
        assert got.var[m] == pytest.approx(want.var[0], rel=RTOL, abs=0), m


def test_numpy_engine_default_is_rolling_summaries() -> None:
    values = make_values("walk", 100, np.random.default_rng(6))
    got, want = NumpyEngine().rolling(values, 9, 2), rolling_summaries(values, 9, 2)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("chunk", [1, 64, 1000])
@pytest.mark.parametrize(("window", "step"), [(1, 1), (7, 1), (97, 3), (200, 450), (2000, 1)])
def test_numpy_engine_in_small_chunks(monkeypatch, chunk, window, step) -> None:
    """`rolling_summaries` computes its outputs in groups of blocks: force many groups."""
    import engine_core.rolling

    monkeypatch.setattr(engine_core.rolling, "ROLLING_CHUNK_VALUES", chunk)
    for kind in ("far", "jump", "walk"):
        values = make_values(kind, 3001, np.random.default_rng(window + step))
        got = rolling_summaries(values, window, step)
        assert_rolling_matches(got, values, window, step)


def test_gpu_rolling_is_one_upload_three_launches_one_table(emulated_device_library) -> None:
    engine = emulated_engine(emulated_device_library, TINY, 5)
    values = make_values("far", 1000, np.random.default_rng(7))
    engine.rolling(values, 100, 3)
    launches = engine.device.launches
    assert {k: launches[k] for k in ("rolling_tiles", "rolling_carries", "rolling_outputs")} == {
        "rolling_tiles": 1,
        "rolling_carries": 1,
        "rolling_outputs": 1,
    }
    assert (engine.device.uploads, engine.device.uploaded_values) == (1, 1000)


def test_gpu_allocation_failure_raises_and_leaves_the_engine_usable(
    emulated_device_library,
) -> None:
    engine = emulated_engine(emulated_device_library, TINY, 5)
    device = engine.device
    real_new_values = device.new_values
    calls = []

    def failing(count: int):
        calls.append(count)
        if len(calls) == 3:  # after the values and one scratch array
            raise MemoryError("out of device memory")
        return real_new_values(count)

    device.new_values = failing
    values = make_values("walk", 500, np.random.default_rng(8))
    with pytest.raises(MemoryError):
        engine.rolling(values, 50, 1)
    assert not engine.lock.locked()
    device.new_values = real_new_values
    assert_rolling_matches(engine.rolling(values, 50, 1), values, 50, 1)
