"""History statistics over any range of a symbol's warm tier, by index or by timestamp.

Why this is cheap on a long history: a range [start, end) is split over the pieces that hold
it. Sealed segments entirely inside contribute their stored summary (count, anchored mean, M2,
min, max) and are never read; at most two sealed edge segments are decompressed and sliced;
the unsealed in-memory values cover the newest part. Summaries and raw slices are merged by
`engine_core.summary.combine` (Chan's parallel formula around an anchor, so 1e9-scale prices
keep their variance), i.e. the same numerics as /stats/.

Time ranges map to index ranges through the time marks: [t0, t1) covers the values whose
timestamp t is in t0 <= t < t1 (a value's timestamp is its event time when its batch carried
timestamps, else its batch's receive time; marks are non-decreasing, see warm.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import numpy as np

from appliance import timeparse
from appliance.durability.warm import MemoryPiece, SymbolView, WarmTier
from appliance.durability.warm_segment import SealedSegment
from engine_core.summary import combine

_INT = re.compile(r"-?[0-9]+")
INT64_MAX = 2**63 - 1


class HistoryError(Exception):
    """A query that cannot be answered; `code` is an `appliance.errors` code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HistoryStats(NamedTuple):
    count: int
    min: float
    max: float
    avg: float | None  # None only when float64 arithmetic overflows (values near 1.8e308)
    var: float | None
    first: float
    last: float
    first_index: int
    last_index: int
    first_ns: int  # timestamp of the first value (event time, or its batch's receive time)
    last_ns: int

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


# ------------------------------------------------------------------ parsing bounds


def parse_index(name: str, text: str) -> int:
    if not _INT.fullmatch(text):
        raise HistoryError("invalid_range", f"{name} must be a series index (an integer)")
    # Past 19 digits no index fits in int64; checked before int(), which refuses > 4300 digits.
    if len(text.lstrip("-").lstrip("0")) > 19 or int(text) > INT64_MAX:
        raise HistoryError("invalid_range", f"{name} must be an index from 0 to 2**63 - 1")
    value = int(text)
    if value < 0:
        raise HistoryError("invalid_range", f"{name} must be >= 0, got {value}")
    return value


def parse_time(name: str, text: str) -> int:
    """Integer ns since the epoch, or ISO 8601 (no zone = UTC; up to 9 fractional digits):
    `appliance.timeparse.parse_time`, shared with the publish/replay CLIs."""
    try:
        return timeparse.parse_time(text, name)
    except ValueError as exc:
        raise HistoryError("invalid_range", str(exc)) from None


# ------------------------------------------------------------------ queries


def _pieces(view: SymbolView) -> list[SealedSegment | MemoryPiece]:
    return [*view.sealed, *view.memory]


def _first(piece: SealedSegment | MemoryPiece) -> int:
    return piece.header.first_index if isinstance(piece, SealedSegment) else piece.first_index


def _end(piece: SealedSegment | MemoryPiece) -> int:
    return piece.header.end_index if isinstance(piece, SealedSegment) else piece.end_index


def _view(warm: WarmTier, symbol: str) -> SymbolView:
    view = warm.view(symbol)
    if view is None:
        raise HistoryError("unknown_symbol", f"no history for symbol {symbol!r}")
    if not (view.sealed or view.memory):
        raise HistoryError(
            "empty_range", f"no value of {symbol!r} is held any more (deleted by retain_days)"
        )
    return view


def _time_at(warm: WarmTier, piece: SealedSegment | MemoryPiece, index: int) -> int:
    """Timestamp of the value at `index` (every piece's first mark is its first index)."""
    if isinstance(piece, SealedSegment):
        if index == piece.header.first_index:
            return piece.header.first_received_ns
        if index == piece.header.end_index - 1:
            return piece.header.last_received_ns
        data = warm.load(piece)
        mark_index, mark_ns = data.mark_index, data.mark_ns
    else:
        mark_index, mark_ns = piece.mark_index, piece.mark_ns
    return int(mark_ns[int(np.searchsorted(mark_index, index, side="right")) - 1])


def index_at_time(warm: WarmTier, view: SymbolView, t_ns: int) -> int:
    """The first index whose timestamp is at or after `t_ns` (the end if none is)."""
    pieces = _pieces(view)
    for piece in pieces:
        if isinstance(piece, SealedSegment):
            if piece.header.last_received_ns < t_ns:
                continue
            if piece.header.first_received_ns >= t_ns:
                return piece.header.first_index
            data = warm.load(piece)
            mark_index, mark_ns = data.mark_index, data.mark_ns
        else:
            if int(piece.mark_ns[-1]) < t_ns:
                continue
            mark_index, mark_ns = piece.mark_index, piece.mark_ns
        return int(mark_index[int(np.searchsorted(mark_ns, t_ns, side="left"))])
    return _end(pieces[-1])


def _cut(
    values: np.ndarray,
    blocks: np.ndarray,
    width: int,
    i: int,
    j: int,
    rows: list[np.ndarray],
    raw: list[np.ndarray],
) -> None:
    """Split [i, j) of a sealed segment into whole blocks (their summaries) and at most two
    partial blocks of raw values, so cutting a segment reads < 2 * width values."""
    lo_block, hi_block = -(-i // width), j // width
    if lo_block >= hi_block:
        raw.append(values[i:j])
        return
    rows.append(blocks[lo_block:hi_block])
    for part in (values[i : lo_block * width], values[hi_block * width : j]):
        if part.shape[0]:
            raw.append(part)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def stats_by_index(
    warm: WarmTier, symbol: str, start: int | None = None, end: int | None = None
) -> HistoryStats:
    """Statistics over the values with index in [start, end) (None: the whole history)."""
    return _stats(warm, _view(warm, symbol), start, end, what="index")


def stats_by_time(
    warm: WarmTier, symbol: str, start_ns: int | None = None, end_ns: int | None = None
) -> HistoryStats:
    """Statistics over the values timestamped in [start_ns, end_ns) (None: unbounded)."""
    if start_ns is not None and end_ns is not None and start_ns >= end_ns:
        raise HistoryError("invalid_range", f"start ({start_ns}) must be before end ({end_ns})")
    view = _view(warm, symbol)
    start = None if start_ns is None else index_at_time(warm, view, start_ns)
    end = None if end_ns is None else index_at_time(warm, view, end_ns)
    if start is not None and end is not None and start >= end:
        raise HistoryError("empty_range", "no values are timestamped in that time range")
    return _stats(warm, view, start, end, what="time")


def _stats(
    warm: WarmTier, view: SymbolView, start: int | None, end: int | None, *, what: str
) -> HistoryStats:
    pieces = _pieces(view)
    held_start, held_end = _first(pieces[0]), _end(pieces[-1])
    if start is not None and end is not None and start >= end:
        raise HistoryError("invalid_range", f"start ({start}) must be below end ({end})")
    lo = held_start if start is None else max(start, held_start)
    hi = held_end if end is None else min(end, held_end)
    rows: list[np.ndarray] = []  # (k, 6) summaries: whole segments, whole blocks of edges
    raw: list[np.ndarray] = []
    # (piece, first index used, last index used, first value, last value) in index order
    used: list[tuple[SealedSegment | MemoryPiece, int, int, float, float]] = []
    for piece in pieces:
        a, b = max(lo, _first(piece)), min(hi, _end(piece))
        if a >= b:
            continue
        if isinstance(piece, SealedSegment) and (a, b) == (_first(piece), _end(piece)):
            h = piece.header
            rows.append(np.array([[h.count, h.ref, h.mean, h.m2, h.min, h.max]]))
            used.append((piece, a, b - 1, h.first_value, h.last_value))
            continue
        i, j = a - _first(piece), b - _first(piece)
        if isinstance(piece, SealedSegment):
            data = warm.load(piece)
            _cut(data.values, data.blocks, piece.header.block_values, i, j, rows, raw)
            values = data.values
        else:
            values = piece.values
            raw.append(values[i:j])
        used.append((piece, a, b - 1, float(values[i]), float(values[j - 1])))
    if not used:
        raise HistoryError(
            "empty_range",
            f"no values held in that range (by {what}); this symbol's history holds indexes "
            f"[{held_start}, {held_end})",
        )
    values = np.concatenate(raw) if raw else np.empty(0)
    table = np.concatenate(rows) if rows else np.empty((0, 6))
    count, mean, m2, vmin, vmax = combine(values, table)
    first_piece, first_index, _, first_value, _ = used[0]
    last_piece, _, last_index, _, last_value = used[-1]
    return HistoryStats(
        count=count,
        min=vmin,
        max=vmax,
        avg=_finite(mean),
        var=_finite(m2 / count),
        first=first_value,
        last=last_value,
        first_index=first_index,
        last_index=last_index,
        first_ns=_time_at(warm, first_piece, first_index),
        last_ns=_time_at(warm, last_piece, last_index),
    )


def run_query(
    warm: WarmTier, symbol: str, by: str = "index", start: str | None = None, end: str | None = None
) -> HistoryStats:
    """GET /history/stats after its parameters are read: parse the bounds, answer the range.

    Empty `start`/`end` strings count as absent (the whole history on that side).
    """
    if by not in ("index", "time"):
        raise HistoryError("invalid_range", f"by must be 'index' or 'time', got {by!r}")
    parse = parse_index if by == "index" else parse_time
    lo = parse("start", start) if start else None
    hi = parse("end", end) if end else None
    query = stats_by_index if by == "index" else stats_by_time
    try:
        return query(warm, symbol, lo, hi)
    except FileNotFoundError:
        # Retention deleted an edge segment between the snapshot and its read: a fresh
        # snapshot no longer lists it.
        return query(warm, symbol, lo, hi)
