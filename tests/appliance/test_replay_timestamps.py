"""The replay CSV's timestamp column (appliance.replay) and the shared time parser.

Property tests write files from a model (per symbol: values and times, in file order) in every
supported shape (long with a header in any column order, headerless long, wide; integer ns or
ISO 8601 cells) and check that the batches read back are exactly the model, whatever the batch
size. Bad cells stop the read naming the line, as bad values do.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.durability.history import HistoryError
from appliance.durability.history import parse_time as history_parse_time
from appliance.replay import BadRowError, ReplayError, detect_layout, read_batches
from appliance.timeparse import parse_time

T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
SYMBOLS = ["EUR/USD", "AAPL", "BRK.B"]


def iso(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{fraction:09d}Z"


def read(text: str, **kwargs: object) -> dict[str, tuple[list[float], list[int] | None]]:
    """Every batch, concatenated per symbol: (values, times or None)."""
    out: dict[str, tuple[list[float], list[int] | None]] = {}
    for symbol, values, stamps in read_batches(io.StringIO(text), **kwargs):
        got_values, got_times = out.setdefault(symbol, ([], None if stamps is None else []))
        assert len(values) == (len(values) if stamps is None else len(stamps))
        got_values.extend(values.tolist())
        if stamps is not None:
            assert stamps.dtype.kind == "i" and got_times is not None
            got_times.extend(stamps.tolist())
    return out


ticks = st.lists(
    st.tuples(
        st.sampled_from(SYMBOLS),
        st.integers(0, 10**6).map(lambda n: n / 8),  # exact in decimal and binary
        st.integers(0, 10**15),
        st.booleans(),  # write the time as ISO 8601 instead of integer ns
    ),
    min_size=1,
    max_size=60,
)


def model(rows: list[tuple[str, float, int, bool]]) -> dict[str, tuple[list[float], list[int]]]:
    out: dict[str, tuple[list[float], list[int]]] = {}
    for symbol, value, offset, _ in rows:
        values, times = out.setdefault(symbol, ([], []))
        values.append(value)
        times.append(T0 + offset)
    return out


def cell(offset: int, as_iso: bool) -> str:
    return iso(T0 + offset) if as_iso else str(T0 + offset)


@settings(max_examples=150)
@given(ticks, st.integers(1, 20), st.permutations(["symbol", "value", "timestamp"]), st.booleans())
def test_long_files_with_a_header_in_any_column_order(
    rows: list[tuple[str, float, int, bool]], batch: int, order: list[str], short_name: bool
) -> None:
    header = ["ts" if name == "timestamp" and short_name else name for name in order]
    lines = [",".join(header)]
    for symbol, value, offset, as_iso in rows:
        cells = {"symbol": symbol, "value": repr(value), "timestamp": cell(offset, as_iso)}
        lines.append(",".join(cells[name] for name in order))
    assert read("\n".join(lines) + "\n", batch=batch) == model(rows)


@settings(max_examples=100)
@given(ticks, st.integers(1, 20))
def test_headerless_long_files_with_three_cells(
    rows: list[tuple[str, float, int, bool]], batch: int
) -> None:
    lines = [f"{s},{v!r},{cell(o, i)}" for s, v, o, i in rows]
    assert detect_layout(lines[0].split(",")) == "long"
    assert read("\n".join(lines) + "\n", batch=batch) == model(rows)


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.lists(st.one_of(st.none(), st.integers(0, 800).map(lambda n: n / 4)), min_size=3,
                     max_size=3),
            st.integers(0, 10**12),
            st.booleans(),
        ),
        min_size=1, max_size=40,
    ),
    st.integers(1, 10),
    st.integers(0, 3),
)  # fmt: skip
def test_wide_files_give_every_value_of_a_row_the_row_time(
    rows: list[tuple[list[float | None], int, bool]], batch: int, column: int
) -> None:
    header = list(SYMBOLS)
    header.insert(column, "timestamp")
    lines = [",".join(header)]
    expected: dict[str, tuple[list[float], list[int]]] = {}
    for values, offset, as_iso in rows:
        cells = ["" if v is None else repr(v) for v in values]
        cells.insert(column, cell(offset, as_iso))
        lines.append(",".join(cells))
        for symbol, value in zip(SYMBOLS, values, strict=True):
            if value is not None:
                got = expected.setdefault(symbol, ([], []))
                got[0].append(value)
                got[1].append(T0 + offset)
    assert read("\n".join(lines) + "\n", batch=batch) == expected


def test_files_without_a_timestamp_column_have_no_times() -> None:
    assert read("symbol,value\nA,1\nA,2\n") == {"A": ([1.0, 2.0], None)}
    assert read("A,1\nB,2\n") == {"A": ([1.0], None), "B": ([2.0], None)}
    assert read("A,B\n1,2\n") == {"A": ([1.0], None), "B": ([2.0], None)}


def test_timestamp_column_options() -> None:
    wide = "when,A,ts\n5,1,2\n"
    # a chosen name; "ts" is then a symbol like any other column
    assert read(wide, timestamp_column="when") == {"A": ([1.0], [5]), "ts": ([2.0], [5])}
    # none: every column is a symbol (a ticker may be called "ts")
    assert read("ts,A\n1,2\n", timestamp_column="") == {"ts": ([1.0], None), "A": ([2.0], None)}
    assert read("symbol,value,at\nA,1,7\n", timestamp_column="at") == {"A": ([1.0], [7])}
    with pytest.raises(ReplayError, match="line 1: no column 'at'"):
        read("A,B\n1,2\n", timestamp_column="at")
    with pytest.raises(ReplayError, match="line 1: no column 'at'"):
        read("A,1\n", layout="long", timestamp_column="at")
    with pytest.raises(ReplayError, match="both 'timestamp' and 'ts'"):
        read("timestamp,ts,A\n1,2,3\n")
    # symbols are case-sensitive in a wide header: "TS" is a ticker, not the column
    assert read("TS,A\n1,2\n") == {"TS": ([1.0], None), "A": ([2.0], None)}


def test_iso_and_integer_cells_agree_to_the_nanosecond() -> None:
    text = (
        "symbol,value,timestamp\n"
        "A,1,2026-01-01T00:00:00.000000001Z\n"
        "A,2,1767225600000000002\n"
        "A,3,2026-01-01T01:00:00.000000003+01:00\n"
        "A,4,2026-01-01 00:00:00.5\n"
    )
    assert read(text) == {"A": ([1.0, 2.0, 3.0, 4.0], [T0 + 1, T0 + 2, T0 + 3, T0 + 500_000_000])}


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("symbol,value,timestamp\nA,1,5\nA,2,soon\n", 3,
         "timestamp: 'soon' must be integer ns since the epoch or ISO 8601"),
        ("symbol,value,timestamp\nA,1,-1\n", 2, "timestamp: '-1' is before 1970"),
        ("symbol,value,timestamp\nA,1,1969-12-31T23:59:59Z\n", 2, "is before 1970"),
        ("symbol,value,timestamp\nA,1,9223372036854775808\n", 2, "beyond 2262"),
        ("symbol,value,timestamp\nA,1,2026-01-01T00:00:00.1234567891Z\n", 2,
         "more than 9 fractional digits"),
        ("symbol,value,timestamp\nA,1,\n", 2, "timestamp: '' must be integer ns"),
        ("symbol,value,timestamp\nA,1\n", 2, "expected 3 columns (symbol,value,timestamp), got 2"),
        ("A,1,5\nA,2,x\n", 2, "timestamp: 'x' must be"),
        ("ts,A,B\n1,2,3\n,4,\n", 3, "ts: empty, but the row has values"),
        ("ts,A\n1,2\nlater,3\n", 3, "ts: 'later' must be integer ns"),
    ],
)  # fmt: skip
def test_bad_time_cells_name_the_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(BadRowError) as info:
        read(text)
    assert info.value.line == line
    assert reason in info.value.reason


def test_a_wide_row_without_values_needs_no_time() -> None:
    assert read("ts,A\n,\n5,1\n") == {"A": ([1.0], [5])}


def test_a_bad_time_drains_the_rows_before_it_with_their_times() -> None:
    text = "symbol,value,ts\nA,1,10\nB,2,20\nA,3,x\nA,4,40\n"
    got: list[tuple[str, list[float], list[int]]] = []
    with pytest.raises(BadRowError) as info:
        for symbol, values, stamps in read_batches(io.StringIO(text), batch=100):
            got.append((symbol, values.tolist(), stamps.tolist()))
    assert info.value.line == 4
    assert got == [("A", [1.0], [10]), ("B", [2.0], [20])]
    skipped: list[int] = []
    rest = read_batches(
        io.StringIO(text), skip_bad_rows=True, on_skip=lambda e: skipped.append(e.line)
    )
    assert [(s, v.tolist(), t.tolist()) for s, v, t in rest] == [
        ("A", [1.0, 4.0], [10, 40]), ("B", [2.0], [20]),
    ]  # fmt: skip
    assert skipped == [4]


# --- appliance.timeparse --------------------------------------------------------------------


@settings(max_examples=200)
@given(st.integers(0, (1 << 63) - 1))
def test_iso_round_trips_every_ns_timestamp(ns: int) -> None:
    if ns // 1_000_000_000 > 253_402_300_799:  # datetime stops at year 9999
        return
    assert parse_time(iso(ns)) == ns
    assert parse_time(str(ns)) == ns


def test_history_keeps_its_error_type_and_messages() -> None:
    assert history_parse_time("start", "2026-01-01T00:00:00Z") == T0
    with pytest.raises(HistoryError) as info:
        history_parse_time("end", "yesterday")
    assert info.value.code == "invalid_range"
    assert str(info.value).startswith("end must be integer ns since the epoch or ISO 8601")
    with pytest.raises(ValueError, match=r"^when: more than 9 fractional digits"):
        parse_time("2026-01-01T00:00:00.0000000001", "when")
