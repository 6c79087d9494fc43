"""QueryClient without an appliance: the error table, and HTTP behaviour against a stub server.

The stub answers scripted responses over a real socket, so the cases a real appliance cannot be
made to produce on demand are covered: a keep-alive connection dropped while idle, a 503 probe
with a progress body, a body that is not JSON, a route an older server lacks.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from appliance.errors import ERROR_CODES
from transport import query_client as qc
from transport.query_client import (
    ApplianceError,
    NotReadyError,
    QueryClient,
    Stats,
    TransportError,
    UnexpectedResponseError,
)

# ------------------------------------------------------------------ the error table


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_server_code_maps_to_its_own_typed_exception(code: str) -> None:
    row = ERROR_CODES[code]
    body = json.dumps({"error": f"message for {code}", "code": code}).encode()
    error = ApplianceError.from_body(row.status, body)
    assert type(error) is qc.ERROR_CLASSES[code]
    assert (error.code, error.message, error.status) == (code, f"message for {code}", row.status)
    # The class's family status is the table's: a per-item error (no HTTP status of its own)
    # gets the status GET /stats/ would have answered.
    assert type(error).status_family == row.status
    assert type(error)(code, "m").status == row.status
    assert code in str(error) and str(row.status) in str(error)


def test_the_client_knows_exactly_the_server_codes() -> None:
    assert set(qc.ERROR_CLASSES) == set(ERROR_CODES)
    assert len(set(qc.ERROR_CLASSES.values())) == len(ERROR_CODES), "one class per code"
    for name in qc.__all__:
        assert hasattr(qc, name), name


def test_families_group_codes_by_status() -> None:
    for code, row in ERROR_CODES.items():
        family = qc._FAMILY_BY_STATUS[row.status]
        assert issubclass(qc.ERROR_CLASSES[code], family), code
    error = ApplianceError.from_body(400, {"error": "x", "code": "invalid_exponent"})
    assert isinstance(error, qc.InvalidRequestError)


def test_an_unknown_code_falls_back_to_its_status_family() -> None:
    error = qc.error_from_body(404, b'{"error": "gone", "code": "some_new_code"}')
    assert type(error) is qc.NotFoundError and error.code == "some_new_code"
    error = qc.error_from_body(418, b'{"error": "a teapot", "code": "teapot"}')
    assert type(error) is ApplianceError and error.status == 418


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"", b'{"error": 1}', b"[]"])
def test_a_body_that_is_not_an_error_body_is_an_unexpected_response(body: bytes) -> None:
    error = qc.error_from_body(502, body)
    assert isinstance(error, UnexpectedResponseError)
    assert error.status == 502 and error.code == "unexpected_response"


def test_transport_error_is_a_connection_error_without_status() -> None:
    error = TransportError("refused")
    assert isinstance(error, ConnectionError) and isinstance(error, ApplianceError)
    assert error.status is None and error.code == "transport_error"


# ------------------------------------------------------------------ a scripted HTTP server


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"status": "ok"}'
    content_type: str = "application/json"
    drop_after: bool = False  # close the connection after answering, without saying so
    say_close: bool = False  # answer with `Connection: close`, then close (a stopping server)


@dataclass
class Script:
    """Replies by path (the last one repeats); every request seen, with its connection."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    seen: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)  # each request's Authorization header

    def next(self, path: str) -> Reply:
        queue = self.replies.get(path.split("?")[0], [Reply(404, b'{"error":"no","code":"x"}')])
        return queue.pop(0) if len(queue) > 1 else queue[0]


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the reply drops the connection
    server: StubServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        connection_id = self.client_address[1]  # the client port: one per connection
        self.server.script.seen.append((self.command, self.path, connection_id, body))
        self.server.script.auth.append(self.headers.get("Authorization"))
        reply = self.server.script.next(self.path)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if reply.say_close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)
        self.wfile.flush()
        if reply.drop_after or reply.say_close:
            self.close_connection = True

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer(Script())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


STATS = b'{"min":1.0,"max":3.0,"last":2.0,"avg":2.0,"var":0.6666666666666666}'


def test_requests_share_one_keep_alive_connection(stub: StubServer) -> None:
    stub.script.replies["/stats/"] = [Reply(body=STATS)]
    with QueryClient(stub.url) as client:
        for _ in range(3):
            assert client.stats("EUR/USD", 1) == Stats(1.0, 3.0, 2.0, 2.0, 0.6666666666666666)
    connections = {conn for *_, conn, _ in stub.script.seen}
    assert len(connections) == 1
    assert stub.script.seen[0][1] == "/stats/?symbol=EUR%2FUSD&exponent=1"


def test_a_connection_dropped_while_idle_is_reopened_for_a_query(stub: StubServer) -> None:
    stub.script.replies["/stats/"] = [Reply(body=STATS, drop_after=True), Reply(body=STATS)]
    with QueryClient(stub.url) as client:
        assert client.stats("A", 1).max == 3.0
        assert client.stats("A", 1).max == 3.0  # the first connection is gone: reopened, resent
    assert len(stub.script.seen) == 2
    assert stub.script.seen[0][2] != stub.script.seen[1][2]


def test_a_stats_batch_is_resent_but_connection_close_needs_no_resend(stub: StubServer) -> None:
    answer = json.dumps({"results": [json.loads(STATS)]}).encode()
    stub.script.replies["/stats/batch"] = [
        Reply(body=answer, drop_after=True),  # the next request finds the connection dead
        Reply(body=answer, say_close=True),  # announced: the client reconnects before sending
        Reply(body=answer),
    ]
    with QueryClient(stub.url) as client:
        for _ in range(3):
            assert client.stats_batch([("A", 1)]) == [Stats(1.0, 3.0, 2.0, 2.0, 0.6666666666666666)]
    assert len(stub.script.seen) == 3  # nothing was sent twice: the dead connection got nothing
    assert len({conn for _, _, conn, _ in stub.script.seen}) == 3


def test_add_batch_is_never_resent_on_a_dropped_connection(stub: StubServer) -> None:
    stub.script.replies["/stats/"] = [Reply(body=STATS, drop_after=True)]
    stub.script.replies["/add_batch/"] = [Reply(body=b'{"status":"ok","symbol":"A","added":2}')]
    with QueryClient(stub.url) as client:
        client.stats("A", 1)
        with pytest.raises(TransportError, match="add_batch"):
            client.add_batch("A", [1.0, 2.0])
        assert not [seen for seen in stub.script.seen if seen[0] == "POST"]
        # The caller decides; the next call opens a new connection.
        assert client.add_batch("A", np.array([1.0, 2.0])) == 2
    assert json.loads(stub.script.seen[-1][3]) == {"symbol": "A", "values": [1.0, 2.0]}


def test_probes_answer_false_on_503_with_the_progress_body(stub: StubServer) -> None:
    starting = {"error": "replaying", "code": "not_ready", "progress": {"replayed": 10}}
    stub.script.replies["/health"] = [Reply(503, json.dumps(starting).encode()), Reply()]
    stub.script.replies["/live"] = [Reply()]
    with QueryClient(stub.url) as client:
        probe = client.health()
        assert not probe and probe.status == 503 and probe.body["progress"] == {"replayed": 10}
        assert client.health() and client.health().body == {"status": "ok"}
        assert client.live().ok
        with pytest.raises(qc.NotFoundError):  # an older server without the route
            client.ready()


def test_wait_ready_polls_until_200_then_times_out_with_not_ready(stub: StubServer) -> None:
    not_ready = Reply(503, b'{"error":"starting","code":"not_ready"}')
    stub.script.replies["/ready"] = [not_ready, not_ready, Reply(body=b'{"status":"ready"}')]
    with QueryClient(stub.url) as client:
        assert client.wait_ready(timeout_s=5, interval_s=0.01).body == {"status": "ready"}
        stub.script.replies["/ready"] = [not_ready]
        with pytest.raises(NotReadyError, match=r"not ready after 0\.1s: starting"):
            client.wait_ready(timeout_s=0.1, interval_s=0.01)


def test_a_non_json_answer_is_an_unexpected_response(stub: StubServer) -> None:
    stub.script.replies["/symbols"] = [
        Reply(502, b"<html>bad gateway</html>", "text/html"),
        Reply(200, b'{"rows": []}'),
    ]
    with QueryClient(stub.url) as client:
        with pytest.raises(UnexpectedResponseError, match="bad gateway") as info:
            client.symbols()
        assert info.value.status == 502
        with pytest.raises(UnexpectedResponseError, match="not a Symbols answer"):
            client.symbols()


def test_nothing_listening_is_a_clear_transport_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with QueryClient(f"http://127.0.0.1:{port}", timeout_s=1) as client:
            with pytest.raises(TransportError, match=f"GET http://127.0.0.1:{port}/stats/") as e:
                client.stats("A", 1)
            assert isinstance(e.value.__cause__, ConnectionRefusedError)
            with pytest.raises(TransportError, match=r"not reachable after 0\.05s"):
                client.wait_ready(timeout_s=0.05, interval_s=0.01)


def test_a_silent_server_is_a_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # accepts (the kernel completes the handshake) but never answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with (
            QueryClient(url, timeout_s=0.2) as client,
            pytest.raises(TransportError, match=r"no answer within 0\.2s"),
        ):
            client.symbols()


def test_arguments_are_checked_before_anything_is_sent(stub: StubServer) -> None:
    with pytest.raises(ValueError, match="url must be"):
        QueryClient("ftp://host")
    with QueryClient(stub.url) as client:
        with pytest.raises(TypeError, match="exponent must be an int"):
            client.stats("A", 1.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="exponent must be an int"):
            client.stats_batch([("A", True)])
        with pytest.raises(TypeError, match="history bound"):
            client.history("A", start=1.5)  # type: ignore[arg-type]
    assert not stub.script.seen
    client.close()
    with pytest.raises(TransportError, match="closed"):
        client.symbols()


def test_history_bounds_by_time_and_the_path_prefix(stub: StubServer) -> None:
    stub.script.replies["/api/history/stats"] = [Reply(404, b'{"error":"e","code":"empty_range"}')]
    with (
        QueryClient(stub.url + "/api/", token="s3cret") as client,
        pytest.raises(qc.EmptyRangeError),
    ):
        client.history(
            "SPY INDEX",
            start=datetime(2026, 1, 2, 15, 4, 5, 123456),
            end="2026-01-03T00:00:00Z",
            by="time",
        )
    assert stub.script.auth == ["Bearer s3cret"]
    path = stub.script.seen[0][1]
    start_ns = int(datetime(2026, 1, 2, 15, 4, 5, 123456, tzinfo=UTC).timestamp()) * 10**9
    assert path == (
        f"/api/history/stats?symbol=SPY%20INDEX&by=time&start={start_ns + 123456000}"
        "&end=2026-01-03T00%3A00%3A00Z"
    )


def test_stats_batch_arrays_put_nan_and_codes_in_failed_rows(stub: StubServer) -> None:
    results = [
        json.loads(STATS),
        {"error": "unknown symbol 'B'", "code": "unknown_symbol"},
        {"min": 0.0, "max": 1e200, "last": 1e200, "avg": 5e199, "var": None},
    ]
    stub.script.replies["/stats/batch"] = [Reply(body=json.dumps({"results": results}).encode())]
    queries = [("A", 1), ("B", 2), ("C", 3)]
    with QueryClient(stub.url) as client:
        arrays = client.stats_batch_arrays(queries)
        items = client.stats_batch(queries)
    assert json.loads(stub.script.seen[0][3]) == {
        "queries": [{"symbol": s, "exponent": k} for s, k in queries]
    }
    assert arrays.ok.tolist() == [True, False, True]
    assert arrays.codes.tolist() == ["", "unknown_symbol", ""]
    assert arrays.max.dtype == np.float64
    np.testing.assert_array_equal(arrays.max, [3.0, np.nan, 1e200])
    np.testing.assert_array_equal(arrays.var, [0.6666666666666666, np.nan, np.nan])
    assert isinstance(arrays.errors[1], qc.UnknownSymbolError)
    assert isinstance(items[1], qc.UnknownSymbolError) and items[1].status == 404
    assert items[2] == Stats(0.0, 1e200, 1e200, 5e199, None)
