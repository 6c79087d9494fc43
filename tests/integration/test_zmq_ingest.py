"""ZeroMQ ingest end to end (SPEC section 7, issue 3): a real server subprocess, real sockets.

Publishing goes through DEALER (acked), PUSH/PULL and a PUB the server SUB-connects to; what
arrived is read back over REST (GET /stats) and compared with numpy, and the transport's own
counters over GET /ingest. Raw DEALER sockets send hand-made frames where a test needs exact
control of sequence numbers or damaged bytes.

One server per xdist worker serves the module (tests use unique symbols and publisher ids, and
compare counter deltas); tests about starting and stopping get servers of their own.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from server_harness import Server, run_cli, running_server

from tests.waiting import wait_until
from transport.wire import Frame, Kind, Reason, decode_message, encode_data
from transport.zmq.publisher import ZmqPublisher

RCVHWM = 16  # the server's high-water mark: bursts below are far larger
REPLY_TIMEOUT_MS = 10_000
BASE_ENV = {
    "APP_STORE__MAX_SYMBOLS": "100000",
    "APP_STORE__STARTING_CAPACITY": "1024",
    "APP_TRANSPORT__SHM__ENABLED": "false",
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Zmq:
    """The test side's sockets, all closed when the module ends."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)  # never drop on the test side
        self.pub.bind("tcp://127.0.0.1:0")
        self.pub_endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._sockets = [self.pub]

    def dealer(self, endpoint: str) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        self._sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture(scope="module")
def sockets() -> Iterator[Zmq]:
    owned = Zmq()
    yield owned
    owned.close()


@pytest.fixture(scope="module")
def zserver(tmp_path_factory: pytest.TempPathFactory, sockets: Zmq) -> Iterator[Server]:
    env = {
        **BASE_ENV,
        "APP_TRANSPORT__ZMQ__RCVHWM": str(RCVHWM),
        "APP_TRANSPORT__ZMQ__SUB_CONNECT": json.dumps([sockets.pub_endpoint]),
    }
    with running_server(tmp_path_factory.mktemp("zmq"), env) as server:
        yield server


def exchange(dealer: zmq.Socket, message: bytes) -> list[tuple[Kind, int, int, Reason]]:
    """Send one message, return its reply as (kind, sequence, applied, reason) per frame."""
    dealer.send(message)
    assert dealer.poll(REPLY_TIMEOUT_MS, zmq.POLLIN), "no reply from the appliance"
    frames: list[Frame] = decode_message(dealer.recv())
    return [(f.kind, f.sequence, f.applied, f.reason) for f in frames]


def frame(
    publisher_id: int, sequence: int, symbol: str, values: list[float], *, first: bool = False
) -> bytes:
    """A DATA frame; `first` flags the start of a publisher's session (the ROUTER needs it)."""
    array = np.array(values, dtype=np.float64)
    return encode_data(publisher_id, sequence, symbol, array, first=first)


def stats(server: Server, symbol: str, exponent: int) -> dict[str, Any]:
    response = server.stats(symbol, exponent)
    assert response.status == 200, response.body
    return response.json


def assert_stats_equal_numpy(server: Server, symbol: str, values: np.ndarray) -> None:
    for exponent in range(1, int(np.ceil(np.log10(values.size))) + 1):
        window = values[-(10**exponent) :]
        body = stats(server, symbol, exponent)
        assert (body["min"], body["max"], body["last"]) == (
            window.min(),
            window.max(),
            window[-1],
        ), exponent
        assert body["avg"] == pytest.approx(window.mean(), rel=1e-9)
        assert body["var"] == pytest.approx(window.var(), rel=1e-9, abs=1e-12)


def counters(server: Server, kind: str) -> dict[str, Any]:
    return server.ingest_counters()["zmq"][kind]


def test_dealer_publisher_stats_equal_numpy(zserver: Server) -> None:
    symbol = unique("DEALER")
    values = np.random.default_rng(11).random(5000) * 100 + 50
    with ZmqPublisher(zserver.router_endpoint, max_frame_bytes=4096) as publisher:
        for start in range(0, values.size, 700):
            publisher.publish(symbol, values[start : start + 700])
        publisher.flush()
    assert_stats_equal_numpy(zserver, symbol, values)


def test_acks_carry_each_frames_sequence_and_the_applied_mark(
    zserver: Server, sockets: Zmq
) -> None:
    dealer = sockets.dealer(zserver.router_endpoint)
    pid, symbol = secrets.randbits(62), unique("ACK")
    packed = b"".join(frame(pid, seq, symbol, [float(seq)], first=seq == 1) for seq in (1, 2, 3))
    assert exchange(dealer, packed) == [(Kind.ACK, s, s, Reason.NONE) for s in (1, 2, 3)]
    assert exchange(dealer, frame(pid, 4, symbol, [4.0])) == [(Kind.ACK, 4, 4, Reason.NONE)]
    assert_stats_equal_numpy(zserver, symbol, np.array([1.0, 2.0, 3.0, 4.0]))


def test_negative_value_and_bad_crc_are_nacked_and_change_nothing(
    zserver: Server, sockets: Zmq
) -> None:
    dealer = sockets.dealer(zserver.router_endpoint)
    pid, fresh, known = secrets.randbits(62), unique("NEG"), unique("CRC")
    before = counters(zserver, "router")["rejected"]
    assert exchange(dealer, frame(pid, 1, fresh, [1.0, -0.5], first=True)) == [
        (Kind.NACK, 1, 1, Reason.INVALID_VALUE)
    ]
    unknown = zserver.stats(fresh, 1)
    assert unknown.status == 404
    assert unknown.json["code"] == "unknown_symbol"

    assert exchange(dealer, frame(pid, 2, known, [10.0, 20.0]))[0][0] is Kind.ACK
    damaged = bytearray(frame(pid, 3, known, [1000.0]))
    damaged[-3] ^= 0x40  # one flipped bit in the payload
    assert exchange(dealer, bytes(damaged)) == [(Kind.NACK, 3, 2, Reason.BAD_CRC)]
    assert stats(zserver, known, 1) == {"min": 10.0, "max": 20.0, "last": 20.0, "avg": 15.0,
                                        "var": 25.0}  # fmt: skip
    after = counters(zserver, "router")["rejected"]
    assert after.get("invalid_value", 0) == before.get("invalid_value", 0) + 1
    assert after.get("bad_crc", 0) == before.get("bad_crc", 0) + 1


def test_gaps_are_nacked_and_duplicates_acked_without_applying_twice(
    zserver: Server, sockets: Zmq
) -> None:
    dealer = sockets.dealer(zserver.router_endpoint)
    pid, symbol = secrets.randbits(62), unique("SEQ")
    before = counters(zserver, "router")["rejected"]
    assert exchange(dealer, frame(pid, 1, symbol, [1.0], first=True)) == [
        (Kind.ACK, 1, 1, Reason.NONE)
    ]
    # Sequence 2 skipped: 3 is not applied, and the nack says to resend from applied + 1 = 2.
    assert exchange(dealer, frame(pid, 3, symbol, [3.0])) == [(Kind.NACK, 3, 1, Reason.GAP)]
    assert stats(zserver, symbol, 1)["last"] == 1.0
    resent = frame(pid, 2, symbol, [2.0]) + frame(pid, 3, symbol, [3.0])
    assert exchange(dealer, resent) == [
        (Kind.ACK, 2, 2, Reason.NONE),
        (Kind.ACK, 3, 3, Reason.NONE),
    ]
    # A resent frame that already arrived: acked (the data is in), never applied again.
    assert exchange(dealer, frame(pid, 2, symbol, [2.0])) == [(Kind.ACK, 2, 3, Reason.NONE)]
    assert_stats_equal_numpy(zserver, symbol, np.array([1.0, 2.0, 3.0]))
    after = counters(zserver, "router")["rejected"]
    assert after.get("gap", 0) == before.get("gap", 0) + 1
    assert after.get("duplicate", 0) == before.get("duplicate", 0) + 1


def test_push_pull_stats_equal_numpy(zserver: Server) -> None:
    symbol = unique("PUSH")
    values = np.random.default_rng(12).random(3000) * 10
    applied_before = counters(zserver, "pull")["values_applied"]
    with ZmqPublisher(zserver.pull_endpoint, mode="push", max_frame_bytes=2048) as publisher:
        publisher.publish(symbol, values)
    wait_until(lambda: counters(zserver, "pull")["values_applied"] >= applied_before + values.size)
    assert_stats_equal_numpy(zserver, symbol, values)


def test_sub_connect_receives_from_an_external_pub(zserver: Server, sockets: Zmq) -> None:
    # PUB drops messages until the server's subscription has arrived: probe until one lands.
    probe_id, probe_sequence = secrets.randbits(62), iter(range(1, 1_000_000))

    def probe_landed() -> bool:
        sockets.pub.send(frame(probe_id, next(probe_sequence), unique("PROBE"), [1.0]))
        return counters(zserver, "sub")["frames_applied"] > 0

    wait_until(probe_landed)
    symbol, pid = unique("SUB"), secrets.randbits(62)
    values = np.random.default_rng(13).random(1000)
    for sequence, start in enumerate(range(0, values.size, 100), start=1):
        sockets.pub.send(frame(pid, sequence, symbol, list(values[start : start + 100])))
    wait_until(lambda: zserver.stats(symbol, 3).status == 200 and
               stats(zserver, symbol, 3)["last"] == values[-1])  # fmt: skip
    assert_stats_equal_numpy(zserver, symbol, values)


@pytest.mark.parametrize("mode", ["dealer", "push"])
def test_a_burst_beyond_the_high_water_mark_is_neither_lost_nor_applied_twice(
    zserver: Server, mode: str
) -> None:
    """6 000 frames against RCVHWM = 16: the sender blocks (back-pressure), nothing drops.

    The DEALER's window (4096) is far above the high-water mark, so its sends block, not the
    window. PUSH has no acks: the publisher stays connected until everything is counted, since
    ZeroMQ can lose what is still in transit when a PUSH socket closes under back-pressure.
    """
    symbol, frames, per_frame = unique("BURST"), 6000, 10
    kind = "router" if mode == "dealer" else "pull"
    endpoint = zserver.router_endpoint if mode == "dealer" else zserver.pull_endpoint
    total = frames * per_frame
    before = counters(zserver, kind)
    values = np.arange(1, total + 1, dtype=np.float64)
    peak_in_flight = 0
    with ZmqPublisher(endpoint, mode=mode, window=4096, timeout_s=30) as publisher:  # type: ignore[arg-type]
        for start in range(0, total, per_frame):
            publisher.publish(symbol, values[start : start + per_frame])
            peak_in_flight = max(peak_in_flight, publisher.in_flight)
        publisher.flush()
        wait_until(
            lambda: counters(zserver, kind)["values_applied"] >= before["values_applied"] + total
        )
    after = counters(zserver, kind)
    assert after["values_applied"] == before["values_applied"] + total
    if mode == "dealer":
        assert peak_in_flight > RCVHWM  # more was outstanding than the appliance would queue
        assert after["acks_dropped"] == before["acks_dropped"]
    body = stats(zserver, symbol, 5)  # a window of 10^5 >= everything sent
    # Each of 1..N exactly once: a lost or doubled value moves the mean or the variance.
    assert (body["min"], body["max"], body["last"]) == (1.0, float(total), float(total))
    assert body["avg"] == pytest.approx((total + 1) / 2, rel=1e-12)
    assert body["var"] == pytest.approx((total**2 - 1) / 12, rel=1e-12)


def test_ingest_counters_are_served_with_get_and_head(zserver: Server) -> None:
    transports = zserver.ingest_counters()
    assert set(transports) == {"zmq"}  # shared memory is disabled for this server
    zmq_counters = transports["zmq"]
    assert zmq_counters["running"] is True
    assert zmq_counters["endpoints"]["router"] == zserver.router_endpoint
    assert {"router", "pull", "sub", "control", "loop_errors"} <= set(zmq_counters)
    assert zmq_counters["loop_errors"] == 0
    conn = http.client.HTTPConnection("127.0.0.1", zserver.port, timeout=10)
    try:
        conn.request("HEAD", "/ingest")
        head = conn.getresponse()
        assert head.status == 200
        assert int(head.getheader("content-length", "0")) > 0
        assert head.read() == b""
    finally:
        conn.close()


def test_a_transport_endpoint_in_use_exits_2_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        result = run_cli(
            tmp_path, "serve", env={**BASE_ENV, "APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": busy}
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot bind transport endpoint {busy}" in lines[0]
    assert "Address already in use" in lines[0]


def test_rdma_required_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "serve", env={**BASE_ENV, "APP_TRANSPORT__RDMA__ENABLED": "required"}
    )
    assert result.returncode == 2
    assert 'transport.rdma.enabled = "required"' in result.stderr
    assert "pyverbs" in result.stderr or "RDMA device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_with_transports_disabled_rest_still_serves(tmp_path: Path) -> None:
    env = {**BASE_ENV, "APP_TRANSPORT__ZMQ__ENABLED": "false"}
    with running_server(tmp_path, env) as server:
        assert server.post_batch("REST", [1.0, 2.0]).status == 200
        assert stats(server, "REST", 1)["last"] == 2.0
        assert server.ingest_counters() == {}
        assert not Path(server.router_endpoint.removeprefix("ipc://")).exists()


def test_stop_removes_the_ipc_socket_files(tmp_path: Path) -> None:
    server = Server(tmp_path, BASE_ENV)
    try:
        server.wait_ready()
        paths = [
            Path(endpoint.removeprefix("ipc://"))
            for endpoint in (server.router_endpoint, server.pull_endpoint, server.control_endpoint)
        ]
        if not server.router_endpoint.startswith("ipc://"):
            pytest.skip("this tmp path is too long for ipc endpoints; the harness used TCP")
        assert all(path.exists() for path in paths)
    finally:
        assert server.stop() == 0
    assert not any(path.exists() for path in paths)
