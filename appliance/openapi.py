"""The OpenAPI 3.1 document of the REST API, built in code from the same tables the app uses.

Why in code: error codes come from `appliance.errors.ERROR_CODES` and limits from the running
configuration, so the document cannot drift from the behaviour; tests check that every route
the app registers and every error code appear here.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from appliance.config import AppConfig
from appliance.errors import ERROR_CODES
from appliance.validation import MAX_EXPONENT, MAX_SYMBOL_BYTES, MIN_EXPONENT

_JSON = "application/json"

# Errors any route can produce (an unknown method on it, a malformed request, a server fault).
_COMMON = ("method_not_allowed", "bad_request", "internal_error")
# The errors a POST /stats/batch query can get as its item of a 200 answer.
_BATCH_ITEM_CODES = (
    "missing_parameter",
    "invalid_exponent",
    "invalid_window",
    "invalid_symbol",
    "unknown_symbol",
)
# A time window (`seconds`), as GET /stats/, POST /stats/batch and the docs describe it.
_TIME_WINDOW = (
    "a time window: the values whose timestamp is at or after (this symbol's newest timestamp "
    "- seconds), never the wall clock; it covers the hot values only (`store.max_data_retention`)"
)
_SECONDS_PATTERN = r"^([0-9]+\.?[0-9]*|\.[0-9]+)$"
_SECONDS_TEXT = (
    "a positive decimal number of seconds (digits, optional fraction: `5`, `0.25`, `.5`; no "
    "sign, no exponent, at most 9 digits after the point), at least 1 ns and at most 2**63-1 ns"
)


def _window_parameters(seconds_note: str) -> list[dict[str, Any]]:
    """The `exponent` / `seconds` query parameters, one or the other (GET /stats/, GET /stream;
    appliance.validation.parse_seconds reads every `seconds`)."""
    return [
        {
            "name": "exponent",
            "in": "query",
            "required": False,
            "description": "window = the last 10^exponent values (a plain decimal integer); "
            "percent-encoded non-UTF-8 bytes are 400 `invalid_exponent`. Required unless "
            "`seconds` is given (neither: 400 `invalid_exponent`; both: 400 `invalid_window`)",
            "schema": {"type": "integer", "minimum": MIN_EXPONENT, "maximum": MAX_EXPONENT},
        },
        {
            "name": "seconds",
            "in": "query",
            "required": False,
            "description": f"{_TIME_WINDOW}: {_SECONDS_TEXT}; otherwise 400 `invalid_window`. "
            + seconds_note,
            "schema": {"type": "string", "pattern": _SECONDS_PATTERN},
        },
    ]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


def _errors(*codes: str) -> dict[str, Any]:
    """One response per status, listing each code it can carry, with an example per code."""
    by_status: dict[int, list[str]] = defaultdict(list)
    for code in (*codes, *_COMMON):
        by_status[ERROR_CODES[code].status].append(code)
    responses: dict[str, Any] = {}
    for status, status_codes in sorted(by_status.items()):
        lines = "; ".join(f"`{c}`: {ERROR_CODES[c].description}" for c in status_codes)
        responses[str(status)] = {
            "description": lines,
            "content": {
                _JSON: {
                    "schema": _ref("Error"),
                    "examples": {
                        c: {"value": {"error": ERROR_CODES[c].description, "code": c}}
                        for c in status_codes
                    },
                }
            },
        }
    return responses


def _add_head_operations(paths: dict[str, Any]) -> None:
    """A HEAD operation beside every GET: same statuses and headers, no body is sent."""
    for path_item in paths.values():
        get = path_item.get("get")
        if get is None:
            continue
        path_item["head"] = {
            "operationId": get["operationId"] + "Head",
            "summary": get["summary"] + " (HEAD: status and headers only, no body)",
            **({"parameters": get["parameters"]} if "parameters" in get else {}),
            "responses": {
                status: {"description": response["description"]}
                for status, response in get["responses"].items()
            },
        }


def _schemas(config: AppConfig) -> dict[str, Any]:
    symbol = {
        "type": "string",
        "minLength": 1,
        "description": f"1 to {MAX_SYMBOL_BYTES} UTF-8 bytes, no control characters "
        "(C0, DEL, C1), e.g. `EUR/USD`, `BRK.B`, `SPY INDEX`.",
    }
    number = {"type": "number", "minimum": 0, "description": "finite, >= 0 (-0.0 counts as 0)"}
    # Engine arithmetic is float64: values near its maximum can overflow a sum. The engine is
    # left as it is and the document says so rather than promising a number that is not sent.
    avg_null = (
        "; null only when float64 arithmetic overflows, which needs values near the float64 "
        "maximum (about 1.8e308): e.g. [0, 1.7e308, 1.7e308]"
    )
    var_null = (
        "; null when the variance exceeds the float64 maximum (about 1.8e308), i.e. values "
        "spread by more than about 1.3e154 (e.g. [0, 1e200]), or with values near 1.8e308"
    )
    return {
        "Symbol": symbol,
        "AddBatchRequest": {
            "type": "object",
            "required": ["symbol", "values"],
            "properties": {
                "symbol": _ref("Symbol"),
                "values": {
                    "type": "array",
                    "items": number,
                    "minItems": 1,
                    "maxItems": config.store.max_batch_size,
                    "description": "Oldest first. Integers are accepted; booleans, strings, "
                    "null, nested arrays, NaN and infinities are not.",
                },
                "timestamps": _timestamps_schema(config),
            },
        },
        "AddBatchResponse": {
            "type": "object",
            "required": ["status", "symbol", "added"],
            "properties": {
                "status": {"type": "string", "const": "ok"},
                "symbol": _ref("Symbol"),
                "added": {"type": "integer", "minimum": 1},
            },
        },
        "StatsResponse": {
            "type": "object",
            "required": ["min", "max", "last", "avg", "var"],
            "additionalProperties": False,
            "properties": {
                "min": {"type": "number", "description": "never null: a stored value"},
                "max": {"type": "number", "description": "never null: a stored value"},
                "last": {"type": "number", "description": "the newest value of the series"},
                "avg": {"type": ["number", "null"], "description": "arithmetic mean" + avg_null},
                "var": {
                    "type": ["number", "null"],
                    "description": "population variance (M2 / count)" + var_null,
                },
            },
        },
        "TimeWindowStatsResponse": _time_window_stats_schema(avg_null, var_null),
        "StatsBatchRequest": {
            "type": "object",
            "required": ["queries"],
            "properties": {
                "queries": {
                    "type": "array",
                    "maxItems": config.server.max_stats_queries,
                    "description": "GET /stats/ queries, answered in this order (an empty list "
                    "answers an empty list). Unknown extra fields are ignored. A symbol or "
                    "exponent that is a JSON array or object makes the body `invalid_body`. "
                    "Each query has `exponent` (a count window) or `seconds` (a time window); "
                    "both: that item's `invalid_window`; neither: its `invalid_exponent`.",
                    "items": {
                        "type": "object",
                        "required": ["symbol"],
                        "properties": {
                            "symbol": _ref("Symbol"),
                            "exponent": {
                                "type": "integer",
                                "minimum": MIN_EXPONENT,
                                "maximum": MAX_EXPONENT,
                                "description": "window = 10^exponent values; a JSON integer "
                                '(`true`, `1.0` and `"1"` are invalid_exponent)',
                            },
                            "seconds": {
                                "type": "number",
                                "exclusiveMinimum": 0,
                                "description": f"{_TIME_WINDOW}. A JSON number, read exactly "
                                f"from its digits: {_SECONDS_TEXT} (a string, `1e-3` or `-1` "
                                "is that item's `invalid_window`). Its result adds `count` and "
                                "`seconds`.",
                            },
                        },
                    },
                },
            },
        },
        "StatsBatchResponse": {
            "type": "object",
            "required": ["results"],
            "properties": {
                "results": {
                    "type": "array",
                    "description": "One per query, in request order: the body GET /stats/ "
                    "would answer for it, success or error. An error result carries "
                    + ", ".join(f"`{c}`" for c in _BATCH_ITEM_CODES)
                    + " (a query without `symbol`: `missing_parameter`; a symbol that is not "
                    "a string: `invalid_symbol`).",
                    "items": {
                        "oneOf": [
                            _ref("StatsResponse"),
                            _ref("TimeWindowStatsResponse"),
                            _ref("Error"),
                        ]
                    },
                }
            },
        },
        "IngestCounters": {
            "type": "object",
            "description": "One socket kind's frame processor (since the appliance started).",
            "required": ["messages", "frames_applied", "values_applied", "rejected"],
            "properties": {
                "messages": {"type": "integer", "minimum": 0, "description": "received"},
                "frames_applied": {"type": "integer", "minimum": 0},
                "values_applied": {"type": "integer", "minimum": 0},
                "rejected": {
                    "type": "object",
                    "description": "frames per reason, lower-case wire reason names (`gap`, "
                    "`duplicate`, `bad_crc`, `invalid_value`, ...); duplicates are acked but "
                    "never applied twice, gaps on PULL/SUB are counted and still applied",
                    "additionalProperties": {"type": "integer", "minimum": 0},
                },
                "acks_dropped": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "ROUTER only: replies not delivered (publisher gone or not "
                    "reading its acks)",
                },
            },
        },
        "IngestResponse": {
            "type": "object",
            "required": ["transports"],
            "properties": {
                "transports": {
                    "type": "object",
                    "description": "One entry per enabled transport (`zmq`, `shm`, `rdma`); "
                    "empty when none is enabled.",
                    "properties": {
                        "zmq": {
                            "type": "object",
                            "description": "`endpoints` (bound addresses), `running`, one "
                            "IngestCounters per configured socket (`router`, `pull`, `sub`), "
                            "`control` (`requests`, `ops`) and `loop_errors`.",
                            "properties": {
                                "endpoints": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "running": {"type": "boolean"},
                                "router": _ref("IngestCounters"),
                                "pull": _ref("IngestCounters"),
                                "sub": _ref("IngestCounters"),
                                "loop_errors": {"type": "integer", "minimum": 0},
                            },
                        },
                        "shm": {
                            "type": "object",
                            "description": "shared-memory rings: counters per ring, and "
                            "`rings_reclaimed` (`gone`: the publisher died or detached; `idle`: "
                            "no frame nor attach for `transport.shm.idle_reclaim_s`)",
                            "properties": {
                                "rings_reclaimed": {
                                    "type": "object",
                                    "properties": {
                                        "gone": {"type": "integer", "minimum": 0},
                                        "idle": {"type": "integer", "minimum": 0},
                                    },
                                },
                            },
                        },
                        "rdma": {
                            "type": "object",
                            "description": "running: `status`, `device`, `rings_open`, `rings` "
                            "(per publisher id: `connected`, `writes`, `credit_writes`, "
                            "`consumer_position`, counters) and `totals`; enabled but not "
                            "running: `status: unavailable` and the `reason`",
                        },
                    },
                },
            },
        },
        "HistoryStatsResponse": _history_stats_schema(),
        "HistoryBarsResponse": _history_bars_schema(),
        "HistoryRollingResponse": _history_rolling_schema(),
        "SymbolsResponse": {
            "type": "object",
            "required": ["symbols"],
            "properties": {
                "symbols": {
                    "type": "array",
                    "description": "every symbol, sorted by name",
                    "items": {
                        "type": "object",
                        "required": ["symbol", "hot", "total"],
                        "properties": {
                            "symbol": _ref("Symbol"),
                            "hot": {
                                "type": "integer",
                                "minimum": 0,
                                "description": "values in the hot tier (what /stats/ covers)",
                            },
                            "total": {
                                "type": ["integer", "null"],
                                "minimum": 0,
                                "description": "values ever accepted, evicted ones included; "
                                "null when durability is disabled (nothing counts them)",
                            },
                        },
                    },
                }
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}},
        },
        "DeleteSymbolResponse": {
            "type": "object",
            "required": ["status", "symbol", "hot_values_dropped", "history"],
            "properties": {
                "status": {"const": "deleted"},
                "symbol": {"type": "string"},
                "hot_values_dropped": {"type": "integer", "minimum": 0},
                "history": {
                    "type": "string",
                    "description": "what happens to its history: kept in the warm tier (and "
                    "the index the next batch continues at), or none without durability",
                },
            },
        },
        "HealthNotReady": {
            "type": "object",
            "required": ["error", "code", "status"],
            "properties": {
                "error": {"type": "string"},
                "code": {"const": "not_ready"},
                "status": {"enum": ["starting", "replaying", "stopping", "failed"]},
                "progress": {
                    "type": "object",
                    "description": "only while replaying: write-ahead log segments done of "
                    "total, records and values replayed so far, seconds since the replay began",
                    "properties": {
                        "segments_total": {"type": "integer"},
                        "segments_done": {"type": "integer"},
                        "records": {"type": "integer"},
                        "values": {"type": "integer"},
                        "elapsed_s": {"type": "number"},
                    },
                },
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "code"],
            "properties": {
                "error": {"type": "string", "description": "what went wrong and how to fix it"},
                "code": {"type": "string", "enum": sorted(ERROR_CODES)},
            },
        },
    }


def _history_stats_schema() -> dict[str, Any]:
    number = {"type": "number"}
    nullable = {"type": ["number", "null"], "description": "null only on float64 overflow"}
    index = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "required": [
            "symbol",
            "count",
            "min",
            "max",
            "avg",
            "var",
            "first",
            "last",
            "first_index",
            "last_index",
            "first_ns",
            "last_ns",
        ],
        "properties": {
            "symbol": _ref("Symbol"),
            "count": {"type": "integer", "minimum": 1},
            "min": number,
            "max": number,
            "avg": nullable,
            "var": {**nullable, "description": "population variance; " + nullable["description"]},
            "first": {**number, "description": "the oldest value in the range"},
            "last": {**number, "description": "the newest value in the range"},
            "first_index": {**index, "description": "series index of `first`"},
            "last_index": {**index, "description": "series index of `last`"},
            "first_ns": {
                "type": "integer",
                "description": "timestamp (ns since the epoch) of `first`: its event time, or "
                "its batch's receive time when the batch had none",
            },
            "last_ns": {"type": "integer", "description": "timestamp of `last`, as `first_ns`"},
        },
    }


def _history_bars_schema() -> dict[str, Any]:
    def column(kind: dict[str, Any], description: str) -> dict[str, Any]:
        return {"type": "array", "items": kind, "description": description}

    number = {"type": "number"}
    nullable = {"type": ["number", "null"]}
    fields = {
        "time": column({"type": "integer"}, "bar start: a multiple of interval_ns since the epoch"),
        "open": column(number, "the bar's first value (index order)"),
        "high": column(number, "the bar's largest value"),
        "low": column(number, "the bar's smallest value"),
        "close": column(number, "the bar's last value"),
        "count": column({"type": "integer", "minimum": 1}, "values in the bar"),
        "avg": column(nullable, "the bar's mean; null only on float64 overflow"),
        "var": column(nullable, "population variance (M2 / count); null only on overflow"),
    }
    return {
        "type": "object",
        "description": "one item per non-empty bar in every array, oldest first",
        "required": ["symbol", "interval_ns", "start", "end", *fields],
        "properties": {
            "symbol": _ref("Symbol"),
            "interval_ns": {"type": "integer", "minimum": 1},
            "start": {"type": "integer", "description": "the range's start, ns since the epoch"},
            "end": {"type": "integer", "description": "the range's (exclusive) end, ns"},
            **fields,
        },
    }


def _history_bars_paths() -> dict[str, Any]:
    """GET /history/bars (issue 17)."""
    bound = "integer ns since the epoch or ISO 8601 (no zone = UTC), by value timestamp"
    return {
        "/history/bars": {
            "get": {
                "operationId": "historyBars",
                "summary": "OHLC bars over [start, end) of a symbol's full history (warm tier)",
                "description": "Bars start at multiples of the interval since the epoch; "
                "intervals without a value are omitted. At most `history.max_bars` bars.",
                "parameters": [
                    {"name": "symbol", "in": "query", "required": True, "schema": _ref("Symbol")},
                    {
                        "name": "interval",
                        "in": "query",
                        "required": True,
                        "description": "a positive integer and a unit: ns, us, ms, s, m, h, d "
                        "(e.g. `100ms`, `1m`)",
                        "schema": {"type": "string", "pattern": "^[0-9]+(ns|us|ms|s|m|h|d)$"},
                    },
                    {
                        "name": "start",
                        "in": "query",
                        "required": True,
                        "description": "inclusive; " + bound,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "end",
                        "in": "query",
                        "required": True,
                        "description": "exclusive; " + bound,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _ok("bars", "HistoryBarsResponse"),
                    **_errors(
                        "missing_parameter",
                        "invalid_symbol",
                        "invalid_interval",
                        "invalid_range",
                        "unknown_symbol",
                        "empty_range",
                        "history_disabled",
                        "batch_too_large",
                        "not_ready",
                    ),
                },
            }
        },
    }


def _history_rolling_schema() -> dict[str, Any]:
    def column(kind: dict[str, Any], description: str) -> dict[str, Any]:
        return {"type": "array", "items": kind, "description": description}

    number = {"type": "number"}
    nullable = {"type": ["number", "null"]}
    index = {"type": "integer", "minimum": 0}
    fields = {
        "positions": column(index, "history index of the window's last value"),
        "min": column(number, "the window's smallest value"),
        "max": column(number, "the window's largest value"),
        "avg": column(nullable, "the window's mean; null only on float64 overflow"),
        "var": column(nullable, "population variance (M2 / window); null only on overflow"),
    }
    return {
        "type": "object",
        "description": "one item per output position in every array, oldest first",
        "required": ["symbol", "window", "start", "end", "step", *fields],
        "properties": {
            "symbol": _ref("Symbol"),
            "window": {"type": "integer", "minimum": 1},
            "start": {
                **index,
                "description": "the range's first index (the held start if not given)",
            },
            "end": {**index, "description": "the range's (exclusive) end index"},
            "step": {"type": "integer", "minimum": 1},
            **fields,
        },
    }


def _history_rolling_paths() -> dict[str, Any]:
    """GET /history/rolling (issue 13)."""

    def integer(name: str, required: bool, description: str, minimum: int) -> dict[str, Any]:
        return {
            "name": name,
            "in": "query",
            "required": required,
            "description": description,
            "schema": {"type": "integer", "minimum": minimum},
        }

    return {
        "/history/rolling": {
            "get": {
                "operationId": "historyRolling",
                "summary": "Rolling min/max/avg/var over [start, end) of a symbol's full "
                "history (warm tier, by index)",
                "description": "For every step-th position p in [start + window - 1, end): the "
                "statistics of the window values ending at p. At most "
                "`history.max_rolling_values` values read and `history.max_rolling_positions` "
                "positions answered.",
                "parameters": [
                    {"name": "symbol", "in": "query", "required": True, "schema": _ref("Symbol")},
                    integer("window", True, "values per window", 1),
                    integer("start", False, "inclusive index; default: the first held", 0),
                    integer("end", False, "exclusive index; default: the held end", 0),
                    integer("step", False, "distance between output positions; default 1", 1),
                ],
                "responses": {
                    "200": _ok("rolling statistics", "HistoryRollingResponse"),
                    **_errors(
                        "missing_parameter",
                        "invalid_symbol",
                        "invalid_window",
                        "invalid_range",
                        "unknown_symbol",
                        "empty_range",
                        "history_disabled",
                        "batch_too_large",
                        "not_ready",
                    ),
                },
            }
        },
    }


def _metrics_paths() -> dict[str, Any]:
    """GET /metrics (issue 14): present only with `[metrics] enabled = true`."""
    return {
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text exposition format 0.0.4; docs/metrics.md)",
                "responses": {
                    "200": {
                        "description": "every metric of the appliance, for a Prometheus scrape",
                        "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        }
    }


def _history_paths() -> dict[str, Any]:
    bound = (
        "by=index: a series index (0 = the first value ever accepted); by=time: integer ns "
        "since the epoch or ISO 8601 (no zone = UTC). Optional: the whole history by default."
    )
    return {
        "/history/stats": {
            "get": {
                "operationId": "historyStats",
                "summary": "Statistics over [start, end) of a symbol's full history (warm tier)",
                "parameters": [
                    {
                        "name": "symbol",
                        "in": "query",
                        "required": True,
                        "schema": _ref("Symbol"),
                    },
                    {
                        "name": "by",
                        "in": "query",
                        "required": False,
                        "description": "`index` (default) or `time`: values of the batches "
                        "received at start <= t < end",
                        "schema": {"type": "string", "enum": ["index", "time"]},
                    },
                    {
                        "name": "start",
                        "in": "query",
                        "required": False,
                        "description": "inclusive; " + bound,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "end",
                        "in": "query",
                        "required": False,
                        "description": "exclusive; " + bound,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _ok("range statistics", "HistoryStatsResponse"),
                    **_errors(
                        "missing_parameter",
                        "invalid_symbol",
                        "invalid_range",
                        "unknown_symbol",
                        "empty_range",
                        "history_disabled",
                        "not_ready",
                    ),
                },
            }
        },
        "/symbols": {
            "get": {
                "operationId": "symbols",
                "summary": "Every symbol with its hot-tier and total value counts",
                "responses": {
                    "200": _ok("symbols", "SymbolsResponse"),
                    **_errors("not_ready"),
                },
            }
        },
    }


def _timestamps_schema(config: AppConfig) -> dict[str, Any]:
    """POST /add_batch/'s optional `timestamps` field."""
    return {
        "type": ["array", "null"],
        "items": {"type": "integer", "minimum": 0, "maximum": (1 << 63) - 1},
        "maxItems": config.store.max_batch_size,
        "description": "Optional: each value's event time in ns since the epoch (JSON integers "
        "0..2**63-1, one per value; else 400 `invalid_timestamps`). Non-decreasing, the first "
        "at or after the symbol's newest timestamp; otherwise the batch is refused whole (400 "
        '`out_of_order`), or with `store.out_of_order = "clamp"` each value that goes back is '
        "stored at the previous timestamp. Without it every value gets the receive time "
        "(moved forward to the symbol's newest timestamp if the clock is behind).",
    }


def _time_window_stats_schema(avg_null: str, var_null: str) -> dict[str, Any]:
    """The answer to a time window (`seconds`): StatsResponse's five keys, `count`, `seconds`."""
    return {
        "type": "object",
        "required": ["min", "max", "last", "avg", "var", "count", "seconds"],
        "additionalProperties": False,
        "properties": {
            "min": {"type": "number", "description": "never null: a stored value"},
            "max": {"type": "number", "description": "never null: a stored value"},
            "last": {"type": "number", "description": "the newest value of the series"},
            "avg": {"type": ["number", "null"], "description": "arithmetic mean" + avg_null},
            "var": {
                "type": ["number", "null"],
                "description": "population variance (M2 / count)" + var_null,
            },
            "count": {
                "type": "integer",
                "minimum": 1,
                "description": "values in the window (at least the newest one)",
            },
            "seconds": {
                "type": "number",
                "description": "the window, echoed as an exact decimal (`.5` answers 0.5)",
            },
        },
    }


def build_openapi(config: AppConfig) -> dict[str, Any]:
    """The document served at GET /openapi.json (paths also answer without the trailing slash)."""
    window = (
        f"the last min(10^exponent, series length) values; exponent {MIN_EXPONENT}..{MAX_EXPONENT}"
    )
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "hft-appliance",
            "version": "0.1.0",
            "description": "Windowed statistics over per-symbol price series. Every response is "
            'JSON; errors are `{"error": message, "code": code}`. Paths work with and without '
            "the trailing slash. Requests to unknown paths answer 404 `not_found`.",
        },
        "paths": {
            "/live": {
                "get": {
                    "operationId": "live",
                    "summary": "Liveness: 200 whenever the process serves HTTP (liveness probes)",
                    "responses": {"200": _ok('alive: `{"status": "ok"}`', "Status"), **_errors()},
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Ready to accept traffic: 200 only once reads and writes are "
                    "accepted; 503 with the phase and the log replay's progress before that and "
                    "while stopping",
                    "responses": {
                        "200": _ok('ready: `{"status": "ok"}`', "Status"),
                        **_errors(),
                        "503": {
                            "description": "`not_ready`: starting, replaying the write-ahead "
                            "log (with progress), stopping, or failed to start",
                            "content": {_JSON: {"schema": _ref("HealthNotReady")}},
                        },
                    },
                }
            },
            "/ready": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: 200 once startup is done, 503 before and while stopping",
                    "responses": {
                        "200": _ok('ready: `{"status": "ready"}`', "Status"),
                        **_errors("not_ready"),
                    },
                }
            },
            "/add_batch/": {
                "post": {
                    "operationId": "addBatch",
                    "summary": "Append a batch of values to a symbol's series (all or nothing)",
                    "requestBody": {
                        "required": True,
                        "description": f"At most {config.store.max_batch_size} values and "
                        f"{config.max_body_bytes} bytes. Content-Type application/json "
                        "(charset utf-8 if given).",
                        "content": {_JSON: {"schema": _ref("AddBatchRequest")}},
                    },
                    "responses": {
                        "200": _ok("accepted", "AddBatchResponse"),
                        **_errors(
                            "invalid_json",
                            "invalid_body",
                            "invalid_symbol",
                            "empty_batch",
                            "invalid_value",
                            "invalid_timestamps",
                            "out_of_order",
                            "symbol_limit",
                            "batch_too_large",
                            "unsupported_media_type",
                            "storage_unavailable",
                            "not_ready",
                        ),
                    },
                }
            },
            "/stats/": {
                "get": {
                    "operationId": "stats",
                    "summary": f"Statistics over {window}, or over a time window (`seconds`)",
                    "parameters": [
                        {
                            "name": "symbol",
                            "in": "query",
                            "required": True,
                            "description": "URL-encoded UTF-8 (`EUR%2FUSD`); percent-encoded "
                            "bytes that are not valid UTF-8 (`%FF`) are 400 `invalid_symbol`",
                            "schema": _ref("Symbol"),
                        },
                        *_window_parameters("The answer adds `count` and `seconds`."),
                    ],
                    "responses": {
                        "200": {
                            "description": "window statistics (a time window: with `count` and "
                            "`seconds`)",
                            "content": {
                                _JSON: {
                                    "schema": {
                                        "oneOf": [
                                            _ref("StatsResponse"),
                                            _ref("TimeWindowStatsResponse"),
                                        ]
                                    }
                                }
                            },
                        },
                        **_errors(
                            "missing_parameter",
                            "invalid_exponent",
                            "invalid_window",
                            "invalid_symbol",
                            "unknown_symbol",
                            "not_ready",
                        ),
                    },
                }
            },
            "/stats/batch": {
                "post": {
                    "operationId": "statsBatch",
                    "summary": "Many GET /stats/ queries in one request, answered in order from "
                    "one consistent state of each symbol",
                    "description": "The whole request fails (4xx, nothing answered) only when "
                    "the body is not a list of query objects or holds more than "
                    f"{config.server.max_stats_queries} queries (server.max_stats_queries). "
                    "A query that cannot be answered (unknown symbol, bad exponent) gets GET "
                    "/stats/'s error body as its result; the batch still answers 200.",
                    "requestBody": {
                        "required": True,
                        "description": f"At most {config.server.max_stats_queries} queries and "
                        f"{config.max_body_bytes} bytes. Content-Type application/json "
                        "(charset utf-8 if given).",
                        "content": {_JSON: {"schema": _ref("StatsBatchRequest")}},
                    },
                    "responses": {
                        "200": _ok("one result per query, in order", "StatsBatchResponse"),
                        **_errors(
                            "invalid_json",
                            "invalid_body",
                            "batch_too_large",
                            "unsupported_media_type",
                            "not_ready",
                        ),
                    },
                }
            },
            "/ingest": {
                "get": {
                    "operationId": "ingest",
                    "summary": "Counters of the binary ingest transports (ZeroMQ, shared memory)",
                    "responses": {
                        "200": _ok("counters per transport", "IngestResponse"),
                        **_errors(),
                    },
                }
            },
            **_history_paths(),
            **_history_bars_paths(),
            **_history_rolling_paths(),
            **(_metrics_paths() if config.metrics.enabled else {}),
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "the OpenAPI document",
                            "content": {_JSON: {"schema": {"type": "object"}}},
                        },
                        **_errors(),
                    },
                }
            },
        },
        "components": {
            "schemas": _schemas(config),
            "responses": {"NotFound": _errors("not_found")["404"]},
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": 'With `auth.mode = "token"`: `Authorization: Bearer <token>`; '
                    "the token's role (read < write < admin) and symbol patterns decide what "
                    "it may do (docs/security.md). The probes need none.",
                }
            },
        },
    }
    document["paths"].update(_delete_symbol_path())
    document["paths"].update(_live_paths(config))
    if config.auth.mode == "token":
        _add_security(document["paths"])
    _add_head_operations(document["paths"])
    return document


_OPEN_PATHS = ("/health", "/live", "/ready", "/", "/ui")


def _add_security(paths: dict[str, Any]) -> None:
    """Every operation but the probes needs a bearer token, and may answer 401, 403, 429."""
    for path, item in paths.items():
        if path in _OPEN_PATHS:
            continue
        for operation in item.values():
            operation["security"] = [{"bearerAuth": []}]
            for status, response in _errors("unauthorized", "forbidden", "rate_limited").items():
                if status in ("401", "403", "429"):
                    operation["responses"].setdefault(status, response)


def _delete_symbol_path() -> dict[str, Any]:
    return {
        "/symbols/{symbol}": {
            "delete": {
                "operationId": "deleteSymbol",
                "summary": "Free a symbol's slot and drop its hot values (an admin token with "
                "auth on); its history stays in the warm tier, and a later batch starts a new "
                "hot series whose indexes continue that history",
                "parameters": [
                    {
                        "name": "symbol",
                        "in": "path",
                        "required": True,
                        "description": "the symbol; a `/` in it may be sent as is or as %2F",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _ok("deleted", "DeleteSymbolResponse"),
                    **_errors(
                        "invalid_symbol", "unknown_symbol", "not_ready", "storage_unavailable"
                    ),
                },
            }
        }
    }


def _live_paths(config: AppConfig) -> dict[str, Any]:
    """GET /stream (Server-Sent Events of live statistics) and the live page (GET /, GET /ui)."""
    stream = config.stream
    page = {
        "summary": "The live statistics page (one static HTML file; no token needed: it holds "
        "no data and calls GET /symbols and GET /stream with the token pasted into it)",
        "responses": {
            "200": {
                "description": "the page",
                "content": {"text/html": {"schema": {"type": "string"}}},
            },
            **_errors(),
        },
    }
    return {
        "/stream": {
            "get": {
                "operationId": "stream",
                "summary": "Live statistics as Server-Sent Events: `event: stats` per symbol "
                "after applied batches (at most stream.max_rate_hz per symbol, the newest state "
                "wins), an initial one per symbol that has values, `: heartbeat` comments, and "
                "a final `event: end` (shutdown) or `event: dropped` (the client fell "
                "stream.queue_events behind)",
                "description": f"At most {stream.max_clients} concurrent streams "
                f"(stream.max_clients; beyond: 429 `rate_limited`), {stream.max_rate_hz} events "
                f"per symbol per second, heartbeat every {stream.heartbeat_s} s. Symbols not "
                "yet known are allowed: their events start with their first batch.",
                "parameters": [
                    {
                        "name": "symbols",
                        "in": "query",
                        "required": True,
                        "description": "comma-separated symbols (URL-encoded UTF-8), 1..256",
                        "schema": {"type": "string"},
                    },
                    *_window_parameters("Events then carry `window_ns` instead of `exponent`."),
                ],
                "responses": {
                    "200": {
                        "description": "an endless event stream; each `data:` is one JSON "
                        "object: symbol, `exponent` or `window_ns`, count, min, max, last, avg, "
                        "var, timestamp (the symbol's newest, ns since the epoch), version "
                        "(batches applied to the symbol)",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(
                        "missing_parameter",
                        "invalid_symbol",
                        "invalid_exponent",
                        "invalid_window",
                        "rate_limited",
                        "not_ready",
                    ),
                },
            }
        },
        "/": {"get": {"operationId": "livePage", **page}},
        "/ui": {"get": {"operationId": "livePageUi", **page}},
    }
