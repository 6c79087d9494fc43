"""The contract every statistics engine implements (numpy in `fallback`, CuPy in `gpu_kernels`).

Engines know nothing about HTTP, sockets or configuration files: they receive validated float64
arrays and answer window statistics. The conformance suite in `tests/engine/` is written against
this interface only, so a second engine is tested by adding it to that suite's parametrization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np

from engine_core.bars import Bars, bar_summaries
from engine_core.rolling import Rolling, rolling_summaries

# Columns of `Engine.stats_table`'s answer.
STATS_COUNT, STATS_MIN, STATS_MAX, STATS_LAST, STATS_AVG, STATS_VAR = range(6)
STATS_COLUMNS = 6


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """SPEC section 4: the hot-tier bound of one series.

    Before a batch of m values is appended to a series of n values, if n + m > max_values the
    oldest values are dropped so that min(n, keep_after_cleanup) remain. If the batch still does
    not fit, the series becomes the newest `max_values` values of (retained ++ batch): more old
    values go first, then the batch's oldest, so the series stays contiguous in time and never
    exceeds `max_values`.
    """

    max_values: int = 150_000_000
    keep_after_cleanup: int = 100_000_000

    def __post_init__(self) -> None:
        if self.max_values < 1:
            raise ValueError("max_values must be >= 1")
        if not 0 <= self.keep_after_cleanup <= self.max_values:
            raise ValueError("keep_after_cleanup must be between 0 and max_values")

    def retained_after(self, current: int, incoming: int) -> tuple[int, int]:
        """Return (old values kept, batch values kept) for appending `incoming` to `current`."""
        if current + incoming <= self.max_values:
            return current, incoming
        kept_old = min(current, self.keep_after_cleanup)
        if kept_old + incoming <= self.max_values:
            return kept_old, incoming
        if incoming >= self.max_values:
            return 0, self.max_values
        return self.max_values - incoming, incoming

    def plan_append(self, current: int, values: np.ndarray) -> tuple[np.ndarray, int]:
        """(the newest values of the batch that are kept, old values evicted) for appending
        `values` to `current` values: what every engine's append applies."""
        incoming = values.shape[0]
        kept_old, kept_new = self.retained_after(current, incoming)
        kept = values if kept_new == incoming else values[incoming - kept_new :]  # no view per tick
        return kept, current - kept_old


class WindowStats(msgspec.Struct, frozen=True, gc=False):
    """Statistics of the last `count` values of a series.

    `var` is the population variance (M2 / count); `last` is the newest value of the series.

    A msgspec Struct, not a dataclass: every query builds one, and a frozen dataclass's
    `__init__` (0.7-0.9 us) cost more than the compiled engine's whole window query; a Struct
    is built in under 0.1 us, compares by value and is immutable all the same.
    """

    count: int
    min: float
    max: float
    last: float
    avg: float
    var: float


class Series(Protocol):
    """One symbol's bounded series of non-negative finite float64 values.

    Callers guarantee that `values` passed to `append` is a 1-D, C-contiguous float64 array of
    finite values >= 0 (validation happens once, in `appliance.validation`). Engines must not
    keep a reference to it after `append` returns.
    """

    def append(self, values: np.ndarray) -> int:
        """Append a batch, applying the retention policy first; return how many old values
        were evicted."""
        ...

    def stats(self, window: int) -> WindowStats:
        """Statistics over the last min(window, len(self)) values. Raises ValueError when empty."""
        ...

    def tail(self, count: int) -> np.ndarray:
        """A copy of the last min(count, len(self)) retained values, oldest first (count >= 0).

        Why: checkpoints of the hot tier (issue 5) save the raw values, not the summaries,
        and rebuild the series by appending them; a copy keeps the engine's pages private.
        """
        ...

    def __len__(self) -> int:
        """Number of retained values."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of array memory the series holds (values and summaries, allocated capacity)."""
        ...


class Engine(Protocol):
    """A factory of series; the appliance holds one engine and asks it for one series per symbol.

    Engines subclass this protocol explicitly to inherit the default `stats_many`.
    """

    __slots__ = ()  # subclasses such as the frozen, slotted NumpyEngine stay without a __dict__

    name: str

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> Series:
        """Create an empty series. `starting_capacity` is an allocation hint, never a cap."""
        ...

    def stats_many(self, requests: Sequence[tuple[Series, int]]) -> list[WindowStats]:
        """`series.stats(window)` for every (series, window) pair, answers in request order.

        Why a method of the engine and not of a series: a batch of queries over many series
        (POST /stats/batch) is one call, so a GPU engine can answer all of it in one kernel
        launch instead of one launch per query. The caller holds every named series still for
        the whole call (the store holds their locks) and passes only series this engine made,
        each non-empty, with windows >= 1; a pair may repeat. This default asks each series in
        turn, which is all a CPU engine needs.
        """
        return [series.stats(window) for series, window in requests]

    def stats_table(
        self, series: Sequence[Series], which: np.ndarray, windows: np.ndarray
    ) -> np.ndarray:
        """The columnar twin of `stats_many`: a (len(which), STATS_COLUMNS) float64 table whose
        row i is count, min, max, last, avg, var of `series[which[i]]` over `windows[i]`.

        Why columns: a batch of 10k queries is then two int64 arrays in and one float64 array
        out, with no Python object per query, so a compiled or GPU engine answers it in one
        call. Same contract as `stats_many` (series held still, non-empty, windows >= 1);
        `which` and `windows` are int64 arrays of one length. This default asks each series.
        """
        table = np.empty((which.shape[0], STATS_COLUMNS))
        for i, (index, window) in enumerate(zip(which.tolist(), windows.tolist(), strict=True)):
            s = series[index].stats(window)
            table[i] = (s.count, s.min, s.max, s.last, s.avg, s.var)
        return table

    def bars(self, values: np.ndarray, offsets: np.ndarray) -> Bars:
        """OHLC summaries of the bars `values[offsets[i]:offsets[i + 1]]` (GET /history/bars).

        Why a method of the engine: the appliance computes bars on the device it computes
        everything else on. `values` is a float64 array of finite values, `offsets` strictly
        increasing int64 from 0, below `len(values)`. This default is the numpy reference
        (`engine_core.bars.bar_summaries`), which a CPU engine needs as is.
        """
        return bar_summaries(values, offsets)

    def rolling(self, values: np.ndarray, window: int, step: int) -> Rolling:
        """Min, max, avg and var of `values[p - window + 1 : p + 1]` for every p = window - 1,
        window - 1 + step, ... < len(values) (GET /history/rolling).

        `values` is a float64 array of finite values, `window` and `step` >= 1. Min and max
        are exact; avg and var agree with `engine_core.rolling.rolling_reference` to 1e-9
        relative, 1e9-scale prices with 1e-3 noise included. This default is the numpy
        engine's O(len(values)) algorithm (`engine_core.rolling.rolling_summaries`); the
        reference itself costs O(outputs x window) and only the tests call it.
        """
        return rolling_summaries(values, window, step)
