"""ZeroMQ publisher: DEALER with acks and a sliding window, or PUSH fire-and-forget.

DEALER mode (the default) gives the delivery contract of `transport.publisher`: every frame is
kept until the appliance acks it, at most `window` frames are unacknowledged at once (a full
window blocks `publish`: back-pressure), and `flush` returns once all of them are finished.

The first frame carries FLAG_FIRST, which tells the appliance where this publisher's sequence
starts; if the appliance answers UNKNOWN_PUBLISHER (that frame was lost, or the appliance
restarted and forgot us), the oldest unacked frame is flagged FIRST and everything is resent.

Recovery is go-back-N. The appliance applies a publisher's frames strictly in order, so when a
frame is not applied for a retryable reason (BAD_CRC, INTERNAL, UNAVAILABLE, or GAP because an
earlier one is missing) every later frame in flight is nacked GAP as well. On the first such
nack the publisher resends every unacked frame, oldest first. The nacks for the frames that were
already in flight at that moment are stale, and must not trigger a resend each (that would make
the traffic quadratic in the window): the appliance sends exactly one reply per message, in
order, so counting messages sent and replies received tells which replies predate the last
resend. Resends are bounded (`max_retries` without progress) and raise PublishError; if no reply
comes at all for `retry_interval_s` (a reply lost, the appliance restarted), the unacked frames
are resent too. Duplicates that this causes are harmless: the appliance acks a frame it already
applied and never applies it twice.

PUSH mode is fire-and-forget: no acks, so `flush` only hands pending frames to ZeroMQ, and
rejected frames are only visible in the appliance's counters (GET /ingest) and log. `publish`
still blocks when the appliance's high-water mark is reached (back-pressure, never silent loss
while both ends run); `close` waits up to `timeout_s` for queued messages to leave. ZeroMQ
cannot confirm delivery, though: messages still in transit when a PUSH socket closes while the
appliance is back-pressuring can be lost (measured over ipc:// with libzmq 4.3.5: the last few
hundred of a burst). Where every frame matters, use DEALER.

An appliance with CURVE on (docs/security.md) admits only listed client keys: pass `curve`
(`CurveKeys.from_files(server_public, client_secret)`); without it the handshake fails and
nothing is delivered (`publish` blocks, `flush` times out). A message (one part) larger than the
appliance's `max_message_bytes` drops the connection: keep `coalesce_bytes` and
`max_frame_bytes` below it (the defaults are).

Either mode can coalesce several frames into one message (`coalesce_bytes`), which saves a
ZeroMQ message and an ack message per frame when frames are small.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Literal

import zmq

from transport.curve import CurveKeys
from transport.publisher import Publisher, PublishError, Rejection
from transport.wire import RETRYABLE, Frame, Kind, Reason, WireError, decode_message, mark_first

log = logging.getLogger(__name__)

Mode = Literal["dealer", "push"]


class ZmqPublisher(Publisher):
    """Publish frames to the appliance's ROUTER (`mode="dealer"`) or PULL (`mode="push"`)."""

    transport = "zmq"

    def __init__(
        self,
        endpoint: str,
        *,
        mode: Mode = "dealer",
        publisher_id: int | None = None,
        window: int = 64,
        max_frame_bytes: int = 1 << 20,
        coalesce_bytes: int = 0,
        sndhwm: int = 1000,
        timeout_s: float = 10.0,
        retry_interval_s: float = 2.0,
        max_retries: int = 16,
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        if mode not in ("dealer", "push"):
            raise ValueError(f"mode must be 'dealer' or 'push', got {mode!r}")
        if window < 1 or sndhwm < 0 or timeout_s <= 0 or retry_interval_s <= 0:
            raise ValueError("window >= 1, sndhwm >= 0, timeout_s > 0, retry_interval_s > 0")
        super().__init__(publisher_id=publisher_id, max_frame_bytes=max_frame_bytes)
        self.endpoint = endpoint
        self.mode = mode
        self.window = window
        self.coalesce_bytes = coalesce_bytes
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.max_retries = max_retries
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.DEALER if mode == "dealer" else zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        # Replies are bounded by the window (one per message in flight); a finite RCVHWM could
        # only drop acks while `publish` is blocked in a send, and cost a retry timeout.
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        if curve is not None:  # an appliance whose sockets require CURVE admits only known keys
            curve.apply(self._socket)
        self._socket.connect(endpoint)
        # sequence -> (symbol, encoded frame), oldest first; pending frames are in here too.
        self._unacked: OrderedDict[int, tuple[str, bytes]] = OrderedDict()
        self._pending: list[bytes] = []  # encoded frames waiting to be coalesced into a message
        self._pending_bytes = 0
        self._sent_messages = 0
        self._replies = 0
        self._stale_through = 0  # replies numbered <= this answer messages sent before a resend
        self._applied = 0  # the highest `applied` the appliance reported
        self._retries = 0  # resends since the last progress
        self.resends = 0  # go-back-N rounds in total (tests and logs read it)
        self.messages_sent = 0

    @property
    def in_flight(self) -> int:
        """Frames not yet acknowledged (always 0 in push mode)."""
        return len(self._unacked)

    # -- Publisher hooks --------------------------------------------------------------------

    def _send_frame(self, sequence: int, symbol: str, frame: bytes) -> None:
        if self.mode == "push":
            self._queue(frame)
            return
        if len(self._unacked) >= self.window:
            deadline = time.monotonic() + self.timeout_s
            while len(self._unacked) >= self.window:
                self._send_pending()  # the window may be full of frames not sent yet
                self._wait_replies(deadline, "window full")
        self._unacked[sequence] = (symbol, frame)
        self._queue(frame)
        self._read_replies()

    def _flush(self, timeout: float | None) -> None:
        self._send_pending()
        if self.mode == "push":
            return  # nothing to wait for: PUSH has no acks
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._unacked:
            self._wait_replies(deadline, "flush")

    def _close(self) -> None:
        # PUSH: give queued messages up to timeout_s to leave. DEALER: unacked frames are the
        # caller's to republish (flush first), so nothing is worth waiting for.
        linger_ms = int(self.timeout_s * 1000) if self.mode == "push" else 0
        self._socket.close(linger=linger_ms)
        if self._own_context:
            self._context.term()

    # -- sending ----------------------------------------------------------------------------

    def _queue(self, frame: bytes) -> None:
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        if self._pending_bytes >= self.coalesce_bytes:
            self._send_pending()

    def _send_pending(self) -> None:
        if not self._pending:
            return
        message = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        try:
            self._socket.send(message, copy=len(message) < zmq.COPY_THRESHOLD)
        except zmq.Again:
            raise PublishError(
                f"the appliance at {self.endpoint} accepted nothing for {self.timeout_s} s "
                "(high-water mark reached, or not reachable)"
            ) from None
        self._sent_messages += 1
        self.messages_sent += 1

    def _resend_all(self) -> None:
        """Go-back-N: resend every unacked frame, oldest first; older replies become stale."""
        self._stale_through = self._sent_messages
        self.resends += 1
        self._pending.clear()
        self._pending_bytes = 0
        for _, frame in self._unacked.values():
            self._queue(frame)
        self._send_pending()

    # -- replies ----------------------------------------------------------------------------

    def _wait_replies(self, deadline: float | None, why: str) -> None:
        """Block until at least one reply is handled; resend after `retry_interval_s` of
        silence; raise PublishError once `deadline` passes."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise PublishError(
                f"{why}: {len(self._unacked)} frame(s) not acknowledged by {self.endpoint} in "
                f"time (first unacked sequence {next(iter(self._unacked), None)})"
            )
        wait_s = (
            self.retry_interval_s
            if deadline is None
            else min(self.retry_interval_s, deadline - now)
        )
        if self._socket.poll(max(1, int(wait_s * 1000)), zmq.POLLIN):
            self._read_replies()
        elif deadline is None or time.monotonic() < deadline:
            log.info(
                "no ack from the appliance; resending unacked frames",
                extra={"endpoint": self.endpoint, "unacked": len(self._unacked)},
            )
            # Silence means the outstanding messages were lost or their replies were: count
            # them as answered, or every reply to the resend would look stale (older than the
            # resend) and recovery would wait for this timer each time.
            self._replies = self._sent_messages
            self._resend_all()

    def _read_replies(self) -> None:
        """Handle every reply already received, without blocking."""
        while True:
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle_reply(parts[-1])

    def _handle_reply(self, message: bytes) -> None:
        self._replies += 1
        stale = self._replies <= self._stale_through
        try:
            frames = decode_message(message)
        except WireError as exc:
            log.warning("undecodable reply from the appliance ignored", extra={"error": str(exc)})
            return
        retry: Frame | None = None
        for frame in frames:
            if frame.publisher_id != self.publisher_id or frame.kind is Kind.DATA:
                continue
            if self._settle(frame) and not stale and retry is None:
                retry = frame
        if retry is not None and self._unacked:
            self._retry(retry)

    def _settle(self, frame: Frame) -> bool:
        """Apply one ACK/NACK; True when it asks for a resend (retryable NACK)."""
        # The frame's own outcome first: a content NACK also advances `applied` past it, and
        # releasing through `applied` first would forget the rejection.
        if frame.kind is Kind.ACK:
            self._unacked.pop(frame.sequence, None)
        elif frame.reason not in RETRYABLE:
            entry = self._unacked.pop(frame.sequence, None)
            if entry is not None:
                self.rejections.append(Rejection(frame.sequence, entry[0], frame.reason))
        # Everything <= applied is finished: applied, or rejected (its NACK came first).
        while self._unacked and next(iter(self._unacked)) <= frame.applied:
            self._unacked.popitem(last=False)
        if frame.applied > self._applied:
            self._applied = frame.applied
            self._retries = 0
        if frame.reason is Reason.UNKNOWN_PUBLISHER and self._unacked:
            # The appliance lost (or never got) our start: restart the session at the oldest
            # frame we still hold; everything before it was acked. Done for a stale nack too
            # (always safe): after lost messages the reply count runs behind, every reply to
            # a resend can look stale, and only the retry timer resends; it must carry the flag.
            oldest, (symbol, encoded) = next(iter(self._unacked.items()))
            self._unacked[oldest] = (symbol, mark_first(encoded))
        return frame.kind is Kind.NACK and frame.reason in RETRYABLE

    def _retry(self, nack: Frame) -> None:
        self._retries += 1
        if self._retries > self.max_retries:
            raise PublishError(
                f"gave up after {self.max_retries} resends without progress: sequence "
                f"{nack.sequence} nacked {nack.reason.name.lower()} (applied {nack.applied})"
            )
        if nack.reason in (Reason.INTERNAL, Reason.UNAVAILABLE):
            time.sleep(min(0.1, 0.001 * 2**self._retries))  # the appliance is struggling
        self._resend_all()  # after UNKNOWN_PUBLISHER the oldest frame is flagged (_settle)
