"""Starting and stopping the appliance as a user does: config sources, exit codes, logs, limits."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
from server_harness import Server, free_port, run_cli, running_server

from tests.gpu_probe import no_gpu_reason


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_exit_0_and_json_logs(tmp_path: Path, sig: int) -> None:
    server = Server(tmp_path)
    try:
        server.wait_ready()
        assert server.post_batch("AAPL", [1.0, 2.0]).status == 200
    finally:
        code = server.stop(sig)
    assert code == 0, server.stderr()
    stdout_records = _json_lines(server.stdout())
    file_records = _json_lines((tmp_path / "logs" / "app.log").read_text(encoding="utf-8"))
    for records in (stdout_records, file_records):
        messages = [r["message"] for r in records]
        assert "appliance ready" in messages
        assert "appliance stopped" in messages
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    # Sanic's own loggers come out through the same JSON handlers.
    assert any(r["logger"].startswith("sanic") for r in stdout_records)
    # Access logging is off by default: no request lines.
    assert not any(r["logger"] == "sanic.access" for r in stdout_records)


def test_config_file_in_cwd_is_used_and_env_beats_it(tmp_path: Path) -> None:
    file_port = free_port()
    (tmp_path / "Config.toml").write_text(
        f'[server]\nport = {file_port}\n\n[store]\nmax_symbols = 2\n\n[log]\nfile = "x/app.log"\n'
    )
    # Server() sets APP_SERVER__PORT to another free port: the environment must win.
    with running_server(tmp_path) as server:
        assert server.port != file_port
        assert server.post_batch("A", [1.0]).status == 200
        assert server.post_batch("B", [1.0]).status == 200
        assert server.post_batch("C", [1.0]).status == 409  # max_symbols = 2 from the file
    assert (tmp_path / "x" / "app.log").is_file()


def test_explicit_config_path_and_access_log(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "custom.toml"
    config.parent.mkdir()
    config.write_text('[log]\naccess_log = true\nfile = ""\n')
    server = Server(tmp_path / "run", args=("--config", str(config)))
    try:
        server.wait_ready()
        assert server.request("GET", "/health").status == 200
    finally:
        assert server.stop() == 0
    assert any(r["logger"] == "sanic.access" for r in _json_lines(server.stdout()))
    assert not (tmp_path / "run" / "logs").exists()


def test_symbol_limit_409_while_existing_symbols_keep_working(tmp_path: Path) -> None:
    with running_server(tmp_path, {"APP_STORE__MAX_SYMBOLS": "3"}) as server:
        for name in ("S1", "S2", "S3"):
            assert server.post_batch(name, [1.0]).status == 200
        response = server.post_batch("S4", [1.0])
        assert response.status == 409
        assert response.json["code"] == "symbol_limit"
        assert server.stats("S4", 1).json["code"] == "unknown_symbol"
        for name in ("S1", "S2", "S3"):
            assert server.post_batch(name, [3.0]).status == 200
            assert server.stats(name, 1).json == {
                "min": 1.0,
                "max": 3.0,
                "last": 3.0,
                "avg": 2.0,
                "var": 1.0,
            }


def test_retention_settings_from_env_are_applied(tmp_path: Path) -> None:
    env = {"APP_STORE__MAX_DATA_RETENTION": "100", "APP_STORE__CLEANUP_KEEP_COUNT": "50"}
    with running_server(tmp_path, env) as server:
        assert server.post_batch("R", list(range(1, 101))).status == 200
        assert server.post_batch("R", [1000.0]).status == 200
        # 100 + 1 > 100: keep the newest 50 (51..100), then append 1000.
        body = server.stats("R", 3).json
        assert body["min"] == 51.0
        assert body["max"] == 1000.0


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"APP_STORE__MAX_SYMBOLS": "0"}, "store.max_symbols"),
        ({"app_store__max_symbols": "many"}, "store.max_symbols"),
        ({"APP_SERVER__PORT": "70000"}, "server.port"),
        ({"APP_LOG__LEVEL": "loud"}, "log.level"),
        ({"APP_STORE__NOPE": "1"}, "store.nope"),
        ({"APP_STORE__CLEANUP_KEEP_COUNT": "200000000"}, "store.cleanup_keep_count"),
    ],
)
def test_bad_config_value_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, env: dict[str, str], key: str
) -> None:
    result = run_cli(tmp_path, "serve", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[store]\nmax_symbols = -5\n")
    result = run_cli(tmp_path, "serve", "--config", "bad.toml")
    assert result.returncode == 2
    assert "store.max_symbols" in result.stderr
    (tmp_path / "broken.toml").write_text("[store\n")
    result = run_cli(tmp_path, "serve", "--config", "broken.toml")
    assert result.returncode == 2
    assert "broken.toml" in result.stderr
    result = run_cli(tmp_path, "serve", "--config", "missing.toml")
    assert result.returncode == 2
    assert "missing.toml" in result.stderr
    (tmp_path / "latin.toml").write_bytes(b"\xff\xfe[server]\n")
    result = run_cli(tmp_path, "serve", "--config", "latin.toml")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "latin.toml" in result.stderr


def test_port_in_use_exits_2_naming_host_and_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(tmp_path, "serve", env={"APP_SERVER__PORT": str(port)})
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_gpu_backend_without_a_usable_gpu_exits_2_saying_why(tmp_path: Path) -> None:
    no_gpu = no_gpu_reason()
    if no_gpu is None:
        pytest.skip("this machine has a usable GPU; the unavailable path is tested in-process")
    env = {"APP_ENGINE__BACKEND": "gpu", "APP_SERVER__PORT": str(free_port())}
    result = run_cli(tmp_path, "serve", env=env)
    assert result.returncode == 2
    assert "GPU engine not available" in result.stderr
    assert no_gpu in result.stderr  # CuPy missing, no driver or no device: the reason itself


def test_usage_error_exits_2(tmp_path: Path) -> None:
    assert run_cli(tmp_path).returncode == 2
    assert run_cli(tmp_path, "serve", "--bogus").returncode == 2


def test_sigterm_drains_an_in_flight_upload_then_exits_0(tmp_path: Path) -> None:
    """The request in flight when SIGTERM arrives completes; the drain does not wait out the
    graceful timeout (30 s here) because the drained connection is answered with close."""
    server = Server(tmp_path, {"APP_SERVER__GRACEFUL_SHUTDOWN_S": "30"})
    try:
        server.wait_ready()
        body = json.dumps({"symbol": "DRAIN", "values": [1.5] * 100_000}).encode()
        head = (
            b"POST /add_batch/ HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + body[:1000])
            time.sleep(0.3)  # the server has the request in progress
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert server.proc.poll() is None  # still draining
            sock.sendall(body[1000:])
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head_out, _, payload = raw.partition(b"\r\n\r\n")
        assert head_out.startswith(b"HTTP/1.1 200")
        assert b"connection: close" in head_out.lower()
        assert json.loads(payload) == {"status": "ok", "symbol": "DRAIN", "added": 100_000}
        started = time.monotonic()
        assert server.proc.wait(20) == 0
        assert time.monotonic() - started < 10
    finally:
        server.stop()


def test_client_disconnecting_mid_upload_is_not_an_error(tmp_path: Path) -> None:
    # Any client can do this: announce a body, send part of it, close. That must not write an
    # ERROR (with a traceback) to the log, or anyone could flood the error log.
    with running_server(tmp_path, {"APP_LOG__LEVEL": "debug"}) as server:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /add_batch/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n" + b'{"symbol": "S", "values": [1,'
                )
                time.sleep(0.2)  # the handler is now waiting for the rest of the body
        time.sleep(0.3)
        assert server.request("GET", "/health").status == 200
    records = _json_lines(server.stdout())
    assert [r for r in records if r["level"] in ("ERROR", "CRITICAL")] == []
    assert "Traceback" not in server.stdout() + server.stderr()
    gone = [r for r in records if r["message"] == "client disconnected before the response"]
    assert gone and all(r["level"] == "DEBUG" and "exc_info" not in r for r in gone)


def _write_when_listening(server: Server, timeout_s: float = 60) -> tuple[int, float]:
    """POST once the socket accepts (retrying only refused connections); (status, seconds)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert server.proc.poll() is None, server.stderr()
        try:
            return server.post_batch("AT/ONCE", [1.0, 2.0]).status, time.monotonic() - started
        except ConnectionRefusedError:
            time.sleep(0.005)
    raise AssertionError("the server never listened")


def _health_then_write(server: Server, timeout_s: float = 60) -> int:
    """The issue's client: poll /health until 200, then write at once; the write's status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.stderr()
        try:
            health = server.request("GET", "/health")
        except ConnectionRefusedError:
            time.sleep(0.005)
            continue
        if health.status == 200:
            return server.post_batch("AFTER/HEALTH", [3.0]).status
        assert (health.status, health.json["code"]) == (503, "not_ready"), health
        time.sleep(0.005)
    raise AssertionError("/health never turned 200")


@pytest.mark.parametrize("with_log", [False, True], ids=["empty-data-dir", "log-to-replay"])
def test_a_fresh_start_accepts_a_write_at_once_and_after_health(
    tmp_path: Path, with_log: bool
) -> None:
    """Issue 14: /health 200 means ready, and a write sent before that waits instead of 503.

    Repeated starts, because the race between the first request and the end of the start is
    what used to fail (18 of 20 starts on an empty data directory).
    """
    for attempt in range(4):
        cwd = tmp_path / f"start{attempt}"
        if with_log:
            # A log of 50k records to replay (a few tenths of a second), from a previous run.
            from tests.durability.test_crash_recovery import write_long_log

            write_long_log(cwd / "data", 50_000)
        server = Server(cwd)
        try:
            status, _ = _write_when_listening(server)
            assert status == 200, server.stdout()
            assert _health_then_write(server) == 200
        finally:
            assert server.stop() == 0, server.stderr()


def test_log_lines_of_a_request_carry_its_id_and_the_thread(tmp_path: Path) -> None:
    # The access log is written after the handler, in the same context: it carries the id the
    # request hook set (the client's X-Request-ID here; Sanic makes a uuid4 without one).
    server = Server(tmp_path, {"APP_LOG__ACCESS_LOG": "true"})
    try:
        server.wait_ready()
        response = server.request("GET", "/stats/?symbol=NONE&exponent=1", headers={
            "X-Request-ID": "6c1e0c2a-94b5-4a57-9d6e-2f1b8c1f0b11"})  # fmt: skip
        assert response.status == 404
    finally:
        assert server.stop() == 0
    records = _json_lines(server.stdout())
    access = [r for r in records if r["logger"] == "sanic.access" and "/stats" in str(r)]
    assert access, records[-5:]
    assert access[0]["request_id"] == "6c1e0c2a-94b5-4a57-9d6e-2f1b8c1f0b11"
    assert all("thread" in r for r in records)
    assert not any("request_id" in r for r in records if r["message"] == "appliance ready")
