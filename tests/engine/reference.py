"""The numpy model every engine result is checked against."""

from __future__ import annotations

import numpy as np

from engine_core import RetentionPolicy, Series, WindowStats

WINDOW_EXPONENTS = range(1, 9)


class ModelSeries:
    """SPEC section 4 applied to a plain numpy array, the slow obvious way.

    Written from the SPEC's words, independently of `RetentionPolicy.retained_after`, so the
    suite can catch a bug in the engine's rule as well as in the engine.
    """

    def __init__(self, retention: RetentionPolicy) -> None:
        self.max_values = retention.max_values
        self.keep = retention.keep_after_cleanup
        self.values = np.empty(0)

    def append(self, batch: np.ndarray) -> int:
        before = len(self.values)
        old = self.values
        if before + len(batch) > self.max_values:
            old = old[before - min(before, self.keep) :]  # cleanup: keep min(n, keep) newest
        combined = np.concatenate([old, batch])
        overflow = max(0, len(combined) - self.max_values)  # still too long: newest win
        self.values = combined[overflow:]
        old_left = max(0, len(old) - overflow)
        return before - old_left


def rounding_floor(x: np.ndarray) -> float:
    """M2 below this is rounding noise at the data's magnitude: numpy's own mean is off by an
    ulp or so, which it squares into every deviation; an engine may be *closer* to exact.
    Squares below the smallest normal float64 (values near 1e-162) are subnormal and carry
    fewer significant bits, so nothing below `tiny` per value can be compared relatively."""
    info = np.finfo(float)
    return len(x) * max((4 * info.eps * float(x.max())) ** 2, float(info.tiny))


def assert_window_matches(series: Series, model: np.ndarray, window: int, rel: float = 1e-9):
    """Check one window of `series` against numpy on the same values."""
    assert_stats_match(series.stats(window), model, window, rel)


def assert_stats_match(got: WindowStats, model: np.ndarray, window: int, rel: float = 1e-9):
    """Check an answer for the last `window` values of `model` against numpy on them."""
    expected = model[-window:]
    assert got.count == len(expected)
    # min, max and last are selections, never arithmetic: they must be bit-exact.
    assert got.min == expected.min()
    assert got.max == expected.max()
    assert got.last == expected[-1]
    mean = expected.mean()
    assert abs(got.avg - mean) <= rel * abs(mean) + 1e-300
    var = expected.var()
    noise_floor = rounding_floor(expected) / len(expected)
    assert abs(got.var - var) <= rel * var + noise_floor, (got.var, var, window)


def assert_all_windows_match(series: Series, model: np.ndarray, rel: float = 1e-9) -> None:
    assert len(series) == len(model)
    for exponent in WINDOW_EXPONENTS:
        if 10 ** (exponent - 1) > len(model):
            break
        assert_window_matches(series, model, 10**exponent, rel)
