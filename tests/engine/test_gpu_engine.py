"""The GPU engine against the numpy engine, and what makes it a GPU engine: few launches.

Runs on the CPU build of the kernels everywhere (gpu-emulated) and on a real GPU where there
is one (cupy, skipped with the reason otherwise). Answers are compared with the numpy engine
at the same geometry on the same batches: min / max / last / count bit for bit, avg and var
to 1e-12 relative (SPEC section 7, issue 4).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from appliance.store import Store
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine
from gpu_kernels import CupyEngine
from tests.engine.conftest import TINY, emulated_engine, fake_cupy_engine, real_gpu_engine
from tests.engine.emulated_device import EmulatedDevice
from tests.engine.reference import rounding_floor

_GEOMETRIES = {"default": Geometry(), "b4f4c64": TINY}


@pytest.fixture(
    params=[
        *(f"gpu-emulated-{name}" for name in _GEOMETRIES),
        *(pytest.param(f"cupy-{name}", marks=pytest.mark.gpu) for name in _GEOMETRIES),
    ]
)
def gpu_engine(request):
    kind, _, geometry = request.param.rpartition("-")
    if kind == "cupy":
        return real_gpu_engine(_GEOMETRIES[geometry], 5)
    library = request.getfixturevalue("emulated_device_library")
    return emulated_engine(library, _GEOMETRIES[geometry], 5)


def assert_same_answer(got, want, window_values: np.ndarray) -> None:
    assert (got.count, got.min, got.max, got.last) == (want.count, want.min, want.max, want.last)
    assert abs(got.avg - want.avg) <= 1e-12 * abs(want.avg)
    # Below the rounding floor a variance is noise at the data's magnitude in both engines.
    floor = rounding_floor(window_values) / len(window_values)
    assert abs(got.var - want.var) <= 1e-12 * want.var + floor, (got.var, want.var)


prices = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
batch_lists = st.lists(
    st.tuples(st.integers(0, 2), arrays(np.float64, st.integers(1, 120), elements=prices)),
    min_size=1,
    max_size=20,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=batch_lists, max_values=st.integers(1, 600), keep_fraction=st.floats(0.0, 1.0))
def test_gpu_matches_numpy_on_the_same_random_batches(
    gpu_engine, batches, max_values, keep_fraction
):
    """Three symbols, batches in random order, random retention; after every batch each
    window by `stats` and all of them again in one `stats_many` batch."""
    retention = RetentionPolicy(max_values, int(max_values * keep_fraction))
    cpu_engine = NumpyEngine(geometry=gpu_engine.geometry)
    gpu = [gpu_engine.new_series(retention, 0) for _ in range(3)]
    cpu = [cpu_engine.new_series(retention, 0) for _ in range(3)]
    for symbol, batch in batches:
        assert gpu[symbol].append(batch) == cpu[symbol].append(batch)
        requests = [(symbol, 10**k) for symbol in range(3) if len(cpu[symbol]) for k in range(0, 4)]
        batched = gpu_engine.stats_many([(gpu[s], w) for s, w in requests])
        for (s, window), from_batch in zip(requests, batched, strict=True):
            want = cpu[s].stats(window)
            values = cpu[s].tail(window)
            assert_same_answer(gpu[s].stats(window), want, values)
            assert_same_answer(from_batch, want, values)


def test_prices_far_from_zero_keep_their_variance(gpu_engine):
    """1e9 + noise of 1e-3: anchored means on the device as on the host."""
    rng = np.random.default_rng(7)
    values = 1e9 + rng.normal(0, 1e-3, 5000)
    gpu = gpu_engine.new_series(RetentionPolicy(), 0)
    cpu = NumpyEngine(geometry=gpu_engine.geometry).new_series(RetentionPolicy(), 0)
    for part in np.array_split(values, 7):
        gpu.append(part)
        cpu.append(part)
    for window in (10, 1000, 5000):
        assert_same_answer(gpu.stats(window), cpu.stats(window), values[-window:])
        assert gpu.stats(window).var == pytest.approx(values[-window:].var(), rel=1e-9)


def test_ticks_are_coalesced_into_few_uploads_and_launches(emulated_device_library):
    engine = emulated_engine(emulated_device_library, Geometry(), 4096)
    device = engine.device
    series = engine.new_series(RetentionPolicy(), 0)
    ticks = np.random.default_rng(1).uniform(100, 101, 10_000)
    for tick in ticks:
        series.append(tick[None])
    # 10k one-value appends: an upload and one set of launches per 4096 values, not per tick.
    assert device.uploads == 2
    assert device.launches["summarize_blocks"] == 2
    stats = series.stats(10_000)  # a query uploads the rest first
    assert device.uploads == 3 and device.launches["window_stats"] == 1
    assert stats.last == ticks[-1] and stats.min == ticks.min() and stats.max == ticks.max()
    assert stats.avg == pytest.approx(ticks.mean(), rel=1e-12)


def test_a_large_batch_is_one_launch_per_level_whatever_its_pages(emulated_device_library):
    geometry = Geometry(block=4, fanout=4, chunk=64)
    engine = emulated_engine(emulated_device_library, geometry, 5)
    device = engine.device
    series = engine.new_series(RetentionPolicy(100_000, 50_000), 0)
    values = np.random.default_rng(2).uniform(0, 1, 10_000)  # 157 value pages
    series.append(values)
    levels = len(geometry.summary_spans(100_000))
    assert device.launches["summarize_blocks"] == 1
    assert device.launches["merge_groups"] == levels - 1
    assert device.uploads == -(-10_000 // 64)  # one copy per value page, through staging
    assert series.stats(10_000).avg == pytest.approx(values.mean(), rel=1e-12)


def test_a_batch_of_queries_over_many_series_is_one_launch(emulated_device_library):
    engine = emulated_engine(emulated_device_library, TINY, 16)
    device = engine.device
    rng = np.random.default_rng(3)
    series, models = [], []
    for _ in range(40):
        s = engine.new_series(RetentionPolicy(), 0)
        values = rng.uniform(0, 1000, int(rng.integers(1, 300)))
        s.append(values)
        series.append(s)
        models.append(values)
    requests = [(s, 10**k) for s in series for k in range(4)]
    answers = engine.stats_many(requests)
    assert device.launches["window_stats"] == 1
    for (s, window), answer in zip(requests, answers, strict=True):
        model = models[series.index(s)][-window:]
        assert answer.count == len(model) and answer.min == model.min()
        assert answer.avg == pytest.approx(model.mean(), rel=1e-12)


def test_device_memory_follows_retention(gpu_engine):
    """Pages dropped by retention are given back: memory stays bounded over many cleanups."""
    chunk = gpu_engine.geometry.chunk
    series = gpu_engine.new_series(RetentionPolicy(4 * chunk, 2 * chunk), 0)
    series.append(np.ones(4 * chunk))
    full = series.nbytes
    for _ in range(6):
        series.append(np.full(2 * chunk, 2.0))  # each one a cleanup
    assert len(series) == 4 * chunk
    assert series.nbytes <= full + series.nbytes // 4  # not 4x: dropped pages are gone
    assert series.stats(4 * chunk).min == 2.0


def test_concurrent_symbols_share_the_device_safely(gpu_engine):
    """Writers on different symbols and a batch reader, all at once, through one device."""
    retention = RetentionPolicy(5000, 2500)
    series = [gpu_engine.new_series(retention, 0) for _ in range(4)]
    expected = [np.random.default_rng(i).uniform(1, 2, 3000) for i in range(4)]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for part in np.array_split(expected[i], 150):
                series[i].append(part)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def read() -> None:
        try:
            while any(t.is_alive() for t in threads[:4]):
                ready = [(s, 100) for s in series if len(s)]
                for answer in gpu_engine.stats_many(ready) if ready else []:
                    assert answer.count >= 1 and 1 <= answer.min <= answer.max < 2
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=read))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    answers = gpu_engine.stats_many([(s, 3000) for s in series])
    for answer, values in zip(answers, expected, strict=True):
        assert answer.count == 3000 and answer.max == values.max() and answer.last == values[-1]


def test_store_batch_queries_on_the_gpu_engine(gpu_engine):
    """The store's batch path (one engine call for every miss) on this engine."""
    store = Store(gpu_engine, retention=RetentionPolicy(), max_symbols=10, starting_capacity=0)
    rng = np.random.default_rng(5)
    data = {f"S{i}": rng.uniform(10, 20, 500 + i) for i in range(5)}
    for symbol, values in data.items():
        store.ingest(symbol, values)
    queries = [(symbol, k) for symbol in data for k in (1, 2, 3)] + [("NOPE", 1)]
    answers = store.stats_many(queries)
    assert answers[-1] is None
    for (symbol, k), answer in zip(queries[:-1], answers[:-1], strict=True):
        window = data[symbol][-(10**k) :]
        assert answer.count == len(window) and answer.min == window.min()
        assert answer.var == pytest.approx(window.var(), rel=1e-9)


def test_every_window_at_every_length_matches_numpy(emulated_device_library):
    """Windows 1..len after each append, tiny geometry: every block, node and page boundary
    on both edges of a window, through cleanups."""
    engine = emulated_engine(emulated_device_library, TINY, 5)
    cpu = NumpyEngine(geometry=TINY).new_series(RetentionPolicy(300, 130), 0)
    gpu = engine.new_series(RetentionPolicy(300, 130), 0)
    rng = np.random.default_rng(11)
    for size in (1, 3, 17, 64, 65, 100, 250, 7, 300, 1):
        batch = rng.uniform(0, 50, size)
        assert gpu.append(batch) == cpu.append(batch)
        requests = [(gpu, w) for w in range(1, len(cpu) + 2)]
        for (_, window), got in zip(requests, engine.stats_many(requests), strict=True):
            assert_same_answer(got, cpu.stats(window), cpu.tail(window))


def test_resummarize_after_cleanups_changes_no_answer(gpu_engine):
    series = gpu_engine.new_series(RetentionPolicy(1000, 400), 0)
    rng = np.random.default_rng(4)
    for size in (700, 500, 999, 3):
        series.append(rng.uniform(5, 6, size))
    windows = (1, 10, 100, 1000)
    before = [series.stats(w) for w in windows]
    series.resummarize()
    assert [series.stats(w) for w in windows] == before


class _FailingDevice(EmulatedDevice):
    """Raises MemoryError at the n-th device allocation (pages, directories), as CUDA would."""

    def __init__(self, library, fail_at: int) -> None:
        super().__init__(library)
        self.allocations = 0
        self.fail_at = fail_at

    def _allocate(self) -> None:
        self.allocations += 1
        if self.allocations == self.fail_at:
            raise MemoryError("injected device allocation failure")

    def new_values(self, count):
        self._allocate()
        return super().new_values(count)

    def new_rows(self, rows):
        self._allocate()
        return super().new_rows(rows)

    def new_int64(self, host):
        self._allocate()
        return super().new_int64(host)


@pytest.mark.parametrize("fail_at", range(1, 18))  # the append makes 17: pages, then the directory
def test_a_failed_device_allocation_leaves_the_series_unchanged(emulated_device_library, fail_at):
    """All or nothing on the device: whichever allocation of a multi-page, evicting append
    fails, the series answers as before, and later appends are right."""
    retention = RetentionPolicy(400, 150)
    device = _FailingDevice(emulated_device_library, fail_at=0)
    engine = CupyEngine(TINY, device, 5)
    gpu = engine.new_series(retention, 0)
    cpu = NumpyEngine(geometry=TINY).new_series(retention, 0)
    rng = np.random.default_rng(fail_at)
    for size in (350, 3):  # nearly full, and 3 pending values
        batch = rng.uniform(0, 9, size)
        gpu.append(batch)
        cpu.append(batch)
    device.allocations, device.fail_at = 0, fail_at
    with pytest.raises(MemoryError):
        gpu.append(rng.uniform(0, 9, 300))  # new pages at every level, and a cleanup
    device.fail_at = 0
    for size in (0, 200, 3, 400):
        batch = rng.uniform(0, 9, size)
        assert gpu.append(batch) == cpu.append(batch)
        assert len(gpu) == len(cpu)
        for window in (1, 7, 64, 400):
            assert_same_answer(gpu.stats(window), cpu.stats(window), cpu.tail(window))


def test_cupy_device_code_over_a_fake_cupy(emulated_device_library):
    """CupyDevice's own Python (staging in pieces through two pinned buffers, offsets, int64
    arguments, everything on one stream) against numpy, on the CPU build of the kernels."""
    engine, fake = fake_cupy_engine(emulated_device_library, TINY, staging_values=7)
    assert engine.device_name == "Fake GPU (numpy)"
    retention = RetentionPolicy(500, 200)
    gpu = [engine.new_series(retention, 0) for _ in range(2)]
    cpu = [NumpyEngine(geometry=TINY).new_series(retention, 0) for _ in range(2)]
    rng = np.random.default_rng(8)
    for size in (1, 2, 40, 3, 130, 600, 9):
        for g, c in zip(gpu, cpu, strict=True):
            batch = rng.uniform(0, 1e6, size)
            assert g.append(batch) == c.append(batch)
        requests = [(i, w) for i in range(2) for w in (1, 5, 33, 500)]
        answers = engine.stats_many([(gpu[i], w) for i, w in requests])
        for (i, window), got in zip(requests, answers, strict=True):
            assert_same_answer(got, cpu[i].stats(window), cpu[i].tail(window))
    assert np.array_equal(gpu[0].tail(500), cpu[0].tail(500))
    assert fake.copies and max(size for _, size, _ in fake.copies) <= 7 * 8
    assert fake.streams_entered == 0
