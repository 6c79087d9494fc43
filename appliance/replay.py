"""Read tick CSV files as per-symbol batches, in file order, for `hft-appliance replay`.

Two layouts, detected from the first row (or forced with `layout=`):
- long: one tick per row, `symbol,value` (an optional header row `symbol,value`);
- wide: a header row naming one symbol per column, then rows of values; an empty cell means
  "no tick for that symbol in this row".

Optional event times (a **timestamp column**): each cell integer ns since the epoch or ISO 8601
(`appliance.timeparse`, the same rules as the history API's times). The column is named in the
header: `timestamp` or `ts` by default (`timestamp_column=` picks another name, or "" for none):
- long: a header `symbol,value,timestamp` (the three names in any order), or headerless rows
  `SYM,<number>,<time>` (three cells, the third a time);
- wide: a header column with that name (exactly, since symbols are case-sensitive); its cell
  is the time of every value in the row, and must not be empty in a row that has values.
A file with a timestamp column yields its batches with timestamps; one without, with None (the
appliance stamps each batch with its receive time). The order of the times is not checked
here: the appliance refuses a batch whose times go back (or clamps them, per its config).

Why batches per symbol: publishing one frame per tick would cost a frame header and a sequence
number per value. Values are buffered per symbol and emitted when a buffer reaches `batch`
values, and all remaining buffers at the end; the order of ticks within a symbol is kept
(the only order the appliance's statistics depend on).

A malformed row stops the replay with `BadRowError` naming the line: replaying half a file
silently is worse than stopping. Before it is raised, every value of the rows before it is
yielded (the per-symbol buffers are drained), so the rows before the bad line are all applied
and none from it on: `start_line=` that line (once fixed) resumes without applying anything
twice. With `skip_bad_rows=True` a bad row is reported to `on_skip` and left out whole (a wide
row's good cells too: a row is taken entirely or not at all). Line numbers are the file's
physical lines (a quoted cell spanning lines counts the line it ends on); a header is always read.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from appliance.timeparse import parse_time

Layout = Literal["auto", "long", "wide"]
AUTO_TIMESTAMP_COLUMNS = ("timestamp", "ts")
_INT64_MAX = (1 << 63) - 1


class ReplayError(Exception):
    """The file cannot be replayed; the message names the line and the problem."""


class BadRowError(ReplayError):
    """One data row cannot be read (`line`, `reason`); the rows before it were all yielded."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass
class RowProgress:
    """Where a read stands: the last line whose values were taken (0: none yet)."""

    last_line: int = 0


def _number(text: str, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRowError(line, f"{column}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BadRowError(line, f"{column}: {text!r} is not a finite number")
    return value


def _time(text: str, line: int, column: str) -> int:
    """A timestamp cell: ns since the epoch, 0..2**63-1 (what the wire and the store carry)."""
    try:
        value = parse_time(text, f"{column}: {text!r}")
    except ValueError as exc:
        raise BadRowError(line, str(exc)) from None
    if not 0 <= value <= _INT64_MAX:
        where = "before 1970" if value < 0 else "beyond 2262 (int64 ns)"
        raise BadRowError(line, f"{column}: {text!r} is {where}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_time(text: str) -> bool:
    try:
        parse_time(text)
    except ValueError:
        return False
    return True


def detect_layout(
    first_row: list[str], timestamp_column: str | None = None
) -> Literal["long", "wide"]:
    """`symbol,value[,timestamp]` header or `SYM,<number>[,<time>]` first tick -> long;
    anything else -> wide. `timestamp_column` as in `read_batches`."""
    cells = [cell.strip() for cell in first_row]
    if _long_header(cells, timestamp_column) is not None:
        return "long"
    if len(cells) == 2 and not _is_number(cells[0]) and _is_number(cells[1]):
        return "long"
    if timestamp_column is None and _headerless_timed(cells) and _is_time(cells[2]):
        return "long"
    return "wide"


def _long_header(cells: list[str], timestamp_column: str | None) -> dict[str, int] | None:
    """{"symbol": i, "value": j[, "timestamp": k]} when `cells` is a long layout's header."""
    names = [cell.strip().lower() for cell in cells]
    if names == ["symbol", "value"]:
        return {"symbol": 0, "value": 1}
    if timestamp_column == "" or len(names) != 3 or "symbol" not in names or "value" not in names:
        return None
    allowed = AUTO_TIMESTAMP_COLUMNS if timestamp_column is None else (timestamp_column.lower(),)
    rest = [i for i, name in enumerate(names) if name not in ("symbol", "value")]
    if len(rest) != 1 or names[rest[0]] not in allowed:
        return None
    return {"symbol": names.index("symbol"), "value": names.index("value"), "timestamp": rest[0]}


Batch = tuple[str, np.ndarray, "np.ndarray | None"]  # symbol, values, timestamps (int64 ns)
Tick = tuple[str, float, int | None]


class _Buffers:
    """Per-symbol values (and timestamps), emitted as arrays once `batch` values are waiting."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._values: dict[str, list[float]] = {}
        self._times: dict[str, list[int]] = {}

    def add(self, symbol: str, value: float, time: int | None) -> Batch | None:
        values = self._values.setdefault(symbol, [])
        values.append(value)
        if time is not None:
            self._times.setdefault(symbol, []).append(time)
        if len(values) >= self.batch:
            return self._take(symbol)
        return None

    def _take(self, symbol: str) -> Batch:
        values = self._values.pop(symbol)
        times = self._times.pop(symbol, None)
        stamps = None if times is None else np.array(times, dtype=np.int64)
        return symbol, np.array(values, dtype=np.float64), stamps

    def drain(self) -> Iterator[Batch]:
        for symbol in list(self._values):
            yield self._take(symbol)


def read_batches(
    lines: Iterable[str],
    *,
    batch: int = 10_000,
    layout: Layout = "auto",
    start_line: int = 1,
    skip_bad_rows: bool = False,
    on_skip: Callable[[BadRowError], None] = lambda error: None,
    progress: RowProgress | None = None,
    timestamp_column: str | None = None,
) -> Iterator[Batch]:
    """(symbol, values, timestamps) batches from CSV text lines; see the module docstring.

    Rows ending before `start_line` are not read (the header still is). `timestamp_column`:
    None finds a column named `timestamp` or `ts`; a name must be a header column (else
    ReplayError); "" reads no timestamps. `timestamps` is None for a file without the column.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if start_line < 1:
        raise ValueError("start_line must be >= 1")
    rows = csv.reader(lines)
    first = next(rows, None)
    if first is None:
        return
    numbered, parse = _layout(first, rows, layout, timestamp_column)
    progress = progress if progress is not None else RowProgress()
    buffers = _Buffers(batch)
    for line, row in numbered:
        if line < start_line:
            continue
        try:
            ticks = parse(row, line)
        except BadRowError as error:
            if skip_bad_rows:
                on_skip(error)
                continue
            yield from buffers.drain()  # every row before this one is applied, none after
            raise
        for symbol, value, time in ticks:
            full = buffers.add(symbol, value, time)
            if full is not None:
                yield full
        if ticks:
            progress.last_line = line
    yield from buffers.drain()


def _layout(
    first: list[str], rows: Iterator[list[str]], layout: Layout, timestamp_column: str | None
) -> tuple[Iterator[tuple[int, list[str]]], Callable[[list[str], int], list[Tick]]]:
    """The numbered data rows and the row parser for the file whose first row is `first`."""
    chosen = detect_layout(first, timestamp_column) if layout == "auto" else layout
    if chosen == "wide":
        return _numbered(rows), _wide_parser(first, timestamp_column)
    columns = _long_header(first, timestamp_column)
    if columns is not None:  # a header: the data starts on line 2
        return _numbered(rows), _long_parser(columns)
    if timestamp_column:
        raise ReplayError(
            f"line 1: no column {timestamp_column!r} (a long file with timestamps needs the "
            f"header symbol,value,{timestamp_column})"
        )
    timed = timestamp_column is None and _headerless_timed(first)
    columns = {"symbol": 0, "value": 1} | ({"timestamp": 2} if timed else {})
    return _numbered(rows, first=first), _long_parser(columns)


def _headerless_timed(cells: list[str]) -> bool:
    """A first row `SYM,<number>,<something>`: a long file with timestamps and no header
    (whether the third cell is a time is checked per row, naming the line)."""
    cells = [cell.strip() for cell in cells]
    return len(cells) == 3 and not _is_number(cells[0]) and _is_number(cells[1])


def _numbered(
    rows: Iterator[list[str]], first: list[str] | None = None
) -> Iterator[tuple[int, list[str]]]:
    """(line the row ends on, row); a first row already read is line 1."""
    if first is not None:
        yield 1, first
    for row in rows:
        yield rows.line_num, row  # type: ignore[attr-defined]


def _long_parser(columns: dict[str, int]) -> Callable[[list[str], int], list[Tick]]:
    symbol_at, value_at = columns["symbol"], columns["value"]
    time_at = columns.get("timestamp")
    width = 2 if time_at is None else 3
    names = "symbol,value" if time_at is None else "symbol,value,timestamp"

    def parse(row: list[str], line: int) -> list[Tick]:
        if not row or (len(row) == 1 and not row[0].strip()):
            return []
        if len(row) != width:
            raise BadRowError(line, f"expected {width} columns ({names}), got {len(row)}")
        symbol = row[symbol_at].strip()
        if not symbol:
            raise BadRowError(line, "empty symbol")
        value = _number(row[value_at].strip(), line, "value")
        time = None if time_at is None else _time(row[time_at].strip(), line, "timestamp")
        return [(symbol, value, time)]

    return parse


def _wide_parser(
    header: list[str], timestamp_column: str | None
) -> Callable[[list[str], int], list[Tick]]:
    names = [cell.strip() for cell in header]
    if not all(names):
        raise ReplayError("line 1: the header names one symbol per column; a column is unnamed")
    if len(set(names)) != len(names):
        raise ReplayError("line 1: a symbol appears in two columns")
    wanted = AUTO_TIMESTAMP_COLUMNS if timestamp_column is None else (timestamp_column,)
    found = [i for i, name in enumerate(names) if timestamp_column != "" and name in wanted]
    if timestamp_column and not found:
        raise ReplayError(f"line 1: no column {timestamp_column!r} in the header")
    if len(found) > 1:
        raise ReplayError(
            f"line 1: both {names[found[0]]!r} and {names[found[1]]!r} could be the timestamp "
            "column; name the one to use"
        )
    time_at = found[0] if found else None
    time_name = "" if time_at is None else names[time_at]
    symbols = [(i, name) for i, name in enumerate(names) if i != time_at]

    def parse(row: list[str], line: int) -> list[Tick]:
        if len(row) > len(names):
            raise BadRowError(line, f"{len(row)} cells but {len(names)} columns")
        # The whole row is read before any value is taken: a bad cell leaves none of its row.
        ticks: list[Tick] = [
            (symbol, _number(row[i].strip(), line, symbol), None)
            for i, symbol in symbols
            if i < len(row) and row[i].strip()
        ]
        if time_at is None or not ticks:
            return ticks
        cell = row[time_at].strip() if time_at < len(row) else ""
        if not cell:
            raise BadRowError(line, f"{time_name}: empty, but the row has values")
        time = _time(cell, line, time_name)
        return [(symbol, value, time) for symbol, value, _ in ticks]

    return parse
