"""Binary transports' security against a real server (issue 15, item 2; docs/security.md).

- CURVE: a real pyzmq DEALER with a listed key is admitted and acked; one without keys, or with
  an unlisted key, never gets a frame in. The control socket is behind CURVE too.
- Control tokens (auth on): a request without a token, or with a read token, is refused; a
  write token opens a ring.
- Rings: a second client cannot take over or close another client's ring (no secret).
- ZMQ_MAXMSGSIZE: a raw ZMTP peer declaring an 8 GiB message part is disconnected at the
  header, and the appliance's resident memory does not grow.

REST calls carry an admin bearer token, so these tests hold whether or not REST enforces auth.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from server_harness import Server, running_server

from appliance.auth import new_token, tokens_file_entry
from tests.waiting import wait_until
from transport.control import ControlError, request
from transport.curve import CurveKeys
from transport.publisher import PublishError
from transport.shm.publisher import ShmPublisher
from transport.shm.server import DEFAULT_DIRECTORY
from transport.wire import Reason
from transport.zmq.publisher import ZmqPublisher

TIMEOUT_S = 20.0
RSS_GROWTH_LIMIT_KB = 20 * 1024
DECLARED_BYTES = 8 << 30


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Tokens:
    """Tokens of one test server: an admin (REST), a writer (also the CURVE client's name), a
    reader."""

    def __init__(self, directory: Path) -> None:
        self.admin, self.writer, self.reader = new_token(), new_token(), new_token()
        self.eur_desk = new_token()
        self.path = directory / "tokens.toml"
        self.path.write_text(
            tokens_file_entry("ops", self.admin, "admin")
            + tokens_file_entry("feeder", self.writer, "write")
            + tokens_file_entry("viewer", self.reader, "read")
            + tokens_file_entry("eur-desk", self.eur_desk, "write", ["EUR/*"])
        )

    @property
    def rest(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}


def applied(server: Server, tokens: Tokens | None, kind: str = "router") -> int:
    headers = tokens.rest if tokens else {}
    response = server.request("GET", "/ingest", headers=headers)
    assert response.status == 200, response
    return int(response.json["transports"]["zmq"][kind]["frames_applied"])


@pytest.fixture(scope="module")
def curve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Any]]:
    root = tmp_path_factory.mktemp("curve")
    keys = root / "keys"
    keys.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    eur_public, eur_secret = zmq.auth.create_certificates(keys, "eur")
    public_key, _ = zmq.auth.load_certificate(client_public)
    eur_key, _ = zmq.auth.load_certificate(eur_public)
    clients = root / "clients.toml"
    clients.write_text(
        f'[[clients]]\nname = "feeder"\npublic_key = "{public_key.decode()}"\n'
        f'[[clients]]\nname = "eur-desk"\npublic_key = "{eur_key.decode()}"\n'
    )
    tokens = Tokens(root)
    env = {
        "APP_AUTH__MODE": "token",
        "APP_AUTH__TOKENS_FILE": str(tokens.path),
        "APP_TRANSPORT__ZMQ__CURVE_SECRET_KEY_FILE": str(server_secret),
        "APP_TRANSPORT__ZMQ__CURVE_CLIENTS_FILE": str(clients),
        "APP_TRANSPORT__SHM__ENABLED": "true",
        "APP_TRANSPORT__SHM__SLOTS": "16",
        "APP_TRANSPORT__SHM__SLOT_BYTES": "4096",
        "APP_TRANSPORT__SHM__MAX_RINGS_PER_TOKEN": "1",
    }
    with running_server(root / "srv", env) as server:
        ns = type("Keys", (), {})()
        ns.tokens = tokens
        ns.good = CurveKeys.from_files(server_public, client_secret)
        ns.stranger = CurveKeys.from_files(server_public, stranger_secret)
        ns.eur = CurveKeys.from_files(server_public, eur_secret)
        yield server, ns


def test_curve_admits_a_listed_key_and_refuses_others(curve_server: tuple[Server, Any]) -> None:
    server, keys = curve_server
    symbol = unique("CURVE")
    before = applied(server, keys.tokens)
    with ZmqPublisher(server.router_endpoint, curve=keys.good, timeout_s=TIMEOUT_S) as pub:
        pub.publish(symbol, [1.0, 2.0])
        pub.flush(TIMEOUT_S)
    assert applied(server, keys.tokens) == before + 1
    for curve in (None, keys.stranger):
        pub = ZmqPublisher(
            server.router_endpoint, curve=curve, timeout_s=1.0, retry_interval_s=0.5,
            max_retries=1,
        )  # fmt: skip
        try:
            pub.publish(unique("CURVE-NO"), [3.0])
            with pytest.raises(PublishError):
                pub.flush(2.0)
        finally:
            pub.close()
    assert applied(server, keys.tokens) == before + 1
    # The control socket is behind CURVE too: without keys, no reply at all.
    with pytest.raises(ControlError, match="no reply"):
        request(server.control_endpoint, {"op": "shm.open", "publisher_id": 1,
                                          "token": keys.tokens.writer}, timeout_s=1.0)  # fmt: skip


def test_a_curve_client_is_held_to_its_tokens_symbol_patterns(
    curve_server: tuple[Server, Any],
) -> None:
    """The ZAP handler names each connection's token; its frames for symbols outside the
    token's patterns are nacked FORBIDDEN and not applied, on the ROUTER and on PULL."""
    server, keys = curve_server
    allowed, refused = f"EUR/{unique('OK')}", unique("USD")
    with ZmqPublisher(server.router_endpoint, curve=keys.eur, timeout_s=TIMEOUT_S) as pub:
        pub.publish(allowed, [1.0])
        pub.flush(TIMEOUT_S)
        pub.publish(refused, [2.0])
        with pytest.raises(PublishError) as info:
            pub.flush(TIMEOUT_S)
    assert [r.reason for r in info.value.rejections] == [Reason.FORBIDDEN]
    # PULL: fire and forget, the frame is counted as rejected and never applied.
    rejected_before = server.ingest_counters_with(keys.tokens.rest)["zmq"]["pull"]["rejected"]
    pull = ZmqPublisher(server.pull_endpoint, mode="push", curve=keys.eur, timeout_s=TIMEOUT_S)
    with pull:
        pull.publish(refused, [3.0])
        pull.flush(TIMEOUT_S)
    wait_until(
        lambda: (
            server.ingest_counters_with(keys.tokens.rest)["zmq"]["pull"]["rejected"].get(
                "forbidden", 0
            )
            == rejected_before.get("forbidden", 0) + 1
        ),
        "the PULL frame refused",
        TIMEOUT_S,
    )
    stats = server.request("GET", f"/stats/?symbol={refused}&exponent=1", headers=keys.tokens.rest)
    assert stats.json["code"] == "unknown_symbol"  # nothing of it was applied
    # The feeder (no patterns) may write that symbol.
    with ZmqPublisher(server.router_endpoint, curve=keys.good, timeout_s=TIMEOUT_S) as pub:
        pub.publish(refused, [4.0])
        pub.flush(TIMEOUT_S)


@pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")
def test_control_ops_need_a_write_token(curve_server: tuple[Server, Any]) -> None:
    server, keys = curve_server
    tokens = keys.tokens

    def control(body: dict[str, Any]) -> dict[str, Any]:
        return request(server.control_endpoint, body, timeout_s=TIMEOUT_S, curve=keys.good)

    for token, code in ((None, "unauthorized"), ("hft_unknown", "unauthorized"),
                        (tokens.reader, "forbidden")):  # fmt: skip
        body = {"op": "shm.open", "publisher_id": 5, **({"token": token} if token else {})}
        with pytest.raises(ControlError) as refused:
            control(body)
        assert refused.value.code == code, refused.value
    pub = ShmPublisher(server.control_endpoint, token=tokens.writer, curve=keys.good,
                       timeout_s=TIMEOUT_S)  # fmt: skip
    try:
        pub.publish(unique("TOK"), [1.0])
        pub.flush(TIMEOUT_S)
        # max_rings_per_token = 1: the same token cannot hold a second ring.
        with pytest.raises(PublishError, match="max_rings_per_token is 1"):
            ShmPublisher(server.control_endpoint, token=tokens.writer, curve=keys.good)
    finally:
        pub.close()


@pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")
def test_ring_takeover_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv", {"APP_TRANSPORT__SHM__ENABLED": "true"}) as server:
        symbol = unique("OWN")
        owner = ShmPublisher(server.control_endpoint, slots=16, slot_bytes=4096,
                             release_on_close=True, timeout_s=TIMEOUT_S)  # fmt: skip
        try:
            owner.publish(symbol, [1.0])
            owner.flush(TIMEOUT_S)
            pid = owner.publisher_id
            # Another local client that learnt the publisher id (GET /ingest, a log line).
            with pytest.raises(PublishError, match="belongs to the client that opened it"):
                ShmPublisher(server.control_endpoint, publisher_id=pid, timeout_s=TIMEOUT_S)
            for secret in ({}, {"secret": "0" * 32}):
                with pytest.raises(ControlError) as refused:
                    request(server.control_endpoint,
                            {"op": "shm.close", "publisher_id": pid, **secret})  # fmt: skip
                assert refused.value.code == "forbidden"
            owner.publish(symbol, [2.0])  # the ring is still the owner's
            owner.flush(TIMEOUT_S)
            rings = server.request("GET", "/ingest").json["transports"]["shm"]
            assert rings["totals"]["frames_applied"] == 2
            assert not any(key.startswith("rejected") for key in rings["totals"])
        finally:
            owner.close()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _zmtp_connect(endpoint: str) -> socket.socket:
    """A raw ZMTP 3.0 DEALER (NULL mechanism) on an ipc:// or tcp:// endpoint, past the
    handshake: what any client can do without pyzmq's limits."""
    if endpoint.startswith("ipc://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(endpoint[len("ipc://") :])
    else:
        host, port = endpoint[len("tcp://") :].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(TIMEOUT_S)
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)
    sock.sendall(greeting)
    body = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    sock.sendall(bytes([0x04, len(body)]) + body)
    received = b""
    while len(received) < 64 + 2:  # the server's greeting and the start of its READY
        chunk = sock.recv(4096)
        assert chunk, "the appliance closed the connection during the handshake"
        received += chunk
    return sock


def test_an_8_gib_declared_message_is_refused_without_memory_growth(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv", {"APP_TRANSPORT__SHM__ENABLED": "false"}) as server:
        pid = server.proc.pid
        before = _rss_kb(pid)
        sock = _zmtp_connect(server.router_endpoint)
        dropped = False
        try:
            # A LONG message frame (flags 0x02) declaring 8 GiB, then data as fast as possible.
            sock.sendall(b"\x02" + DECLARED_BYTES.to_bytes(8, "big"))
            chunk = bytes(1 << 20)
            for _ in range(512):  # up to 512 MiB: what an unbounded receiver would keep
                sock.sendall(chunk)
        except OSError:  # EPIPE / ECONNRESET: the appliance dropped the connection
            dropped = True
        finally:
            with contextlib.suppress(OSError):
                if not dropped:
                    sock.settimeout(5.0)
                    dropped = sock.recv(1) == b""
            sock.close()
        assert dropped, "the appliance kept reading an 8 GiB message part"
        time.sleep(0.2)
        growth = _rss_kb(pid) - before
        assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth} KiB"
        # The appliance still serves well-behaved publishers.
        symbol = unique("AFTER")
        with ZmqPublisher(server.router_endpoint, timeout_s=TIMEOUT_S) as pub:
            pub.publish(symbol, [1.0])
            pub.flush(TIMEOUT_S)
        wait_until(lambda: applied(server, None) >= 1, "the frame to be applied", TIMEOUT_S)
