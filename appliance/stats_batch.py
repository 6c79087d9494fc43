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
that item's `invalid_window`. A time window goes to the store in the same `stats_columns` call
as the count windows (key `time_key(ns)`), and its answer adds `count` and `seconds`.

Why columns (`decode_columns`, `answer_columns`): a 10k-query batch is then a list of symbols
and an int64 array in, and the answer is each distinct result encoded once and joined by the
per-query index, so no Python runs per query on the common path (issue 13; measured in
benches/results/stats-batch-2026-12-05.md). `decode` and `answer` (the item list) remain for
bodies the server must look at item by item: a token restricted to some symbols.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Annotated, Any, NamedTuple

import msgspec
import numpy as np

from appliance.errors import ApiError
from appliance.store import StatsColumns, Store, time_key
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


_Exponent = Annotated[int, msgspec.Meta(ge=MIN_EXPONENT, le=MAX_EXPONENT)]


class _GoodItem(msgspec.Struct, gc=False):
    """An item of the common body: a string symbol and a JSON integer exponent in range
    (msgspec's strict mode refuses `true`, `1.0` and `"1"` as it decodes, in C)."""

    symbol: str
    exponent: _Exponent


class _GoodBody(msgspec.Struct):
    queries: list[_GoodItem]


class _TimedItem(msgspec.Struct, gc=False):
    """A query of a body that mentions `seconds`: `seconds` kept as its raw JSON text (b"" when
    absent), so a window is read exactly from the digits the client sent, never via a float."""

    symbol: _Scalar | msgspec.UnsetType = msgspec.UNSET
    exponent: _Scalar | msgspec.UnsetType = msgspec.UNSET
    seconds: msgspec.Raw = msgspec.Raw(b"")


class _TimedBody(msgspec.Struct):
    queries: list[_TimedItem]


_SYMBOL_AND_EXPONENT = attrgetter("symbol", "exponent")
_SYMBOL = attrgetter("symbol")
_EXPONENT = attrgetter("exponent")


class QueryColumns(NamedTuple):
    """A decoded batch as columns: the answerable queries (`symbols[i]`, `keys[i]`: an exponent
    or `time_key(ns)`) and the items that are errors, with where each stands in the batch.

    `positions` is None when every item is a query (the common body: no index array needed);
    else the item index of each query, and `error_positions` those of `errors`.
    """

    symbols: list[str]
    keys: np.ndarray
    positions: np.ndarray | None
    errors: list[ApiError]
    error_positions: np.ndarray


class _QueriesProbe(msgspec.Struct):
    """Only the raw bytes of `queries`: counts the items without building them."""

    queries: msgspec.Raw


class StatsBatchDecoder:
    """Decodes POST /stats/batch bodies; one per app (the msgspec decoders are reusable)."""

    def __init__(self, max_queries: int) -> None:
        self.max_queries = max_queries
        self._decoder = msgspec.json.Decoder(_Body)
        self._good_decoder = msgspec.json.Decoder(_GoodBody)
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

    def decode_columns(self, body: bytes) -> QueryColumns:
        """`decode` as columns (the same queries and the same errors, in the same places).

        Fast path, for a body of exponent queries only, every one well typed and in range (a
        dashboard's batch): one strict C decode, then two C `map`s over the items, no Python
        per item. Anything else (an invalid item, `seconds`, a whole-body error) takes
        `decode`'s path, which decides every error exactly as before.
        """
        self._check_count(body)
        if b'"seconds"' not in body:
            try:
                queries = self._good_decoder.decode(body).queries
            except msgspec.MsgspecError:
                pass  # an item's error or the body's: `decode` says which
            else:
                keys = np.fromiter(map(_EXPONENT, queries), dtype=np.int64, count=len(queries))
                return QueryColumns(list(map(_SYMBOL, queries)), keys, None, [], _NO_POSITIONS)
        return columns_of(self.decode(body))

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


_NO_POSITIONS = np.empty(0, dtype=np.int64)


def columns_of(items: list[Query | ApiError]) -> QueryColumns:
    """The columns of a decoded item list (per-item Python: the path of bodies with errors,
    time windows or a token's symbol restrictions)."""
    symbols: list[str] = []
    keys: list[int] = []
    positions: list[int] = []
    errors: list[ApiError] = []
    error_positions: list[int] = []
    for index, item in enumerate(items):
        if type(item) is tuple:
            symbols.append(item[0])
            keys.append(item[1])
            positions.append(index)
        else:
            errors.append(item)
            error_positions.append(index)
    return QueryColumns(
        symbols,
        np.array(keys, dtype=np.int64),
        None if not errors else np.array(positions, dtype=np.int64),
        errors,
        np.array(error_positions, dtype=np.int64),
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
    """The 200 body for a decoded item list (`answer_columns` of its columns)."""
    return answer_columns(store, columns_of(items))


def answer_columns(store: Store, columns: QueryColumns) -> bytes:
    """The 200 body: `{"results": [...]}`, one result per item, in order, each GET /stats/'s
    success body or error body for it.

    The store answers every query in one call (`Store.stats_columns`: one state per symbol,
    each distinct query computed once). Each DISTINCT answer is encoded once (float
    formatting would otherwise be most of the work), and the body is the join of those parts
    in item order, picked by an index array in C (`map` over the parts' `__getitem__`): no
    Python runs per item.
    """
    result = store.stats_columns(columns.symbols, columns.keys)
    parts = _distinct_parts(result)
    if columns.positions is None:
        order = result.inverse
    else:  # error items: their parts after the distinct answers', placed by position
        order = np.empty(columns.positions.shape[0] + len(columns.errors), dtype=np.int64)
        order[columns.positions] = result.inverse
        order[columns.error_positions] = np.arange(len(parts), len(parts) + len(columns.errors))
        parts.extend(_encode(error.to_body()) for error in columns.errors)
    if not parts:
        return b'{"results":[]}'
    # One join builds the whole body: every part but the first carries its leading comma, the
    # first the opening and a last part the closing. Concatenating a prefix and a suffix to a
    # joined megabyte would copy it twice more, and each fresh megabyte costs its page faults
    # (most of the encode time on this VM: benches/results/stats-batch-2026-12-05.md).
    picks = order.tolist()
    first = picks[0]
    parts = [b"," + part for part in parts]
    parts.append(b'{"results":[' + parts[first][1:])
    parts.append(b"]}")
    picks[0] = len(parts) - 2
    picks.append(len(parts) - 1)
    return b"".join(map(parts.__getitem__, picks))


def _distinct_parts(result: StatsColumns) -> list[bytes]:
    """The encoded answer of each distinct query: GET /stats/'s body, with `count` and
    `seconds` for a time window (key -ns), or the symbol's error body when it is unknown."""
    missing: dict[int, bytes] = {}
    parts: list[bytes] = []
    for slot, key, found in zip(
        result.pair_slots.tolist(), result.pair_keys.tolist(), result.answers, strict=True
    ):
        if found is None:
            part = missing.get(slot)
            if part is None:
                part = missing[slot] = _encode(unknown_symbol(result.names[slot]).to_body())
        elif key > 0:
            part = _encode(stats_body(found))
        else:
            part = _encode(time_stats_body(found, -key))
        parts.append(part)
    return parts


_encode = msgspec.json.Encoder().encode  # the same bytes as the app's json_response
