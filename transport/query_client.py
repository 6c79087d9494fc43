"""Read from the appliance in Python: a small client for the REST API.

    from transport.query_client import QueryClient

    with QueryClient("http://127.0.0.1:8080") as client:
        client.wait_ready(timeout_s=30)
        s = client.stats("EUR/USD", 3)  # Stats(min=..., max=..., last=..., avg=..., var=...)
        client.history("EUR/USD", start=0, end=1_000_000)
        client.symbols()

Why this shape:

- One persistent HTTP/1.1 keep-alive connection (`http.client`, standard library): a query costs
  one round trip, never a TCP handshake. Not thread-safe, like the publishers: one client per
  thread.
- A connection the server closed while idle (keep-alive timeout, restart) is reopened and the
  request sent once more, but only for requests that change nothing: GET and POST /stats/batch.
  `add_batch` is never resent: REST batches carry no sequence number, so when a connection
  drops after the server applied a batch but before its answer arrived, a resend would append
  the values twice. It raises `TransportError` instead and the caller decides (the binary
  publishers, whose frames are numbered, are the way to get exactly-once appends).
- Every answer the appliance refuses raises a typed `ApplianceError` subclass carrying the
  machine code, message and HTTP status (`UnknownSymbolError`, `InvalidExponentError`,
  `BatchTooLargeError`, ...): one class per code of `appliance.errors.ERROR_CODES`, grouped under
  a family class per status (`InvalidRequestError` for 400, `NotFoundError` for 404,
  `UnavailableError` for 503), so `except InvalidRequestError` catches every 400. A test checks
  the mapping against that table, so a new code cannot be missed. A code this client does not
  know (a newer server) still raises the family class of its status.
- No answer at all (refused, reset, timed out) raises `TransportError`, also a `ConnectionError`;
  an answer that is not the API's JSON (a proxy's HTML page, another service on the port) raises
  `UnexpectedResponseError`. Neither is confused with a refusal by the appliance.
- Results are plain Python (frozen msgspec structs) or numpy (`stats_batch_arrays`); JSON is
  decoded and encoded with msgspec, straight into the result types.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlencode, urlsplit

import msgspec
import numpy as np

__all__ = [
    "ApplianceError",
    "BatchTooLargeError",
    "EmptyBatchError",
    "EmptyRangeError",
    "ForbiddenError",
    "HistoryDisabledError",
    "HistoryStats",
    "InternalServerError",
    "InvalidBodyError",
    "InvalidExponentError",
    "InvalidIntervalError",
    "InvalidJsonError",
    "InvalidRangeError",
    "InvalidRequestError",
    "InvalidSymbolError",
    "InvalidTimestampsError",
    "InvalidValueError",
    "InvalidWindowError",
    "MethodNotAllowedError",
    "MissingParameterError",
    "NotFoundError",
    "NotReadyError",
    "OutOfOrderError",
    "PartitionUnavailableError",
    "Probe",
    "QueryClient",
    "RateLimitedError",
    "Seconds",
    "Stats",
    "StatsArrays",
    "StorageUnavailableError",
    "SymbolInfo",
    "SymbolLimitError",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
    "UnexpectedResponseError",
    "UnknownSymbolError",
    "UnsupportedMediaTypeError",
    "error_from_body",
]

DEFAULT_URL = "http://127.0.0.1:8080"
JSON = "application/json"

# ------------------------------------------------------------------ errors


class ApplianceError(Exception):
    """Base of every error the client raises: `code`, `message` and HTTP `status`.

    `status` is None when no HTTP answer came back (`TransportError`). For an item of
    `stats_batch`, it is the status GET /stats/ would have answered for that query.
    """

    status_family: ClassVar[int | None] = None  # the HTTP status of the codes this class covers

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else self.status_family

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, status={self.status!r})"

    @classmethod
    def from_body(cls, status: int, body: bytes | Mapping[str, Any]) -> ApplianceError:
        """The typed error for an error answer (see `error_from_body`)."""
        return error_from_body(status, body)


class TransportError(ApplianceError, ConnectionError):
    """No answer from the appliance: connection refused or reset, timeout, bad URL.

    Code `transport_error`, status None. Also a `ConnectionError`, so code that already
    handles network failures catches it.
    """

    def __init__(self, message: str) -> None:
        super().__init__("transport_error", message, None)


class UnexpectedResponseError(ApplianceError):
    """An answer that is not the appliance's JSON: not JSON, or not the expected shape.

    Code `unexpected_response`; `status` is the HTTP status received. Usually something else
    answers on that port (a proxy, another service), or client and server versions disagree.
    """

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__("unexpected_response", message, status)


class InvalidRequestError(ApplianceError):
    """400: the request was refused as malformed (every 400 code derives from this)."""

    status_family = 400


class InvalidJsonError(InvalidRequestError):
    """`invalid_json`: the body is not valid JSON (this client always sends valid JSON)."""


class InvalidBodyError(InvalidRequestError):
    """`invalid_body`: the body is not the object the route expects."""


class InvalidSymbolError(InvalidRequestError):
    """`invalid_symbol`: empty, over 64 UTF-8 bytes, or with control characters."""


class EmptyBatchError(InvalidRequestError):
    """`empty_batch`: `add_batch` with no values."""


class InvalidValueError(InvalidRequestError):
    """`invalid_value`: a negative or non-finite value (NaN is sent as null); the message names
    the first bad index."""


class InvalidExponentError(InvalidRequestError):
    """`invalid_exponent`: not an integer in 1..8."""


class InvalidWindowError(InvalidRequestError):
    """`invalid_window`: `seconds` is not a positive decimal, or both `exponent` and `seconds`."""


class InvalidTimestampsError(InvalidRequestError):
    """`invalid_timestamps`: timestamps that are not int64 ns >= 0, or not one per value."""


class OutOfOrderError(InvalidRequestError):
    """`out_of_order`: the batch's timestamps go backwards; nothing of it was applied."""


class MissingParameterError(InvalidRequestError):
    """`missing_parameter`: a required parameter (`symbol`) is missing."""


class BadHttpRequestError(InvalidRequestError):
    """`bad_request`: the HTTP request itself was refused (status 400, or 431 and other 4xx)."""


class InvalidRangeError(InvalidRequestError):
    """`invalid_range`: history bounds that are not indexes/times, negative, or start >= end."""


class InvalidIntervalError(InvalidRequestError):
    """`invalid_interval`: a GET /history/bars interval that is not `<integer><unit>`."""


class UnauthorizedError(ApplianceError):
    """401 `unauthorized`: the server runs with `auth.mode = "token"` and this client sent no
    token or an unknown one (pass `token=`)."""

    status_family = 401


class ForbiddenError(ApplianceError):
    """403 `forbidden`: the token's role or symbol patterns do not allow this."""

    status_family = 403


class NotFoundError(ApplianceError):
    """404 (`not_found`: no such path, e.g. a server older than the route)."""

    status_family = 404


class UnknownSymbolError(NotFoundError):
    """`unknown_symbol`: no values were ever accepted for the symbol."""


class EmptyRangeError(NotFoundError):
    """`empty_range`: the history range holds no value (the message gives the held range)."""


class HistoryDisabledError(NotFoundError):
    """`history_disabled`: history needs `[durability] enabled = true` on the server."""


class MethodNotAllowedError(ApplianceError):
    """405 `method_not_allowed`."""

    status_family = 405


class SymbolLimitError(ApplianceError):
    """409 `symbol_limit`: a new symbol while `store.max_symbols` exist."""

    status_family = 409


class BatchTooLargeError(ApplianceError):
    """413 `batch_too_large`: too many values (`store.max_batch_size`), too many queries
    (`server.max_stats_queries`) or a body over `server.max_body_bytes`. Not split by the client:
    a batch is applied, and a stats batch answered, atomically."""

    status_family = 413


class UnsupportedMediaTypeError(ApplianceError):
    """415 `unsupported_media_type` (this client always sends application/json)."""

    status_family = 415


class RateLimitedError(ApplianceError):
    """429 `rate_limited`: the token's requests or values per second are spent; nothing was
    applied. The server's `Retry-After` says how many seconds to wait."""

    status_family = 429


class InternalServerError(ApplianceError):
    """500 `internal_error`: a server fault, logged by the server."""

    status_family = 500


class UnavailableError(ApplianceError):
    """503: the appliance cannot serve this now; retrying later may succeed."""

    status_family = 503


class NotReadyError(UnavailableError):
    """`not_ready`: starting (write-ahead log replay) or stopping."""


class StorageUnavailableError(UnavailableError):
    """`storage_unavailable`: the write-ahead log cannot be written; nothing was applied."""


class PartitionUnavailableError(UnavailableError):
    """`partition_unavailable` (cluster mode): the symbol's partition is moving to another
    node; retry (a write with the same Idempotency-Key is applied once)."""


# Every code of appliance.errors.ERROR_CODES (tests/transport/test_query_client_errors.py checks
# the two agree, statuses included). Spelled out, not imported: the client stays readable on its
# own and a newer server's code still maps by status (`_FAMILY_BY_STATUS`).
ERROR_CLASSES: Mapping[str, type[ApplianceError]] = {
    "invalid_json": InvalidJsonError,
    "invalid_body": InvalidBodyError,
    "invalid_symbol": InvalidSymbolError,
    "empty_batch": EmptyBatchError,
    "invalid_value": InvalidValueError,
    "invalid_exponent": InvalidExponentError,
    "invalid_window": InvalidWindowError,
    "invalid_timestamps": InvalidTimestampsError,
    "out_of_order": OutOfOrderError,
    "missing_parameter": MissingParameterError,
    "bad_request": BadHttpRequestError,
    "invalid_range": InvalidRangeError,
    "invalid_interval": InvalidIntervalError,
    "unauthorized": UnauthorizedError,
    "forbidden": ForbiddenError,
    "rate_limited": RateLimitedError,
    "not_found": NotFoundError,
    "unknown_symbol": UnknownSymbolError,
    "empty_range": EmptyRangeError,
    "history_disabled": HistoryDisabledError,
    "method_not_allowed": MethodNotAllowedError,
    "symbol_limit": SymbolLimitError,
    "batch_too_large": BatchTooLargeError,
    "unsupported_media_type": UnsupportedMediaTypeError,
    "internal_error": InternalServerError,
    "not_ready": NotReadyError,
    "storage_unavailable": StorageUnavailableError,
    "partition_unavailable": PartitionUnavailableError,
}

_FAMILY_BY_STATUS: Mapping[int, type[ApplianceError]] = {
    cls.status_family: cls
    for cls in (
        InvalidRequestError,
        UnauthorizedError,
        ForbiddenError,
        NotFoundError,
        MethodNotAllowedError,
        SymbolLimitError,
        BatchTooLargeError,
        UnsupportedMediaTypeError,
        RateLimitedError,
        InternalServerError,
        UnavailableError,
    )
    if cls.status_family is not None
}


class _ErrorBody(msgspec.Struct):
    error: str
    code: str


_ERROR_DECODER = msgspec.json.Decoder(_ErrorBody)


def error_from_body(status: int | None, body: bytes | Mapping[str, Any]) -> ApplianceError:
    """The typed error for an `{"error", "code"}` body (raw bytes or decoded) and its status.

    The class comes from the code; an unknown code gets the family class of its status (or
    `ApplianceError`). A body that is not such JSON gives `UnexpectedResponseError`.
    Returned, not raised: `stats_batch` keeps per-item errors as values.
    """
    try:
        if isinstance(body, bytes | bytearray | memoryview):
            parsed = _ERROR_DECODER.decode(body)
        else:
            parsed = msgspec.convert(body, _ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return UnexpectedResponseError(
            f"HTTP {status} with a body that is not the appliance's JSON error: {_excerpt(body)}",
            status,
        )
    cls = ERROR_CLASSES.get(parsed.code)
    if cls is None:
        cls = _FAMILY_BY_STATUS.get(status or 0, ApplianceError)
    return cls(parsed.code, parsed.error, status)


def _excerpt(body: object, limit: int = 200) -> str:
    if isinstance(body, bytes | bytearray | memoryview):
        text = bytes(body[:limit]).decode("utf-8", errors="replace")
        return repr(text) + ("..." if len(body) > limit else "")
    return repr(body)[:limit]


# ------------------------------------------------------------------ results


class Stats(msgspec.Struct, frozen=True):
    """Statistics over the last min(10^exponent, n) values (GET /stats/), or over a time window.

    `var` is the population variance. `avg`/`var` are None only when float64 arithmetic
    overflows (values spread by more than ~1e154); `min`, `max`, `last` are stored values.
    A time window (`seconds=`) also has `count` (values in it) and `seconds` (the window, as
    the server echoed it); both are None for a count window.
    """

    min: float
    max: float
    last: float
    avg: float | None
    var: float | None
    count: int | None = None
    seconds: float | None = None


class HistoryStats(msgspec.Struct, frozen=True):
    """Statistics over [start, end) of a symbol's whole history (GET /history/stats).

    Indexes count from the first value ever accepted for the symbol; `first_ns`/`last_ns` are
    the receive times (ns since the epoch) of the batches holding the first and last value.
    """

    symbol: str
    count: int
    min: float
    max: float
    avg: float | None
    var: float | None
    first: float
    last: float
    first_index: int
    last_index: int
    first_ns: int
    last_ns: int


class SymbolInfo(msgspec.Struct, frozen=True):
    """One row of GET /symbols: values in the hot tier (what `stats` covers) and values ever
    accepted (`total`, None when the server runs without durability)."""

    symbol: str
    hot: int
    total: int | None


@dataclass(frozen=True, slots=True)
class StatsArrays:
    """`stats_batch_arrays`' answer: one float64 array per statistic, one row per query.

    A failed query has NaN in every statistic, its code in `codes` and False in `ok`; `codes`
    is "" for answered queries. `errors` maps the row to its typed error.
    """

    min: np.ndarray
    max: np.ndarray
    last: np.ndarray
    avg: np.ndarray
    var: np.ndarray
    ok: np.ndarray
    codes: np.ndarray
    errors: dict[int, ApplianceError] = field(default_factory=dict)
    # int64, values in each time window (`Seconds` queries); -1 for count windows and failures.
    count: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Seconds:
    """A time window for `stats_batch` queries: `("EUR/USD", Seconds(0.5))` beside
    `("EUR/USD", 3)`. `seconds` is what `QueryClient.stats(seconds=...)` takes: an int, a float
    (its shortest decimal form), a Decimal, decimal text, or a timedelta."""

    seconds: int | float | Decimal | str | timedelta


@dataclass(frozen=True, slots=True)
class Probe:
    """The outcome of a probe (`health`, `ready`, `live`): true when it answered 200.

    `body` is the decoded JSON answer: `{"status": ...}` or, on 503, the `not_ready` error body
    with whatever progress the server reports.
    """

    ok: bool
    status: int
    body: dict[str, Any]

    def __bool__(self) -> bool:
        return self.ok


class _Results(msgspec.Struct):
    results: list[_Item]


class _Item(msgspec.Struct):
    """An item of POST /stats/batch: the five statistics or an error body."""

    min: float | None = None
    max: float | None = None
    last: float | None = None
    avg: float | None = None
    var: float | None = None
    count: int | None = None
    seconds: float | None = None
    error: str | None = None
    code: str | None = None


class _Symbols(msgspec.Struct):
    symbols: list[SymbolInfo]


class _Added(msgspec.Struct):
    added: int


class _StatsQuery(msgspec.Struct):
    symbol: str
    exponent: int


class _TimeQuery(msgspec.Struct):
    symbol: str
    seconds: msgspec.Raw | str  # a JSON number with every digit; text that is not one: a string


class _StatsBatchBody(msgspec.Struct):
    queries: list[_StatsQuery | _TimeQuery]


class _AddBatchBody(msgspec.Struct, omit_defaults=True):
    symbol: str
    values: list[float]
    timestamps: list[int] | None = None  # omitted when None: the body is as before timestamps


# ------------------------------------------------------------------ the client

# What a reused keep-alive connection raises when the server closed it while idle.
_STALE_CONNECTION = (
    http.client.RemoteDisconnected,
    http.client.CannotSendRequest,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class QueryClient:
    """A client of the appliance's REST API over one keep-alive connection. Not thread-safe.

    `url` is `http://host:port` (or `https://`, with an optional path prefix behind a proxy);
    `timeout_s` bounds connecting and each socket read. `token`, when given, is sent as
    `Authorization: Bearer <token>`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout_s: float = 5.0,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://host[:port] or https://..., got {url!r}")
        self.url = url
        self.timeout_s = timeout_s
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Accept": JSON}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        port = parts.port
        if parts.scheme == "https":
            self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, port, timeout=timeout_s, context=ssl_context
            )
        else:
            self._conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout_s)
        self._used = False  # a request went over the current connection (it may be stale)
        self._closed = False

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the connection. Idempotent; the client cannot be used afterwards."""
        self._closed = True
        self._conn.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- statistics

    def stats(
        self,
        symbol: str,
        exponent: int | None = None,
        seconds: int | float | Decimal | str | timedelta | None = None,
    ) -> Stats:
        """min, max, last, avg, var over the last 10^exponent values (fewer if the series is
        shorter), or, with `seconds`, over the values whose timestamp is at or after the
        symbol's newest timestamp minus `seconds` (the answer adds `count` and `seconds`).
        Give one of the two (TypeError otherwise). `seconds` goes out as exact decimal text: a
        float as its shortest decimal form (0.1 is "0.1"), a timedelta to the microsecond.
        Raises `UnknownSymbolError`, `InvalidExponentError`, `InvalidWindowError`,
        `InvalidSymbolError`."""
        if (exponent is None) == (seconds is None):
            raise TypeError("give exponent (a count window) or seconds (a time window), not both")
        if seconds is None:
            window = f"exponent={_exponent_text(exponent)}"  # type: ignore[arg-type]
        else:
            window = f"seconds={quote(_seconds_text(seconds), safe='')}"
        status, body = self._request("GET", f"/stats/?symbol={quote(symbol, safe='')}&{window}")
        return self._decode(status, body, Stats)

    def stats_batch(
        self, queries: Iterable[tuple[str, int | Seconds]]
    ) -> list[Stats | ApplianceError]:
        """Many `stats` queries in one request, answered in order from one consistent state of
        each symbol: `(symbol, exponent)` or `(symbol, Seconds(x))` for a time window. A failed
        query's item is its typed error (returned, not raised: the other items are answered).
        Raises only when the whole request is refused, e.g. `BatchTooLargeError` above
        `server.max_stats_queries` (10_000 by default)."""
        return [_item_result(item) for item in self._stats_batch(queries)]

    def stats_batch_arrays(self, queries: Iterable[tuple[str, int | Seconds]]) -> StatsArrays:
        """`stats_batch` as float64 arrays (NaN where a query failed or `avg`/`var` is null);
        `count` holds each time window's count (-1 for count windows and failed queries)."""
        items = self._stats_batch(queries)
        n = len(items)
        columns = {name: np.full(n, np.nan) for name in ("min", "max", "last", "avg", "var")}
        counts = np.full(n, -1, dtype=np.int64)
        codes = np.full(n, "", dtype=object)
        errors: dict[int, ApplianceError] = {}
        for row, item in enumerate(items):
            if item.code is not None:
                errors[row] = _item_result(item)  # type: ignore[assignment]
                codes[row] = item.code
                continue
            for name, column in columns.items():
                value = getattr(item, name)
                if value is not None:
                    column[row] = value
            if item.count is not None:
                counts[row] = item.count
        return StatsArrays(
            **columns, ok=codes == "", codes=codes.astype(str), errors=errors, count=counts
        )

    def _stats_batch(self, queries: Iterable[tuple[str, int | Seconds]]) -> list[_Item]:
        body = _StatsBatchBody([_batch_query(s, k) for s, k in queries])
        status, raw = self._request("POST", "/stats/batch", msgspec.json.encode(body))
        return self._decode(status, raw, _Results).results

    # -------------------------------------------------------------- history and symbols

    def history(
        self,
        symbol: str,
        start: int | str | datetime | None = None,
        end: int | str | datetime | None = None,
        *,
        by: Literal["index", "time"] = "index",
    ) -> HistoryStats:
        """Statistics over [start, end) of the symbol's whole history, evicted values included.

        `by="index"`: series indexes (0 = the first value ever accepted; an `end` past the
        newest is clipped). `by="time"`: receive times as integer ns since the epoch, ISO 8601
        text, or a `datetime` (naive = UTC, as the server reads ISO text without a zone).
        None: unbounded on that side. Needs durability on the server (`HistoryDisabledError`);
        `EmptyRangeError` when nothing is held there, `InvalidRangeError` for bad bounds.
        """
        params = {"symbol": symbol, "by": by}
        for name, bound in (("start", start), ("end", end)):
            if bound is not None:
                params[name] = _bound_text(bound)
        status, body = self._request("GET", "/history/stats?" + urlencode(params, quote_via=quote))
        return self._decode(status, body, HistoryStats)

    def symbols(self) -> list[SymbolInfo]:
        """Every symbol, sorted, with its hot-tier and total value counts."""
        status, body = self._request("GET", "/symbols")
        return self._decode(status, body, _Symbols).symbols

    # -------------------------------------------------------------- writing

    def add_batch(
        self,
        symbol: str,
        values: np.ndarray | Sequence[float],
        timestamps: np.ndarray | Sequence[int] | None = None,
    ) -> int:
        """Append `values` (any float64-convertible array or sequence) as one atomic batch;
        returns the number added. `timestamps`: each value's event time, integer ns since the
        epoch (or a numpy datetime64 array), one per value, non-decreasing and not before the
        symbol's newest (else `OutOfOrderError`, nothing applied, unless the server clamps);
        None: the server's receive time. Never resent on a dropped connection (see the module
        docstring): a `TransportError` here means the batch may or may not have been applied.
        For high rates use the binary publishers (`transport.publishers.connect`)."""
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        times = None if timestamps is None else _timestamps_list(timestamps)
        payload = msgspec.json.encode(_AddBatchBody(symbol, array.tolist(), times))
        status, body = self._request("POST", "/add_batch/", payload, idempotent=False)
        return self._decode(status, body, _Added).added

    # -------------------------------------------------------------- probes

    def health(self) -> Probe:
        """GET /health: true when the appliance accepts traffic. A 503 (`not_ready`, with the
        server's progress in `body`) is a false `Probe`, not an exception; other errors and
        `TransportError` (nothing answers) raise."""
        return self._probe("/health")

    def ready(self) -> Probe:
        """GET /ready: true once started and recovered; a false `Probe` on 503."""
        return self._probe("/ready")

    def live(self) -> Probe:
        """GET /live: true whenever the process serves HTTP (liveness, even while starting)."""
        return self._probe("/live")

    def wait_ready(self, timeout_s: float = 30.0, interval_s: float = 0.05) -> Probe:
        """Poll /ready until it answers 200, for at most `timeout_s`.

        Connection failures count as "not yet" (the server may not listen yet). On timeout,
        raises `NotReadyError` if the server was answering 503, else the last `TransportError`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                probe = self.ready()
                if probe:
                    return probe
                last: ApplianceError = error_from_body(probe.status, probe.body)
            except TransportError as exc:
                last = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        if isinstance(last, TransportError):
            raise TransportError(f"appliance not reachable after {timeout_s}s: {last.message}")
        raise NotReadyError("not_ready", f"not ready after {timeout_s}s: {last.message}", 503)

    def _probe(self, path: str) -> Probe:
        status, body = self._request("GET", path)
        if status in (200, 503):
            try:
                decoded = msgspec.json.decode(body)
            except msgspec.DecodeError:
                decoded = None
            if isinstance(decoded, dict):
                return Probe(status == 200, status, decoded)
        raise self._error(status, body)

    # -------------------------------------------------------------- HTTP

    def _request(
        self, method: str, path: str, body: bytes | None = None, *, idempotent: bool = True
    ) -> tuple[int, bytes]:
        """Send one request and read the whole answer (the connection is then free again).

        A reused connection that turns out closed by the server is reopened and the request
        sent once more when `idempotent`; anything else becomes `TransportError`.
        """
        if self._closed:
            raise TransportError("the client is closed")
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = JSON
        target = self._prefix + path
        reused = self._used
        try:
            return self._exchange(method, target, body, headers)
        except _STALE_CONNECTION as exc:
            self._conn.close()
            if not (reused and idempotent):
                raise self._transport_error(method, path, exc) from exc
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise self._transport_error(method, path, exc) from exc
        try:
            return self._exchange(method, target, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise self._transport_error(method, path, exc) from exc

    def _exchange(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        self._used = False  # a new connection may be opened by request(); set once answered
        self._conn.request(method, target, body=body, headers=headers)
        response = self._conn.getresponse()
        data = response.read()
        if response.will_close:
            self._conn.close()  # the server said Connection: close (e.g. while stopping)
        else:
            self._used = True
        return response.status, data

    def _transport_error(self, method: str, path: str, exc: BaseException) -> TransportError:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, socket.timeout | TimeoutError):
            reason = f"no answer within {self.timeout_s}s"
        return TransportError(f"{method} {self.url}{path}: {reason}")

    def _decode(self, status: int, body: bytes, kind: type[Any]) -> Any:
        if status != 200:
            raise self._error(status, body)
        try:
            return msgspec.json.decode(body, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UnexpectedResponseError(
                f"HTTP 200 that is not a {kind.__name__.strip('_')} answer ({exc}): "
                f"{_excerpt(body)}",
                status,
            ) from None

    @staticmethod
    def _error(status: int, body: bytes) -> ApplianceError:
        return error_from_body(status, body)


def _item_result(item: _Item) -> Stats | ApplianceError:
    if item.code is not None:
        cls = ERROR_CLASSES.get(item.code, ApplianceError)
        return cls(item.code, item.error or "", cls.status_family)
    if item.min is None or item.max is None or item.last is None:
        return UnexpectedResponseError(f"a /stats/batch item without statistics: {item!r}", 200)
    return Stats(item.min, item.max, item.last, item.avg, item.var, item.count, item.seconds)


def _exponent_int(exponent: int) -> int:
    """Refuse what JSON would not carry as an integer; the server checks the range (1..8)."""
    if isinstance(exponent, bool) or not isinstance(exponent, int | np.integer):
        raise TypeError(f"exponent must be an int, got {type(exponent).__name__}")
    return int(exponent)


def _exponent_text(exponent: int) -> str:
    return str(_exponent_int(exponent))


# The server's spelling of a window: digits with an optional fraction, no sign, no exponent.
_PLAIN_DECIMAL = re.compile(r"([0-9]*)(?:\.([0-9]*))?", re.ASCII)


def _seconds_text(seconds: int | float | Decimal | str | timedelta) -> str:
    """A window as decimal text, never through binary rounding the caller did not ask for.

    A float is sent as its shortest round-trip form (what `repr` shows, without an exponent);
    a timedelta is whole microseconds. Text is sent as it is: the server judges it.
    """
    if isinstance(seconds, bool):
        raise TypeError("seconds must be a number, text or timedelta, got bool")
    if isinstance(seconds, str):
        return seconds
    if isinstance(seconds, timedelta):
        return _plain(Decimal(seconds // timedelta(microseconds=1)).scaleb(-6))
    if isinstance(seconds, int | np.integer):
        return str(int(seconds))
    if isinstance(seconds, float | np.floating):
        return _plain(Decimal(repr(float(seconds))))
    if isinstance(seconds, Decimal):
        return _plain(seconds)
    raise TypeError(f"seconds must be a number, text or timedelta, got {type(seconds).__name__}")


def _plain(number: Decimal) -> str:
    """`number` in positional notation ("1e-7" -> "0.0000001"); NaN and infinities as text."""
    return format(number, "f")


def _batch_query(symbol: str, window: int | Seconds) -> _StatsQuery | _TimeQuery:
    if not isinstance(window, Seconds):
        return _StatsQuery(symbol, _exponent_int(window))
    text = _seconds_text(window.seconds)
    match = _PLAIN_DECIMAL.fullmatch(text)
    if match is None or not (match.group(1) or match.group(2)):
        return _TimeQuery(symbol, text)  # not a number: the server answers the item's error
    # As a valid JSON number: no leading zeros, digits on both sides of the point.
    whole = match.group(1).lstrip("0") or "0"
    fraction = match.group(2)
    return _TimeQuery(symbol, msgspec.Raw(f"{whole}.{fraction}" if fraction else whole))


def _timestamps_list(timestamps: np.ndarray | Sequence[int]) -> list[int]:
    """Integer ns since the epoch (datetime64 converted); floats are refused, not rounded."""
    array = np.asarray(timestamps).reshape(-1)
    if array.dtype.kind == "M":
        array = array.astype("datetime64[ns]").view(np.int64)
    elif array.size and array.dtype.kind not in "iu":
        raise TypeError(
            f"timestamps must be integer ns since the epoch or datetime64, got {array.dtype}"
        )
    return [int(t) for t in array.tolist()]


def _bound_text(bound: int | str | datetime) -> str:
    if isinstance(bound, datetime):
        if bound.tzinfo is None:
            bound = bound.replace(tzinfo=UTC)
        return str((bound - _EPOCH) // timedelta(microseconds=1) * 1000)
    if isinstance(bound, bool) or not isinstance(bound, int | str | np.integer):
        raise TypeError(f"a history bound is an int, str or datetime, got {type(bound).__name__}")
    return str(bound)
