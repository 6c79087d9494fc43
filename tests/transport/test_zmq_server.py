"""ZmqIngest in-process: real ZeroMQ sockets (TCP port 0, ipc files in tmp_path), a recording sink.

What is checked is what a publisher on the other end relies on: one reply per message with one
ACK/NACK per frame in order, the sequence rules (gaps nacked, duplicates acked but not applied),
nothing of a bad frame reaching the sink, back-pressure instead of loss, a loop that survives
any failure, bind errors that name the endpoint and leave nothing open, and a prompt stop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from tests.waiting import wait_until
from transport.control import ControlError, request
from transport.errors import TransportBindError
from transport.ingest import Rejected
from transport.wire import RETRYABLE, Frame, Kind, Reason, decode_message, encode_data
from transport.zmq.server import ZmqIngest

LOCAL = "tcp://127.0.0.1:0"
REPLY_TIMEOUT_MS = 5000


class Recorder:
    """A sink that keeps a copy of every batch (the values are views into ZeroMQ messages).

    `fail` is called before recording and may raise, to play a struggling store.
    """

    def __init__(self, fail: Callable[[str, np.ndarray], None] | None = None) -> None:
        self.batches: list[tuple[str, np.ndarray]] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, symbol: str, values: np.ndarray, *origin: int) -> None:
        if (values < 0).any():
            raise Rejected(Reason.INVALID_VALUE, "negative value")
        if self.fail is not None:
            self.fail(symbol, values)
        with self._lock:
            self.batches.append((symbol, values.copy()))

    def values(self, symbol: str) -> np.ndarray:
        with self._lock:
            parts = [v for s, v in self.batches if s == symbol]
        return np.concatenate(parts) if parts else np.empty(0)


class Batched:
    """The same sink behind the batch interface (`BatchSink`), answering from another thread
    as the log's writer does; a retryable failure stops that publisher's later items."""

    def __init__(self, sink: Recorder) -> None:
        self.sink = sink

    def __call__(self, symbol: str, values: np.ndarray, *origin: int) -> None:
        self.sink(symbol, values, *origin)

    def prepare(
        self, symbol: str, values: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        return values

    def submit_batch(self, items: list, done: Callable[[list[Reason]], None]) -> None:
        def run() -> None:
            reasons: list[Reason] = []
            broken: set[int] = set()
            for symbol, values, publisher_id, sequence, _ in items:
                reason = Reason.INTERNAL
                if publisher_id not in broken:
                    try:
                        self.sink(symbol, values, publisher_id, sequence)
                        reason = Reason.NONE
                    except Rejected as exc:
                        reason = exc.reason
                    except Exception:
                        reason = Reason.INTERNAL
                if reason in RETRYABLE:
                    broken.add(publisher_id)
                reasons.append(reason)
            done(reasons)

        threading.Thread(target=run, daemon=True).start()


@pytest.fixture(autouse=True, params=["frame-by-frame", "batched"])
def sink_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs against both the plain sink and the batch path of the loop."""
    global SINK_MODE
    SINK_MODE = request.param
    yield request.param
    SINK_MODE = "frame-by-frame"


SINK_MODE = "frame-by-frame"


@contextlib.contextmanager
def running_ingest(sink: Recorder, **kwargs: object) -> Iterator[ZmqIngest]:
    """A started ZmqIngest on local TCP port-0 endpoints (router, pull, control by default)."""
    options: dict[str, object] = {
        "router_endpoint": LOCAL,
        "pull_endpoint": LOCAL,
        "control_endpoint": LOCAL,
        **kwargs,
    }
    if SINK_MODE == "batched":
        sink = Batched(sink)  # type: ignore[assignment]
    ingest = ZmqIngest(sink, **options)  # type: ignore[arg-type]
    ingest.bind()
    ingest.start()
    try:
        yield ingest
    finally:
        assert ingest.stop(2.0)


class Clients:
    """The test's own sockets, all closed at teardown (an unclosed one is a ResourceWarning)."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self._sockets: list[zmq.Socket] = []

    def socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self._sockets.append(sock)
        return sock

    def connect(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.socket(kind)
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def clients() -> Iterator[Clients]:
    owned = Clients()
    yield owned
    owned.close()


def reply(sock: zmq.Socket) -> list[Frame]:
    assert sock.poll(REPLY_TIMEOUT_MS, zmq.POLLIN), "no reply from the ingest thread"
    return decode_message(sock.recv())


def data(
    sequence: int, symbol: str, values: list[float], publisher_id: int = 7, *, first: bool = False
) -> bytes:
    """A DATA frame; `first` flags the start of a publisher's session (the ROUTER needs it)."""
    array = np.array(values, dtype=np.float64)
    return encode_data(publisher_id, sequence, symbol, array, first=first)


def outcomes(frames: list[Frame]) -> list[tuple[Kind, int, int, Reason]]:
    return [(f.kind, f.sequence, f.applied, f.reason) for f in frames]


def test_router_answers_one_message_with_one_ack_per_frame(clients: Clients) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        dealer = clients.connect(zmq.DEALER, ingest.bound_endpoints["router"])
        dealer.send(
            data(1, "A", [1.0, 2.0], first=True) + data(2, "B", [3.0]) + data(3, "A", [4.0])
        )
        assert outcomes(reply(dealer)) == [
            (Kind.ACK, 1, 1, Reason.NONE),
            (Kind.ACK, 2, 2, Reason.NONE),
            (Kind.ACK, 3, 3, Reason.NONE),
        ]
        np.testing.assert_array_equal(sink.values("A"), [1.0, 2.0, 4.0])
        np.testing.assert_array_equal(sink.values("B"), [3.0])
        counters = ingest.snapshot()["router"]
        assert counters["messages"] == 1
        assert counters["frames_applied"] == 3
        assert counters["values_applied"] == 4


def test_bad_value_and_bad_crc_are_nacked_and_never_reach_the_sink(clients: Clients) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        dealer = clients.connect(zmq.DEALER, ingest.bound_endpoints["router"])
        dealer.send(data(1, "NEG", [1.0, -2.0], first=True))
        # A content error is final: `applied` moves past it (resending cannot help).
        assert outcomes(reply(dealer)) == [(Kind.NACK, 1, 1, Reason.INVALID_VALUE)]
        damaged = bytearray(data(2, "CRC", [5.0]))
        damaged[-1] ^= 0x01
        dealer.send(bytes(damaged))
        # A damaged frame is retryable: `applied` stays, so the publisher resends it.
        assert outcomes(reply(dealer)) == [(Kind.NACK, 2, 1, Reason.BAD_CRC)]
        dealer.send(data(2, "CRC", [5.0]))
        assert outcomes(reply(dealer)) == [(Kind.ACK, 2, 2, Reason.NONE)]
        assert sink.values("NEG").size == 0
        np.testing.assert_array_equal(sink.values("CRC"), [5.0])
        rejected = ingest.snapshot()["router"]["rejected"]
        assert rejected == {"invalid_value": 1, "bad_crc": 1}


def test_gap_is_nacked_and_a_duplicate_acked_but_not_applied_twice(clients: Clients) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        dealer = clients.connect(zmq.DEALER, ingest.bound_endpoints["router"])
        dealer.send(data(1, "G", [1.0], first=True))
        assert outcomes(reply(dealer)) == [(Kind.ACK, 1, 1, Reason.NONE)]
        dealer.send(data(3, "G", [3.0]))
        assert outcomes(reply(dealer)) == [(Kind.NACK, 3, 1, Reason.GAP)]
        dealer.send(data(2, "G", [2.0]) + data(3, "G", [3.0]))
        assert [f.applied for f in reply(dealer)] == [2, 3]
        dealer.send(data(2, "G", [2.0]))
        # A duplicate is acked (the data is in), with the publisher's current `applied`.
        assert outcomes(reply(dealer)) == [(Kind.ACK, 2, 3, Reason.NONE)]
        np.testing.assert_array_equal(sink.values("G"), [1.0, 2.0, 3.0])
        assert ingest.snapshot()["router"]["rejected"] == {"gap": 1, "duplicate": 1}


def test_router_asks_an_unknown_publisher_for_its_start(clients: Clients) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        dealer = clients.connect(zmq.DEALER, ingest.bound_endpoints["router"])
        dealer.send(data(2, "U", [2.0]) + data(3, "U", [3.0]))  # the message with 1 was lost
        assert outcomes(reply(dealer)) == [
            (Kind.NACK, 2, 0, Reason.UNKNOWN_PUBLISHER),
            (Kind.NACK, 3, 0, Reason.UNKNOWN_PUBLISHER),
        ]
        assert sink.batches == []
        dealer.send(data(1, "U", [1.0], first=True) + data(2, "U", [2.0]) + data(3, "U", [3.0]))
        assert outcomes(reply(dealer)) == [(Kind.ACK, s, s, Reason.NONE) for s in (1, 2, 3)]
        np.testing.assert_array_equal(sink.values("U"), [1.0, 2.0, 3.0])
        assert ingest.snapshot()["router"]["rejected"] == {"unknown_publisher": 2}


@pytest.mark.parametrize("message", [b"", b"garbage", b"HFTW" + bytes(60)])
def test_malformed_messages_get_one_nack_and_the_loop_goes_on(
    clients: Clients, message: bytes
) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        dealer = clients.connect(zmq.DEALER, ingest.bound_endpoints["router"])
        dealer.send(message)
        (nack,) = reply(dealer)
        assert nack.kind is Kind.NACK
        assert nack.reason in (Reason.BAD_LENGTH, Reason.BAD_CRC, Reason.BAD_VERSION)
        dealer.send(data(1, "OK", [1.0], first=True))
        assert outcomes(reply(dealer)) == [(Kind.ACK, 1, 1, Reason.NONE)]
        assert sink.batches == [("OK", pytest.approx(np.array([1.0])))]


def test_a_failing_sink_is_nacked_internal_and_the_frame_can_be_resent(
    clients: Clients,
) -> None:
    failures = iter([RuntimeError("disk on fire")])

    def fail_once(symbol: str, values: np.ndarray) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    sink = Recorder(fail_once)
    with running_ingest(sink) as ingest:
        dealer = clients.connect(zmq.DEALER, ingest.bound_endpoints["router"])
        dealer.send(data(1, "S", [1.0], first=True))
        assert outcomes(reply(dealer)) == [(Kind.NACK, 1, 0, Reason.INTERNAL)]
        dealer.send(data(1, "S", [1.0], first=True))
        assert outcomes(reply(dealer)) == [(Kind.ACK, 1, 1, Reason.NONE)]
        np.testing.assert_array_equal(sink.values("S"), [1.0])


def test_an_unexpected_error_in_the_loop_still_answers_and_the_loop_survives(
    clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        processor = ingest._processors["router"]
        original = processor.process_message
        calls = iter([True])

        def broken_once(buffer: bytes | memoryview, *check: object) -> list:
            if next(calls, False):
                raise AssertionError("a bug in the transport")
            return original(buffer, *check)

        monkeypatch.setattr(processor, "process_message", broken_once)
        original_begin = processor.begin

        def begin_broken_once(buffers: list, batch_sink: object, *checks: object) -> object:
            if next(calls, False):
                raise AssertionError("a bug in the transport")
            return original_begin(buffers, batch_sink, *checks)

        monkeypatch.setattr(processor, "begin", begin_broken_once)
        dealer = clients.connect(zmq.DEALER, ingest.bound_endpoints["router"])
        dealer.send(data(1, "L", [1.0], first=True))
        # Still exactly one reply: a retryable NACK, so a publisher resends.
        assert outcomes(reply(dealer)) == [(Kind.NACK, 1, 0, Reason.INTERNAL)]
        dealer.send(data(1, "L", [1.0], first=True))
        assert outcomes(reply(dealer)) == [(Kind.ACK, 1, 1, Reason.NONE)]
        assert ingest.snapshot()["loop_errors"] == 1
        assert ingest.running


def test_a_req_client_gets_its_envelope_back(clients: Clients) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        req = clients.connect(zmq.REQ, ingest.bound_endpoints["router"])
        req.send(data(1, "R", [1.5], first=True))
        assert outcomes(reply(req)) == [(Kind.ACK, 1, 1, Reason.NONE)]


def test_pull_applies_frames_and_counts_gaps_without_acks(clients: Clients) -> None:
    sink = Recorder()
    with running_ingest(sink) as ingest:
        push = clients.connect(zmq.PUSH, ingest.bound_endpoints["pull"])
        for sequence in (1, 2, 4, 4):  # 3 is missing, 4 comes twice
            push.send(data(sequence, "P", [float(sequence)]))
        # Applied frames, not received messages: a batch is applied after it is counted.
        wait_until(lambda: ingest.snapshot()["pull"]["frames_applied"] == 3)
        assert ingest.snapshot()["pull"]["messages"] == 4
        # Nobody can resend on PULL: the gap is counted and the frame applied; the duplicate is
        # counted and dropped.
        np.testing.assert_array_equal(sink.values("P"), [1.0, 2.0, 4.0])
        assert ingest.snapshot()["pull"]["rejected"] == {"gap": 1, "duplicate": 1}


def test_pull_back_pressure_blocks_the_sender_and_loses_nothing(clients: Clients) -> None:
    release = threading.Event()
    sink = Recorder(lambda symbol, values, *origin: release.wait(10))
    payload = [1.0] * 8192  # 64 KiB frames fill the socket buffers quickly
    with running_ingest(sink, rcvhwm=1) as ingest:
        push = clients.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 1)
        push.connect(ingest.bound_endpoints["pull"])
        sent = 0
        try:
            with contextlib.suppress(zmq.Again):
                while sent < 10_000:
                    push.send(data(sent + 1, "BP", payload), zmq.NOBLOCK)
                    sent += 1
        finally:
            release.set()
        assert 0 < sent < 10_000, "the sender never felt back-pressure"
        wait_until(lambda: ingest.snapshot()["pull"]["frames_applied"] == sent)
        assert sink.values("BP").size == sent * len(payload)


def test_sub_receives_from_a_connected_pub_with_or_without_a_topic(
    clients: Clients,
) -> None:
    pub = clients.socket(zmq.PUB)
    pub.bind(LOCAL)
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    sink = Recorder()
    with running_ingest(sink, sub_connect=[endpoint]) as ingest:
        # PUB drops everything until the subscription arrives: probe until one lands.
        probe = iter(range(1, 1_000_000))

        def probe_landed() -> bool:
            pub.send(data(next(probe), "PROBE", [0.0], publisher_id=99))
            return ingest.snapshot()["sub"]["frames_applied"] > 0

        wait_until(probe_landed)
        pub.send(data(1, "SUB", [1.0]))
        pub.send_multipart([b"ticks", data(2, "SUB", [2.0])])  # a topic envelope is skipped
        wait_until(lambda: sink.values("SUB").size == 2)
        np.testing.assert_array_equal(sink.values("SUB"), [1.0, 2.0])
        assert ingest.snapshot()["endpoints"]["sub0"] == endpoint


def test_control_requests_reach_the_registered_handlers(clients: Clients) -> None:
    ingest = ZmqIngest(
        Recorder(),
        router_endpoint=LOCAL,
        control_endpoint=LOCAL,
        control_handlers={"echo": lambda body, caller: {"echo": body["text"]}},
    )
    ingest.add_control_handlers({"twice": lambda body, caller: {"value": 2 * body["value"]}})
    with pytest.raises(ValueError, match="echo"):
        ingest.add_control_handlers({"echo": lambda body, caller: {}})
    ingest.bind()
    ingest.start()
    try:
        with pytest.raises(RuntimeError, match="before start"):
            ingest.add_control_handlers({"late": lambda body, caller: {}})
        endpoint = ingest.bound_endpoints["control"]
        reply_body = request(endpoint, {"op": "echo", "text": "hi"}, context=clients.context)
        assert reply_body == {"ok": True, "echo": "hi"}
        assert (
            request(endpoint, {"op": "twice", "value": 21}, context=clients.context)["value"] == 42
        )
        with pytest.raises(ControlError, match="unknown op"):
            request(endpoint, {"op": "nope"}, context=clients.context)
        assert ingest.snapshot()["control"] == {"requests": 3, "ops": ["echo", "twice"]}
    finally:
        assert ingest.stop(2.0)


def _listening_port() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_bind_failure_names_the_endpoint_and_leaves_nothing_bound(tmp_path: Path) -> None:
    router = f"ipc://{tmp_path}/router.sock"
    with _listening_port() as taken:
        busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        failing = ZmqIngest(Recorder(), router_endpoint=router, pull_endpoint=busy)
        with pytest.raises(TransportBindError) as error:
            failing.bind()
    assert busy in str(error.value)
    assert "Address already in use" in str(error.value)
    # The ROUTER bound before the failure was closed: the same file binds again at once.
    again = ZmqIngest(Recorder(), router_endpoint=router)
    again.bind()
    assert again.stop()


def test_an_ipc_endpoint_in_use_is_refused_and_its_file_removed_on_stop(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/in-use.sock"
    first = ZmqIngest(Recorder(), router_endpoint=endpoint)
    first.bind()
    first.start()
    try:
        # libzmq alone would silently take the file over from the running appliance.
        with pytest.raises(TransportBindError, match=r"in-use\.sock"):
            ZmqIngest(Recorder(), router_endpoint=endpoint).bind()
    finally:
        assert first.stop(2.0)
    assert not (tmp_path / "in-use.sock").exists()


def test_stop_is_prompt_and_frees_the_endpoints() -> None:
    ingest = ZmqIngest(Recorder(), router_endpoint=LOCAL, pull_endpoint=LOCAL)
    ingest.bind()
    ingest.start()
    port = int(ingest.bound_endpoints["router"].rsplit(":", 1)[1])
    started = time.monotonic()
    assert ingest.stop(5.0)
    # Well under the 1 s poll safety timeout: the wake socket ended the poll.
    assert time.monotonic() - started < 0.5
    assert not ingest.running
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_stop_without_start_closes_everything_and_start_needs_bind() -> None:
    ingest = ZmqIngest(Recorder(), router_endpoint=LOCAL)
    with pytest.raises(RuntimeError, match="bind"):
        ingest.start()
    ingest.bind()
    with pytest.raises(RuntimeError, match="already"):
        ingest.bind()
    assert ingest.stop()
    assert ingest.stop()  # idempotent
    assert ingest.snapshot()["running"] is False


def test_snapshot_lists_only_configured_sockets() -> None:
    ingest = ZmqIngest(Recorder(), router_endpoint=LOCAL)
    snapshot = ingest.snapshot()
    assert "router" in snapshot
    assert not {"pull", "sub", "control"} & set(snapshot)
