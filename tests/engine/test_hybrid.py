"""The hybrid engine (gpu_kernels.hybrid): routing, the mirror's exactness under retention,
answers against the compiled engine, device memory failure, pinned pages and selection.

The conformance suite runs on it too (tests/engine/conftest.py, "hybrid-*"); these tests check
what is particular to it. The device is the CPU build of the kernels (emulated_device.py),
which counts launches and uploads."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpu_kernels
from appliance.engine import GpuPlacement, select_engine
from engine_core import Geometry, RetentionPolicy
from engine_core.contract import STATS_COUNT, STATS_LAST, STATS_MAX, STATS_MIN
from fallback.compiled import CompiledEngine
from gpu_kernels.hybrid import (
    DEFAULT_HISTORY_MIN_VALUES,
    HOST_ONLY_BATCHES,
    WARN_INTERVAL_S,
    HybridEngine,
    sliding_policy,
)
from tests.engine.conftest import TINY, emulated_engine, fake_cupy_engine, hybrid_engine

EXACT = [STATS_COUNT, STATS_MIN, STATS_MAX, STATS_LAST]


@pytest.fixture
def library(emulated_device_library):
    return emulated_device_library


def _filled(engine, policy, chunks, rng):
    series = engine.new_series(policy, 0)
    for size in chunks:
        series.append(rng.uniform(1.0, 2.0, size))
    return series


def test_appends_and_single_queries_never_touch_the_device(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 4)
    device = engine.device.device
    series = engine.new_series(RetentionPolicy(300, 100), 0)
    rng = np.random.default_rng(1)
    for size in (1, 7, 64, 250, 3):
        series.append(rng.uniform(0.0, 1.0, size))
        series.stats(10)
        series.tail(5)
    assert device.launches == {} and device.uploads == 0 and device.direct_uploads == 0
    assert engine.stats_many([(series, 3)] * 3)  # 3 < 4: a small batch stays on the host
    assert device.launches == {}


def test_small_batches_stay_on_the_host_and_large_ones_go_to_the_device(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 8)
    device = engine.device.device
    rng = np.random.default_rng(2)
    series = [_filled(engine, RetentionPolicy(500, 200), [130, 90], rng) for _ in range(3)]
    small = np.array([0, 1, 2, 1, 0, 2, 1], dtype=np.int64)
    engine.stats_table(series, small, np.full(7, 50, dtype=np.int64))
    engine.stats_many([(series[0], 4)] * 7)
    assert device.launches["window_stats"] == 0
    large = np.arange(8, dtype=np.int64) % 3
    engine.stats_table(series, large, np.full(8, 50, dtype=np.int64))
    assert device.launches["window_stats"] >= 1
    launched = device.launches["window_stats"]
    engine.stats_many([(series[1], 4)] * 8)  # 8 queries, 1 distinct: the host
    assert device.launches["window_stats"] == launched
    engine.stats_many([(series[1], window) for window in range(1, 9)])  # 8 distinct
    assert device.launches["window_stats"] > launched


def _assert_matches_compiled(table, reference) -> None:
    np.testing.assert_array_equal(table[:, EXACT], reference[:, EXACT])  # bit for bit
    np.testing.assert_allclose(table, reference, rtol=1e-12, atol=0)


def test_device_answers_equal_the_compiled_engine(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 1)
    compiled = CompiledEngine(geometry=TINY)
    policy = RetentionPolicy(700, 300)
    rng = np.random.default_rng(3)
    hybrid_series, compiled_series = [], []
    for _ in range(4):
        h, c = engine.new_series(policy, 0), compiled.new_series(policy, 0)
        for size in rng.integers(1, 200, 12):
            batch = 1e9 + rng.uniform(0.0, 1e-3, int(size))  # 1e9-scale prices, 1e-3 noise
            h.append(batch)
            c.append(batch)
        hybrid_series.append(h)
        compiled_series.append(c)
    which = rng.integers(0, 4, 300).astype(np.int64)
    windows = rng.integers(1, 2000, 300).astype(np.int64)  # many past the series' length
    table = engine.stats_table(hybrid_series, which, windows)
    _assert_matches_compiled(table, compiled.stats_table(compiled_series, which, windows))
    answers = engine.stats_many(
        list(zip([hybrid_series[i] for i in which], windows.tolist(), strict=True))
    )
    wanted = compiled.stats_many(
        list(zip([compiled_series[i] for i in which], windows.tolist(), strict=True))
    )
    assert [(a.count, a.min, a.max, a.last) for a in answers] == [
        (w.count, w.min, w.max, w.last) for w in wanted
    ]


def test_the_hosts_own_policy_would_not_keep_the_mirror_exact() -> None:
    """Why the mirror slides (gpu_kernels.hybrid): under max 10, keep 2, a host that took
    10 values then 1 holds 3; a mirror that took the 11 as one batch holds 10, and after one
    more value each, the mirror (10 + 1 -> 3) is shorter than the host (3 + 1 -> 4)."""
    policy = RetentionPolicy(10, 2)

    def after(n: int, m: int) -> int:
        return sum(policy.retained_after(n, m))

    host = after(after(after(0, 10), 1), 1)
    mirror = after(after(0, 11), 1)
    assert (host, mirror) == (4, 3)
    sliding = sliding_policy(policy)
    assert sum(sliding.retained_after(sum(sliding.retained_after(0, 11)), 1)) == 10


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_values=st.integers(1, 90),
    keep_fraction=st.floats(0.0, 1.0),
    steps=st.lists(st.tuples(st.integers(1, 120), st.booleans()), min_size=1, max_size=25),
)
def test_the_mirror_holds_the_hosts_values_whatever_the_batches(
    library, max_values, keep_fraction, steps
) -> None:
    """Random batch sizes over small policies (cleanups, batches larger than the bound),
    the mirror synced after random appends only: each time, the host's values are the
    mirror's newest, and device answers equal the host's."""
    engine = hybrid_engine(library, TINY, 5, 1)
    policy = RetentionPolicy(max_values, int(keep_fraction * max_values))
    series = engine.new_series(policy, 0)
    rng = np.random.default_rng(max_values)
    for size, sync in steps:
        series.append(rng.uniform(0.0, 100.0, size))
        if not sync:
            continue
        mirror = series.synced_mirror()
        assert mirror is not None and len(mirror) >= len(series)
        np.testing.assert_array_equal(mirror.tail(len(series)), series.tail(len(series)))
        windows = np.array([1, 2, 7, len(series), len(series) + 5, 10_000], dtype=np.int64)
        which = np.zeros(windows.shape[0], dtype=np.int64)
        table = engine.stats_table([series], which, windows)
        _assert_matches_compiled(table, engine.host.stats_table([series.host], which, windows))


def test_a_mirror_behind_an_evicting_host_is_rebuilt(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 1)
    series = engine.new_series(RetentionPolicy(50, 20), 0)
    rng = np.random.default_rng(5)
    series.append(rng.uniform(0.0, 1.0, 40))
    first = series.synced_mirror()
    for _ in range(6):  # 60 values the mirror never saw, more than the host still holds
        series.append(rng.uniform(0.0, 1.0, 10))
    second = series.synced_mirror()
    assert second is not first
    np.testing.assert_array_equal(second.tail(10**6), series.tail(10**6))


def test_device_memory_failure_answers_on_the_host_and_changes_nothing(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 2)
    device = engine.device.device
    rng = np.random.default_rng(6)
    series = _filled(engine, RetentionPolicy(400, 100), [150, 150], rng)
    before = series.tail(10**6)
    which, windows = np.zeros(4, dtype=np.int64), np.array([1, 5, 60, 999], dtype=np.int64)
    reference = engine.host.stats_table([series.host], which, windows)
    device.fail_allocations = True
    table = engine.stats_table([series], which, windows)
    np.testing.assert_array_equal(table, reference)  # the host engine's own answer
    assert engine.host_fallbacks == 1 and device.launches["window_stats"] == 0
    assert series.synced_mirror() is None
    np.testing.assert_array_equal(series.tail(10**6), before)
    assert len(series) == 300
    series.append(rng.uniform(0.0, 1.0, 30))  # the host still takes appends
    device.fail_allocations = False
    # Host only for HOST_ONLY_BATCHES device-routed batches: no sync is tried meanwhile.
    for _ in range(HOST_ONLY_BATCHES):
        table = engine.stats_table([series], which, windows)
        np.testing.assert_array_equal(table, engine.host.stats_table([series.host], which, windows))
    assert device.launches["window_stats"] == 0 and engine.host_fallbacks == 1
    table = engine.stats_table([series], which, windows)
    _assert_matches_compiled(table, engine.host.stats_table([series.host], which, windows))
    assert device.launches["window_stats"] == 1


def test_a_sync_that_runs_out_of_memory_leaves_the_mirror_as_it_was(library) -> None:
    """The failure comes after some of the sync's pages were made: the mirror's append is all
    or nothing, so it keeps its old values and the next sync brings the rest."""
    engine = hybrid_engine(library, TINY, 5, 1)
    rng = np.random.default_rng(7)
    series = _filled(engine, RetentionPolicy(1000, 500), [300], rng)
    mirror = series.synced_mirror()
    before = mirror.tail(1000)
    series.append(rng.uniform(0.0, 1.0, 400))
    real = mirror._values.allocate  # the mirror's value pages (bound at its creation)
    made = []

    def fail_after_two(count):
        if len(made) >= 2:
            raise MemoryError("emulated")
        made.append(count)
        return real(count)

    mirror._values.allocate = fail_after_two
    assert series.synced_mirror() is None
    assert len(made) == 2  # it failed part-way through the pages the sync needed
    np.testing.assert_array_equal(mirror.tail(1000), before)
    mirror._values.allocate = real
    assert series.synced_mirror() is mirror
    np.testing.assert_array_equal(mirror.tail(700), series.tail(700))


def test_plain_pages_are_staged_and_pages_pinned_after_the_first_sync_copied_directly(
    library,
) -> None:
    """Review findings 4 and 6: pages made before the mirror existed are plain (np.empty) and
    go through the staged upload; from the first sync on, new pages are pinned and copied
    straight from the page."""
    engine = hybrid_engine(library, TINY, 5, 1)
    device = engine.device.device
    pinned: list[int] = []
    real = device.new_pinned_values

    def counted(count):
        pinned.append(count)
        return real(count)

    device.new_pinned_values = counted
    rng = np.random.default_rng(8)
    series = _filled(engine, RetentionPolicy(10_000, 5_000), [1000], rng)
    assert pinned == []  # no mirror yet: a tick never pays a page-locked allocation
    series.synced_mirror()
    pages = -(-1000 // TINY.chunk)
    assert (device.uploads, device.direct_uploads) == (pages, 0)  # plain pages: staged
    assert pinned == [TINY.chunk]  # the next page, made ahead by the sync
    series.append(rng.uniform(1.0, 2.0, 200))  # fills page 15, then pages 16, 17, 18
    assert pinned == [TINY.chunk] * 3  # page 16 was the one made ahead
    mirror = series.synced_mirror()
    assert device.uploads == pages + 1  # the rest of the plain page 15
    assert device.direct_uploads == 3  # the pinned pages 16-18
    np.testing.assert_array_equal(mirror.tail(1200), series.tail(1200))
    assert series.nbytes > series.host.nbytes  # the mirror is counted


def test_without_pinned_host_pages_every_page_is_staged(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 1)
    engine = HybridEngine(engine.host, engine.device, 1, pinned_host_pages=False)
    device = engine.device.device
    device.new_pinned_values = None  # never called
    series = _filled(engine, RetentionPolicy(10_000, 5_000), [300], np.random.default_rng(8))
    series.synced_mirror()
    series.append(np.arange(300.0))
    mirror = series.synced_mirror()
    assert device.direct_uploads == 0
    np.testing.assert_array_equal(mirror.tail(600), series.tail(600))


def test_host_pages_come_from_the_device_and_fall_back_to_plain_memory(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 1)
    pinned: list[int] = []
    device = engine.device.device

    def pinned_values(count):
        if pinned:
            raise MemoryError("no more page-locked memory")
        pinned.append(count)
        return np.empty(count)

    device.new_pinned_values = pinned_values
    series = engine.new_series(RetentionPolicy(1000, 500), 0)
    series.append(np.arange(10.0))
    series.synced_mirror()  # from now on new pages are pinned: the first is made ahead
    assert pinned == [TINY.chunk]
    series.append(np.arange(10.0, 300.0))  # several pages: the first pinned, the rest plain
    assert pinned == [TINY.chunk]
    np.testing.assert_array_equal(series.tail(300), np.arange(300.0))
    mirror = series.synced_mirror()
    np.testing.assert_array_equal(mirror.tail(300), np.arange(300.0))
    assert device.direct_uploads == 1  # only the pinned page


def test_cupy_device_direct_and_parallel_staged_copies(library) -> None:
    """CupyDevice over the numpy stand-in for CuPy: large copies filled by several threads
    through several staging buffers, and direct copies straight from the source."""
    engine, fake = fake_cupy_engine(
        library, TINY, staging_values=50, staging_buffers=3, fill_threads=3, parallel_fill_values=8
    )
    values = np.random.default_rng(9).uniform(0.0, 1.0, 1000)
    series = engine.new_series(RetentionPolicy(5000, 2000), 0)
    series.append(values)
    np.testing.assert_array_equal(series.tail(1000), values)
    assert fake.copies  # staged, in pieces of at most 50 values
    assert max(size for _, size, _ in fake.copies) <= 50 * 8
    hybrid = HybridEngine(CompiledEngine(geometry=TINY), engine, 1)
    h = hybrid.new_series(RetentionPolicy(5000, 2000), 0)
    h.append(values)
    calls = {"upload": 0, "upload_direct": 0}
    device = engine.device
    for name in calls:
        method = getattr(device, name)

        def counted(*args, _method=method, _name=name):
            calls[_name] += 1
            return _method(*args)

        setattr(device, name, counted)
    fake.copies.clear()
    mirror = h.synced_mirror()
    # Pages made before the mirror existed are plain: staged, in parallel.
    assert calls == {"upload": -(-1000 // TINY.chunk), "upload_direct": 0}
    assert max(size for _, size, _ in fake.copies) <= 50 * 8
    np.testing.assert_array_equal(mirror.tail(1000), values)
    h.append(values)  # the rest of page 15 (plain), then pages 16-31, pinned
    fake.copies.clear()
    mirror = h.synced_mirror()
    assert calls == {"upload": -(-1000 // TINY.chunk) + 1, "upload_direct": 16}
    # Every pinned page copied straight from the host page, whole where it is full.
    assert sum(size == TINY.chunk * 8 for _, size, _ in fake.copies) == 15
    np.testing.assert_array_equal(mirror.tail(2000), np.concatenate([values, values]))


def test_bars_and_rolling_go_to_the_device(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 1)
    values = np.random.default_rng(10).uniform(0.0, 1.0, 100)
    bars = engine.bars(values, np.array([0, 10, 55], dtype=np.int64))
    assert engine.device.device.launches["bar_summaries"] == 1
    np.testing.assert_array_equal(
        bars.high, [values[:10].max(), values[10:55].max(), values[55:].max()]
    )
    rolling = engine.rolling(values, 5, 3)
    np.testing.assert_array_equal(
        rolling.max, [values[p - 4 : p + 1].max() for p in range(4, 100, 3)]
    )


# -- selection ---------------------------------------------------------------------------------


def test_auto_without_a_gpu_falls_back_to_cpu_and_logs_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    caplog.set_level("INFO")
    choice = select_engine("auto", placement=GpuPlacement("hybrid", 64))
    assert choice.engine.name == "cpu"
    assert "CuPy is not installed" in choice.reason
    record = next(r for r in caplog.records if r.message == "engine selected")
    assert record.engine == "cpu" and "CuPy is not installed" in record.reason


@pytest.mark.parametrize("backend", ["gpu", "auto"])
def test_a_loading_gpu_gives_the_hybrid_engine_or_the_device_engine(
    library, backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    device_engine = emulated_engine(library, Geometry(), 64)  # before CupyEngine is patched
    monkeypatch.setattr(gpu_kernels, "CupyEngine", lambda: device_engine)
    caplog.set_level("INFO")
    choice = select_engine(backend, placement=GpuPlacement("hybrid", 77, 5000))
    assert choice.engine.name == "hybrid" and choice.engine.batch_min_queries == 77
    assert choice.engine.history_min_values == 5000
    assert "placement = 'hybrid'" in choice.reason
    record = next(r for r in caplog.records if r.message == "engine selected")
    assert record.engine == "hybrid" and record.gpu_batch_min_queries == 77
    assert record.gpu_history_min_values == 5000
    assert record.device == choice.engine.device_name
    assert select_engine(backend, placement=GpuPlacement("device")).engine.name == "cupy"


def test_an_unknown_placement_is_an_error() -> None:
    from appliance.engine import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match=r"engine\.placement"):
        GpuPlacement("everywhere")


def test_any_other_device_error_during_a_sync_is_raised_and_the_mirror_rebuilt(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 1)
    device = engine.device.device
    series = _filled(engine, RetentionPolicy(1000, 500), [300], np.random.default_rng(11))
    real = device.upload  # the first sync's pages are plain: staged
    calls = []

    def broken(dst, values):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cudaErrorLaunchFailure")
        real(dst, values)

    device.upload = broken
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure"):
        series.synced_mirror()
    device.upload = real
    mirror = series.synced_mirror()
    assert len(mirror) == 300  # rebuilt whole, not resumed (which would repeat values)
    np.testing.assert_array_equal(mirror.tail(1000), series.tail(1000))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_values=st.integers(1, 80),
    keep_fraction=st.floats(0.0, 1.0),
    batches=st.lists(st.lists(st.integers(0, 90), min_size=1, max_size=4), min_size=1, max_size=8),
)
def test_append_parts_is_append_of_the_concatenation(
    library, max_values, keep_fraction, batches
) -> None:
    """GpuSeries.append_parts (the mirror sync's one append) against append of the joined
    parts, retention trimming parts away included (a batch larger than the bound)."""
    policy = RetentionPolicy(max_values, int(keep_fraction * max_values))
    engine = emulated_engine(library, TINY, 5)
    by_parts, joined = engine.new_series(policy, 0), engine.new_series(policy, 0)
    rng = np.random.default_rng(max_values)
    for sizes in batches:
        parts = [rng.uniform(0.0, 10.0, size) for size in sizes]
        evicted = by_parts.append_parts(parts, stable_source=True)
        engine.device.synchronize()
        assert evicted == joined.append(np.concatenate(parts))
        assert len(by_parts) == len(joined)
        np.testing.assert_array_equal(by_parts.tail(10**6), joined.tail(10**6))
        if len(joined):
            assert by_parts.stats(7) == joined.stats(7)


def test_a_gpu_without_the_compiled_engine_is_placed_on_the_device_and_says_why(
    library, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_engine = emulated_engine(library, Geometry(), 64)
    monkeypatch.setattr(gpu_kernels, "CupyEngine", lambda: device_engine)
    monkeypatch.setitem(sys.modules, "fallback.compiled", None)  # as if numba were missing
    for backend in ("gpu", "auto"):
        choice = select_engine(backend, placement=GpuPlacement("hybrid"))
        assert choice.engine is device_engine
        assert "'hybrid' unavailable, using 'device'" in choice.reason
        assert "compiled CPU engine not available" in choice.reason


def test_bars_fall_back_to_the_host_when_the_device_is_out_of_memory(library) -> None:
    engine = hybrid_engine(library, TINY, 5, 1)
    values = np.random.default_rng(12).uniform(0.0, 1.0, 100)
    offsets = np.array([0, 10, 55], dtype=np.int64)
    engine.device.device.fail_allocations = True
    bars = engine.bars(values, offsets)
    assert engine.host_fallbacks == 1 and engine.device.device.launches["bar_summaries"] == 0
    want = engine.host.bars(values, offsets)
    np.testing.assert_array_equal(bars.high, want.high)
    np.testing.assert_array_equal(bars.low, want.low)


# -- review findings (issue 13): out of memory in the batch call, backoff, history routing -----


def test_a_batch_call_out_of_device_memory_is_answered_on_the_host(library) -> None:
    """Finding 2: the device's own batch allocations (`new_output` here) run out of memory
    after the mirrors synced: the host answers, nothing changes, the next batch can use the
    device again."""
    engine = hybrid_engine(library, TINY, 5, 1)
    device = engine.device.device
    rng = np.random.default_rng(13)
    series = [_filled(engine, RetentionPolicy(400, 100), [150, 90], rng) for _ in range(2)]
    which = np.array([0, 1, 1, 0], dtype=np.int64)
    windows = np.array([1, 5, 60, 999], dtype=np.int64)
    reference = engine.host.stats_table([s.host for s in series], which, windows)
    real = device.new_output

    def exhausted(rows):
        raise MemoryError("emulated: out of device memory")

    device.new_output = exhausted
    np.testing.assert_array_equal(engine.stats_table(series, which, windows), reference)
    requests = [(series[i], int(w)) for i, w in zip(which, windows, strict=True)]
    want = engine.host.stats_many([(s.host, w) for s, w in requests])
    assert engine.stats_many(requests) == want
    assert engine.host_fallbacks == 2 and device.launches["window_stats"] == 0
    assert [len(s) for s in series] == [240, 240]
    device.new_output = real
    _assert_matches_compiled(engine.stats_table(series, which, windows), reference)
    assert device.launches["window_stats"] == 1


def test_an_out_of_memory_sync_makes_the_series_host_only_and_logs_once_a_minute(
    library, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 5: no retry (and no log line) on every batch; the warning at most once per
    series per minute, the state on the engine object."""
    engine = hybrid_engine(library, TINY, 5, 1)
    other_engine = hybrid_engine(library, TINY, 5, 1)
    now = [1000.0]
    engine.backoff.clock = lambda: now[0]
    device = engine.device.device
    rng = np.random.default_rng(14)
    a, b = (_filled(engine, RetentionPolicy(400, 100), [150], rng) for _ in range(2))
    which, windows = np.zeros(2, dtype=np.int64), np.array([3, 70], dtype=np.int64)
    caplog.set_level("WARNING")

    def warnings() -> int:
        return sum("device memory exhausted" in r.getMessage() for r in caplog.records)

    device.fail_allocations = True
    for _ in range(5):
        engine.stats_table([a], which, windows)
    assert warnings() == 1 and engine.host_fallbacks == 1  # tried once, host only since
    engine.stats_table([b], which, windows)  # another series: its own warning
    assert warnings() == 2
    assert other_engine.host_fallbacks == 0  # no state shared between engines
    for _ in range(HOST_ONLY_BATCHES):  # a's host-only period ends; its retry fails again
        engine.stats_table([a], which, windows)
    assert engine.host_fallbacks == 3 and warnings() == 2  # within the minute: not logged
    now[0] += WARN_INTERVAL_S
    for _ in range(HOST_ONLY_BATCHES + 1):
        engine.stats_table([a], which, windows)
    assert engine.host_fallbacks == 4 and warnings() == 3
    device.fail_allocations = False
    tries = 0
    while not device.launches["window_stats"] and tries <= HOST_ONLY_BATCHES:
        table = engine.stats_table([a], which, windows)  # the device once the period ends
        tries += 1
    assert tries > 1 and device.launches["window_stats"] == 1
    _assert_matches_compiled(table, engine.host.stats_table([a.host], which, windows))


def test_bars_and_rolling_over_short_histories_stay_on_the_host(library) -> None:
    """Finding 7: below `history_min_values` values the host engine answers."""
    engine = hybrid_engine(library, TINY, 5, 1, history_min_values=100)
    device = engine.device.device
    values = np.random.default_rng(15).uniform(0.0, 1.0, 100)
    offsets = np.array([0, 10, 55], dtype=np.int64)
    engine.bars(values[:99], offsets)
    engine.rolling(values[:99], 5, 3)
    assert device.launches["bar_summaries"] == 0 and sum(device.launches.values()) == 0
    want = engine.host.rolling(values, 5, 3)
    got = engine.rolling(values, 5, 3)  # 100 values: the device
    assert sum(device.launches.values()) >= 1
    np.testing.assert_array_equal(got.max, want.max)
    engine.bars(values, offsets)
    assert device.launches["bar_summaries"] == 1
    assert engine.host_fallbacks == 0
    with pytest.raises(ValueError, match="history_min_values"):
        HybridEngine(engine.host, engine.device, 1, history_min_values=0)


def test_the_default_history_threshold_keeps_small_histories_on_the_host(library) -> None:
    engine = hybrid_engine(library, TINY, 5)
    assert engine.history_min_values == DEFAULT_HISTORY_MIN_VALUES
    values = np.random.default_rng(16).uniform(0.0, 1.0, 1000)
    engine.rolling(values, 10, 1)
    assert sum(engine.device.device.launches.values()) == 0
