"""Time windows and REST timestamps in process: `parse_seconds`, the add_batch decoder's
`timestamps`, POST /stats/batch's `seconds` items, and `Store.stats_seconds` against a numpy
model (batches with and without timestamps, eviction by a tiny retention, clamping)."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import ApiError
from appliance.stats_batch import StatsBatchDecoder, answer
from appliance.store import Store, time_key
from appliance.timestamps import OutOfOrderError
from appliance.validation import (
    MAX_WINDOW_NS,
    BatchDecoder,
    TimeWindowQuery,
    format_seconds,
    parse_query_string,
    parse_seconds,
    parse_stats_query,
)
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine

TINY = Geometry(block=4, fanout=4, chunk=64)


def engines():
    """The numpy engine and the compiled one, at a tiny geometry (many blocks and pages)."""
    from fallback.compiled import CompiledEngine

    return {"numpy": NumpyEngine(geometry=TINY), "compiled": CompiledEngine(geometry=TINY)}


# --- parse_seconds ------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=MAX_WINDOW_NS))
def test_every_window_round_trips_through_its_decimal_text(ns: int) -> None:
    text = format_seconds(ns)
    assert parse_seconds(text) == ns
    assert Decimal(text) * 10**9 == ns  # the echo is the exact window


@given(
    st.text(alphabet="0123456789", min_size=0, max_size=12),
    st.text(alphabet="0123456789", min_size=0, max_size=12),
)
def test_decimal_text_is_converted_exactly_or_refused(whole: str, fraction: str) -> None:
    text = f"{whole}.{fraction}"
    if not (whole or fraction):
        expected = None
    else:
        exact = Decimal(f"{whole or '0'}.{fraction or '0'}") * 10**9
        fine = exact == exact.to_integral_value()
        expected = int(exact) if fine and 1 <= exact <= MAX_WINDOW_NS else None
    if expected is None:
        with pytest.raises(ApiError) as raised:
            parse_seconds(text)
        assert raised.value.code == "invalid_window"
    else:
        assert parse_seconds(text) == expected


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("5", 5_000_000_000),
        ("0.25", 250_000_000),
        (".5", 500_000_000),
        ("5.", 5_000_000_000),
        ("0.3", 300_000_000),  # a float would give 299999999
        ("0.000000001", 1),
        ("0.0000000010", 1),  # trailing zeros past 9 digits are still whole ns
        ("007.100", 7_100_000_000),
        ("9223372036.854775807", MAX_WINDOW_NS),
    ],
)
def test_good_windows(text: str, ns: int) -> None:
    assert parse_seconds(text) == ns


@pytest.mark.parametrize(
    "text",
    ["", ".", "0", "0.0", "-1", "+1", "1e3", "1E3", " 1", "1 ", "1,5", "inf", "nan", "0x10",
     "0.0000000001", "0.0000000015", "9223372036.854775808", "99999999999", "\u0663", "1..2",
     "1_000"],
)  # fmt: skip
def test_bad_windows_are_invalid_window(text: str) -> None:
    with pytest.raises(ApiError) as raised:
        parse_seconds(text)
    assert raised.value.code == "invalid_window"
    assert raised.value.status == 400


@given(st.text(max_size=30))
def test_any_text_is_a_window_or_invalid_window(text: str) -> None:
    try:
        ns = parse_seconds(text)
    except ApiError as error:
        assert error.code == "invalid_window"
    else:
        assert 1 <= ns <= MAX_WINDOW_NS


def test_stats_query_takes_exponent_or_seconds_not_both() -> None:
    assert parse_stats_query({"symbol": "S", "exponent": "2"}).exponent == 2
    query = parse_stats_query({"symbol": "S", "seconds": "1.5"})
    assert isinstance(query, TimeWindowQuery)
    assert (query.exponent, query.window_ns) == (0, 1_500_000_000)
    for params, code in (
        ({"symbol": "S", "exponent": "2", "seconds": "1"}, "invalid_window"),
        ({"symbol": "S", "exponent": "9", "seconds": "1"}, "invalid_window"),
        ({"symbol": "S", "seconds": "x"}, "invalid_window"),
        ({"symbol": "S"}, "invalid_exponent"),
    ):
        with pytest.raises(ApiError) as raised:
            parse_stats_query(params)
        assert raised.value.code == code, params


def test_seconds_with_bytes_that_are_not_utf8_is_invalid_window() -> None:
    with pytest.raises(ApiError) as raised:
        parse_query_string("symbol=S&seconds=%FF")
    assert raised.value.code == "invalid_window"


# --- POST /add_batch/ decoding ------------------------------------------------------------


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_timestamps_are_decoded_to_int64() -> None:
    batch = BatchDecoder(10).decode(body(symbol="S", values=[1, 2], timestamps=[0, 2**63 - 1]))
    assert batch.timestamps is not None
    assert batch.timestamps.dtype == np.int64
    assert batch.timestamps.tolist() == [0, 2**63 - 1]
    assert BatchDecoder(10).decode(body(symbol="S", values=[1], timestamps=None)).timestamps is None
    assert BatchDecoder(10).decode(body(symbol="S", values=[1])).timestamps is None


@pytest.mark.parametrize(
    ("timestamps", "needle"),
    [
        ([1], "has 1 items, `values` has 2"),
        ([1, 2, 3], "has 3 items"),
        ([], "has 0 items"),
        ([1, -1], "timestamps[1] is invalid (negative)"),
        ([1, 2**63], "timestamps[1] is invalid (above 2**63 - 1)"),
        ([1, 10**30], "timestamps[1] is invalid"),
        ([1.0, 2], "timestamps[0] is invalid"),
        (["1", 2], "timestamps[0] is invalid"),
        ([True, 2], "timestamps[0] is invalid"),
        ([None, 2], "timestamps[0] is invalid"),
        ([[1], 2], "timestamps[0] is invalid"),
        ("1,2", "`timestamps` must be an array"),
        ({"a": 1}, "`timestamps` must be an array"),
        (7, "`timestamps` must be an array"),
    ],
)
def test_bad_timestamps_are_invalid_timestamps(timestamps, needle: str) -> None:
    with pytest.raises(ApiError) as raised:
        BatchDecoder(10).decode(body(symbol="S", values=[1, 2], timestamps=timestamps))
    assert raised.value.code == "invalid_timestamps"
    assert needle in raised.value.message


def timed_body(count: int, timestamps: object = "each") -> bytes:
    """A batch of `count` values; `timestamps` "each" (one per value), or a JSON value as is."""
    values = ",".join(["1"] * count)
    if timestamps == "each":
        stamps = "[" + ",".join(str(10**18 + i) for i in range(count)) + "]"
    else:
        stamps = json.dumps(timestamps)
    return f'{{"symbol":"S","values":[{values}],"timestamps":{stamps}}}'.encode()


@pytest.mark.parametrize("limit", [1, 2, 3, 50, 1000])
def test_a_full_batch_with_timestamps_is_never_too_large(limit: int) -> None:
    batch = BatchDecoder(limit).decode(timed_body(limit))
    assert batch.values.shape[0] == limit
    assert batch.timestamps is not None and batch.timestamps.shape[0] == limit


@pytest.mark.parametrize("limit", [1, 2, 3, 50, 1000])
@pytest.mark.parametrize("timestamps", ["each", None, [], [1], [-1], "x"])
def test_one_value_too_many_is_413_whatever_the_timestamps(limit: int, timestamps) -> None:
    """Size comes first: even with missing, short or bad timestamps, 413 and not a 400."""
    with pytest.raises(ApiError) as raised:
        BatchDecoder(limit).decode(timed_body(limit + 1, timestamps))
    assert raised.value.code == "batch_too_large", raised.value.message
    assert f"has {limit + 1} values" in raised.value.message


def test_a_symbol_named_timestamps_does_not_loosen_the_size_check() -> None:
    values = ",".join(["1"] * 11)
    with pytest.raises(ApiError) as raised:
        BatchDecoder(10).decode(f'{{"symbol":"timestamps","values":[{values}]}}'.encode())
    assert raised.value.code == "batch_too_large"


# --- POST /stats/batch: seconds items -----------------------------------------------------


def make_store(engine=None, clamp: bool = False, **retention: int) -> Store:
    return Store(
        engine or NumpyEngine(),
        retention=RetentionPolicy(**retention) if retention else RetentionPolicy(),
        max_symbols=100,
        starting_capacity=16,
        clamp_out_of_order=clamp,
    )


def test_batch_items_with_seconds_are_time_windows() -> None:
    store = make_store()
    values = np.array([1.0, 2.0, 3.0, 4.0])
    store.ingest("S", values, timestamps=np.array([0, 10**9, 2 * 10**9, 3 * 10**9]))
    queries = [
        {"symbol": "S", "seconds": 1},
        {"symbol": "S", "exponent": 1},
        {"symbol": "S", "seconds": 0.5},
        {"symbol": "S", "seconds": 2.000000001},
        {"symbol": "S", "seconds": 1, "exponent": 1},
        {"symbol": "S", "seconds": "1"},
        {"symbol": "S", "seconds": -1},
        {"symbol": "S", "seconds": 0},
        {"symbol": "S", "seconds": None},
        {"symbol": "S", "seconds": [1]},
        {"symbol": 5, "seconds": 1},
        {"seconds": 1},
        {"symbol": "T", "seconds": 1},
        {"symbol": "S"},
    ]
    items = StatsBatchDecoder(100).decode(json.dumps({"queries": queries}).encode())
    assert items[0] == ("S", time_key(10**9))
    assert items[1] == ("S", 1)
    results = msgspec.json.decode(answer(store, items))["results"]
    assert results[0] == {"min": 3.0, "max": 4.0, "last": 4.0, "avg": 3.5, "var": 0.25,
                          "count": 2, "seconds": 1}  # fmt: skip
    assert set(results[1]) == {"min", "max", "last", "avg", "var"}
    assert results[2]["count"] == 1 and results[2]["seconds"] == 0.5
    assert results[3]["count"] == 3 and results[3]["min"] == 2.0
    codes = [r.get("code") for r in results[4:]]
    assert codes == ["invalid_window"] * 6 + ["invalid_symbol", "missing_parameter",
                                               "unknown_symbol", "invalid_exponent"]  # fmt: skip
    assert "not a string" not in results[5]["error"] and "JSON number" in results[5]["error"]


def test_seconds_in_a_batch_are_read_from_the_digits_not_a_float() -> None:
    items = StatsBatchDecoder(10).decode(
        b'{"queries":[{"symbol":"S","seconds":9223372036.854775807},'
        b'{"symbol":"S","seconds":0.3},{"symbol":"S","seconds":1e-3}]}'
    )
    assert items[0] == ("S", time_key(MAX_WINDOW_NS))
    assert items[1] == ("S", time_key(300_000_000))
    assert isinstance(items[2], ApiError) and items[2].code == "invalid_window"


def test_exponent_only_batches_ignore_seconds_in_a_symbol_name() -> None:
    items = StatsBatchDecoder(10).decode(b'{"queries":[{"symbol":"\\"seconds\\"","exponent":1}]}')
    assert items == [('"seconds"', 1)]


# --- Store.stats_seconds against numpy ----------------------------------------------------

_batches = st.lists(
    st.tuples(
        st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=20),
        st.booleans(),  # with timestamps?
        st.integers(0, 5),  # a random start offset (ns, x 1e8) for its times
        st.lists(st.integers(0, 3 * 10**8), min_size=20, max_size=20),  # gaps
    ),
    min_size=1,
    max_size=12,
)


class Model:
    """What the store should hold: every value with its resolved timestamp."""

    def __init__(self, clamp: bool) -> None:
        self.clamp = clamp
        self.values: list[float] = []
        self.times: list[int] = []

    def add(self, values: list[float], times: list[int] | None, received: int) -> None:
        newest = self.times[-1] if self.times else None
        if times is None:
            stamp = received if newest is None else max(received, newest)
            times = [stamp] * len(values)
        elif self.clamp:
            floor = newest if newest is not None else times[0]
            resolved = []
            for t in times:
                floor = max(floor, t)
                resolved.append(floor)
            times = resolved
        self.values += values
        self.times += times

    def window(self, held: int, window_ns: int) -> np.ndarray:
        values = np.array(self.values[-held:])
        times = np.array(self.times[-held:], dtype=np.int64)
        return values[times >= times[-1] - window_ns]


def check_against(store: Store, model: Model, windows: list[int]) -> None:
    held = store.length("S")
    assert store.newest_timestamp("S") == model.times[-1]
    # Windows that end exactly on held timestamps: the boundary is inclusive (>=).
    times = model.times[-held:]
    edges = {times[-1] - times[i] for i in range(0, held, max(1, held // 5))} - {0}
    for window_ns in [*windows, *sorted(edges)]:
        expected = model.window(held, window_ns)
        result = store.stats_seconds("S", window_ns)
        assert result.count == expected.size >= 1, window_ns
        assert (result.min, result.max, result.last) == (
            expected.min(),
            expected.max(),
            expected[-1],
        )
        assert result.avg == pytest.approx(expected.mean(), rel=1e-9, abs=1e-9)
        assert result.var == pytest.approx(expected.var(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("engine_name", ["numpy", "compiled"])
@pytest.mark.parametrize("clamp", [False, True])
@settings(max_examples=40)
@given(
    batches=_batches,
    windows=st.lists(st.integers(1, 5 * 10**9), min_size=1, max_size=6),
    retention=st.sampled_from([None, (7, 3), (25, 0), (40, 30)]),
)
def test_stats_seconds_matches_a_numpy_model(
    engine_name: str, clamp: bool, batches, windows, retention
) -> None:
    engine = engines()[engine_name]
    kwargs = {} if retention is None else {"max_values": retention[0],
                                           "keep_after_cleanup": retention[1]}  # fmt: skip
    store = make_store(engine, clamp=clamp, **kwargs)
    model = Model(clamp)
    clock = 10**18
    for values, timed, offset, gaps in batches:
        clock += 10**8
        received = clock
        times = None
        if timed:
            # Event times around the clock: may go backwards against the newest (and, with
            # clamp, within the batch) to exercise refusal and clamping.
            start = clock - offset * 10**8
            steps = np.array(gaps[: len(values)], dtype=np.int64)
            if clamp:
                steps -= 10**8  # some steps go back
            times = (start + np.cumsum(steps)).tolist()
        array = np.array(values, dtype=np.float64)
        stamps = None if times is None else np.array(times, dtype=np.int64)
        newest = model.times[-1] if model.times else None
        goes_back = times is not None and (
            any(b < a for a, b in itertools.pairwise(times))
            or (newest is not None and times[0] < newest)
        )
        if goes_back and not clamp:
            before = (store.length("S"), store.newest_timestamp("S"), store.version("S"))
            with pytest.raises(OutOfOrderError):
                store.ingest("S", array, timestamps=stamps, received_ns=received)
            assert (store.length("S"), store.newest_timestamp("S"), store.version("S")) == before
            continue
        store.ingest("S", array, timestamps=stamps, received_ns=received)
        model.add(values, times, received)
        if retention is not None:
            assert store.length("S") <= retention[0]
        check_against(store, model, windows)
    if model.times:
        check_against(store, model, [1, MAX_WINDOW_NS])
        # Count windows are unaffected by time windows answered in between.
        held = store.length("S")
        assert store.stats("S", 1).count == min(10, held)


def test_stats_many_mixes_count_and_time_windows_in_one_call() -> None:
    store = make_store()
    store.ingest("A", np.arange(1.0, 11.0), timestamps=np.arange(10, dtype=np.int64) * 10**9)
    store.ingest("B", np.array([5.0, 6.0]))
    got = store.stats_many([("A", time_key(2 * 10**9)), ("A", 1), ("B", time_key(1)), ("C", 1)])
    assert got[0] is not None and (got[0].count, got[0].min) == (3, 8.0)
    assert got[1] is not None and got[1].count == 10
    assert got[2] is not None and got[2].count == 2  # one batch: one receive time
    assert got[3] is None
