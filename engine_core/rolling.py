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
