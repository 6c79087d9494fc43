"""Rolling statistics over a symbol's warm tier (GET /history/rolling): for every `step`-th
position p in [start + window - 1, end), min, max, avg and var of the `window` values ending
at p, in the index space of GET /history/stats (hot and warm values alike).

Why one gathered array and one engine call: a window of W values crosses piece boundaries
wherever it lies, and the engine's rolling kernels (`Engine.rolling`: compiled on the CPU,
CUDA on the GPU) are O(len(values)) over one contiguous array, so the values of [start, end)
are copied once, piece by piece (sealed segments decompressed with `warm.load`, memory pieces
sliced), into one float64 array that the engine scans in a single call. Both limits
(`history.max_rolling_values` read, `history.max_rolling_positions` answered) follow from the
parameters and the held range alone, so an oversized query is refused (413) before any
segment is read.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from appliance.durability.history import (
    INT64_MAX,
    HistoryError,
    _end,
    _first,
    _pieces,
    _view,
    parse_index,
)
from appliance.durability.history_bars import _json_floats
from appliance.durability.warm import MemoryPiece, WarmTier
from appliance.durability.warm_segment import SealedSegment
from engine_core.contract import Engine
from engine_core.rolling import Rolling, rolling_count


class HistoryRolling(NamedTuple):
    symbol: str
    window: int
    start: int
    end: int
    step: int
    rolling: Rolling  # one item per output position, oldest first

    def positions(self) -> np.ndarray:
        """Absolute history index of each output (the last value of its window)."""
        count = self.rolling.min.shape[0]
        first = self.start + self.window - 1
        return first + self.step * np.arange(count, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        r = self.rolling
        return {
            "symbol": self.symbol,
            "window": self.window,
            "start": self.start,
            "end": self.end,
            "step": self.step,
            "positions": self.positions().tolist(),
            # Values are finite (ingest refuses others), so min and max are too; a window sum
            # of 1e308-scale values overflows, and avg/var become null as in /history/bars.
            "min": r.min.tolist(),
            "max": r.max.tolist(),
            "avg": _json_floats(r.avg),
            "var": _json_floats(r.var),
        }


def parse_positive(name: str, text: str | None, *, code: str) -> int:
    """A required integer >= 1 (`window`, `step`); `code` is the error code for a bad one."""
    if text is None or text == "":
        raise HistoryError(code, f"{name} is required: an integer >= 1")
    digits = text.lstrip("0")
    # Past 19 digits no count fits in int64 (nor in any held history); checked before int(),
    # which refuses more than 4300 digits.
    if (
        not text.isascii()
        or not text.isdigit()
        or len(digits) > 19
        or not digits
        or int(digits) > INT64_MAX
    ):
        shown = repr(text if len(text) <= 40 else text[:40] + "...")
        raise HistoryError(code, f"{name} must be an integer from 1 to 2**63 - 1, got {shown}")
    return int(digits)


def _check_no_gap(pieces: list[SealedSegment | MemoryPiece], lo: int, hi: int) -> None:
    """Refuse a range that spans a gap between pieces (warm.SymbolView allows one): a window
    across it would mix values that were never adjacent."""
    expected = lo
    for piece in pieces:
        a, b = max(lo, _first(piece)), min(hi, _end(piece))
        if a >= b:
            continue
        if a != expected:
            break
        expected = b
    if expected != hi:
        missing_end = min([hi, *(_first(p) for p in pieces if _first(p) > expected)])
        raise HistoryError(
            "invalid_range",
            f"indexes [{expected}, {missing_end}) are not held (a gap in this symbol's "
            "history): ask for a range on one side of it",
        )


def _gather(
    warm: WarmTier, pieces: list[SealedSegment | MemoryPiece], lo: int, hi: int
) -> np.ndarray:
    """The values with index in [lo, hi) as one float64 array (one copy of each slice)."""
    out = np.empty(hi - lo, dtype=np.float64)
    for piece in pieces:
        a, b = max(lo, _first(piece)), min(hi, _end(piece))
        if a >= b:
            continue
        values = warm.load(piece).values if isinstance(piece, SealedSegment) else piece.values
        first = _first(piece)
        out[a - lo : b - lo] = values[a - first : b - first]
    return out


def rolling_by_index(
    warm: WarmTier,
    engine: Engine,
    symbol: str,
    window: int,
    start: int | None,
    end: int | None,
    step: int,
    *,
    max_positions: int,
    max_values: int,
) -> HistoryRolling:
    """Rolling statistics of the values with index in [start, end) (None: that end of what is
    held); every refusal is decided before a value is read."""
    view = _view(warm, symbol)
    pieces = _pieces(view)
    held_start, held_end = _first(pieces[0]), _end(pieces[-1])
    held = f"this symbol's history holds indexes [{held_start}, {held_end})"
    lo = held_start if start is None else start
    hi = held_end if end is None else end
    if lo >= hi:
        raise HistoryError("invalid_range", f"start ({lo}) must be below end ({hi})")
    if lo < held_start or hi > held_end:
        raise HistoryError("invalid_range", f"[{lo}, {hi}) is outside the history: {held}")
    _check_no_gap(pieces, lo, hi)
    n = hi - lo
    if n < window:
        raise HistoryError(
            "invalid_range",
            f"[{lo}, {hi}) holds {n} values, fewer than one window of {window}",
        )
    if n > max_values:
        raise HistoryError(
            "batch_too_large",
            f"[{lo}, {hi}) holds {n} values, more than history.max_rolling_values = "
            f"{max_values}: ask for a shorter range",
        )
    outputs = rolling_count(n, window, step)
    if outputs > max_positions:
        raise HistoryError(
            "batch_too_large",
            f"{outputs} output positions, more than history.max_rolling_positions = "
            f"{max_positions}: ask for a shorter range or a larger step",
        )
    values = _gather(warm, pieces, lo, hi)
    # A step past the last window start gives the same single output; capping it keeps the
    # engine's kernels within int64 whatever step was asked for.
    # Windows of 1e308-scale values spread far apart overflow var to inf (answered as null):
    # an expected outcome, not a fault worth a RuntimeWarning per query.
    with np.errstate(over="ignore", invalid="ignore"):
        result = engine.rolling(values, window, min(step, n))
    return HistoryRolling(symbol, window, lo, hi, step, result)


def run_rolling_query(
    warm: WarmTier,
    engine: Engine,
    symbol: str,
    window: str | None,
    start: str | None,
    end: str | None,
    step: str | None,
    *,
    max_positions: int,
    max_values: int,
) -> HistoryRolling:
    """GET /history/rolling after its parameters are read: parse them, answer the range.

    Empty `start`/`end`/`step` count as absent (the held start, the held end, step 1).
    """
    w = parse_positive("window", window, code="invalid_window")
    k = parse_positive("step", step, code="invalid_window") if step else 1
    lo = parse_index("start", start) if start else None
    hi = parse_index("end", end) if end else None
    try:
        return rolling_by_index(
            warm, engine, symbol, w, lo, hi, k, max_positions=max_positions, max_values=max_values
        )
    except FileNotFoundError:
        # Retention deleted a segment between the snapshot and its read: a fresh snapshot
        # no longer lists it (and the range check then says what is still held).
        return rolling_by_index(
            warm, engine, symbol, w, lo, hi, k, max_positions=max_positions, max_values=max_values
        )
