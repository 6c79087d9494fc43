"""The naive baseline for the REST benchmark: a flat array, the window recomputed on each query.

`FlatArrayEngine` implements the `engine_core.contract` Engine/Series protocol the simple way the
original service could have: values live in one growable float64 array (amortized doubling) and
`stats(window)` calls `np.min`, `np.max`, `np.mean` and `np.var` on the last `window` values, so a
query costs O(window) instead of the segment tree's O(log N). Retention follows the same
`RetentionPolicy` as the real engine (the kept values are moved to the front of the array).

It exists only so `benches/bench_rest.py` can show both sides in the same run; it is not part of
the product and is not imported by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine_core.contract import Engine, RetentionPolicy, WindowStats


class FlatArraySeries:
    """One symbol's values in a single contiguous float64 array."""

    def __init__(self, retention: RetentionPolicy, starting_capacity: int) -> None:
        self._retention = retention
        capacity = max(1, min(starting_capacity, retention.max_values))
        self._data = np.empty(capacity, dtype=np.float64)
        self._n = 0

    def append(self, values: np.ndarray) -> int:
        m = int(values.shape[0])
        kept_old, kept_new = self._retention.retained_after(self._n, m)
        evicted = self._n - kept_old
        if evicted:
            # Move the newest `kept_old` values to the front (numpy handles the overlap).
            self._data[:kept_old] = self._data[self._n - kept_old : self._n]
            self._n = kept_old
        need = self._n + kept_new
        if need > self._data.shape[0]:
            capacity = self._data.shape[0]
            while capacity < need:
                capacity *= 2
            grown = np.empty(min(capacity, self._retention.max_values), np.float64)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : need] = values[m - kept_new :]
        self._n = need
        return evicted

    def stats(self, window: int) -> WindowStats:
        if self._n == 0:
            raise ValueError("stats of an empty series")
        count = min(window, self._n)
        tail = self._data[self._n - count : self._n]
        return WindowStats(
            count=count,
            min=float(np.min(tail)),
            max=float(np.max(tail)),
            last=float(tail[-1]),
            avg=float(np.mean(tail)),
            var=float(np.var(tail)),
        )

    def tail(self, count: int) -> np.ndarray:
        if count < 0:
            raise ValueError("count must be >= 0")
        return self._data[self._n - min(count, self._n) : self._n].copy()

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)


@dataclass(frozen=True, slots=True)
class FlatArrayEngine(Engine):
    """Engine factory for `FlatArraySeries`; `stats_many` is the protocol's default."""

    name: str = "flat-numpy-baseline"

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> FlatArraySeries:
        return FlatArraySeries(retention, starting_capacity)
