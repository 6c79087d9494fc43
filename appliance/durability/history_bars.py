"""OHLC bars over a symbol's warm tier (GET /history/bars): [start, end) by timestamp, cut into
intervals aligned to multiples of the interval since the epoch.

Why from the warm tier: it holds every accepted value (hot ones too) with its time marks, so a
bar query reads one place whatever the age of its range. A time range maps to an index range
through the marks (`history.index_at_time`); the pieces holding it (sealed segments, decompressed
with `warm.load`, and memory pieces) give their values and the marks over them, and bars are cut
in index space where a mark's time crosses an interval boundary (`engine_core.bars`): no time per
value is ever built. The bar count is known from the marks before any bar is summarized, so an
answer over `history.max_bars` bars is refused (413) before the values are gathered and summed.
The summaries come from the engine in use (`Engine.bars`: numpy, or the GPU kernel).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from appliance.durability.history import (
    HistoryError,
    _end,
    _first,
    _pieces,
    _view,
    index_at_time,
    parse_time,
)
from appliance.durability.warm import MemoryPiece, WarmTier
from appliance.durability.warm_segment import SealedSegment
from engine_core.bars import Bars, bar_starts, count_bars
from engine_core.contract import Engine

INT64_MAX = 2**63 - 1
_UNITS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
_INTERVAL = re.compile(r"([0-9]+)(ns|us|ms|s|m|h|d)")


class HistoryBars(NamedTuple):
    symbol: str
    interval_ns: int
    start: int
    end: int
    time: np.ndarray  # int64 bar starts
    bars: Bars

    def to_dict(self) -> dict[str, Any]:
        b = self.bars
        return {
            "symbol": self.symbol,
            "interval_ns": self.interval_ns,
            "start": self.start,
            "end": self.end,
            "time": self.time.tolist(),
            "open": b.open.tolist(),
            "high": b.high.tolist(),
            "low": b.low.tolist(),
            "close": b.close.tolist(),
            "count": b.count.tolist(),
            "avg": _json_floats(b.avg),
            "var": _json_floats(b.var),
        }


def _json_floats(column: np.ndarray) -> list[float | None]:
    """None where float64 arithmetic overflowed (values near 1.8e308), as /history/stats does."""
    out: list[float | None] = column.tolist()
    if not np.isfinite(column).all():
        out = [x if np.isfinite(x) else None for x in out]
    return out


def parse_interval(text: str | None) -> int:
    """`<positive integer><unit>` with unit ns, us, ms, s, m, h or d, in ns (at most 2**63 - 1)."""
    match = _INTERVAL.fullmatch(text or "")
    if match is None:
        raise HistoryError(
            "invalid_interval",
            "interval must be a positive integer followed by ns, us, ms, s, m, h or d "
            f"(e.g. 100ms, 1m), got {text!r}",
        )
    ns = int(match.group(1)) * _UNITS[match.group(2)]
    if not 1 <= ns <= INT64_MAX:
        raise HistoryError(
            "invalid_interval", f"interval must be 1 ns .. 2**63 - 1 ns, got {text!r}"
        )
    return ns


class _Part(NamedTuple):
    values: np.ndarray  # the piece's values in the range
    run_pos: np.ndarray  # where each run of equal times starts in `values`
    run_ns: np.ndarray


def _parts(warm: WarmTier, pieces: list[SealedSegment | MemoryPiece], lo: int, hi: int):
    """The values and marks of [lo, hi), piece by piece, in index order (a generator: a
    refusal stops before the later pieces are decompressed)."""
    for piece in pieces:
        a, b = max(lo, _first(piece)), min(hi, _end(piece))
        if a >= b:
            continue
        if isinstance(piece, SealedSegment):
            data = warm.load(piece)
            values, mark_index, mark_ns = data.values, data.mark_index, data.mark_ns
        else:
            values, mark_index, mark_ns = piece.values, piece.mark_index, piece.mark_ns
        k0 = int(np.searchsorted(mark_index, a, side="right")) - 1
        k1 = int(np.searchsorted(mark_index, b, side="left"))
        run_pos = mark_index[k0:k1] - a
        run_pos[0] = 0  # the first run may start before the range (a copy: slicing arithmetic)
        first = _first(piece)
        yield _Part(values[a - first : b - first], run_pos, mark_ns[k0:k1])


def bars_by_time(
    warm: WarmTier,
    engine: Engine,
    symbol: str,
    start_ns: int,
    end_ns: int,
    interval_ns: int,
    max_bars: int,
) -> HistoryBars:
    """The non-empty bars of the values with timestamp in [start_ns, end_ns)."""
    if start_ns >= end_ns:
        raise HistoryError("invalid_range", f"start ({start_ns}) must be before end ({end_ns})")
    view = _view(warm, symbol)
    lo = index_at_time(warm, view, start_ns)
    hi = index_at_time(warm, view, end_ns)
    if lo >= hi:
        raise HistoryError("empty_range", "no value has a timestamp in that range")
    # At most one bar per value and one per interval the range touches: below the limit, no
    # counting pass is needed.
    span = (end_ns - 1) // interval_ns - start_ns // interval_ns + 1
    must_count = min(hi - lo, span) > max_bars
    parts: list[_Part] = []
    n_bars, key = 0, None
    for part in _parts(warm, _pieces(view), lo, hi):
        if must_count:
            more, key = count_bars(part.run_ns, interval_ns, key)
            n_bars += more
            if n_bars > max_bars:
                raise HistoryError(
                    "batch_too_large",
                    f"more than history.max_bars = {max_bars} bars in that range at that "
                    "interval: ask for a shorter range or a longer interval",
                )
        parts.append(part)
    if not parts:
        raise HistoryError("empty_range", "no value held by the warm tier in that range")
    values = np.concatenate([p.values for p in parts]) if len(parts) > 1 else parts[0].values
    sizes = np.cumsum([0] + [p.values.shape[0] for p in parts[:-1]])
    run_pos = np.concatenate([p.run_pos + size for p, size in zip(parts, sizes, strict=True)])
    run_ns = np.concatenate([p.run_ns for p in parts])
    offsets, times = bar_starts(run_pos, run_ns, interval_ns)
    return HistoryBars(symbol, interval_ns, start_ns, end_ns, times, engine.bars(values, offsets))


def run_bars_query(
    warm: WarmTier,
    engine: Engine,
    symbol: str,
    interval: str | None,
    start: str | None,
    end: str | None,
    max_bars: int,
) -> HistoryBars:
    """GET /history/bars after its parameters are read: parse them, answer the range."""
    interval_ns = parse_interval(interval)
    if not start or not end:
        raise HistoryError("invalid_range", "start and end are required (ns or ISO 8601)")
    lo, hi = parse_time("start", start), parse_time("end", end)
    for name, value in (("start", lo), ("end", hi)):
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise HistoryError("invalid_range", f"{name} is outside the int64 ns range")
    try:
        return bars_by_time(warm, engine, symbol, lo, hi, interval_ns, max_bars)
    except FileNotFoundError:
        # Retention deleted a segment between the snapshot and its read: a fresh snapshot
        # no longer lists it.
        return bars_by_time(warm, engine, symbol, lo, hi, interval_ns, max_bars)
