"""Test harness: start the appliance the way a user does (a subprocess), talk over a real socket.

Each server gets a fresh temporary working directory (so `logs/app.log` and any `Config.toml`
are its own) and a free port passed through `APP_SERVER__PORT`, which also exercises the
environment override. Its ZeroMQ endpoints (ROUTER, PULL, control) are its own too: ipc socket
files in that directory, or free TCP ports when the path is too long for a unix socket.
Everything is xdist-safe: no fixed ports, no shared directories.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.cluster.local import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
# sun_path holds 108 bytes on Linux (104 on macOS); stay well under both.
MAX_IPC_PATH = 100
ENDPOINT_VARS = {
    "router": "APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT",
    "pull": "APP_TRANSPORT__ZMQ__PULL_ENDPOINT",
    "control": "APP_TRANSPORT__ZMQ__CONTROL_ENDPOINT",
}


def free_port() -> int:
    """A loopback port for a server to listen on, outside the ephemeral range that outgoing
    connections take ports from (appliance.cluster.local.free_ports says why)."""
    return free_ports(1)[0]


def transport_env(cwd: Path) -> dict[str, str]:
    """ZeroMQ endpoints of their own for a server running in `cwd` (never the shared defaults).

    ipc files in `cwd` cannot collide between servers; TCP ports (the fallback for a long `cwd`)
    are free when chosen and bound by the server moments later.
    """
    base = cwd.resolve()
    if len(str(base / "control.sock")) <= MAX_IPC_PATH:
        endpoints = {name: f"ipc://{base / name}.sock" for name in ENDPOINT_VARS}
    else:
        endpoints = {name: f"tcp://127.0.0.1:{free_port()}" for name in ENDPOINT_VARS}
    return {ENDPOINT_VARS[name]: endpoint for name, endpoint in endpoints.items()}


def _env_get(env: Mapping[str, str], name: str) -> str | None:
    """The value of `name` in `env`, matched case-insensitively as the appliance does."""
    for key, value in env.items():
        if key.upper() == name:
            return value
    return None


def appliance_command(*args: str) -> list[str]:
    """`python -m appliance ...` with the venv's interpreter (same as the console script)."""
    return [sys.executable, "-m", "appliance", *args]


def subprocess_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment minus any APP_* settings, plus the repo on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("APP_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(overrides or {})
    return env


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Server:
    """A running `python -m appliance serve` subprocess with its port and working directory."""

    def __init__(
        self,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        args: tuple = (),
        command: list[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`command` replaces `python -m appliance serve ARGS` (a script that serves through
        `appliance.cli.serve` with an injected engine); with `ssl_context`, `request` speaks
        HTTPS through it (a server configured with `server.tls_*`)."""
        self.cwd = cwd
        self.ssl_context = ssl_context
        self.port = free_port()
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.stdout_path = cwd / "stdout.log"
        self.stderr_path = cwd / "stderr.log"
        overrides = {"APP_SERVER__PORT": str(self.port), **transport_env(cwd), **(env or {})}
        # The endpoints in effect (the caller's env wins), for tests that publish to this server.
        self.router_endpoint = _env_get(overrides, ENDPOINT_VARS["router"]) or ""
        self.pull_endpoint = _env_get(overrides, ENDPOINT_VARS["pull"]) or ""
        self.control_endpoint = _env_get(overrides, ENDPOINT_VARS["control"]) or ""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                command or appliance_command("serve", *args),
                cwd=cwd,
                env=subprocess_env(overrides),
                stdout=out,
                stderr=err,
            )

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before ready: {self.stderr()}"
                )
            with contextlib.suppress(OSError):
                if self.request("GET", "/ready").status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout_s}s: {self.stderr()}")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> Response:
        conn = (
            http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=timeout_s, context=self.ssl_context
            )
            if self.ssl_context is not None
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        )
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            raw = conn.getresponse()
            response = Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
        finally:
            conn.close()
        # SPEC section 5: every response body is JSON, labelled so. Checked on every request.
        content_type = response.headers.get("content-type", "")
        assert content_type.split(";")[0].strip() == "application/json", response
        json.loads(response.body)
        return response

    def post_batch(self, symbol: str, values: Any, **kwargs: Any) -> Response:
        body = json.dumps({"symbol": symbol, "values": values}).encode()
        return self.request("POST", "/add_batch/", body, {"Content-Type": "application/json"})

    def stats(self, symbol: str, exponent: int | str) -> Response:
        from urllib.parse import urlencode

        return self.request("GET", "/stats/?" + urlencode({"symbol": symbol, "exponent": exponent}))

    def ingest_counters(self) -> dict[str, Any]:
        """GET /ingest: the counters of every transport, by transport name."""
        return self.ingest_counters_with({})

    def ingest_counters_with(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """GET /ingest with `headers` (an admin token when auth is on)."""
        response = self.request("GET", "/ingest", headers=headers)
        assert response.status == 200, response
        return response.json["transports"]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def running_server(cwd: Path, env: Mapping[str, str] | None = None) -> Iterator[Server]:
    server = Server(cwd, env)
    try:
        server.wait_ready()
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


def run_cli(cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 30):
    """Run the CLI to completion (for invocations that must fail fast).

    A free REST port by default: a `serve` that fails after binding it (transport errors) must
    not collide with another test's, or with anything on 8080.
    """
    defaults = {"APP_SERVER__PORT": str(free_port()), **transport_env(cwd)}
    return subprocess.run(
        appliance_command(*args),
        cwd=cwd,
        env=subprocess_env({**defaults, **(env or {})}),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
