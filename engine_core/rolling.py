"""Rolling statistics over a stretch of history (GET /history/rolling): for every `step`-th
position p from `window - 1`, min, max, avg and var of the `window` values ending at p.

`rolling_reference` is the oracle the tests compare every engine with: per output, the window's
deviations from its first value summed in two passes, as every engine's window query does
(engine_core/summary.py says why a 1e9-scale price needs the anchor). It costs O(outputs x
window), so engines implement `Engine.rolling` with O(len(values)) algorithms instead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ROLLING_COLUMNS = ("min", "max", "avg", "var")


class Rolling(NamedTuple):
    """One float64 array per statistic, one item per output position, oldest first; `var` is
    the population variance (M2 / window)."""

    min: np.ndarray
    max: np.ndarray
    avg: np.ndarray
    var: np.ndarray


def rolling_count(n: int, window: int, step: int) -> int:
    """How many output positions `window - 1, window - 1 + step, ... < n` there are."""
    if window < 1 or step < 1:
        raise ValueError("window and step must be >= 1")
    return 0 if n < window else (n - window) // step + 1


def rolling_reference(values: np.ndarray, window: int, step: int) -> Rolling:
    """The test oracle: each window computed on its own (O(outputs x window))."""
    outputs = rolling_count(values.shape[0], window, step)
    out = Rolling(*(np.empty(outputs) for _ in ROLLING_COLUMNS))
    for m in range(outputs):
        w = values[m * step : m * step + window]
        deviations = w - w[0]
        mean = deviations.sum() / window
        centered = deviations - mean
        out.min[m] = w.min()
        out.max[m] = w.max()
        out.avg[m] = w[0] + mean
        out.var[m] = (centered * centered).sum() / window
    return out


def rolling_summaries(values: np.ndarray, window: int, step: int) -> Rolling:
    """The numpy engine's rolling statistics in O(len(values)) (van Herk / Gil-Werman).

    Why blocks: cut the values into blocks of `window`. A window [s, p] that does not start a
    block covers the tail of block b from s (a *suffix*) and the head of block b + 1 up to p (a
    *prefix*); one that starts a block is that block, whole. Every suffix and prefix comes from
    one scan per block, so each output costs O(1) whatever the window.

    Numerics: prefixes are anchored at their block's first value, suffixes at their block's
    last value, so both anchors are values of every window that uses them (x - anchor is exact
    for 1e9-scale prices with 1e-3 noise, see engine_core/summary.py). The two parts merge
    with Chan's formula after shifting the prefix's mean by (first of b + 1) - (last of b),
    one exact subtraction of neighbouring values. Min and max are running min/max: exact.

    The parts' count, mean and M2 come from a scan of Chan merges along each block
    (`_chan_scan`), not from running sums of d and d^2: those cancel when a part's values sit
    far from its anchor compared with their spread (a lone spike at the anchor), which cost
    8e-8 relative var error at window 4e5 in a measured case; the scan adds only
    non-negative terms, like the compiled engine's Welford updates.

    Memory: the four output arrays plus about twenty temporaries of up to twice
    max(window, ROLLING_CHUNK_VALUES)
    values: outputs are computed in groups of blocks.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    n = values.shape[0]
    outputs = rolling_count(n, window, step)
    out = Rolling(*(np.empty(outputs) for _ in ROLLING_COLUMNS))
    # Outputs in groups by the block their window ends in, so the temporaries stay a few
    # chunk-sized arrays (reused by the allocator) rather than several of len(values).
    per_chunk = max(1, ROLLING_CHUNK_VALUES // window)
    blocks = -(-n // window)
    for first in range(0, blocks, per_chunk):
        last = min(first + per_chunk, blocks)  # windows ending in blocks [first, last)
        m0 = max(0, -(-(first * window - (window - 1)) // step))
        m1 = min(outputs, -(-(last * window - (window - 1)) // step))
        if m0 >= m1:
            continue
        base = max(first - 1, 0)  # the suffixes come from the block before
        _rolling_chunk(values, base, last, window, step, m0, m1, out)
    return out


# Values per group of blocks in `rolling_summaries` (at least one block): 8 MB per temporary.
ROLLING_CHUNK_VALUES = 1 << 20


def _rolling_chunk(
    values: np.ndarray,
    base: int,
    last: int,
    window: int,
    step: int,
    m0: int,
    m1: int,
    out: Rolling,
) -> None:
    """Outputs m0 .. m1 - 1 of `rolling_summaries`, whose windows lie in blocks [base, last)."""
    n = values.shape[0]
    lo = base * window
    hi = min(last * window, n)
    padded = np.empty((last - base) * window)
    padded[: hi - lo] = values[lo:hi]
    padded[hi - lo :] = values[hi - 1]  # never read by an output (a partial last block)
    grid = padded.reshape(last - base, window)
    ends = (window - 1) + step * np.arange(m0, m1, dtype=np.int64) - lo
    starts = ends - (window - 1)

    # Suffix of block s // window from s, read through a reversed view: a prefix of it.
    s_block = starts // window
    s_col = window - 1 - (starts - s_block * window)
    a_count, a_mean, a_m2, a_min, a_max = _anchored_prefixes(grid[:, ::-1], s_block, s_col)
    a_anchor = grid[s_block, window - 1]

    p_block = ends // window
    p_col = ends - p_block * window
    b_count, b_mean, b_m2, b_min, b_max = _anchored_prefixes(grid, p_block, p_col)
    # A window that starts a block is that block: its suffix alone (p_col is window - 1).
    whole = s_col == window - 1
    b_count[whole] = 0.0
    b_m2[whole] = 0.0
    shift = grid[p_block, 0] - a_anchor  # neighbouring values: exact where it matters

    delta = (shift + b_mean) - a_mean
    mean = a_mean + delta * (b_count / window)
    m2 = a_m2 + b_m2 + delta * delta * (a_count * b_count / window)
    np.minimum(a_min, b_min, out=out.min[m0:m1])
    np.maximum(a_max, b_max, out=out.max[m0:m1])
    np.add(a_anchor, mean, out=out.avg[m0:m1])
    np.divide(m2, window, out=out.var[m0:m1])


def _anchored_prefixes(
    grid: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(count, mean, M2, min, max) of grid[row, : col + 1] for each (row, col), means
    relative to grid[row, 0] (the anchor). Min and max are running selections; count, mean
    and M2 come from a Chan-merge scan along each row (`_chan_scan`), gathered."""
    flat = rows * grid.shape[1] + cols
    count, mean, m2 = (column.ravel()[flat] for column in _chan_scan(grid - grid[:, :1]))
    lo = np.minimum.accumulate(grid, axis=1).ravel()[flat]
    hi = np.maximum.accumulate(grid, axis=1).ravel()[flat]
    return count, mean, m2, lo, hi


def _chan_scan(deviations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inclusive prefix (count, mean, M2) along each row of `deviations`, (rows, width).

    Why a scan of Chan merges and not running sums: sum(d^2) - sum(d)^2 / count cancels
    when a prefix's values sit far from its anchor compared with their spread (a lone spike
    at the anchor: 8e-8 relative var error at window 4e5, measured). Chan's merge adds only
    non-negative terms, like Welford, and is associative, so it runs as a work-efficient
    (Blelloch) scan: an up-sweep merging neighbours level by level, then a down-sweep handing
    each node the merge of everything before it. log2(width) levels of whole-array numpy
    operations, O(width) work per row. Rows are padded to a power of two with empty (count 0)
    elements, which merge as the identity.
    """
    rows, width = deviations.shape
    padded = 1 << max(0, (width - 1).bit_length())
    count = np.zeros((rows, padded))
    count[:, :width] = 1.0
    mean = np.zeros((rows, padded))
    mean[:, :width] = deviations
    levels = [(count, mean, np.zeros((rows, padded)))]
    while levels[-1][0].shape[1] > 1:  # up-sweep: level k + 1 merges pairs of level k
        n, m, q = levels[-1]
        levels.append(
            _merge(n[:, 0::2], m[:, 0::2], q[:, 0::2], n[:, 1::2], m[:, 1::2], q[:, 1::2])
        )
    # down-sweep: (count, mean, M2) of everything before each node of the level
    before = tuple(np.zeros((rows, 1)) for _ in range(3))
    for n, m, q in reversed(levels[:-1]):
        left = (n[:, 0::2], m[:, 0::2], q[:, 0::2])
        after_left = _merge(*before, *left)
        width_here = n.shape[1]
        nxt = tuple(np.empty((rows, width_here)) for _ in range(3))
        for out, first, second in zip(nxt, before, after_left, strict=True):
            out[:, 0::2] = first
            out[:, 1::2] = second
        before = nxt
    n, m, q = _merge(*before, *levels[0])
    return n[:, :width], m[:, :width], q[:, :width]


def _merge(
    n_a: np.ndarray,
    m_a: np.ndarray,
    q_a: np.ndarray,
    n_b: np.ndarray,
    m_b: np.ndarray,
    q_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan's merge of (count, mean, M2) parts a then b, means around one shared anchor.
    An empty part (count 0, mean 0, M2 0) on either side returns the other part exactly
    (its weight n_b / n is 0 or exactly 1)."""
    n = n_a + n_b
    weight = n_b / np.maximum(n, 1.0)
    delta = m_b - m_a
    mean = m_a + delta * weight
    m2 = (q_a + q_b) + delta * delta * (n_a * weight)
    return n, mean, m2


def rolling_naive(values: np.ndarray, window: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(avg, var) by the one-pass formula a user would write: running sums of x and x**2,
    var = E[x^2] - E[x]^2. NOT an engine: the yardstick benches/bench_rolling.py times and
    the stability test shows failing. At 1e9-scale prices x**2 ~ 1e18 carries a rounding
    error of ~1e2 per term, so the variance of 1e-3 noise (~1e-7) is lost entirely."""
    outputs = rolling_count(values.shape[0], window, step)
    sums = np.concatenate(([0.0], np.cumsum(values)))
    squares = np.concatenate(([0.0], np.cumsum(values * values)))
    ends = window + step * np.arange(outputs, dtype=np.int64)
    mean = (sums[ends] - sums[ends - window]) / window
    return mean, (squares[ends] - squares[ends - window]) / window - mean * mean
