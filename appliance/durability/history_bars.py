"""OHLC bars over a symbol's warm tier (GET /history/bars): [start, end) by timestamp, cut into
intervals aligned to multiples of the interval since the epoch.

Why from the warm tier: it holds every accepted value (hot ones too) with its time marks, so a
bar query reads one place whatever the age of its range. A time range maps to an index range
through the marks (`history.index_at_time`); the pieces holding it (sealed segments, decompressed
with `warm.load`, and memory pieces) give their values and the marks over them, and bars are cut
in index space where a mark's time crosses an interval boundary (`engine_core.bars`): no time per
value is ever built. The bar count is known from the marks before any bar is summarized, so an
answer over `history.max_bars` bars is refused (413) before the values are gathered and summed.
The summaries come from the engine in use (`Engine.bars`: a numba kernel, the numpy reference,
or a CUDA kernel), one piece at a time: a query holds one decompressed segment, never its whole
range (a bar that crosses a piece boundary is carried as a running summary, `_OpenBar`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from appliance.durability.history import (
    INT64_MAX,
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
    shown = repr(text if text is None or len(text) <= 40 else text[:40] + "...")
    if match is None:
        raise HistoryError(
            "invalid_interval",
            "interval must be a positive integer followed by ns, us, ms, s, m, h or d "
            f"(e.g. 100ms, 1m), got {shown}",
        )
    digits = match.group(1).lstrip("0") or "0"
    # Past 19 digits no unit fits in int64; checked before int(), which refuses > 4300 digits.
    ns = int(digits) * _UNITS[match.group(2)] if len(digits) <= 19 else INT64_MAX + 1
    if not 1 <= ns <= INT64_MAX:
        raise HistoryError(
            "invalid_interval", f"interval must be 1 ns .. 2**63 - 1 ns, got {shown}"
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
    n_bars, key = 0, None
    bars = _BarStream(engine, interval_ns)
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
        bars.add(part)
    times, summaries = bars.finish()
    if times.shape[0] == 0:
        raise HistoryError("empty_range", "no value held by the warm tier in that range")
    return HistoryBars(symbol, interval_ns, start_ns, end_ns, times, summaries)


class _OpenBar:
    """The last bar of the pieces seen so far, which the next piece may continue.

    Why a running summary and not its values: one bar may span the whole history (`1d` over a
    day of ticks), and holding its values would bound a query's memory by the range, not by
    one piece. Its mean and M2 are kept relative to its open (as `engine_core.summary`
    anchors them), and a continuation is merged with Chan's formula on those deviations, so a
    bar cut by a piece boundary keeps the digits of 1e9-scale prices.
    """

    __slots__ = ("close", "count", "high", "low", "m2", "mean", "open", "time")

    def __init__(self, time: int, values: np.ndarray) -> None:
        self.time = time
        self.open = float(values[0])
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.high, self.low = -np.inf, np.inf
        self.close = self.open
        self.extend(values)

    def extend(self, values: np.ndarray) -> None:
        deviations = values - self.open
        n2 = int(values.shape[0])
        mean2 = float(deviations.mean())
        m2_2 = float(np.square(deviations - mean2).sum())
        n1, n = self.count, self.count + n2
        delta = mean2 - self.mean
        self.mean += delta * n2 / n
        self.m2 += m2_2 + delta * delta * n1 * n2 / n
        self.count = n
        self.high = max(self.high, float(values.max()))
        self.low = min(self.low, float(values.min()))
        self.close = float(values[-1])

    def row(self) -> Bars:
        """This bar as a one-row `Bars`."""

        def one(x: float | int, dtype: type = np.float64) -> np.ndarray:
            return np.array([x], dtype=dtype)

        return Bars(
            open=one(self.open),
            high=one(self.high),
            low=one(self.low),
            close=one(self.close),
            count=one(self.count, np.int64),
            avg=one(self.open + self.mean),
            var=one(self.m2 / self.count),
        )


class _BarStream:
    """Bars of consecutive pieces, one piece in memory at a time: the bars that end inside a
    piece are summarized by the engine (`Engine.bars`), the piece's last bar stays open
    (`_OpenBar`) until a later piece starts another bar or the range ends."""

    def __init__(self, engine: Engine, interval_ns: int) -> None:
        self.engine = engine
        self.interval_ns = interval_ns
        self.times: list[np.ndarray] = []
        self.done: list[Bars] = []
        self.open_bar: _OpenBar | None = None

    def add(self, part: _Part) -> None:
        offsets, times = bar_starts(part.run_pos, part.run_ns, self.interval_ns)
        values = part.values
        open_bar = self.open_bar
        if open_bar is not None and int(times[0]) == open_bar.time:  # it goes on here
            end = int(offsets[1]) if offsets.shape[0] > 1 else values.shape[0]
            open_bar.extend(values[:end])
            if offsets.shape[0] == 1:
                return
            values, offsets, times = values[end:], offsets[1:] - end, times[1:]
        if open_bar is not None:
            self._emit(np.array([open_bar.time], np.int64), open_bar.row())
        last = int(offsets[-1])
        if offsets.shape[0] > 1:
            self._emit(times[:-1], self.engine.bars(values[:last], offsets[:-1]))
        self.open_bar = _OpenBar(int(times[-1]), values[last:])

    def _emit(self, times: np.ndarray, bars: Bars) -> None:
        self.times.append(times)
        self.done.append(bars)

    def finish(self) -> tuple[np.ndarray, Bars]:
        if self.open_bar is not None:
            self._emit(np.array([self.open_bar.time], np.int64), self.open_bar.row())
            self.open_bar = None
        if not self.done:
            return np.empty(0, np.int64), Bars(*(np.empty(0) for _ in Bars._fields))
        columns = [np.concatenate([getattr(b, f) for b in self.done]) for f in Bars._fields]
        return np.concatenate(self.times), Bars(*columns)


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
