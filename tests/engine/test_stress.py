"""Stress: the default retention with real sizes (`-m slow`, not in the default run).

Pushes 210M values through one series with the default policy (150M max, keep 100M), so the
series crosses a cleanup and refills, and checks that memory stays bounded and that every window
is still exact against numpy afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_core import RetentionPolicy
from fallback import NumpyEngine
from tests.engine.reference import assert_window_matches

TOTAL = 210_000_000
BATCH = 1_000_000
SLACK_BYTES = 64 * 2**20


def value_at(indices: np.ndarray) -> np.ndarray:
    """A deterministic, non-periodic-looking price path as a pure function of the index, so the
    expected window can be rebuilt without keeping 210M values around."""
    return 100.0 + (indices * 2654435761 % 1_000_003) / 10_000.0 + indices * 1e-7


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_default_retention_keeps_memory_bounded_and_stats_exact():
    policy = RetentionPolicy()
    series = NumpyEngine().new_series(policy, 1_000_000)
    baseline_rss = resident_bytes()
    evicted_total = 0
    # Retired pages are freed a few per append after each cleanup, so the bound that holds at
    # every moment is the peak: about 9 bytes per value of max_values, plus part-filled pages.
    bound = 9.0 * policy.max_values + SLACK_BYTES
    for start in range(0, TOTAL, BATCH):
        evicted_total += series.append(value_at(np.arange(start, start + BATCH)))
        assert len(series) <= policy.max_values
        assert series.nbytes <= bound
    # 150M reached at 150M appended; cleanup to 100M; +60M more = 160M > 150M again at 151M:
    # the model below replays the policy on counts only.
    n = 0
    for _ in range(0, TOTAL, BATCH):
        kept_old, kept_new = policy.retained_after(n, BATCH)
        n = kept_old + kept_new
    assert len(series) == n
    assert evicted_total == TOTAL - n
    assert resident_bytes() - baseline_rss <= bound
    for exponent in range(1, 9):
        window = 10**exponent
        expected = value_at(np.arange(TOTAL - window, TOTAL))
        assert_window_matches(series, expected, window)
