"""Read tick CSV files as per-symbol batches, in file order, for `hft-appliance replay`.

Two layouts, detected from the first row (or forced with `layout=`):
- long: one tick per row, `symbol,value` (an optional header row `symbol,value`);
- wide: a header row naming one symbol per column, then rows of values; an empty cell means
  "no tick for that symbol in this row".

Why batches per symbol: publishing one frame per tick would cost a frame header and a sequence
number per value. Values are buffered per symbol and emitted when a buffer reaches `batch`
values, and all remaining buffers at the end; the order of ticks within a symbol is kept
(the only order the appliance's statistics depend on).

A malformed row stops the replay with `ReplayError` naming the line: replaying half a file
silently is worse than stopping.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np

Layout = Literal["auto", "long", "wide"]


class ReplayError(Exception):
    """The file cannot be replayed; the message names the line and the problem."""


def _number(text: str, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ReplayError(f"line {line}: {column}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ReplayError(f"line {line}: {column}: {text!r} is not a finite number")
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
    lines: Iterable[str], *, batch: int = 10_000, layout: Layout = "auto"
) -> Iterator[tuple[str, np.ndarray]]:
    """(symbol, values) batches from CSV text lines; see the module docstring."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    rows = csv.reader(lines)
    first = next(rows, None)
    if first is None:
        return
    chosen = detect_layout(first) if layout == "auto" else layout
    buffers = _Buffers(batch)
    if chosen == "long":
        yield from _long_rows(first, rows, buffers)
    else:
        yield from _wide_rows(first, rows, buffers)
    yield from buffers.drain()


def _long_rows(
    first: list[str], rows: Iterator[list[str]], buffers: _Buffers
) -> Iterator[tuple[str, np.ndarray]]:
    is_header = [cell.strip().lower() for cell in first] == ["symbol", "value"]
    pending = rows if is_header else _prepend(first, rows)
    for row in pending:
        line = rows.line_num  # type: ignore[attr-defined]
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 2:
            raise ReplayError(f"line {line}: expected 2 columns (symbol,value), got {len(row)}")
        symbol = row[0].strip()
        if not symbol:
            raise ReplayError(f"line {line}: empty symbol")
        full = buffers.add(symbol, _number(row[1].strip(), line, "value"))
        if full is not None:
            yield full


def _wide_rows(
    header: list[str], rows: Iterator[list[str]], buffers: _Buffers
) -> Iterator[tuple[str, np.ndarray]]:
    symbols = [cell.strip() for cell in header]
    if not all(symbols):
        raise ReplayError("line 1: the header names one symbol per column; a column is unnamed")
    if len(set(symbols)) != len(symbols):
        raise ReplayError("line 1: a symbol appears in two columns")
    for row in rows:
        line = rows.line_num  # type: ignore[attr-defined]
        if not row:
            continue
        if len(row) > len(symbols):
            raise ReplayError(f"line {line}: {len(row)} cells but {len(symbols)} columns")
        for symbol, cell in zip(symbols, row, strict=False):
            text = cell.strip()
            if not text:
                continue
            full = buffers.add(symbol, _number(text, line, symbol))
            if full is not None:
                yield full


def _prepend(first: list[str], rows: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rows
