"""What every transport does with received bytes: decode, order, hand to the sink, answer.

Why one class for all transports: the rules for sequence numbers, duplicates, gaps and bad
frames must not differ between ZeroMQ, shared memory and RDMA. A transport only moves bytes;
it calls `FrameProcessor.process_message` and sends back (or publishes in the ring header) the
`Outcome`s it returns.

The processor knows nothing of the store: it is given a `Sink`, a callable that validates and
appends one batch (`appliance.ingest` builds it from the store, with the same validation as
REST) and raises `Rejected` with a `Reason` when it refuses one. Anything else the sink raises
is a fault of the appliance: logged, nacked as INTERNAL (retryable), and the loop goes on.

Sequence rules, per publisher id:
- `consumed` is the highest sequence that the appliance has finished with in order: every
  sequence up to it was applied or definitively rejected. It is what acks call `applied`.
- Where a publisher starts: with `strict_order` (transports with acks) only a frame flagged
  FIRST sets the baseline (`consumed = sequence - 1`); any other frame from a publisher the
  appliance does not know is nacked UNKNOWN_PUBLISHER and not applied, and the publisher
  resends from its oldest unacked frame, flagged FIRST. Guessing instead would be silent loss:
  if the first message were lost, the next one would become the baseline and the resent first
  frame would be acked as a duplicate without ever being applied. A FIRST frame from a known
  publisher that would leave a gap moves the baseline too (the publisher says everything
  before it is finished, e.g. after the appliance restarted). Without acks (PULL, SUB) the
  first frame seen from a publisher sets the baseline, flagged or not.
- `sequence <= consumed`: a duplicate. Never applied twice; acked (the data is in) and counted.
- `sequence > consumed + 1`: a gap. With `strict_order` (transports with acks) the frame is
  nacked GAP and not applied, so the publisher resends from `consumed + 1` and order is kept;
  without acks (PULL, SUB, where nobody can resend) the gap is counted and logged and the frame
  is applied.
- A retryable failure (INTERNAL, UNAVAILABLE) does not advance `consumed`; a content error
  (bad value, bad symbol, symbol limit) does, since resending the same bytes cannot succeed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from transport.wire import RETRYABLE, Frame, Kind, Reason, WireError, decode_message, peek_identity

log = logging.getLogger(__name__)

MAX_TRACKED_PUBLISHERS = 65_536
LOG_EVERY_S = 1.0


class Rejected(Exception):
    """Raised by a sink: the batch was refused, nothing of it applied."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# (symbol, values, publisher_id, sequence): the identity lets the appliance log where a batch
# came from (the write-ahead log records it).
Sink = Callable[[str, np.ndarray, int, int], None]


class Outcome(NamedTuple):
    """The answer for one frame (or for a whole undecodable message). A NamedTuple for the
    same reason as `transport.wire.Frame`: one per frame on the hot path."""

    publisher_id: int
    sequence: int
    applied: int  # the publisher's `consumed` after this frame
    reason: Reason  # NONE: applied; DUPLICATE: already in (acked); anything else: nacked

    @property
    def ok(self) -> bool:
        """True when the publisher may forget this frame: applied or already applied."""
        return self.reason in (Reason.NONE, Reason.DUPLICATE)


class IngestCounters:
    """Plain counters, read by tests, logs and (later) /metrics. Updated by one thread only."""

    __slots__ = ("frames_applied", "messages", "rejected", "values_applied")

    def __init__(self) -> None:
        self.messages = 0
        self.frames_applied = 0
        self.values_applied = 0
        self.rejected: Counter[str] = Counter()  # reason name -> frames (gaps, duplicates too)

    def snapshot(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "frames_applied": self.frames_applied,
            "values_applied": self.values_applied,
            "rejected": dict(self.rejected),
        }


class _ThrottledLog:
    """At most one warning per (publisher, reason) per second, with the count since the last."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self._last: dict[tuple[int, Reason], tuple[float, int]] = {}

    def warn(
        self, publisher_id: int, reason: Reason, message: str, *, exc_info: bool = False,
        **fields: object,
    ) -> None:  # fmt: skip
        """A warning, or with `exc_info` an error with the current traceback."""
        key = (publisher_id, reason)
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-LOG_EVERY_S, 0))
        if now - last < LOG_EVERY_S:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > MAX_TRACKED_PUBLISHERS:
            self._last.clear()
        self._last[key] = (now, 0)
        (log.error if exc_info else log.warning)(
            message,
            exc_info=exc_info,
            extra={
                "transport": self.transport,
                "publisher_id": publisher_id,
                "reason": reason.name.lower(),
                "suppressed_since_last": suppressed,
                **fields,
            },
        )


class FrameProcessor:
    """Turns messages into sink calls and outcomes. Not thread-safe: one per ingest thread."""

    def __init__(self, sink: Sink, transport: str, *, strict_order: bool) -> None:
        self.sink = sink
        self.transport = transport
        self.strict_order = strict_order
        self.counters = IngestCounters()
        # publisher id -> consumed; least recently seen first, bounded against hostile ids.
        self._consumed: OrderedDict[int, int] = OrderedDict()
        self._log = _ThrottledLog(transport)

    def resume(self, consumed: Mapping[int, int]) -> None:
        """Know these publishers as finished up to the given sequences (the appliance's log after
        a restart). A resent frame at or below is then a duplicate (acked, not applied); the
        next one is applied without FLAG_FIRST. Call before any frame is processed."""
        for publisher_id, sequence in consumed.items():
            if sequence > self._consumed.get(publisher_id, 0):
                self._advance(publisher_id, sequence)

    def consumed(self, publisher_id: int) -> int:
        """Highest in-order sequence finished for `publisher_id` (0: never seen)."""
        return self._consumed.get(publisher_id, 0)

    def process_message(self, buffer: bytes | bytearray | memoryview) -> list[Outcome]:
        """Decode all frames, then handle each in order; one outcome per frame.

        A message that does not decode gets one outcome, addressed with the (untrusted) id and
        sequence of its first header, and nothing of it is applied.
        """
        self.counters.messages += 1
        try:
            frames = decode_message(buffer)
        except WireError as exc:
            publisher_id, sequence = peek_identity(buffer)
            self.counters.rejected[exc.reason.name.lower()] += 1
            self._log.warn(
                publisher_id, exc.reason, "malformed message rejected",
                error=str(exc), offset=exc.offset, bytes=len(memoryview(buffer).cast("B")),
            )  # fmt: skip
            return [Outcome(publisher_id, sequence, self.consumed(publisher_id), exc.reason)]
        return [self.process_frame(frame) for frame in frames]

    def process_frame(self, frame: Frame) -> Outcome:
        publisher_id, sequence = frame.publisher_id, frame.sequence
        if frame.kind is not Kind.DATA:
            return self._reject(frame, Reason.BAD_HEADER, "only DATA frames are accepted")
        known = publisher_id in self._consumed
        if not known and self.strict_order and not frame.first:
            self.counters.rejected["unknown_publisher"] += 1
            self._log.warn(
                publisher_id, Reason.UNKNOWN_PUBLISHER,
                "frame from an unknown publisher without FLAG_FIRST; asking for a restart",
                sequence=sequence,
            )  # fmt: skip
            return Outcome(publisher_id, sequence, 0, Reason.UNKNOWN_PUBLISHER)
        consumed = self._consumed.get(publisher_id, sequence - 1)
        if known and frame.first and sequence > consumed + 1:
            consumed = sequence - 1  # the publisher restarts its session here
        if known and sequence <= consumed:
            self.counters.rejected["duplicate"] += 1
            self._log.warn(
                publisher_id, Reason.DUPLICATE, "duplicate frame not applied again",
                sequence=sequence, consumed=consumed,
            )  # fmt: skip
            return Outcome(publisher_id, sequence, consumed, Reason.DUPLICATE)
        if sequence > consumed + 1:
            self.counters.rejected["gap"] += 1
            self._log.warn(
                publisher_id, Reason.GAP, "sequence gap", sequence=sequence,
                expected=consumed + 1, missing=sequence - consumed - 1,
            )  # fmt: skip
            if self.strict_order:
                return Outcome(publisher_id, sequence, consumed, Reason.GAP)
        reason = self._apply(frame)
        if reason in RETRYABLE and self.strict_order:
            if not known or frame.first:
                # Keep the baseline this frame set or moved (the outcome reports it): a
                # pipelined next frame is then a gap, not a start.
                self._advance(publisher_id, consumed)
            return Outcome(publisher_id, sequence, consumed, reason)
        self._advance(publisher_id, sequence)
        return Outcome(publisher_id, sequence, sequence, reason)

    def _apply(self, frame: Frame) -> Reason:
        try:
            self.sink(frame.symbol, frame.values, frame.publisher_id, frame.sequence)
        except Rejected as exc:
            self.counters.rejected[exc.reason.name.lower()] += 1
            self._log.warn(
                frame.publisher_id, exc.reason, "frame rejected", sequence=frame.sequence,
                symbol=frame.symbol, error=str(exc),
            )  # fmt: skip
            return exc.reason
        except Exception:
            self.counters.rejected["internal"] += 1
            self._log.warn(
                frame.publisher_id, Reason.INTERNAL, "ingest sink failed; frame not applied",
                exc_info=True, sequence=frame.sequence, symbol=frame.symbol,
            )  # fmt: skip
            return Reason.INTERNAL
        self.counters.frames_applied += 1
        self.counters.values_applied += frame.values.shape[0]
        return Reason.NONE

    def _reject(self, frame: Frame, reason: Reason, message: str) -> Outcome:
        self.counters.rejected[reason.name.lower()] += 1
        self._log.warn(frame.publisher_id, reason, message, sequence=frame.sequence)
        return Outcome(
            frame.publisher_id, frame.sequence, self.consumed(frame.publisher_id), reason
        )

    def _advance(self, publisher_id: int, sequence: int) -> None:
        self._consumed[publisher_id] = sequence
        self._consumed.move_to_end(publisher_id)
        if len(self._consumed) > MAX_TRACKED_PUBLISHERS:
            self._consumed.popitem(last=False)


def add_totals(totals: Counter[str], counters: dict[str, Any]) -> None:
    """Fold one ring's FrameProcessor counters into `totals` (rejections as rejected.<reason>)."""
    for key in ("messages", "frames_applied", "values_applied"):
        totals[key] += counters[key]
    for reason, count in counters["rejected"].items():
        totals[f"rejected.{reason}"] += count
