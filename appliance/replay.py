"""Read tick CSV files as per-symbol batches, in file order, for `hft-appliance replay`.

Two layouts, detected from the first row (or forced with `layout=`):
- long: one tick per row, `symbol,value` (an optional header row `symbol,value`);
- wide: a header row naming one symbol per column, then rows of values; an empty cell means
  "no tick for that symbol in this row".

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

Layout = Literal["auto", "long", "wide"]


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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def detect_layout(first_row: list[str]) -> Literal["long", "wide"]:
    """`symbol,value` header or `SYM,<number>` first tick -> long; anything else -> wide."""
    cells = [cell.strip() for cell in first_row]
    if [cell.lower() for cell in cells] == ["symbol", "value"]:
        return "long"
    if len(cells) == 2 and not _is_number(cells[0]) and _is_number(cells[1]):
        return "long"
    return "wide"


class _Buffers:
    """Per-symbol value lists, emitted as float64 arrays once `batch` values are waiting."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._values: dict[str, list[float]] = {}

    def add(self, symbol: str, value: float) -> tuple[str, np.ndarray] | None:
        values = self._values.setdefault(symbol, [])
        values.append(value)
        if len(values) >= self.batch:
            del self._values[symbol]
            return symbol, np.array(values, dtype=np.float64)
        return None

    def drain(self) -> Iterator[tuple[str, np.ndarray]]:
        for symbol, values in self._values.items():
            yield symbol, np.array(values, dtype=np.float64)
        self._values.clear()


def read_batches(
    lines: Iterable[str],
    *,
    batch: int = 10_000,
    layout: Layout = "auto",
    start_line: int = 1,
    skip_bad_rows: bool = False,
    on_skip: Callable[[BadRowError], None] = lambda error: None,
    progress: RowProgress | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(symbol, values) batches from CSV text lines; see the module docstring.

    Rows ending before `start_line` are not read (the header still is).
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if start_line < 1:
        raise ValueError("start_line must be >= 1")
    rows = csv.reader(lines)
    first = next(rows, None)
    if first is None:
        return
    chosen = detect_layout(first) if layout == "auto" else layout
    if chosen == "long":
        parse = _long_parser()
        is_header = [cell.strip().lower() for cell in first] == ["symbol", "value"]
        numbered = _numbered(rows) if is_header else _numbered(rows, first=first)
    else:
        parse = _wide_parser(first)
        numbered = _numbered(rows)
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
        for symbol, value in ticks:
            full = buffers.add(symbol, value)
            if full is not None:
                yield full
        if ticks:
            progress.last_line = line
    yield from buffers.drain()


Ticks = list[tuple[str, float]]


def _numbered(
    rows: Iterator[list[str]], first: list[str] | None = None
) -> Iterator[tuple[int, list[str]]]:
    """(line the row ends on, row); a first row already read is line 1."""
    if first is not None:
        yield 1, first
    for row in rows:
        yield rows.line_num, row  # type: ignore[attr-defined]


def _long_parser() -> Callable[[list[str], int], Ticks]:
    def parse(row: list[str], line: int) -> Ticks:
        if not row or (len(row) == 1 and not row[0].strip()):
            return []
        if len(row) != 2:
            raise BadRowError(line, f"expected 2 columns (symbol,value), got {len(row)}")
        symbol = row[0].strip()
        if not symbol:
            raise BadRowError(line, "empty symbol")
        return [(symbol, _number(row[1].strip(), line, "value"))]

    return parse


def _wide_parser(header: list[str]) -> Callable[[list[str], int], Ticks]:
    symbols = [cell.strip() for cell in header]
    if not all(symbols):
        raise ReplayError("line 1: the header names one symbol per column; a column is unnamed")
    if len(set(symbols)) != len(symbols):
        raise ReplayError("line 1: a symbol appears in two columns")

    def parse(row: list[str], line: int) -> Ticks:
        if len(row) > len(symbols):
            raise BadRowError(line, f"{len(row)} cells but {len(symbols)} columns")
        # The whole row is read before any value is taken: a bad cell leaves none of its row.
        return [
            (symbol, _number(cell.strip(), line, symbol))
            for symbol, cell in zip(symbols, row, strict=False)
            if cell.strip()
        ]

    return parse
