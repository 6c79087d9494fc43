"""The REST contract of SPEC section 5 over a real socket: success paths and every error row."""

from __future__ import annotations

import json
import socket
import uuid

import numpy as np
import pytest
from openapi_spec_validator import validate
from server_harness import REPO_ROOT, Response, Server, running_server

SEED = [150.1, 150.5, 151.0, 149.8, 150.2, 151.1, 151.2, 152.0, 151.5, 151.9]
JSON_CT = {"Content-Type": "application/json"}
STATS_KEYS = {"min", "max", "last", "avg", "var"}


def unique(prefix: str = "SYM") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_json(response: Response) -> None:
    assert response.headers["content-type"].split(";")[0] == "application/json"
    json.loads(response.body)


def assert_error(response: Response, status: int, code: str) -> dict:
    assert response.status == status, response.body
    assert_json(response)
    body = response.json
    assert set(body) == {"error", "code"}
    assert body["code"] == code
    assert body["error"]
    return body


def assert_stats_match(body: dict, window: np.ndarray) -> None:
    assert set(body) == STATS_KEYS
    assert body["min"] == window.min()
    assert body["max"] == window.max()
    assert body["last"] == window[-1]
    assert body["avg"] == pytest.approx(window.mean(), rel=1e-9)
    assert body["var"] == pytest.approx(window.var(), rel=1e-9, abs=1e-12)


def test_seed_example_gives_population_variance_0_5201(server: Server) -> None:
    symbol = unique("AAPL")
    added = server.post_batch(symbol, SEED)
    assert added.status == 200
    assert added.json == {"status": "ok", "symbol": symbol, "added": 10}
    response = server.stats(symbol, 1)
    assert response.status == 200
    assert_json(response)
    assert_stats_match(response.json, np.array(SEED))
    assert response.json["var"] == pytest.approx(0.5201, rel=1e-9)


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_documented_stats_example_is_the_real_output(server: Server, doc: str) -> None:
    # The docs show the exact bytes of GET /stats/ for the seed batch; they must be the server's.
    text = (REPO_ROOT / doc).read_text(encoding="utf-8")
    shown = text.split("/stats/?symbol=AAPL&exponent=1'\n# ", 1)[1].split("\n", 1)[0]
    symbol = unique("AAPL")
    assert server.post_batch(symbol, SEED).status == 200
    assert server.stats(symbol, 1).body.decode() == shown


def test_health_ready_and_openapi(server: Server) -> None:
    assert server.request("GET", "/health").json == {"status": "ok"}
    assert server.request("GET", "/ready").json == {"status": "ready"}
    doc = server.request("GET", "/openapi.json")
    assert doc.status == 200
    assert_json(doc)
    validate(doc.json)


@pytest.mark.parametrize("path", ["/health", "/health/", "/ready", "/ready/", "/openapi.json"])
def test_get_paths_work_with_and_without_trailing_slash(server: Server, path: str) -> None:
    response = server.request("GET", path)
    assert response.status == 200
    assert_json(response)


@pytest.mark.parametrize("add_path", ["/add_batch", "/add_batch/"])
@pytest.mark.parametrize("stats_path", ["/stats", "/stats/"])
def test_add_and_stats_with_and_without_trailing_slash(
    server: Server, add_path: str, stats_path: str
) -> None:
    symbol = unique()
    body = json.dumps({"symbol": symbol, "values": [1, 2, 3]}).encode()
    assert server.request("POST", add_path, body, JSON_CT).status == 200
    response = server.request("GET", f"{stats_path}?symbol={symbol}&exponent=1")
    assert response.status == 200
    assert response.json == {"min": 1.0, "max": 3.0, "last": 3.0, "avg": 2.0, "var": 2 / 3}


@pytest.mark.parametrize(
    "symbol", ["EUR/USD", "BRK.B", "SPY INDEX", "日本円-USD", "é" * 32, "x" * 64]
)
def test_symbols_spec_calls_valid_are_accepted_and_queryable(server: Server, symbol: str) -> None:
    symbol = symbol if len(symbol.encode()) == 64 else f"{symbol}-{uuid.uuid4().hex[:6]}"
    assert server.post_batch(symbol, [5.0]).status == 200
    assert server.stats(symbol, 1).json["last"] == 5.0


def test_integers_accepted_extra_fields_ignored_negative_zero_normalized(server: Server) -> None:
    symbol = unique()
    body = json.dumps({"symbol": symbol, "values": [-0.0, 0, 7], "note": "x"}).encode()
    assert server.request("POST", "/add_batch/", body, JSON_CT).status == 200
    response = server.stats(symbol, 1)
    assert response.json["min"] == 0.0
    assert b"-0.0" not in response.body


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON;charset=UTF-8"]
)
def test_json_content_type_with_utf8_charset_is_accepted(server: Server, content_type: str) -> None:
    body = json.dumps({"symbol": unique(), "values": [1.0]}).encode()
    assert server.request("POST", "/add_batch/", body, {"Content-Type": content_type}).status == 200


def test_one_million_values_in_one_request(server: Server) -> None:
    symbol = unique("BIG")
    rng = np.random.default_rng(7)
    values = rng.uniform(100.0, 200.0, 1_000_000).round(6)
    response = server.post_batch(symbol, values.tolist())
    assert response.status == 200
    assert response.json["added"] == 1_000_000
    for exponent in (1, 3, 6, 7):
        window = values[-min(10**exponent, values.size) :]
        assert_stats_match(server.stats(symbol, exponent).json, window)


# --- every row of the error table ---------------------------------------------------------------

BAD_BODIES = [
    # (body, code)
    (b"{not json", "invalid_json"),
    (b"", "invalid_json"),
    (b'{"symbol": "S", "values": [1, NaN]}', "invalid_json"),
    (b'{"symbol": "S", "values": [Infinity]}', "invalid_json"),
    (b'{"symbol": "S", "values": [-Infinity]}', "invalid_json"),
    (b'{"symbol": "S", "values": [1, 1e400]}', "invalid_json"),
    (b'{"symbol": "S", "values": [1, ' + b"9" * 400 + b"]}", "invalid_json"),
    (b'{"symbol": "S", "values": [1]} trailing', "invalid_json"),
    (b'{"symbol": "\xff", "values": [1]}', "invalid_json"),
    (b"[1, 2, 3]", "invalid_body"),
    (b'"just a string"', "invalid_body"),
    (b"null", "invalid_body"),
    (b'{"values": [1]}', "invalid_body"),
    (b'{"symbol": "S"}', "invalid_body"),
    (b'{"symbol": 5, "values": [1]}', "invalid_body"),
    (b'{"symbol": "S", "values": "1,2"}', "invalid_body"),
    (b'{"symbol": "S", "values": {"a": 1}}', "invalid_body"),
    (b'{"symbol": "", "values": [1]}', "invalid_symbol"),
    (json.dumps({"symbol": "x" * 65, "values": [1]}).encode(), "invalid_symbol"),
    (json.dumps({"symbol": "é" * 33, "values": [1]}).encode(), "invalid_symbol"),
    (b'{"symbol": "A\\nB", "values": [1]}', "invalid_symbol"),
    (b'{"symbol": "A\\u0000B", "values": [1]}', "invalid_symbol"),
    (b'{"symbol": "A\\u007fB", "values": [1]}', "invalid_symbol"),
    (b'{"symbol": "A\\u0085B", "values": [1]}', "invalid_symbol"),
    (b'{"symbol": "S", "values": []}', "empty_batch"),
    (b'{"symbol": "S", "values": [1, -0.5]}', "invalid_value"),
    (b'{"symbol": "S", "values": [1, true]}', "invalid_value"),
    (b'{"symbol": "S", "values": [false]}', "invalid_value"),
    (b'{"symbol": "S", "values": [1, "2"]}', "invalid_value"),
    (b'{"symbol": "S", "values": [1, null]}', "invalid_value"),
    (b'{"symbol": "S", "values": [1, [2]]}', "invalid_value"),
    (b'{"symbol": "S", "values": [1, {"v": 2}]}', "invalid_value"),
]


@pytest.mark.parametrize(("body", "code"), BAD_BODIES)
def test_bad_bodies_are_rejected_with_their_code(server: Server, body: bytes, code: str) -> None:
    assert_error(server.request("POST", "/add_batch/", body, JSON_CT), 400, code)


def test_invalid_value_message_names_the_first_bad_index(server: Server) -> None:
    body = json.dumps({"symbol": unique(), "values": [1, 2, 3, -1, "x"]}).encode()
    error = assert_error(server.request("POST", "/add_batch/", body, JSON_CT), 400, "invalid_value")
    assert "values[3]" in error["error"]


def test_a_rejected_batch_changes_nothing(server: Server) -> None:
    symbol = unique()
    assert server.post_batch(symbol, [1.0, 2.0]).status == 200
    before = server.stats(symbol, 8).json
    for bad in ([3.0, -1.0], [3.0, None], [3.0, True], []):
        assert server.post_batch(symbol, bad).status == 400
    assert server.stats(symbol, 8).json == before
    fresh = unique()
    assert server.post_batch(fresh, [1.0, -1.0]).status == 400
    assert_error(server.stats(fresh, 1), 404, "unknown_symbol")


def test_more_than_max_batch_size_values_is_413(server: Server) -> None:
    body = b'{"symbol": "S", "values": [' + b"1," * 1_000_000 + b"1]}"
    response = server.request("POST", "/add_batch/", body, JSON_CT)
    error = assert_error(response, 413, "batch_too_large")
    assert "1000001" in error["error"]


def test_body_over_the_size_limit_is_413(server: Server) -> None:
    # Announce a body over the derived limit (about 48 MB) and send only its start: the server
    # must answer from the headers, without reading (or buffering) the body.
    head, body = _raw_exchange(
        server,
        b"POST /add_batch/ HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 60000000\r\n\r\n" + b'{"symbol": "S", "values": [' + b"1," * 1000,
    )
    assert head.startswith(b"HTTP/1.1 413")
    assert body["code"] == "batch_too_large"


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
def test_post_without_json_content_type_is_415(server: Server, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"symbol": unique(), "values": [1.0]}).encode()
    response = server.request("POST", "/add_batch/", body, headers)
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/add_batch/"),
        ("PUT", "/add_batch"),
        ("POST", "/stats/"),
        ("DELETE", "/stats"),
        ("POST", "/health"),
        ("PUT", "/ready"),
        ("POST", "/openapi.json"),
    ],
)
def test_wrong_method_is_405(server: Server, method: str, path: str) -> None:
    response = server.request(method, path, b"{}", JSON_CT)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers.get("allow")


# "/" is the live page (GET / and GET /ui), not an unknown path.
@pytest.mark.parametrize("path", ["/nope", "/ui/extra", "/stats/extra", "/add_batch/x"])
def test_unknown_path_is_404_not_found(server: Server, path: str) -> None:
    assert_error(server.request("GET", path), 404, "not_found")


def test_unknown_symbol_is_404(server: Server) -> None:
    assert_error(server.stats(unique("NEVER"), 1), 404, "unknown_symbol")


@pytest.mark.parametrize(
    "query",
    [
        "symbol=S",
        "symbol=S&exponent=",
        "symbol=S&exponent=abc",
        "symbol=S&exponent=1.5",
        "symbol=S&exponent=1e1",
        "symbol=S&exponent=0",
        "symbol=S&exponent=9",
        "symbol=S&exponent=-1",
        "symbol=S&exponent=%2B1",
        "symbol=S&exponent=%201",
        "symbol=S&exponent=%EF%BC%91",  # fullwidth digit one
        "symbol=S&exponent=99999999999999999999999",
        "symbol=S&exponent=true",
    ],
)
def test_bad_or_missing_exponent_is_invalid_exponent(server: Server, query: str) -> None:
    assert_error(server.request("GET", "/stats/?" + query), 400, "invalid_exponent")


@pytest.mark.parametrize("query", ["", "exponent=1", "symbo=S&exponent=1"])
def test_missing_symbol_parameter_is_missing_parameter(server: Server, query: str) -> None:
    assert_error(server.request("GET", "/stats/?" + query), 400, "missing_parameter")


@pytest.mark.parametrize("symbol", ["", "%00", "x" * 65])
def test_invalid_symbol_parameter_is_invalid_symbol(server: Server, symbol: str) -> None:
    response = server.request("GET", f"/stats/?symbol={symbol}&exponent=1")
    assert_error(response, 400, "invalid_symbol")


def test_percent_encoded_non_utf8_symbol_is_invalid_symbol_not_a_match(server: Server) -> None:
    # errors="replace" would turn %FF into U+FFFD and find a series stored under that symbol.
    assert server.post_batch("\ufffd", [1.0]).status == 200
    assert server.request("GET", "/stats/?symbol=%EF%BF%BD&exponent=1").status == 200
    for query in ("symbol=%FF&exponent=1", "symbol=%EF%BF&exponent=1"):
        assert_error(server.request("GET", "/stats/?" + query), 400, "invalid_symbol")
    assert_error(server.request("GET", "/stats/?symbol=S&exponent=%FF"), 400, "invalid_exponent")


def test_results_overflowing_float64_are_null_not_a_500(server: Server) -> None:
    # Valid finite inputs whose exact mean/variance exceed float64: documented as null.
    symbol = unique()
    assert server.post_batch(symbol, [0.0, 1.7e308, 1.7e308]).status == 200
    response = server.stats(symbol, 1)
    assert response.status == 200
    body = response.json
    assert (body["min"], body["max"], body["last"]) == (0.0, 1.7e308, 1.7e308)
    assert body["var"] is None
    assert body["avg"] is None or body["avg"] == pytest.approx(1.7e308 * 2 / 3)
    spread = unique()  # the exact variance (2.5e399) overflows: null, not a 500
    assert server.post_batch(spread, [0.0, 1e200]).status == 200
    assert server.stats(spread, 1).json == {
        "min": 0.0,
        "max": 1e200,
        "last": 1e200,
        "avg": 5e199,
        "var": None,
    }


def test_every_exponent_1_to_8_is_accepted(server: Server) -> None:
    symbol = unique()
    values = np.arange(1, 2001, dtype=np.float64)
    assert server.post_batch(symbol, values.tolist()).status == 200
    for exponent in range(1, 9):
        window = values[-min(10**exponent, values.size) :]
        assert_stats_match(server.stats(symbol, exponent).json, window)


def _raw_exchange(server: Server, data: bytes) -> tuple[bytes, dict]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data)
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    return head, json.loads(body)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (
            b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            431,
            "bad_request",
        ),
        (
            b"POST /add_batch/ HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
            400,
            "bad_request",
        ),
    ],
)
def test_malformed_http_gets_a_json_error(
    server: Server, data: bytes, status: int, code: str
) -> None:
    head, body = _raw_exchange(server, data)
    assert head.startswith(b"HTTP/1.1 %d" % status)
    assert body["code"] == code


# Bad request lines (issue 15 item 7). The NUL and control-byte URLs used to get no answer and
# a 2 KB traceback in the log each (Sanic could not build even the stand-in request it renders
# errors for); appliance.http_protocol fixes that.
BAD_REQUEST_LINES = [
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",  # non-UTF-8 URL
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",  # NUL in the URL
    b"GET /stats/?symbol=\x01&exponent=1 HTTP/1.1\r\nHost: x\r\n\r\n",  # control byte
    b"GET /\r\nHost: x\r\n\r\n",  # no version
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",  # unknown version
    b"GET  /  HTTP/1.1\r\nHost: x\r\n\r\n",  # extra spaces
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello to a plain port
    b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n",  # a header line without a colon
]


@pytest.mark.parametrize("data", BAD_REQUEST_LINES)
def test_a_bad_request_line_gets_the_json_400(server: Server, data: bytes) -> None:
    head, body = _raw_exchange(server, data)
    assert head.startswith(b"HTTP/1.1 400"), head
    assert body["code"] == "bad_request" and body["error"]
    assert b"connection: close" in head.lower()


def test_a_flood_of_bad_requests_is_answered_and_logs_almost_nothing(tmp_path) -> None:
    """500 bad request lines: each answered 400, and the log grows by well under 20 KB (before
    the fix: no answer to some, and 2 KB of traceback each)."""
    with running_server(tmp_path, {"APP_TRANSPORT__ZMQ__ENABLED": "false"}) as fresh:
        log_file = tmp_path / "logs" / "app.log"
        before = log_file.stat().st_size
        for n in range(500):
            head, body = _raw_exchange(fresh, BAD_REQUEST_LINES[n % len(BAD_REQUEST_LINES)])
            assert head.startswith(b"HTTP/1.1 400") and body["code"] == "bad_request"
        assert fresh.request("GET", "/health").status == 200
        grown = log_file.stat().st_size - before
        assert grown < 20_000, grown
        assert "Traceback" not in log_file.read_text()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/health", 200),
        ("/ready/", 200),
        ("/openapi.json", 200),
        ("/stats/?symbol=NEVER-SEEN&exponent=1", 404),
        ("/stats/?symbol=S&exponent=9", 400),
    ],
)
def test_head_sends_the_get_headers_and_no_body(server: Server, path: str, status: int) -> None:
    get = server.request("GET", path)
    # HEAD, then a pipelined GET on the same connection: a stray HEAD body would be read as
    # the start of the second response.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n"
            "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status)
    assert b"content-length: %d" % len(get.body) in head.lower()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:80]
    assert rest.endswith(b'{"status":"ok"}')
