"""OHLC bars: where bars start in a run-length time index, and each bar's summary.

Why bars are cut in index space from the marks: a symbol's times are held as runs (first index,
ns) of a non-decreasing step function (the warm tier's marks), and every value of a run falls in
the same interval, so a bar can only start where a run starts. Cutting needs O(runs) work and
never materializes one time per value, which matters when a batch of a million values shares one
receive time.

The summary is the reference arithmetic of every engine (the numpy engine calls
`bar_summaries`; the GPU engine runs the same formulas as the `bar_summaries` kernel in
gpu_kernels/segment_tree.cu, one thread per bar): each bar is anchored at its open, so a bar of
1e9-scale prices with 1e-3 noise keeps its variance (see engine_core/summary.py for why), and
the mean and M2 come from two passes over the bar's deviations from that anchor.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

BAR_COLUMNS = ("open", "high", "low", "close", "count", "avg", "var")


class Bars(NamedTuple):
    """One array per field, one item per non-empty bar, oldest first; `var` is M2 / count."""

    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    count: np.ndarray  # int64
    avg: np.ndarray
    var: np.ndarray


def bar_starts(
    run_pos: np.ndarray, run_ns: np.ndarray, interval_ns: int
) -> tuple[np.ndarray, np.ndarray]:
    """(bar offsets, bar start times) of runs starting at `run_pos` with times `run_ns`.

    `run_pos` is increasing (the first is the first value's offset, usually 0) and `run_ns`
    non-decreasing; a bar holds the values whose time t has the same floor(t / interval_ns),
    and starts at that multiple of the interval since the epoch.
    """
    keys = run_ns // interval_ns
    first = np.empty(keys.shape[0], dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return run_pos[first], keys[first] * interval_ns


def count_bars(
    run_ns: np.ndarray, interval_ns: int, previous_key: int | None
) -> tuple[int, int | None]:
    """(bars that start among these runs, the key of the last run), for counting bars piece by
    piece before any is summarized; `previous_key` is the last key of the pieces before."""
    if run_ns.shape[0] == 0:
        return 0, previous_key
    keys = run_ns // interval_ns
    starts = int(np.count_nonzero(keys[1:] != keys[:-1]))
    starts += int(previous_key is None or int(keys[0]) != previous_key)
    return starts, int(keys[-1])


def bar_summaries(values: np.ndarray, offsets: np.ndarray) -> Bars:
    """Summaries of the bars `values[offsets[i]:offsets[i + 1]]` (the last up to the end).

    `offsets` is strictly increasing, starts at 0 and is below `len(values)`: no bar is empty.
    """
    n = values.shape[0]
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets, append=n)
    opens = values[offsets]
    deviations = values - np.repeat(opens, counts)
    mean = np.add.reduceat(deviations, offsets) / counts
    deviations -= np.repeat(mean, counts)
    m2 = np.add.reduceat(deviations * deviations, offsets)
    return Bars(
        open=opens,
        high=np.maximum.reduceat(values, offsets),
        low=np.minimum.reduceat(values, offsets),
        close=values[offsets + counts - 1],
        count=counts,
        avg=opens + mean,
        var=m2 / counts,
    )
