"""CSV replay parsing: layouts, batching per symbol, order within a symbol, malformed rows,
resuming from a line and skipping bad rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.publish_commands import read_values
from appliance.replay import BadRowError, ReplayError, RowProgress, detect_layout, read_batches


def _collect(text: str, **kwargs) -> dict[str, list[float]]:
    """Concatenate the batches per symbol, checking each batch is a float64 1-D array."""
    out: dict[str, list[float]] = {}
    for symbol, values, _ in read_batches(io.StringIO(text), **kwargs):
        assert values.dtype == np.float64 and values.ndim == 1 and values.shape[0] > 0
        out.setdefault(symbol, []).extend(values.tolist())
    return out


def test_long_layout_with_header_keeps_order_per_symbol() -> None:
    text = "symbol,value\nA,1\nB,2\nA,3\nA,4.5\nB,0\n"
    assert _collect(text) == {"A": [1.0, 3.0, 4.5], "B": [2.0, 0.0]}


def test_long_layout_without_header_is_detected() -> None:
    assert detect_layout(["EUR/USD", "1.085"]) == "long"
    assert _collect("EUR/USD,1.085\nEUR/USD,1.086\n") == {"EUR/USD": [1.085, 1.086]}


def test_wide_layout_skips_empty_cells() -> None:
    text = "AAPL,MSFT,BRK.B\n1,2,3\n4,,6\n,8\n"
    assert _collect(text) == {"AAPL": [1.0, 4.0], "MSFT": [2.0, 8.0], "BRK.B": [3.0, 6.0]}


def test_two_column_wide_header_is_not_mistaken_for_a_tick() -> None:
    assert detect_layout(["AAPL", "MSFT"]) == "wide"
    assert _collect("AAPL,MSFT\n1,2\n") == {"AAPL": [1.0], "MSFT": [2.0]}


def test_forced_layout_overrides_detection() -> None:
    # "symbol,value" forced wide: two symbols literally named so.
    assert _collect("symbol,value\n1,2\n", layout="wide") == {"symbol": [1.0], "value": [2.0]}


def test_batches_never_exceed_the_batch_size() -> None:
    text = "".join(f"S{i % 3},{i}\n" for i in range(100))
    sizes = [values.shape[0] for _, values, _ in read_batches(io.StringIO(text), batch=7)]
    assert max(sizes) == 7
    assert sum(sizes) == 100


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["A", "B", "C/D"]), st.integers(0, 10**9)), min_size=1),
    st.integers(1, 20),
)
def test_any_long_file_round_trips_per_symbol(rows: list[tuple[str, int]], batch: int) -> None:
    text = "".join(f"{symbol},{value}\n" for symbol, value in rows)
    expected: dict[str, list[float]] = {}
    for symbol, value in rows:
        expected.setdefault(symbol, []).append(float(value))
    assert _collect(text, batch=batch) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("symbol,value\nA,abc\n", "line 2"),
        ("symbol,value\nA,1\nA,nan\n", "line 3"),
        ("symbol,value\nA,1,2\n", "expected 2 columns"),
        ("symbol,value\n,1\n", "empty symbol"),
        ("A,B\n1,2,3\n", "3 cells but 2 columns"),
        ("A,A\n1,2\n", "two columns"),
        ("A,\n1,2\n", "unnamed"),
        ("A,B\n1,inf\n", "not a finite number"),
    ],
)
def test_malformed_rows_stop_with_the_line(text: str, fragment: str) -> None:
    with pytest.raises(ReplayError, match=fragment):
        _collect(text)


def test_empty_file_yields_nothing() -> None:
    assert _collect("") == {}


def test_publish_values_from_stdin() -> None:
    values = read_values(["-"], io.StringIO("1 2,3\n4.5\n"))
    assert values.tolist() == [1.0, 2.0, 3.0, 4.5]
    with pytest.raises(ReplayError):
        read_values(["1", "x"], io.StringIO())


def _collect_until_error(text: str, **kwargs) -> tuple[dict[str, list[float]], BadRowError | None]:
    out: dict[str, list[float]] = {}
    try:
        for symbol, values, _ in read_batches(io.StringIO(text), **kwargs):
            out.setdefault(symbol, []).extend(values.tolist())
    except BadRowError as error:
        return out, error
    return out, None


def _merge(*parts: dict[str, list[float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for part in parts:
        for symbol, values in part.items():
            out.setdefault(symbol, []).extend(values)
    return out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(0, 99)), min_size=1),
    st.data(),
    st.integers(1, 5),
    st.booleans(),
)
def test_stop_at_a_bad_row_then_resume_applies_every_row_exactly_once(
    rows: list[tuple[str, int]], data: st.DataObject, batch: int, header: bool
) -> None:
    """The rows before the bad line are all yielded before the error (the per-symbol buffers
    are drained), none after; fixing the row and resuming at the reported line then yields the
    rest: together exactly the fixed file, nothing twice, nothing lost."""
    bad = data.draw(st.integers(0, len(rows) - 1))
    lines = [f"{symbol},{value}\n" for symbol, value in rows]
    good = ("symbol,value\n" if header else "") + "".join(lines)
    broken = lines.copy()
    broken[bad] = f"{rows[bad][0]},oops\n"
    broken_text = ("symbol,value\n" if header else "") + "".join(broken)
    if not header and bad == 0:  # a bad first row reads as a wide header instead
        return
    before, error = _collect_until_error(broken_text, batch=batch)
    assert error is not None and error.line == bad + 1 + header
    assert before == _merge(*({s: [float(v)]} for s, v in rows[:bad]))
    after = _collect(good, batch=batch, start_line=error.line)
    assert _merge(before, after) == _collect(good, batch=batch)


def test_the_error_names_the_line_and_the_progress_the_last_line_taken() -> None:
    progress = RowProgress()
    before, error = _collect_until_error(
        "symbol,value\nA,1\nB,2\n\nA,x\nA,4\n", batch=10, progress=progress
    )
    assert before == {"A": [1.0], "B": [2.0]}
    assert error is not None and (error.line, error.reason) == (5, "value: 'x' is not a number")
    assert str(error) == "line 5: value: 'x' is not a number"
    assert progress.last_line == 3


def test_skip_bad_rows_leaves_out_whole_rows_and_reports_each() -> None:
    skipped: list[BadRowError] = []
    text = "A,B\n1,2\n3,oops\n5,6,7\n,8\n9,nan\n10,11\n"
    out = _collect(text, skip_bad_rows=True, on_skip=skipped.append)
    # Line 3's good cell (A=3) is left out with its row: a row is taken whole or not at all.
    assert out == {"A": [1.0, 10.0], "B": [2.0, 8.0, 11.0]}
    assert [e.line for e in skipped] == [3, 4, 6]
    assert "B: 'oops' is not a number" in skipped[0].reason


def test_start_line_skips_earlier_rows_but_still_reads_the_header() -> None:
    text = "A,B\n1,2\n3,4\n5,6\n"
    assert _collect(text, start_line=3) == {"A": [3.0, 5.0], "B": [4.0, 6.0]}
    assert _collect("symbol,value\nA,1\nA,2\n", start_line=3) == {"A": [2.0]}
    assert _collect("A,1\nA,2\n", start_line=2) == {"A": [2.0]}  # no header: line 1 is data
    assert _collect("A,1\n", start_line=99) == {}


def test_header_errors_stop_even_with_skip_bad_rows() -> None:
    with pytest.raises(ReplayError, match="line 1: a symbol appears in two columns"):
        _collect("A,A\n1,2\n", skip_bad_rows=True)


def test_a_record_spanning_lines_is_numbered_by_the_line_it_ends_on() -> None:
    _, error = _collect_until_error('symbol,value\nA,1\n"B\nC",x\nA,2\n')
    assert error is not None and error.line == 4
    assert _collect('symbol,value\nA,1\n"B\nC",3\nA,2\n', start_line=4) == {
        "B\nC": [3.0],
        "A": [2.0],
    }
