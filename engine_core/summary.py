"""The summary row, named and versioned, and the reference arithmetic that computes it.

Every engine's pyramid and the warm tier's segment files hold the same row, so its definition
lives here, not in one engine. The numpy functions below are the reference: the numpy engine
(`fallback`) calls them directly, and the GPU engine runs the same formulas, term for term, as
CUDA kernels in gpu_kernels/segment_tree.cu (one thread per row, so a request is a launch or
three instead of a dozen CuPy calls per level). A change here must be made there too, and
tests/engine/test_gpu_engine.py compares the two engines. Each function works on whole arrays,
no Python loop per value.
"""

from __future__ import annotations

import numpy as np

SUMMARY_ROW_VERSION = 1
"""Version 1 of the summary row: six float64 columns, in this order, summarizing n values x_i.

    COUNT  n, the number of values (0 in the identity row); a float64, exact up to 2**53
    REF    the anchor: one of the node's own values (its first value; for a merged node, its
           first child's REF)
    MEAN   the mean of (x_i - REF): the node's mean is REF + MEAN (anchored mean, see below)
    M2     sum of (x_i - mean)**2, the squared deviations from the node's mean; the population
           variance is M2 / COUNT
    MIN    min x_i (+inf in the identity row)
    MAX    max x_i (-inf in the identity row)

Why anchored means: prices sit far from zero relative to their spread (1e9 + noise of 1e-3): a
mean stored as one float64 near 1e9 carries a rounding error of ~1e-7, which is 1e-3 of the
deviations the variance is made of, and such errors do not cancel across nodes. x - REF is
exact for x within a factor of two of REF (Sterbenz), and where it is not, the spread dominates
the variance, so anchored means keep full relative precision. MIN and MAX are selections and
stay bit-exact. Rows merge with Chan's parallel formula around the first row's REF
(`merge_groups`, `combine`).

Rows written to disk (the warm tier's segment files) carry this version; a change to the
columns, their order or their meaning is a new version.
"""

COUNT, REF, MEAN, M2, MIN, MAX = range(6)
ROW_WIDTH = 6
# The summary of no values: merging it changes nothing (count 0 carries no weight; the min/max
# identities are +inf/-inf). Fresh summary pages are filled with it.
IDENTITY_ROW = np.array([0.0, 0.0, 0.0, 0.0, np.inf, -np.inf])


def summarize_blocks(blocks: np.ndarray, out: np.ndarray) -> None:
    """Write the summaries of the rows of a (k, B) array of values into `out`, shape (k, 6)."""
    width = blocks.shape[1]
    out[:, COUNT] = width
    ref = out[:, REF]
    ref[:] = blocks[:, 0]
    shifted = blocks - ref[:, None]
    mean = out[:, MEAN]
    shifted.sum(axis=1, out=mean)
    mean *= 1.0 / width  # exact: width is a power of two
    shifted -= mean[:, None]
    out[:, M2] = np.einsum("ij,ij->i", shifted, shifted)
    blocks.min(axis=1, out=out[:, MIN])
    blocks.max(axis=1, out=out[:, MAX])


def merge_groups(groups: np.ndarray, out: np.ndarray) -> None:
    """Merge each group of child summaries, (m, F, 6), writing the (m, 6) parents into `out`.

    A parent is anchored at its first child's REF. Children past the newest value are IDENTITY
    rows and carry no weight; a group of only such rows (left by an append's roll-back) merges
    to count 0, mean 0, M2 0 and the min/max identities, i.e. to IDENTITY again.
    """
    counts = groups[:, :, COUNT]
    ref = groups[:, 0, REF]
    means = groups[:, :, REF] - ref[:, None]
    means += groups[:, :, MEAN]
    # Column sums give the count and the children's M2 in one pass (the other columns are
    # scratch, overwritten below).
    groups.sum(axis=1, out=out)
    mean = out[:, MEAN]
    np.divide(np.einsum("ij,ij->i", counts, means), np.maximum(out[:, COUNT], 1.0), out=mean)
    means -= mean[:, None]
    out[:, M2] += np.einsum("ij,ij,ij->i", counts, means, means)
    out[:, REF] = ref
    groups[:, :, MIN].min(axis=1, out=out[:, MIN])
    groups[:, :, MAX].max(axis=1, out=out[:, MAX])


def combine(values: np.ndarray, rows: np.ndarray) -> tuple[int, float, float, float, float]:
    """Merge raw values (r,) and node summaries (q, 6) into (count, mean, M2, min, max).

    This is the query-side merge: a window is a few raw values at its old edge plus whole
    nodes. Returns Python scalars. At least one input must be non-empty, and every row must
    hold values. Each part is skipped when empty: small windows are raw values only, and
    fixed per-call costs dominate there.
    """
    n_values = values.shape[0]
    n_rows = rows.shape[0]
    anchor = float(values[0]) if n_values else float(rows[0, REF])
    n = n_values
    total = 0.0
    if n_values:
        dev_values = values - anchor
        total = float(dev_values.sum())
    if n_rows:
        counts = rows[:, COUNT]
        means = rows[:, REF] - anchor
        means += rows[:, MEAN]
        column_sums = rows.sum(axis=0)
        n += int(column_sums[COUNT])
        total += float(counts @ means)
    mean = total / n
    m2 = 0.0
    lo = np.inf
    hi = -np.inf
    if n_values:
        dev_values -= mean
        m2 += float(dev_values @ dev_values)
        lo = float(values.min())
        hi = float(values.max())
    if n_rows:
        means -= mean
        m2 += float(column_sums[M2]) + float(counts @ (means * means))
        lo = min(lo, float(rows[:, MIN].min()))
        hi = max(hi, float(rows[:, MAX].max()))
    return n, anchor + mean, m2, lo, hi
