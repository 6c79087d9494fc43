"""ZeroMQ ingest: ROUTER (acked), PULL (fire-and-forget), SUB (external PUBs), REP (control).

Why one thread for every socket: ingest must never run on the REST event loop, and pyzmq sockets
are not thread-safe. All sockets are created and bound by `bind()` on the caller's thread (so a
bind failure is an ordinary exception the CLI turns into exit status 2) and from `start()` on are
used only by the ingest thread; starting a thread is the memory barrier pyzmq needs to migrate a
socket. `stop()` wakes the thread through an inproc PAIR socket, so it returns within
milliseconds instead of waiting out a poll timeout.

Why one `FrameProcessor` per socket kind: the ROUTER has acks, so it keeps strict order (a gap is
nacked and resent by the publisher); PULL and SUB have nobody to resend, so gaps are counted and
the frame applied. Each keeps its own counters, which `snapshot()` reports (GET /ingest).

Protocol invariants on the ROUTER (docs/wire-format.md):
- exactly one reply per received message: [identity, ack/nack frames], one per outcome, in the
  order of the frames. Publishers rely on it to tell stale nacks from fresh ones;
- ACK when the frame is applied or was already applied (duplicate), NACK with the reason
  otherwise; `applied` is the publisher's highest in-order finished sequence;
- a reply is never allowed to block the loop: a publisher that does not read its acks (send
  queue full) or is gone loses that reply, counted as `acks_dropped`.

Limits and authentication (docs/security.md): every socket caps the size of one message part
(`ZMQ_MAXMSGSIZE`): libzmq reads a part's declared length first and drops the connection of a
peer that declares more, before allocating anything, so a client declaring an 8 GiB frame costs
nothing. The data sockets take `max_message_bytes` (derived from `store.max_batch_size`), the
control socket `MAX_REQUEST_BYTES`. With a `CurveServer`, the ROUTER, PULL and control sockets
are CURVE servers and a ZAP handler thread admits only the listed client keys; a client without
keys, or with another key, fails the handshake and never reaches the loop.

The loop never dies: any exception while handling one message is logged (at most once a second)
and counted as `loop_errors`, and the next message is handled.

Batches (with a `BatchSink`, the appliance's): the ROUTER and PULL sockets are drained a poll
batch at a time (every message ready, up to `batch_messages`); all their frames go to the sink as
one submission (with the write-ahead log: one log write, one engine append per frame) and the
loop goes on polling. The sink signals completion through an eventfd the loop polls; the loop
then sends every reply of the batch. One batch is in flight at a time, and the data sockets are
not read meanwhile: ZeroMQ's queues (RCVHWM) push back on publishers, nothing is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import zmq

from transport.control import MAX_REQUEST_BYTES, OPEN_GATE, ControlGate, ControlHandler, dispatch
from transport.curve import ClientAuthenticator, CurveServer
from transport.errors import TransportBindError
from transport.ingest import Batch, BatchSink, FrameProcessor, Outcome, Sink, SymbolCheck
from transport.wire import Reason, encode_ack, encode_nack, peek_identity

log = logging.getLogger(__name__)

# The wake socket ends a poll at once; this only bounds how long a lost wake-up could delay stop.
POLL_SAFETY_MS = 1000
ERROR_LOG_EVERY_S = 1.0
# Replies queued per publisher before one is dropped. Far above any window: a publisher blocked
# in a send (the appliance's RCVHWM reached) reads no acks meanwhile, and a reply dropped then
# would cost it a retry timeout. Replies are small (48 bytes per frame), so this bounds memory
# only against a publisher that never reads its acks.
REPLY_SNDHWM = 100_000
IPC_PREFIX = "ipc://"

Buffer = bytes | memoryview


def encode_outcome(outcome: Outcome) -> bytes:
    """The ACK or NACK frame that answers one outcome."""
    if outcome.ok:
        return encode_ack(outcome.publisher_id, outcome.sequence, outcome.applied)
    return encode_nack(outcome.publisher_id, outcome.sequence, outcome.applied, outcome.reason)


def _buffer(part: zmq.Frame | bytes) -> Buffer:
    """Zero-copy view of a received part (`copy=False` gives zmq.Frame objects)."""
    return part.buffer if isinstance(part, zmq.Frame) else part


class _Flight:
    """A poll batch submitted to the sink: what is needed to answer it when it completes."""

    __slots__ = ("batch", "envelopes", "messages", "name", "parts", "processor", "sock")

    def __init__(
        self,
        name: str,
        sock: zmq.Socket,
        processor: FrameProcessor,
        messages: list[list[Any]],
        envelopes: list[list[Any]],
        parts: list[int],
    ) -> None:
        self.name = name
        self.sock = sock
        self.processor = processor
        self.messages = messages  # the received frames: the values are views into them
        self.envelopes = envelopes  # per message: the ROUTER envelope (empty for PULL)
        self.parts = parts  # per message: how many wire messages it carried
        self.batch: Batch | None = None


class _Doorbell:
    """Completion signal from the sink's thread to the loop: an eventfd (a pipe elsewhere)."""

    def __init__(self) -> None:
        # ring() runs on the sink's thread: the lock keeps it from writing to a descriptor
        # number that close() freed and the process reused (a log segment, say).
        self._lock = threading.Lock()
        self._closed = False
        if hasattr(os, "eventfd"):
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._write_fd = self.fd
        else:  # pragma: no cover - Linux has eventfd
            self.fd, self._write_fd = os.pipe()
            os.set_blocking(self.fd, False)

    def ring(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # full: it is already ringing
            if not self._closed:
                os.write(self._write_fd, (1).to_bytes(8, "little"))

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.fd)
            if self._write_fd != self.fd:
                os.close(self._write_fd)


def _ipc_path(endpoint: str) -> str | None:
    """The socket file of an ipc:// endpoint; None for TCP and abstract (`ipc://@name`)."""
    if not endpoint.startswith(IPC_PREFIX):
        return None
    path = endpoint[len(IPC_PREFIX) :]
    return None if path.startswith("@") or path == "*" else path


def _someone_listens(path: str) -> bool:
    """True if a process accepts connections on the unix socket file `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:  # absent, stale (ECONNREFUSED), not a socket, or a path too long
        return False
    finally:
        probe.close()
    return True


class ZmqIngest:
    """The ZeroMQ side of the appliance: `bind()`, `start()`, `stop()`, `snapshot()`.

    An empty endpoint leaves that socket out. `control_handlers` (op name -> handler) answer
    requests on the REP socket; more can be added with `add_control_handlers` until `start()`.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        router_endpoint: str,
        pull_endpoint: str = "",
        control_endpoint: str = "",
        sub_connect: Iterable[str] = (),
        rcvhwm: int = 10_000,
        batch_messages: int = 256,
        control_handlers: Mapping[str, ControlHandler] | None = None,
        max_message_bytes: int = -1,
        curve: CurveServer | None = None,
        gate: ControlGate = OPEN_GATE,
    ) -> None:
        if rcvhwm < 1 or batch_messages < 1:
            raise ValueError("rcvhwm and batch_messages must be >= 1")
        self.max_message_bytes = max_message_bytes  # per message part; -1: no cap (tests)
        self.curve = curve
        self.gate = gate
        # CURVE client (token) name -> its symbol check, for tokens with symbol patterns; set
        # with `curve` by appliance.transports. None: no frame is checked (no cost per frame).
        self.symbol_checks: dict[str, SymbolCheck] | None = None
        self.curve_denied = 0  # handshakes the ZAP handler refused (its thread writes it)
        self._authenticator: ClientAuthenticator | None = None
        self.router_endpoint = router_endpoint
        self.pull_endpoint = pull_endpoint
        self.control_endpoint = control_endpoint
        self.sub_connect = tuple(sub_connect)
        self.rcvhwm = rcvhwm
        self.batch_messages = batch_messages
        self._processors = {
            "router": FrameProcessor(sink, "zmq.router", strict_order=True),
            "pull": FrameProcessor(sink, "zmq.pull", strict_order=False),
            "sub": FrameProcessor(sink, "zmq.sub", strict_order=False),
        }
        self._handlers: dict[str, ControlHandler] = dict(control_handlers or {})
        # A sink that takes whole poll batches (the appliance's) gets them; a plain callable
        # is called frame by frame.
        self._batch_sink: BatchSink | None = (
            sink  # type: ignore[assignment]
            if callable(getattr(sink, "submit_batch", None))
            and callable(getattr(sink, "prepare", None))
            else None
        )
        self._in_flight: _Flight | None = None  # owned by the ingest thread
        self._completions: queue.SimpleQueue[tuple[_Flight, list[Reason]]] = queue.SimpleQueue()
        self._doorbell: _Doorbell | None = None
        # endpoint name ("router", "pull", "control", "sub0", ...) -> endpoint actually bound
        self.bound_endpoints: dict[str, str] = {}
        self._context: zmq.Context | None = None
        self._sockets: dict[str, zmq.Socket] = {}  # owned by the ingest thread after start()
        self._wake_rx: zmq.Socket | None = None  # ingest thread's end of the wake-up pipe
        self._wake_tx: zmq.Socket | None = None  # stop()'s end
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ipc_files: list[str] = []
        # Counters written by the ingest thread only; plain ints are safe to read elsewhere.
        self.control_requests = 0
        self.acks_dropped = 0
        self.loop_errors = 0
        self._last_error_log = 0.0

    # -- set-up ---------------------------------------------------------------------------

    def add_control_handlers(self, handlers: Mapping[str, ControlHandler]) -> None:
        """Register control ops (e.g. the shared-memory transport's `shm.open`)."""
        if self._thread is not None:
            raise RuntimeError("control handlers must be added before start()")
        clash = sorted(set(handlers) & set(self._handlers))
        if clash:
            raise ValueError(f"control op(s) registered twice: {', '.join(clash)}")
        self._handlers.update(handlers)

    def bind(self) -> None:
        """Create and bind every socket; raises TransportBindError naming the endpoint.

        On failure nothing stays open: the sockets made so far are closed and the context ended.
        """
        if self._context is not None:
            raise RuntimeError("bind() was already called")
        self._context = zmq.Context()
        try:
            if self.curve is not None:
                # Before any bind: a connection is admitted by the ZAP handler or not at all.
                self._authenticator = ClientAuthenticator(
                    self._context, self.curve, self._on_curve_denied
                )
                self._authenticator.start()
            if self.router_endpoint:
                router = self._bind("router", zmq.ROUTER, self.router_endpoint)
                # Replies never block the loop: a full or vanished peer raises instead of waiting.
                router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                router.setsockopt(zmq.SNDHWM, REPLY_SNDHWM)
            if self.pull_endpoint:
                self._bind("pull", zmq.PULL, self.pull_endpoint)
            if self.control_endpoint:
                self._bind("control", zmq.REP, self.control_endpoint)
            for index, endpoint in enumerate(self.sub_connect):
                self._connect_sub(index, endpoint)
            wake = f"inproc://zmq-ingest-wake-{id(self):x}"
            self._wake_rx = self._new_socket(zmq.PAIR)
            self._wake_rx.bind(wake)
            self._wake_tx = self._new_socket(zmq.PAIR)
            self._wake_tx.connect(wake)
        except BaseException:
            self._close_sockets()
            self._terminate()
            raise

    def _new_socket(self, kind: int) -> zmq.Socket:
        assert self._context is not None
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)  # stop() never waits for undelivered replies
        return sock

    def _on_curve_denied(self, key: str) -> None:
        """A CURVE handshake with an unlisted key (ZAP handler's thread)."""
        self.curve_denied += 1
        self.gate.audit.denied(None, "zmq.curve", "unauthorized", f"unknown client key {key}")

    def _bind(self, name: str, kind: int, endpoint: str) -> zmq.Socket:
        sock = self._new_socket(kind)
        self._sockets[name] = sock  # registered first, so a failed bind still closes it
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)  # back-pressure: senders block beyond this
        cap = MAX_REQUEST_BYTES if name == "control" else self.max_message_bytes
        sock.setsockopt(zmq.MAXMSGSIZE, cap)  # a larger declared part drops the connection
        if self.curve is not None:
            self.curve.apply(sock)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)  # an IPv6 literal, e.g. tcp://[::1]:5555
        path = _ipc_path(endpoint)
        # libzmq silently replaces an existing ipc file, stealing a running appliance's socket.
        if path is not None and _someone_listens(path):
            raise TransportBindError(endpoint, "Address already in use (a process listens there)")
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise TransportBindError(endpoint, exc.strerror) from None
        bound = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.bound_endpoints[name] = bound
        bound_path = _ipc_path(bound)
        if bound_path is not None:
            self._ipc_files.append(bound_path)
        return sock

    def _connect_sub(self, index: int, endpoint: str) -> None:
        sock = self._new_socket(zmq.SUB)
        self._sockets[f"sub{index}"] = sock
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise TransportBindError(endpoint, exc.strerror, action="connect") from None
        self.bound_endpoints[f"sub{index}"] = endpoint

    # -- running --------------------------------------------------------------------------

    def resume_publishers(self, consumed: Mapping[int, int]) -> None:
        """Before `start()`: publishers the appliance finished with before a restart (from
        its log), for the acknowledged ROUTER socket (see FrameProcessor.resume)."""
        if self.running:
            raise RuntimeError("resume_publishers() must be called before start()")
        self._processors["router"].resume(consumed)

    def start(self) -> None:
        """Start the ingest thread (after `bind()`)."""
        if self._context is None:
            raise RuntimeError("bind() must be called before start()")
        if self._thread is not None:
            raise RuntimeError("start() was already called")
        self._thread = threading.Thread(target=self._run, name="zmq-ingest", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _handlers_by_socket(self) -> dict[zmq.Socket, Callable[[zmq.Socket], None]]:
        kinds: dict[str, Callable[[zmq.Socket], None]] = {
            "router": self._drain_router,
            "pull": self._drain_pull,
            "control": self._drain_control,
        }
        if self._batch_sink is not None:
            kinds["router"] = self._submit_router
            kinds["pull"] = self._submit_pull
        return {sock: kinds.get(name, self._drain_sub) for name, sock in self._sockets.items()}

    def _run(self) -> None:
        handlers = self._handlers_by_socket()
        doorbell = _Doorbell()
        self._doorbell = doorbell
        poller = zmq.Poller()  # everything: no batch in flight
        waiting = zmq.Poller()  # a batch in flight: its completion, stop and control only
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        assert self._wake_rx is not None
        for which in (poller, waiting):
            which.register(self._wake_rx, zmq.POLLIN)
            which.register(doorbell.fd, zmq.POLLIN)
        if "control" in self._sockets:
            waiting.register(self._sockets["control"], zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                try:
                    active = poller if self._in_flight is None else waiting
                    ready = active.poll(POLL_SAFETY_MS)
                    for sock, _ in ready:
                        if sock == doorbell.fd:
                            self._collect()
                            continue
                        handler = handlers.get(sock)
                        if (
                            handler is not None
                            and not self._stopping.is_set()
                            and (self._in_flight is None or sock is self._sockets.get("control"))
                        ):
                            handler(sock)
                except Exception:
                    self._loop_error("poll")
                    time.sleep(0.01)  # a persistent poll failure must not spin a core
            self._finish_in_flight()
        finally:
            self._close_sockets()
            self._doorbell = None
            doorbell.close()

    # -- batches ------------------------------------------------------------------------------

    def _check_of(self, message: list[Any]) -> SymbolCheck | None:
        """The symbol check of the message's sender: its CURVE client's token, named in the
        `User-Id` property the ZAP handler gave its connection."""
        checks = self.symbol_checks
        if checks is None:
            return None
        try:
            user = message[-1].get("User-Id")
        except zmq.ZMQError:  # no ZAP identity: CURVE refuses such connections before this
            return None
        return checks.get(user)

    def _checks_of(self, messages: list[list[Any]], parts: list[int]) -> list[Any] | None:
        """One check per buffer of a batch (None when nothing is checked)."""
        if self.symbol_checks is None:
            return None
        return [
            check
            for message, count in zip(messages, parts, strict=True)
            for check in [self._check_of(message)] * count
        ]

    def _submit_router(self, sock: zmq.Socket) -> None:
        """Hot path: every ready DEALER (or REQ) message as one submission to the sink."""
        messages = list(self._ready_messages(sock))
        if not messages:
            return
        envelopes: list[list[Any]] = []
        buffers: list[Buffer] = []
        parts: list[int] = []
        for message in messages:
            envelope, payloads = message[:1], message[1:]
            # A REQ client puts an empty delimiter before the body and expects it back.
            if len(payloads) > 1 and len(payloads[0]) == 0:
                envelope, payloads = message[:2], message[2:]
            payloads = payloads or [b""]  # an empty message is answered (BAD_LENGTH), not lost
            envelopes.append(envelope)
            parts.append(len(payloads))
            buffers.extend(_buffer(part) for part in payloads)
        processor = self._processors["router"]
        flight = _Flight("router", sock, processor, messages, envelopes, parts)
        self._submit(flight, buffers, self._checks_of(messages, parts))

    def _submit_pull(self, sock: zmq.Socket) -> None:
        messages = list(self._ready_messages(sock))
        if not messages:
            return
        buffers = [_buffer(part) for message in messages for part in message]
        parts = [len(message) for message in messages]
        processor = self._processors["pull"]
        flight = _Flight("pull", sock, processor, messages, [[]] * len(messages), parts)
        self._submit(flight, buffers, self._checks_of(messages, parts))

    def _submit(
        self, flight: _Flight, buffers: list[Buffer], checks: list[Any] | None = None
    ) -> None:
        sink = self._batch_sink
        assert sink is not None
        try:
            flight.batch = flight.processor.begin(buffers, sink, checks)
        except Exception:
            self._loop_error(flight.name)
            self._answer_all_internal(flight)
            return
        self._in_flight = flight
        items = flight.batch.items
        if not items:
            self._complete(flight, [])
            return
        try:
            sink.submit_batch(items, lambda reasons: self._on_done(flight, reasons))
        except Exception:
            self._loop_error(flight.name)
            self._complete(flight, [Reason.INTERNAL] * len(items))
            return
        self._collect()  # a sink without a log answers before returning

    def _on_done(self, flight: _Flight, reasons: list[Reason]) -> None:
        """Any thread (the log's writer): hand the results to the loop and wake it."""
        self._completions.put((flight, reasons))
        doorbell = self._doorbell
        if doorbell is not None:
            doorbell.ring()

    def _collect(self) -> None:
        """Answer every completed batch (loop thread)."""
        if self._doorbell is not None:
            self._doorbell.clear()
        while True:
            try:
                flight, reasons = self._completions.get_nowait()
            except queue.Empty:
                return
            self._complete(flight, reasons)

    def _complete(self, flight: _Flight, reasons: list[Reason]) -> None:
        if self._in_flight is flight:
            self._in_flight = None
        assert flight.batch is not None
        try:
            per_part = flight.processor.finish(flight.batch, reasons)
        except Exception:
            self._loop_error(flight.name)
            self._answer_all_internal(flight)
            return
        if flight.name != "router":
            return  # PULL: nobody to answer
        at = 0
        for envelope, count in zip(flight.envelopes, flight.parts, strict=True):
            outcomes = [outcome for part in per_part[at : at + count] for outcome in part]
            at += count
            reply = b"".join(encode_outcome(outcome) for outcome in outcomes)
            try:
                flight.sock.send_multipart([*envelope, reply], zmq.NOBLOCK)
            except zmq.ZMQError:  # EAGAIN: peer's queue full; EHOSTUNREACH: peer gone
                self.acks_dropped += 1

    def _answer_all_internal(self, flight: _Flight) -> None:
        """A batch that could not be handled: one INTERNAL nack per ROUTER message."""
        self._in_flight = None if self._in_flight is flight else self._in_flight
        if flight.name == "router":
            for message in flight.messages:
                self._answer_internal(flight.sock, message)

    def _finish_in_flight(self, timeout_s: float = 2.0) -> None:
        """At stop: wait (bounded) for the batch in flight, so its acks still go out."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight is not None and time.monotonic() < deadline:
            try:
                flight, reasons = self._completions.get(timeout=0.05)
            except queue.Empty:
                continue
            self._complete(flight, reasons)

    def _loop_error(self, where: str) -> None:
        """Count and log (at most once a second, with traceback) a failure in the loop."""
        self.loop_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.exception(
                "zmq ingest: handling a message failed; the loop goes on",
                extra={"socket": where, "loop_errors": self.loop_errors},
            )

    def _ready_messages(self, sock: zmq.Socket) -> Iterator[list[Any]]:
        """Messages already queued on `sock`, at most `batch_messages`, zero-copy; never waits."""
        for _ in range(self.batch_messages):
            try:
                yield sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return

    def _drain_router(self, sock: zmq.Socket) -> None:
        # Hot path: one receive, one decode pass, one reply per message; no waiting.
        processor = self._processors["router"]
        for parts in self._ready_messages(sock):
            try:
                self._answer(sock, processor, parts)
            except Exception:
                self._loop_error("router")
                self._answer_internal(sock, parts)

    def _answer(self, sock: zmq.Socket, processor: FrameProcessor, parts: list[Any]) -> None:
        """Process one DEALER (or REQ) message and send its single reply."""
        envelope, payloads = parts[:1], parts[1:]
        # A REQ client puts an empty delimiter before the body and expects it back.
        if len(payloads) > 1 and len(payloads[0]) == 0:
            envelope, payloads = parts[:2], parts[2:]
        outcomes: list[Outcome] = []
        check = self._check_of(parts)
        for part in payloads or [b""]:  # an empty message is answered (BAD_LENGTH), not lost
            outcomes.extend(processor.process_message(_buffer(part), check))
        reply = b"".join(encode_outcome(outcome) for outcome in outcomes)
        try:
            sock.send_multipart([*envelope, reply], zmq.NOBLOCK)
        except zmq.ZMQError:  # EAGAIN: peer's queue full; EHOSTUNREACH: peer gone
            self.acks_dropped += 1

    def _answer_internal(self, sock: zmq.Socket, parts: list[Any]) -> None:
        """Keep the one-reply-per-message invariant when handling a message failed: a NACK
        INTERNAL (retryable) addressed with the first header's untrusted identity."""
        first = _buffer(parts[-1]) if len(parts) > 1 else b""
        publisher_id, sequence = peek_identity(first)
        reply = encode_nack(publisher_id, sequence, 0, Reason.INTERNAL)
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([parts[0], reply], zmq.NOBLOCK)

    def _drain_pull(self, sock: zmq.Socket) -> None:
        processor = self._processors["pull"]
        for parts in self._ready_messages(sock):
            try:
                check = self._check_of(parts)
                for part in parts:  # each part is a wire message of its own
                    processor.process_message(_buffer(part), check)
            except Exception:
                self._loop_error("pull")

    def _drain_sub(self, sock: zmq.Socket) -> None:
        processor = self._processors["sub"]
        for parts in self._ready_messages(sock):
            try:
                # PUB convention: leading parts are topic envelopes; the last is the message.
                processor.process_message(_buffer(parts[-1]))
            except Exception:
                self._loop_error("sub")

    def _drain_control(self, sock: zmq.Socket) -> None:
        for _ in range(self.batch_messages):
            try:
                raw = b"".join(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.control_requests += 1
            # REP alternates strictly: dispatch never raises, so a reply is always sent.
            try:
                reply = dispatch(raw, self._handlers, self.gate)
            except Exception:  # pragma: no cover - dispatch catches everything
                self._loop_error("control")
                reply = b'{"ok":false,"error":"internal error in the appliance (logged)"}'
            sock.send(reply)

    # -- stopping -------------------------------------------------------------------------

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop polling, close the sockets, end the context; True if all of it happened.

        Frames still queued in ZeroMQ are dropped: DEALER publishers resend what was not
        acked; PULL and SUB have no acks (see docs/wire-format.md). False when the thread is
        stuck in the sink past `timeout_s`: its sockets are then left to the exiting process.
        """
        if self._context is None:
            return True
        thread = self._thread
        self._stopping.set()
        if thread is not None:
            if self._wake_tx is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._wake_tx.send(b"", zmq.NOBLOCK)
            thread.join(timeout_s)
            if thread.is_alive():
                log.error(
                    "zmq ingest thread did not stop in time; sockets left open",
                    extra={"timeout_s": timeout_s},
                )
                return False
        else:
            self._close_sockets()  # never started: the sockets are still this thread's
        self._terminate()
        return True

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        if self._wake_rx is not None:
            self._wake_rx.close(linger=0)
            self._wake_rx = None

    def _terminate(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._context is not None:
            if self._wake_tx is not None:
                self._wake_tx.close(linger=0)
                self._wake_tx = None
            self._context.term()
            self._context = None
        for path in self._ipc_files:
            # libzmq usually unlinks its ipc files on close; a file someone else now listens
            # on (a new appliance bound the same path) is theirs and stays.
            if os.path.exists(path) and not _someone_listens(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._ipc_files.clear()

    # -- observability --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters per socket kind (messages, frames/values applied, rejected by reason)."""
        out: dict[str, Any] = {"endpoints": dict(self.bound_endpoints), "running": self.running}
        if self.router_endpoint:
            out["router"] = {
                **self._processors["router"].counters.snapshot(),
                "acks_dropped": self.acks_dropped,
            }
        if self.pull_endpoint:
            out["pull"] = self._processors["pull"].counters.snapshot()
        if self.sub_connect:
            out["sub"] = self._processors["sub"].counters.snapshot()
        if self.control_endpoint:
            out["control"] = {"requests": self.control_requests, "ops": sorted(self._handlers)}
        if self.curve is not None:
            out["curve"] = {"clients": len(self.curve.clients), "denied": self.curve_denied}
        out["loop_errors"] = self.loop_errors
        return out
