"""Request validation: every bad input maps to its SPEC code, and valid input arrives intact."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlencode

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.errors import ApiError
from appliance.validation import (
    BatchDecoder,
    check_values,
    count_array_elements,
    count_commas,
    parse_query_string,
    parse_stats_query,
    validate_symbol,
)

DECODER = BatchDecoder(max_batch_size=100)


def body(symbol: object = "S", values: object = (1.0,)) -> bytes:
    return json.dumps(
        {"symbol": symbol, "values": list(values) if isinstance(values, tuple) else values}
    ).encode()


def code_of(raw: bytes, decoder: BatchDecoder = DECODER) -> str:
    with pytest.raises(ApiError) as info:
        decoder.decode(raw)
    return info.value.code


def test_valid_batch_becomes_a_contiguous_float64_array() -> None:
    batch = DECODER.decode(body("EUR/USD", (1, 2.5, 0, 1e300)))
    assert batch.symbol == "EUR/USD"
    assert batch.values.dtype == np.float64
    assert batch.values.flags.c_contiguous
    assert batch.values.tolist() == [1.0, 2.5, 0.0, 1e300]


def test_negative_zero_is_normalized() -> None:
    values = DECODER.decode(b'{"symbol": "S", "values": [-0.0, -0]}').values
    assert not np.signbit(values).any()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b'{"symbol": "S", "values": [NaN]}', "invalid_json"),
        (b'{"symbol": "S", "values": [Infinity]}', "invalid_json"),
        (b'{"symbol": "S", "values": [1e400]}', "invalid_json"),
        (b'{"symbol": "S", "values": [-1e400]}', "invalid_json"),
        (b'{"symbol": "\xff", "values": [1]}', "invalid_json"),
        (b'{"symbol": "\\ud800", "values": [1]}', "invalid_json"),
        (
            b'{"symbol": "S", "values": [1], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "invalid_json",
        ),
        (b"[]", "invalid_body"),
        (b"1", "invalid_body"),
        (b"{}", "invalid_body"),
        (b'{"symbol": null, "values": [1]}', "invalid_body"),
        (b'{"symbol": "S", "values": null}', "invalid_body"),
        (b'{"symbol": ["S"], "values": [1]}', "invalid_body"),
        (b'{"symbol": "", "values": [1]}', "invalid_symbol"),
        (b'{"symbol": "S", "values": []}', "empty_batch"),
        (b'{"symbol": "S", "values": [-1]}', "invalid_value"),
        (b'{"symbol": "S", "values": [-1e-300]}', "invalid_value"),
        (b'{"symbol": "S", "values": [true]}', "invalid_value"),
        (b'{"symbol": "S", "values": ["1"]}', "invalid_value"),
        (b'{"symbol": "S", "values": [null]}', "invalid_value"),
        (b'{"symbol": "S", "values": [[1]]}', "invalid_value"),
        (b'{"symbol": "S", "values": [{}]}', "invalid_value"),
    ],
)
def test_bad_bodies_map_to_spec_codes(raw: bytes, code: str) -> None:
    assert code_of(raw) == code


def test_empty_symbol_is_checked_before_values() -> None:
    assert code_of(b'{"symbol": "", "values": []}') == "invalid_symbol"


def test_batch_over_max_batch_size_is_batch_too_large_with_413() -> None:
    with pytest.raises(ApiError) as info:
        BatchDecoder(max_batch_size=3).decode(body(values=(1, 2, 3, 4)))
    assert (info.value.code, info.value.status) == ("batch_too_large", 413)
    assert BatchDecoder(max_batch_size=3).decode(body(values=(1, 2, 3))).values.size == 3


@given(
    st.lists(st.floats(min_value=0, allow_nan=False, allow_infinity=False), max_size=50),
    st.integers(min_value=0, max_value=50),
    st.sampled_from([-1.5, True, False, None, "x", [1.0], {"a": 1}]),
)
def test_invalid_value_names_the_first_bad_index(
    good: list[float], position: int, bad: object
) -> None:
    position = min(position, len(good))
    values = [*good[:position], bad, *good[position:], bad]
    with pytest.raises(ApiError) as info:
        DECODER.decode(json.dumps({"symbol": "S", "values": values}).encode())
    assert info.value.code == "invalid_value"
    assert f"values[{position}]" in info.value.message


@given(
    st.lists(
        st.floats(min_value=0, allow_nan=False, allow_infinity=False), min_size=1, max_size=100
    )
)
def test_any_valid_batch_round_trips_exactly(values: list[float]) -> None:
    decoded = DECODER.decode(json.dumps({"symbol": "S", "values": values}).encode()).values
    np.testing.assert_array_equal(decoded, np.array(values, dtype=np.float64) + 0.0)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape_as_anything_but_api_error(raw: bytes) -> None:
    try:
        DECODER.decode(raw)
    except ApiError as exc:
        assert exc.status in (400, 413)


@given(st.text(max_size=80))
def test_arbitrary_symbols_are_accepted_or_invalid_symbol(symbol: str) -> None:
    raw = json.dumps({"symbol": symbol, "values": [1]}).encode()
    try:
        assert DECODER.decode(raw).symbol == symbol
    except ApiError as exc:
        assert exc.code in ("invalid_symbol", "invalid_json")


@pytest.mark.parametrize(
    "symbol", ["EUR/USD", "BRK.B", "SPY INDEX", "日本円-USD", "x" * 64, "é" * 32]
)
def test_spec_symbols_are_valid(symbol: str) -> None:
    assert validate_symbol(symbol) == symbol


@pytest.mark.parametrize(
    "symbol", ["", "x" * 65, "é" * 33, "a\tb", "a\x00", "\x1f", "a\x7f", "a\x80", "a\x9f", "\ud800"]
)
def test_bad_symbols_are_invalid_symbol(symbol: str) -> None:
    with pytest.raises(ApiError) as info:
        validate_symbol(symbol)
    assert info.value.code == "invalid_symbol"


@pytest.mark.parametrize(("raw", "exponent"), [("1", 1), ("8", 8), ("01", 1), ("0008", 8)])
def test_stats_query_ok(raw: str, exponent: int) -> None:
    query = parse_stats_query({"symbol": "AAPL", "exponent": raw})
    assert (query.symbol, query.exponent) == ("AAPL", exponent)


@pytest.mark.parametrize("raw", ["\uff10", "\u0661", "\uff11", "9" * 40, "1" * 25])
def test_non_ascii_or_huge_exponents_are_invalid(raw: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_stats_query({"symbol": "S", "exponent": raw})
    assert info.value.code == "invalid_exponent"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({}, "missing_parameter"),
        ({"exponent": "1"}, "missing_parameter"),
        ({"symbol": "S"}, "invalid_exponent"),
        *[
            ({"symbol": "S", "exponent": raw}, "invalid_exponent")
            for raw in ["", "0", "00", "9", "10", "-1", "+1", " 1", "1 ", "1.0", "1e0", "x"]
        ],
    ],
)
def test_stats_query_errors(params: dict, code: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_stats_query(params)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("query_string", "expected"),
    [
        ("", {}),
        ("symbol=AAPL&exponent=1", {"symbol": "AAPL", "exponent": "1"}),
        ("symbol=A&symbol=B", {"symbol": "A"}),
        ("symbol=&exponent", {"symbol": "", "exponent": ""}),
        ("symbol=EUR%2FUSD&x=a+b", {"symbol": "EUR/USD", "x": "a b"}),
        ("symbol=%E6%97%A5%E6%9C%AC", {"symbol": "日本"}),
        ("symbol=%00", {"symbol": "\x00"}),
        ("exponent=%2B1", {"exponent": "+1"}),
    ],
)
def test_parse_query_string(query_string: str, expected: dict) -> None:
    assert parse_query_string(query_string) == expected


@pytest.mark.parametrize(
    ("query_string", "code"),
    [
        ("symbol=%FF&exponent=1", "invalid_symbol"),
        ("symbol=A%C3&exponent=1", "invalid_symbol"),  # truncated sequence
        ("symbol=%ED%A0%80&exponent=1", "invalid_symbol"),  # an encoded surrogate
        ("symbol=A&exponent=%FF", "invalid_exponent"),
        ("symbol=A&exponent=1&x=%FE", "bad_request"),
        ("%FF=1&symbol=A&exponent=1", "bad_request"),
    ],
)
def test_percent_encoded_bytes_that_are_not_utf8_are_rejected(query_string: str, code: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_query_string(query_string)
    assert (info.value.code, info.value.status) == (code, 400)


@given(st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=5))
def test_parse_query_string_agrees_with_parse_qs(params: dict[str, str]) -> None:
    query_string = urlencode(params)
    reference = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
    assert parse_query_string(query_string) == reference


@pytest.mark.parametrize(
    ("raw", "count"),
    [
        (b"[]", 0),
        (b"[ ]", 0),
        (b"[1]", 1),
        (b"[1, 2,3]", 3),
        (b'[1, "a,b,\\",c", 2]', 3),
        (b'[1, [2, 3], {"a": 1, "b": [4, 5]}, 6]', 4),
        (b'[["x,y"], "]"]', 2),
        (b"{}", 0),
    ],
)
def test_count_array_elements_counts_top_level_only(raw: bytes, count: int) -> None:
    assert count_array_elements(raw) == count


@pytest.mark.parametrize("bad", [b"-1", b'"x"', b"null", b"[1, 2]", b'{"a": 1}', b"true", b"1e400"])
def test_oversized_batch_is_413_even_with_a_bad_value(bad: bytes) -> None:
    raw = b'{"symbol": "S", "values": [' + b"1," * 100 + bad + b"]}"
    with pytest.raises(ApiError) as info:
        DECODER.decode(raw)
    assert (info.value.code, info.value.status) == ("batch_too_large", 413)
    assert "101 values" in info.value.message


def test_oversized_batch_is_413_without_decoding_the_values(monkeypatch) -> None:
    decoder = BatchDecoder(max_batch_size=100)
    monkeypatch.setattr(decoder, "_decoder", None)  # the typed decode must not run
    with pytest.raises(ApiError) as info:
        decoder.decode(body(values=(1.0,) * 101))
    assert info.value.code == "batch_too_large"


@pytest.mark.parametrize(
    "raw",
    [
        # Many commas elsewhere (a long symbol, an extra field) but few values: accepted.
        b'{"symbol": "S", "x": "' + b"," * 300 + b'", "values": [1, 2]}',
        b'{"symbol": "S", "x": [' + b"0," * 300 + b'0], "values": [1, 2]}',
    ],
)
def test_commas_outside_values_do_not_count(raw: bytes) -> None:
    assert DECODER.decode(raw).values.tolist() == [1.0, 2.0]


def test_oversized_invalid_json_is_invalid_json_not_413() -> None:
    # The exact count needs valid JSON: broken JSON is still invalid_json.
    assert code_of(b'{"symbol": "S", "values": [' + b"1," * 200 + b"]") == "invalid_json"


@given(st.binary(max_size=300))
def test_count_commas_agrees_with_bytes_count(data: bytes) -> None:
    assert count_commas(data) == data.count(b",")


def test_a_batch_of_exactly_max_values_skips_the_exact_count(monkeypatch) -> None:
    decoder = BatchDecoder(max_batch_size=100)
    monkeypatch.setattr(decoder, "_probe", None)  # the exact (Raw) count must not run
    assert decoder.decode(body(values=(1.0,) * 100)).values.size == 100


# --- check_values: the value check shared by REST and the binary transports -----------------


def check_code(values: np.ndarray) -> str:
    with pytest.raises(ApiError) as info:
        check_values(values)
    return info.value.code


def test_check_values_returns_a_valid_array_itself() -> None:
    values = np.array([0.0, 1.5, 1e308, 5e-324])
    assert check_values(values) is values


def test_check_values_accepts_a_read_only_view_without_copying() -> None:
    raw = np.array([1.0, 2.0]).tobytes()
    values = np.frombuffer(raw, dtype=np.float64)
    assert not values.flags.writeable
    assert check_values(values) is values


@pytest.mark.parametrize("writeable", [True, False])
def test_check_values_normalizes_negative_zero_in_a_copy(writeable: bool) -> None:
    values = np.array([1.0, -0.0, 0.0, -0.0])
    values.flags.writeable = writeable
    result = check_values(values)
    assert result is not values
    assert result.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert not np.signbit(result).any()
    assert np.signbit(values).tolist() == [False, True, False, True]  # the input is untouched


@pytest.mark.parametrize(
    ("values", "index"),
    [
        ([-1.0], 0),
        ([1.0, 2.0, -5e-324], 2),
        ([1.0, np.nan, -1.0], 1),
        ([np.inf], 0),
        ([0.0, -np.inf], 1),
        ([3.0, 2.0, 1.0, np.nan], 3),
    ],
)
def test_check_values_names_the_first_bad_index(values: list[float], index: int) -> None:
    with pytest.raises(ApiError) as info:
        check_values(np.array(values))
    assert info.value.code == "invalid_value"
    assert f"values[{index}]" in info.value.message


@pytest.mark.parametrize(
    ("values", "code"),
    [
        (np.array([], dtype=np.float64), "empty_batch"),
        (np.array([1, 2], dtype=np.int64), "invalid_value"),
        (np.array([1.0], dtype=np.float32), "invalid_value"),
        (np.ones((2, 2)), "invalid_value"),
        (np.float64(1.0).reshape(()), "invalid_value"),
    ],
)
def test_check_values_rejects_empty_and_non_flat_float64(values: np.ndarray, code: str) -> None:
    assert check_code(values) == code


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30))
def test_check_values_agrees_with_a_plain_loop(values: list[float]) -> None:
    array = np.array(values, dtype=np.float64)
    bad = [i for i, v in enumerate(values) if not (np.isfinite(v) and v >= 0)]
    if bad:
        with pytest.raises(ApiError) as info:
            check_values(array)
        assert f"values[{bad[0]}]" in info.value.message
    else:
        result = check_values(array)
        assert result.tolist() == [v + 0.0 for v in values]
        assert not np.signbit(result).any()
