"""The one error type the REST layer speaks, and the table of every machine-readable code.

Why a table: the HTTP status, the binary transports' nack reason, the OpenAPI document and the
tests all derive from this single mapping, so a code cannot exist in one place and be missing
in another. `ApiError` carries only a code and a human message; its status and wire reason come
from the table, never from the raiser.
"""

from __future__ import annotations

from dataclasses import dataclass

from transport.wire import Reason


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One row of SPEC section 5's error table (plus the service's own protocol-level rows)."""

    code: str
    status: int
    description: str
    # The nack reason a binary transport answers for the same refusal (docs/wire-format.md);
    # NONE for codes only REST can produce (a route, a method, a query parameter).
    wire_reason: Reason = Reason.NONE


_ROWS = (
    ErrorCode(
        "invalid_json",
        400,
        "The body is not valid JSON (includes NaN/Infinity tokens and "
        "numbers that overflow a float64).",
    ),
    ErrorCode(
        "invalid_body",
        400,
        "The body is not a JSON object, or a field is missing or has the wrong type.",
    ),
    ErrorCode(
        "invalid_symbol",
        400,
        "The symbol is empty, longer than 64 UTF-8 bytes, or contains control characters "
        "(in a query string: also percent-encoded bytes that are not valid UTF-8).",
        wire_reason=Reason.INVALID_SYMBOL,
    ),
    ErrorCode("empty_batch", 400, "`values` is an empty array.", wire_reason=Reason.EMPTY_BATCH),
    ErrorCode(
        "invalid_value",
        400,
        "A value is negative, non-finite, boolean, string, null or "
        "nested; the message names the first bad index.",
        wire_reason=Reason.INVALID_VALUE,
    ),
    ErrorCode(
        "invalid_exponent", 400, "`exponent` is missing, not a plain integer, or outside 1..8."
    ),
    ErrorCode(
        "invalid_window",
        400,
        "`seconds` is not a positive decimal (at least 1 ns, at most 2**63 - 1 ns), or both "
        "`exponent` and `seconds` were given (a window is one or the other); GET "
        "/history/rolling: `window` is missing, or `window`/`step` is not an integer >= 1.",
    ),
    ErrorCode(
        "invalid_timestamps",
        400,
        "`timestamps` is not an array of integers in 0..2**63-1 (ns since the epoch), or its "
        "length differs from `values`; on the wire, a negative timestamp.",
        wire_reason=Reason.INVALID_TIMESTAMP,
    ),
    ErrorCode(
        "out_of_order",
        400,
        "The batch's timestamps go backwards: its first is before the symbol's newest "
        'timestamp, or one is before its predecessor (`store.out_of_order = "reject"`); '
        "nothing of the batch was applied.",
        wire_reason=Reason.OUT_OF_ORDER,
    ),
    ErrorCode(
        "missing_parameter",
        400,
        "A required query parameter (`symbol`) is missing; in a POST /stats/batch result, the "
        "query has no `symbol`.",
    ),
    ErrorCode(
        "bad_request",
        400,
        "The HTTP request itself is malformed, rejected before routing (status 400, or "
        "431 when the request line and headers are too large); also a query parameter other "
        "than `symbol`/`exponent`/`seconds` (or a name) whose percent-encoded bytes are not UTF-8.",
    ),
    ErrorCode("not_found", 404, "No route matches the path."),
    ErrorCode("unknown_symbol", 404, "No values were ever accepted for this symbol."),
    ErrorCode(
        "invalid_range",
        400,
        "GET /history/stats: `start`/`end` is not an index (by=index) or a time (by=time: "
        "integer ns or ISO 8601), an index is negative, `start` is not below `end`, or `by` is "
        "neither `index` nor `time`; GET /history/rolling: `start`/`end` is not an index, "
        "`start` is not below `end`, the range is outside the held history, or it holds fewer "
        "values than one window.",
    ),
    ErrorCode(
        "invalid_interval",
        400,
        "GET /history/bars: `interval` is missing or not a positive integer followed by a "
        "unit (`ns`, `us`, `ms`, `s`, `m`, `h`, `d`), or is longer than 2**63 - 1 ns.",
    ),
    ErrorCode(
        "empty_range",
        404,
        "GET /history/stats: the range holds no value the warm tier has (beyond the newest, "
        "before the oldest kept, or a time range with no batch received in it); GET "
        "/history/bars: no value timestamped in the range; GET /history/rolling: retention "
        "deleted every value of the symbol.",
    ),
    ErrorCode(
        "history_disabled",
        404,
        "GET /history/stats, /history/bars, /history/rolling: history needs "
        "`[durability] enabled = true` (the warm tier).",
    ),
    ErrorCode(
        "unauthorized",
        401,
        'With `auth.mode = "token"`: no `Authorization: Bearer <token>` header, or an '
        "unknown token (the answer carries `WWW-Authenticate: Bearer`).",
    ),
    ErrorCode(
        "forbidden",
        403,
        "The token's role does not allow this route (read < write < admin), or its symbol "
        "patterns do not cover the symbol; in a POST /stats/batch result, that query's symbol.",
        wire_reason=Reason.FORBIDDEN,
    ),
    ErrorCode("method_not_allowed", 405, "The path exists but not for this HTTP method."),
    ErrorCode(
        "symbol_limit",
        409,
        "The batch would create a new symbol but `store.max_symbols` symbols already exist.",
        wire_reason=Reason.SYMBOL_LIMIT,
    ),
    ErrorCode(
        "batch_too_large",
        413,
        "More values than `store.max_batch_size`, more queries than `server.max_stats_queries` "
        "(POST /stats/batch), or a body larger than `server.max_body_bytes`; GET /history/bars "
        "and GET /history/rolling: an answer or range above its `[history]` limit; cluster "
        "mode: a batch (or an owner's answer) larger than the NATS server's `max_payload`.",
        wire_reason=Reason.BATCH_TOO_LARGE,
    ),
    ErrorCode(
        "unsupported_media_type",
        415,
        "POST body Content-Type is not application/json (charset, if given, must be utf-8).",
    ),
    ErrorCode(
        "rate_limited",
        429,
        "The token's requests per second or values per second are spent "
        "(`max_requests_per_s`, `max_values_per_s`); `Retry-After` says when to retry. "
        "Nothing of the request was applied.",
    ),
    ErrorCode(
        "internal_error",
        500,
        "An unexpected server fault; it is logged. Client input never causes it.",
        wire_reason=Reason.INTERNAL,
    ),
    ErrorCode(
        "not_ready",
        503,
        "The appliance is not ready (GET /health, GET /ready): starting, replaying its "
        "write-ahead log, stopping, or failed to start; also a data request that waited "
        "`server.wait_for_ready_s` for the start to end, or came during a failed start.",
        wire_reason=Reason.UNAVAILABLE,
    ),
    ErrorCode(
        "partition_unavailable",
        503,
        "Cluster mode: the symbol's partition has no serving owner right now (it is moving to "
        "another node after a failure or a rebalance, or its owner did not answer within "
        "`cluster.request_timeout_s`); `Retry-After` says when to retry. A write with the same "
        "`Idempotency-Key` is applied at most once.",
        wire_reason=Reason.UNAVAILABLE,
    ),
    ErrorCode(
        "storage_unavailable",
        503,
        "The write-ahead log cannot be written (disk full, file too large, I/O error): nothing "
        "of the batch was applied; retry later.",
        wire_reason=Reason.UNAVAILABLE,
    ),
)

ERROR_CODES: dict[str, ErrorCode] = {row.code: row for row in _ROWS}


class ApiError(Exception):
    """A client-visible error, rendered as `{"error": message, "code": code}` + table status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if code not in ERROR_CODES:
            raise KeyError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        # Only protocol errors relayed from the HTTP server (code bad_request) may carry a status of
        # their own (e.g. 408, 431); every service error uses its table status.
        self.status = status if status is not None else ERROR_CODES[code].status
        # Response headers the error needs: WWW-Authenticate on 401, Retry-After on 429.
        self.headers = headers

    def to_body(self) -> dict[str, str]:
        return {"error": self.message, "code": self.code}
