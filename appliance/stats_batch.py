"""POST /stats/batch: many GET /stats/ queries in one request, answered in order.

Why a module of its own: the batch has two kinds of failure. A body the server cannot read as a
list of queries (not JSON, not an object, `queries` not a list of objects, too many of them) is
one ApiError for the whole request, raised before the store is touched. A query the server can
read but not answer (unknown symbol, bad exponent) is that item's error only, with exactly the
code and message GET /stats/ would answer for it, and the batch still answers 200. Keeping both
rules next to each other keeps the two endpoints in step.

Per item, the checks are GET /stats/'s, in its order: `symbol` present, exponent an integer
1..8, then the store lookup, with the symbol's own rules (`validate_symbol`) applied only on a
miss. JSON has types where a query string has only text: the exponent must be a JSON integer
(`true`, `1.0` and `"1"` are not), and the symbol a string.

An item may ask for a time window instead: `seconds`, a JSON number read exactly from its text
(the same rules as GET /stats/?seconds=, `parse_seconds`); both `exponent` and `seconds` is
that item's `invalid_window`. A time window goes to the store in the same `stats_many` call as
the count windows (key `time_key(ns)`), and its answer adds `count` and `seconds`.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import msgspec

from appliance.errors import ApiError
from appliance.store import Store, time_key
from appliance.validation import (
    MAX_EXPONENT,
    MIN_EXPONENT,
    both_windows,
    count_array_elements,
    count_byte,
    decode_body,
    format_seconds,
    invalid_exponent,
    invalid_window,
    parse_seconds,
    shorten,
    validate_symbol,
)
from engine_core.contract import WindowStats

# Any JSON scalar: a mistyped symbol or exponent is its item's error, not the body's. Arrays and
# objects are refused by the decoder as it meets them (invalid_body), never built in memory.
_Scalar = str | int | float | bool | None
_OPEN_BRACE = ord("{")
# The shortest body of n items is `{"queries":[{},{},...]}`: 3n + 13 bytes.
_BYTES_PER_ITEM = 3
_BODY_OVERHEAD = 13

# (symbol, exponent 1..8) or, for a time window, (symbol, `appliance.store.time_key(ns)`) < 0.
Query = tuple[str, int]


class _Item(msgspec.Struct, gc=False):
    """One query; unknown fields are ignored, as in POST /add_batch/ bodies. Only scalars in
    it, so no reference cycle: gc=False keeps 10k of them out of the cyclic collector."""

    symbol: _Scalar | msgspec.UnsetType = msgspec.UNSET
    exponent: _Scalar | msgspec.UnsetType = msgspec.UNSET


class _Body(msgspec.Struct):
    queries: list[_Item]


class _TimedItem(msgspec.Struct, gc=False):
    """A query of a body that mentions `seconds`: `seconds` kept as its raw JSON text (b"" when
    absent), so a window is read exactly from the digits the client sent, never via a float."""

    symbol: _Scalar | msgspec.UnsetType = msgspec.UNSET
    exponent: _Scalar | msgspec.UnsetType = msgspec.UNSET
    seconds: msgspec.Raw = msgspec.Raw(b"")


class _TimedBody(msgspec.Struct):
    queries: list[_TimedItem]


_SYMBOL_AND_EXPONENT = attrgetter("symbol", "exponent")


class _QueriesProbe(msgspec.Struct):
    """Only the raw bytes of `queries`: counts the items without building them."""

    queries: msgspec.Raw


class StatsBatchDecoder:
    """Decodes POST /stats/batch bodies; one per app (the msgspec decoders are reusable)."""

    def __init__(self, max_queries: int) -> None:
        self.max_queries = max_queries
        self._decoder = msgspec.json.Decoder(_Body)
        self._timed_decoder = msgspec.json.Decoder(_TimedBody)
        self._probe = msgspec.json.Decoder(_QueriesProbe)
        # A body no longer than this cannot hold max_queries + 1 items.
        self._short_body = _BYTES_PER_ITEM * (max_queries + 1) + _BODY_OVERHEAD - 1

    def decode(self, body: bytes) -> list[Query | ApiError]:
        """Each item as a (symbol, exponent) query to ask the store, or the error to answer.

        Raises ApiError for a body that is not a batch of queries, or holds too many.
        Hot path: one C decode, then a type check and a range check per item.
        """
        self._check_count(body)
        if b'"seconds"' in body:  # time windows: a decoder of their own (see _timed_queries)
            return _timed_queries(decode_body(self._timed_decoder, body, _body_error).queries)
        parsed = decode_body(self._decoder, body, _body_error)
        # attrgetter builds each (symbol, exponent) tuple in C; a good one is the query as is.
        return [
            pair
            if type(pair[0]) is str
            and type(pair[1]) is int
            and MIN_EXPONENT <= pair[1] <= MAX_EXPONENT
            else _item_error(*pair)
            for pair in map(_SYMBOL_AND_EXPONENT, parsed.queries)
        ]

    def _check_count(self, body: bytes) -> None:
        """413 before decoding: the 10M `{}` items a 32 MB body can hold would be as many
        Python objects (most of a gigabyte).

        Every item that survives the typed decode is an object, which opens with `{`: a body
        with at most max_queries + 1 braces (its own and one per item) cannot hold too many.
        Only past that bound are the items counted exactly (a Raw decode and vectorized
        counts, no object per item). A body too short to hold more items skips even the
        brace count.
        """
        if len(body) <= self._short_body or count_byte(body, _OPEN_BRACE) <= self.max_queries + 1:
            return
        raw = bytes(decode_body(self._probe, body, _body_error).queries)
        count = count_array_elements(raw)
        if count > self.max_queries:
            raise ApiError(
                "batch_too_large",
                f"batch has {count} queries; at most {self.max_queries} are accepted per "
                "request (server.max_stats_queries): split it",
            )


def _timed_queries(items: list[_TimedItem]) -> list[Query | ApiError]:
    """The queries of a body that mentions `seconds`: an item with `seconds` is a time window,
    asked of the store as (symbol, `time_key(ns)`); the others are checked as in `decode`.

    Only bodies holding the word `"seconds"` come here, so an exponent-only batch keeps the
    decoder without a `seconds` field and its one-comprehension path (the 10k-query cost).
    """
    queries: list[Query | ApiError] = []
    for item in items:
        symbol, exponent, raw = item.symbol, item.exponent, bytes(item.seconds)
        if not raw:
            if (
                type(symbol) is str
                and type(exponent) is int
                and (MIN_EXPONENT <= exponent <= MAX_EXPONENT)
            ):
                queries.append((symbol, exponent))
            else:
                queries.append(_item_error(symbol, exponent))
            continue
        try:
            if symbol is msgspec.UNSET:
                raise ApiError("missing_parameter", "`symbol` is required in every query")
            if exponent is not msgspec.UNSET:
                raise both_windows()
            window_ns = _window_of(raw)
            if type(symbol) is not str:
                raise _item_error(symbol, MIN_EXPONENT)  # the symbol's type error
        except ApiError as error:
            queries.append(error)
            continue
        queries.append((symbol, time_key(window_ns)))
    return queries


def _window_of(raw: bytes) -> int:
    """A `seconds` item as ns: a JSON number, read exactly from its text (`parse_seconds`: no
    sign, no exponent, at most 9 digits after the point)."""
    if raw.startswith(b'"'):
        shown = shorten(raw.decode("utf-8", "replace"))
        raise invalid_window(
            f"seconds {shown} is a string; send a JSON number of seconds (e.g. 0.25)"
        )
    return parse_seconds(raw.decode("utf-8", "replace"))


def _body_error(exc: msgspec.ValidationError) -> ApiError:
    message = str(exc)
    if message.startswith("Number out of range"):
        # SPEC section 5: a number that overflows to inf makes the body invalid JSON.
        return ApiError("invalid_json", f"a number overflows a float64: {message}")
    return ApiError(
        "invalid_body",
        f'body must be an object {{"queries": [{{"symbol": string, "exponent": integer}} or '
        f'{{"symbol": string, "seconds": number}}, ...]}}: '
        f"{message}",
    )


def _item_error(symbol: Any, exponent: Any) -> ApiError:
    """The error of an item the fast path refused, in GET /stats/'s order of checks."""
    if symbol is msgspec.UNSET:
        return ApiError("missing_parameter", "`symbol` is required in every query")
    if exponent is msgspec.UNSET:
        return ApiError(
            "invalid_exponent",
            f"`exponent` is required in every query (an integer {MIN_EXPONENT}..{MAX_EXPONENT})"
            ", or `seconds` for a time window",
        )
    if type(exponent) is not int or not MIN_EXPONENT <= exponent <= MAX_EXPONENT:
        error = invalid_exponent(shorten(msgspec.json.encode(exponent).decode()))
        if isinstance(exponent, str):
            error = ApiError(
                "invalid_exponent", f"{error.message}; send a JSON number, not a string"
            )
        return error
    return ApiError("invalid_symbol", f"symbol must be a JSON string, got {_json_type(symbol)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def unknown_symbol(symbol: str) -> ApiError:
    """What GET /stats/ and a batch item answer for a symbol the store does not hold: the
    symbol's own error if it is not a valid symbol at all, else unknown_symbol."""
    try:
        validate_symbol(symbol)
    except ApiError as error:
        return error
    return ApiError("unknown_symbol", f"unknown symbol {symbol!r}: no values were added for it")


def stats_body(result: WindowStats) -> dict[str, float]:
    """The GET /stats/ success body: exactly these five keys."""
    return {
        "min": result.min,
        "max": result.max,
        "last": result.last,
        "avg": result.avg,
        "var": result.var,
    }


def time_stats_body(result: WindowStats, window_ns: int) -> dict[str, Any]:
    """The success body of a time window (`seconds`): the five statistics, `count` (values in
    the window) and `seconds` (the window, echoed exactly as a JSON number)."""
    body: dict[str, Any] = stats_body(result)
    body["count"] = result.count
    body["seconds"] = msgspec.Raw(format_seconds(window_ns).encode())
    return body


def answer(store: Store, items: list[Query | ApiError]) -> bytes:
    """The 200 body: `{"results": [...]}`, one result per item, in order, each GET /stats/'s
    success body or error body for it.

    The store answers every query in one call (one state per symbol, each distinct query
    computed once). Each distinct result is encoded once and its bytes repeated: with 10k
    queries over a few symbols, float formatting would otherwise be most of the work.
    """
    results = iter(store.stats_many([item for item in items if type(item) is tuple]))
    found: dict[int, bytes] = {}  # by id(): `results` keeps every result alive meanwhile
    timed: dict[tuple[int, int], bytes] = {}  # time windows: by (id(result), key)
    missing: dict[str, bytes] = {}
    parts: list[bytes] = []
    for item in items:
        if type(item) is not tuple:
            parts.append(_encode(item.to_body()))
            continue
        result = next(results)
        if result is None:
            part = missing.get(item[0])
            if part is None:
                part = missing[item[0]] = _encode(unknown_symbol(item[0]).to_body())
        elif item[1] > 0:
            part = found.get(id(result))
            if part is None:
                part = found[id(result)] = _encode(stats_body(result))
        else:  # a time window (key -ns): GET /stats/?seconds='s body, count and seconds too
            part = timed.get((id(result), item[1]))
            if part is None:
                body = time_stats_body(result, -item[1])
                part = timed[(id(result), item[1])] = _encode(body)
        parts.append(part)
    return b'{"results":[' + b",".join(parts) + b"]}"


_encode = msgspec.json.Encoder().encode  # the same bytes as the app's json_response
