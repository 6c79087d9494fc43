"""POST /stats/batch over a real socket: order, per-item errors, the maximum, whole-body errors."""

from __future__ import annotations

import json
import random
import socket
import uuid

import numpy as np
import pytest
from openapi_spec_validator import validate
from server_harness import REPO_ROOT, Response, Server

SEED = [150.1, 150.5, 151.0, 149.8, 150.2, 151.1, 151.2, 152.0, 151.5, 151.9]
JSON_CT = {"Content-Type": "application/json"}
STATS_KEYS = {"min", "max", "last", "avg", "var"}
MAX_QUERIES = 10_000  # server.max_stats_queries, default


def unique(prefix: str = "SYM") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def batch(server: Server, queries: list, path: str = "/stats/batch") -> Response:
    return server.request("POST", path, json.dumps({"queries": queries}).encode(), JSON_CT)


def results(response: Response) -> list:
    assert response.status == 200, response.body
    body = response.json
    assert set(body) == {"results"}
    return body["results"]


def assert_error(response: Response, status: int, code: str) -> dict:
    assert response.status == status, response.body
    body = response.json
    assert set(body) == {"error", "code"} and body["code"] == code and body["error"]
    return body


def test_results_come_in_request_order_and_equal_get_stats(server: Server) -> None:
    rng = np.random.default_rng(11)
    series = {}
    for n in (1, 10, 999, 20_000):
        symbol = unique()
        series[symbol] = rng.uniform(1.0, 1000.0, n).round(4)
        assert server.post_batch(symbol, series[symbol].tolist()).status == 200
    queries = [(s, k) for s in series for k in range(1, 9)] * 2
    random.Random(3).shuffle(queries)
    got = results(batch(server, [{"symbol": s, "exponent": k} for s, k in queries]))
    assert len(got) == len(queries)
    for (symbol, exponent), result in zip(queries, got, strict=True):
        assert set(result) == STATS_KEYS
        assert result == server.stats(symbol, exponent).json
        window = series[symbol][-(10**exponent) :]
        assert (result["min"], result["max"], result["last"]) == (
            window.min(),
            window.max(),
            window[-1],
        )
        assert result["avg"] == pytest.approx(window.mean(), rel=1e-9)
        assert result["var"] == pytest.approx(window.var(), rel=1e-9, abs=1e-12)


def test_per_item_errors_leave_the_other_items_answered(server: Server) -> None:
    symbol, never = unique("OK"), unique("NEVER")
    assert server.post_batch(symbol, SEED).status == 200
    good = {"symbol": symbol, "exponent": 1}
    cases = [
        ({"symbol": never, "exponent": 1}, "unknown_symbol"),
        ({"symbol": symbol, "exponent": 0}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": 9}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": -1}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": 1.5}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": 1.0}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": "1"}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": True}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": False}, "invalid_exponent"),
        ({"symbol": symbol, "exponent": None}, "invalid_exponent"),
        ({"symbol": symbol}, "invalid_exponent"),
        ({"exponent": 1}, "missing_parameter"),
        ({"symbol": "", "exponent": 1}, "invalid_symbol"),
        ({"symbol": "x" * 65, "exponent": 1}, "invalid_symbol"),
        ({"symbol": "A\nB", "exponent": 1}, "invalid_symbol"),
        ({"symbol": 7, "exponent": 1}, "invalid_symbol"),
    ]
    queries = [item for query, _ in cases for item in (good, query)]
    got = results(batch(server, queries))
    expected_ok = server.stats(symbol, 1).json
    for i, (query, code) in enumerate(cases):
        assert got[2 * i] == expected_ok
        assert set(got[2 * i + 1]) == {"error", "code"}, query
        assert got[2 * i + 1]["code"] == code, query

    # Where GET /stats/ can ask the same question it gives the same error, word for word.
    def result_of(query: dict) -> dict:
        return got[2 * [q for q, _ in cases].index(query) + 1]

    assert result_of({"symbol": never, "exponent": 1}) == server.stats(never, 1).json
    assert result_of({"symbol": "", "exponent": 1}) == server.stats("", 1).json
    assert result_of({"symbol": "A\nB", "exponent": 1}) == server.stats("A\nB", 1).json
    shown = server.stats(symbol, 9).json["error"].replace("'9'", "9")  # GET quotes its text
    assert result_of({"symbol": symbol, "exponent": 9})["error"] == shown


def test_up_to_the_maximum_is_answered_and_one_more_is_413(server: Server) -> None:
    symbol = unique("MAX")
    assert server.post_batch(symbol, SEED).status == 200
    queries = [{"symbol": symbol, "exponent": 1 + i % 8} for i in range(MAX_QUERIES)]
    got = results(batch(server, queries))
    assert len(got) == MAX_QUERIES
    assert got[0] == got[8] == server.stats(symbol, 1).json
    error = assert_error(batch(server, [*queries, queries[0]]), 413, "batch_too_large")
    assert str(MAX_QUERIES + 1) in error["error"]
    assert "server.max_stats_queries" in error["error"]


def test_an_empty_list_answers_an_empty_list(server: Server) -> None:
    assert results(batch(server, [])) == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"queries": [{"symbol": "S", "exponent": NaN}]}', "invalid_json"),
        (b'{"queries": [{"symbol": "S", "exponent": 1e400}]}', "invalid_json"),
        (b'{"queries": [{"symbol": "\xff", "exponent": 1}]}', "invalid_json"),
        (b"[]", "invalid_body"),
        (b'"queries"', "invalid_body"),
        (b"null", "invalid_body"),
        (b"{}", "invalid_body"),
        (b'{"query": []}', "invalid_body"),
        (b'{"queries": null}', "invalid_body"),
        (b'{"queries": "S"}', "invalid_body"),
        (b'{"queries": {"symbol": "S", "exponent": 1}}', "invalid_body"),
        (b'{"queries": [{"symbol": "S", "exponent": 1}, 1]}', "invalid_body"),
        (b'{"queries": [null]}', "invalid_body"),
        (b'{"queries": [["S", 1]]}', "invalid_body"),
        (b'{"queries": [{"symbol": ["S"], "exponent": 1}]}', "invalid_body"),
        (b'{"queries": [{"symbol": "S", "exponent": [1]}]}', "invalid_body"),
    ],
)
def test_a_body_that_is_not_a_batch_is_400(server: Server, body: bytes, code: str) -> None:
    assert_error(server.request("POST", "/stats/batch", body, JSON_CT), 400, code)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json; charset=latin-1"])
def test_post_without_json_content_type_is_415(server: Server, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"queries": []}).encode()
    response = server.request("POST", "/stats/batch", body, headers)
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("path", ["/stats/batch", "/stats/batch/"])
def test_the_path_works_with_and_without_the_trailing_slash(server: Server, path: str) -> None:
    symbol = unique()
    assert server.post_batch(symbol, [1, 2, 3]).status == 200
    got = results(batch(server, [{"symbol": symbol, "exponent": 1}], path))
    assert got == [{"min": 1.0, "max": 3.0, "last": 3.0, "avg": 2.0, "var": 2 / 3}]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_405_with_allow_post(server: Server, method: str) -> None:
    response = server.request(method, "/stats/batch")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_head_is_405_and_sends_no_body(server: Server) -> None:
    # HEAD, then a pipelined GET on the same connection: a stray HEAD body would be read as
    # the start of the second response.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"HEAD /stats/batch HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405"), head
    assert b"allow: post" in head.lower()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:80]
    assert rest.endswith(b'{"status":"ok"}')


def test_the_served_openapi_document_describes_the_batch(server: Server) -> None:
    document = server.request("GET", "/openapi.json").json
    validate(document)
    operation = document["paths"]["/stats/batch"]["post"]
    assert set(operation["responses"]) >= {"200", "400", "405", "413", "415", "503"}
    schema = document["components"]["schemas"]["StatsBatchRequest"]
    assert schema["properties"]["queries"]["maxItems"] == MAX_QUERIES


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_documented_batch_example_is_the_real_output(server: Server, doc: str) -> None:
    text = (REPO_ROOT / doc).read_text(encoding="utf-8")
    example = text.split("curl -s -X POST http://127.0.0.1:8080/stats/batch", 1)[1]
    request = example.split("-d '", 1)[1].split("'\n", 1)[0]
    shown = example.split("\n# ", 1)[1].split("\n", 1)[0]
    # The example's symbols, renamed so that this server's other tests cannot interfere.
    aapl, msft = unique("AAPL"), unique("MSFT")
    assert server.post_batch(aapl, SEED).status == 200
    request = request.replace('"AAPL"', json.dumps(aapl)).replace('"MSFT"', json.dumps(msft))
    response = server.request("POST", "/stats/batch", request.encode(), JSON_CT)
    assert response.status == 200
    assert response.body.decode() == shown.replace("'MSFT'", repr(msft))
