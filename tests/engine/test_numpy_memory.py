"""Memory of the numpy engine: bytes per retained value and release after a cleanup (SPEC 4)."""

from __future__ import annotations

import numpy as np

from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine

SMALL_PAGES = Geometry(block=256, fanout=64, chunk=1 << 16)


def test_bytes_per_value_stays_under_nine_with_full_pages():
    series = NumpyEngine(SMALL_PAGES).new_series(RetentionPolicy(10_000_000, 5_000_000), 0)
    series.append(np.ones(40 * SMALL_PAGES.chunk))
    assert series.nbytes / len(series) <= 9.0


def test_cleanup_frees_its_pages_within_a_bounded_number_of_appends():
    policy = RetentionPolicy(max_values=20_000_000, keep_after_cleanup=10_000_000)
    series = NumpyEngine(SMALL_PAGES).new_series(policy, 0)
    series.append(np.ones(policy.max_values - 5_000))
    batch = np.random.default_rng(1).uniform(0, 1, 10_000)
    peak = series.nbytes
    assert series.append(batch) > 0  # the cleanup retires ~80 MB of pages...
    page_bytes = SMALL_PAGES.chunk * 8
    assert series.nbytes >= peak - (8 << 20) - page_bytes  # ...freed at most 8 MiB per append
    for _ in range(20):
        series.append(batch)
    assert series.nbytes / len(series) <= 9.0
