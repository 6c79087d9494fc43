"""The compiled (numba) engine against the numpy reference: bit for bit on count, min, max and
last, 1e-12 relative on avg and var, over random batches, geometries, retention and read-only
batches; its page directory; its kernels' compile options; and numba's on-disk cache.

(The conformance suite in test_conformance.py also runs the compiled engine against numpy.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine, compiled_kernels
from fallback.compiled import _SIGNATURES, CompiledEngine, CompiledSeries, prepare_kernels

REPO = Path(__file__).resolve().parents[2]
GEOMETRIES = [
    Geometry(),
    Geometry(block=2, fanout=2, chunk=8),
    Geometry(block=4, fanout=4, chunk=64),
    Geometry(block=8, fanout=2, chunk=64),
    Geometry(block=4, fanout=8, chunk=32),
]
WINDOWS = [1, 2, 3, 5, 10, 17, 100, 255, 256, 257, 1000, 4097, 10**5, 10**8]


def same_selections(got, want) -> bool:
    """count, min, max and last: selections, so equal to the bit."""
    return (got.count, got.min, got.max, got.last) == (want.count, want.min, want.max, want.last)


def assert_same_answers(compiled: CompiledSeries, reference, windows) -> None:
    assert len(compiled) == len(reference)
    for window in windows:
        got, want = compiled.stats(window), reference.stats(window)
        assert same_selections(got, want), window
        assert got.avg == pytest.approx(want.avg, rel=1e-12, abs=0.0), window
        assert got.var == pytest.approx(want.var, rel=1e-12, abs=1e-300), window


prices = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    geometry=st.sampled_from(GEOMETRIES),
    batches=st.lists(arrays(np.float64, st.integers(0, 90), elements=prices), max_size=30),
    max_values=st.integers(1, 600),
    keep_fraction=st.floats(0.0, 1.0),
    read_only=st.lists(st.booleans(), min_size=30, max_size=30),
    extra_windows=st.lists(st.integers(1, 700), max_size=5),
)
def test_compiled_engine_agrees_with_numpy(
    geometry, batches, max_values, keep_fraction, read_only, extra_windows
):
    policy = RetentionPolicy(max_values, int(max_values * keep_fraction))
    compiled = CompiledEngine(geometry).new_series(policy, 0)
    reference = NumpyEngine(geometry).new_series(policy, 0)
    for batch, frozen in zip(batches, read_only, strict=False):
        batch.flags.writeable = not frozen  # transport frames arrive as read-only views
        assert compiled.append(batch) == reference.append(batch)
        if len(reference):
            assert_same_answers(compiled, reference, WINDOWS + extra_windows)
    np.testing.assert_array_equal(compiled.tail(10**9), reference.tail(10**9))


@pytest.mark.parametrize("geometry", GEOMETRIES[1:], ids=str)
def test_price_like_series_with_cleanups_agree_with_numpy(geometry):
    """Tens of thousands of ticks near 1e9 with 1e-3 noise, in batches of every size, through
    many cleanups: the case where summation order shows first."""
    rng = np.random.default_rng(7)
    policy = RetentionPolicy(20_000, 12_000)
    compiled = CompiledEngine(geometry).new_series(policy, 100)
    reference = NumpyEngine(geometry).new_series(policy, 100)
    for size in rng.integers(1, 700, 150):
        batch = 1e9 + rng.uniform(0.0, 1e-3, size)
        assert compiled.append(batch) == reference.append(batch)
    for window in WINDOWS:
        got, want = compiled.stats(window), reference.stats(window)
        assert same_selections(got, want), window
        assert got.avg == pytest.approx(want.avg, rel=1e-12)
        window_values = reference.tail(window)
        assert got.var == pytest.approx(np.var(window_values), rel=1e-4)  # SPEC section 3


def test_page_directory_grows_and_reuses_slots_of_dropped_pages():
    """Hundreds of live pages (the directory starts with 8 slots) and retention cycling the
    page numbers through the slots many times: every window still matches numpy."""
    geometry = Geometry(block=2, fanout=2, chunk=4)
    policy = RetentionPolicy(3000, 1000)
    compiled = CompiledEngine(geometry).new_series(policy, 0)
    reference = NumpyEngine(geometry).new_series(policy, 0)
    rng = np.random.default_rng(11)
    for step in range(400):
        batch = rng.uniform(0.0, 100.0, int(rng.integers(1, 60)))
        assert compiled.append(batch) == reference.append(batch)
        if step % 20 == 0:
            assert_same_answers(compiled, reference, WINDOWS)
    assert compiled._directory.shape[1] >= 3000 // 4  # grew from 8 slots
    assert_same_answers(compiled, reference, WINDOWS)


def test_starting_capacity_pages_are_in_the_directory():
    geometry = Geometry(block=4, fanout=4, chunk=16)
    series = CompiledEngine(geometry).new_series(RetentionPolicy(), 1000)
    values = np.arange(1000.0)
    series.append(values)
    stats = series.stats(10**3)
    assert (stats.count, stats.min, stats.max, stats.last) == (1000, 0.0, 999.0, 999.0)
    assert stats.avg == pytest.approx(499.5, rel=1e-15)


def test_every_public_kernel_releases_the_gil_and_is_compiled_for_the_appliance_types():
    prepare_kernels()
    for name, signatures in _SIGNATURES.items():
        kernel = getattr(compiled_kernels, name)
        assert kernel.targetoptions["nogil"] is True, name
        for signature in signatures:
            assert tuple(signature) in kernel.overloads, (name, signature)


def test_an_unusable_cache_dir_still_starts_and_says_why(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    report = prepare_kernels(str(not_a_dir / "cache"))
    assert report.cache_dir is None and not report.loaded_from_cache
    assert "engine.compile_cache_dir" in report.cache_note
    series = CompiledEngine().new_series(RetentionPolicy(), 0)
    series.append(np.array([1.0, 2.0]))
    assert series.stats(10).avg == 1.5


_START = """
import json, sys
from fallback.compiled import prepare_kernels
report = prepare_kernels(sys.argv[1])
print(json.dumps({"dir": report.cache_dir, "cached": report.loaded_from_cache}))
"""


def test_kernels_are_cached_where_configured_and_loaded_from_there_next_start(tmp_path):
    """Two fresh processes, as two starts of the appliance: the first compiles and writes the
    cache into the configured directory, the second loads every kernel from it."""
    cache = tmp_path / "numba-cache"

    def start() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _START, str(cache)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = start()
    assert first["dir"].startswith(str(cache)) and first["cached"] is False
    assert any(cache.rglob("*.nbi")) and any(cache.rglob("*.nbc"))
    assert start() == {"dir": first["dir"], "cached": True}


def test_cleanups_recycle_pages_and_memory_never_exceeds_the_peak():
    """Many retention cycles: the series regrows into the pages it retired, so after the first
    cycle its memory stays at its peak and no page is allocated."""
    geometry = Geometry(block=4, fanout=4, chunk=64)
    policy = RetentionPolicy(2000, 1000)
    compiled = CompiledEngine(geometry).new_series(policy, 0)
    reference = NumpyEngine(geometry).new_series(policy, 0)
    rng = np.random.default_rng(5)
    peak = 0
    pages_seen: set[int] = set()
    for cycle in range(6):
        for _ in range(40):
            batch = rng.uniform(0.0, 10.0, 50)
            assert compiled.append(batch) == reference.append(batch)
            if cycle < 2:  # the first fill and the first cleanup set the peak
                peak = max(peak, compiled.nbytes)
                pages_seen |= {id(p) for p in compiled._values.pages.values()}
            else:
                assert compiled.nbytes <= peak
                # every value page now is one the series allocated in its first cycles
                assert {id(p) for p in compiled._values.pages.values()} <= pages_seen
        assert_same_answers(compiled, reference, WINDOWS)


def test_a_page_a_reader_still_views_is_not_reused():
    """A checkpoint's tail_views keep their values through cleanups that retire their pages
    and the regrowth that recycles retired pages."""
    geometry = Geometry(block=4, fanout=4, chunk=64)
    series = CompiledEngine(geometry).new_series(RetentionPolicy(1000, 300), 0)
    rng = np.random.default_rng(9)
    series.append(rng.uniform(0.0, 10.0, 900))
    views = series.tail_views(900)
    expected = np.concatenate(views).copy()
    for _ in range(200):  # several cleanups, every retired page offered for reuse
        series.append(rng.uniform(20.0, 30.0, 37))
    np.testing.assert_array_equal(np.concatenate(views), expected)
    assert series.stats(37).min >= 20.0


def test_a_failed_directory_growth_changes_nothing_and_a_retry_succeeds(monkeypatch):
    """MemoryError while the page directory grows: the append fails whole, and the retry
    registers the page it needs (it must never write through another page's slot)."""
    from fallback import compiled

    geometry = Geometry(block=4, fanout=4, chunk=4)
    policy = RetentionPolicy(1_000_000, 500_000)
    series = CompiledEngine(geometry).new_series(policy, 0)
    reference = NumpyEngine(geometry).new_series(policy, 0)
    values = np.random.default_rng(1).uniform(0.0, 100.0, series.slots * 4)  # fills every slot
    series.append(values)
    reference.append(values)
    grow = compiled.control_block
    calls = []

    def failing_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise MemoryError("injected: the grown control block")
        return grow(*args)

    monkeypatch.setattr(compiled, "control_block", failing_once)
    batch = np.full(4, 7.0)
    with pytest.raises(MemoryError):
        series.append(batch)  # needs one more value page than the directory has slots
    assert len(series) == len(values)
    np.testing.assert_array_equal(series.tail(10**9), values)
    series.append(batch)
    reference.append(batch)
    assert len(calls) == 2  # the retry grew the directory
    np.testing.assert_array_equal(series.tail(10**9), reference.tail(10**9))
    assert_same_answers(series, reference, WINDOWS)


def test_batches_larger_than_pages_retire_as_fast_as_they_evict():
    """Every append evicts several pages' worth: retirement keeps pace, so pages, directory
    and memory stay bounded."""
    geometry = Geometry(block=4, fanout=4, chunk=64)
    series = CompiledEngine(geometry).new_series(RetentionPolicy(2000, 1000), 0)
    batch = np.random.default_rng(2).uniform(0.0, 10.0, 1000)
    for _ in range(400):
        series.append(batch)
    assert len(series._values.pages) < 3 * 2000 // 64
    assert series.slots <= 256
    assert series.nbytes < 3 * (2000 * 8 + 2000 * 48 // 4)


def test_a_sliding_window_frees_what_it_evicts_on_both_engines():
    """keep == max: every append evicts. Memory stays bounded (the numpy engine used to free
    retired pages only on appends that evicted nothing)."""
    geometry = Geometry(block=4, fanout=4, chunk=64)
    for engine in (NumpyEngine(geometry), CompiledEngine(geometry)):
        series = engine.new_series(RetentionPolicy(500, 500), 0)
        batch = np.arange(10.0)
        for _ in range(3000):
            series.append(batch)
        assert series.nbytes < 4 * (500 * 8 + 500 * 48 // 4), engine.name


def test_a_window_beyond_int64_covers_the_whole_series():
    series = CompiledEngine().new_series(RetentionPolicy(), 0)
    series.append(np.array([1.0, 3.0]))
    assert series.stats(2**64).count == 2
