"""CSV replay parsing: layouts, batching per symbol, order within a symbol, malformed rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.publish_commands import read_values
from appliance.replay import ReplayError, detect_layout, read_batches


def _collect(text: str, **kwargs) -> dict[str, list[float]]:
    """Concatenate the batches per symbol, checking each batch is a float64 1-D array."""
    out: dict[str, list[float]] = {}
    for symbol, values in read_batches(io.StringIO(text), **kwargs):
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
    sizes = [values.shape[0] for _, values in read_batches(io.StringIO(text), batch=7)]
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
