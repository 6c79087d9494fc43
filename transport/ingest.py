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

Batches (`begin` / `finish`, for a `BatchSink`): a transport that can answer later hands over
every frame of a poll batch at once, so the sink logs them with one write and the transport acks
when that commit completes. `begin` applies the rules above assuming every frame it submits
will be applied; `finish` takes the sink's results and corrects what that assumption got
wrong: from a publisher's first retryable failure on, its later frames in the batch (which the
sink guarantees it did not apply) are nacked GAP and `consumed` goes back to before the
failure, exactly the answers the frame-by-frame path gives. Only one batch per processor may be
between `begin` and `finish`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from transport.wire import RETRYABLE, Frame, Kind, Reason, WireError, decode_message, peek_identity

log = logging.getLogger(__name__)

MAX_TRACKED_PUBLISHERS = 65_536
LOG_EVERY_S = 1.0


# `check(symbol)` raises Rejected when the sender may not write `symbol` (transport.ownership).
SymbolCheck = Callable[[str], None]


class Rejected(Exception):
    """Raised by a sink: the batch was refused, nothing of it applied."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# (symbol, values, publisher_id, sequence, timestamps): the identity lets the appliance log
# where a batch came from (the write-ahead log records it); timestamps (int64 ns, one per value)
# or None for a frame without them.
Sink = Callable[[str, np.ndarray, int, int, "np.ndarray | None"], None]
Item = tuple[str, np.ndarray, int, int, "np.ndarray | None"]


class BatchSink(Protocol):
    """A sink that also takes a whole poll batch and answers when its commit completes."""

    def __call__(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int,
        sequence: int,
        timestamps: np.ndarray | None = None,
    ) -> None:
        """The frame-by-frame form (`Sink`)."""

    def prepare(
        self, symbol: str, values: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        """Validate one frame's batch without applying it: the values to submit, or `Rejected`."""

    def submit_batch(self, items: list[Item], done: Callable[[list[Reason]], None]) -> None:
        """Apply prepared items in order; `done` gets one `Reason` per item (NONE: applied),
        from any thread, once all of them are final. Never blocks on the commit."""


class _Pending:
    """A frame submitted in a batch, waiting for its result."""

    __slots__ = ("consumed", "frame", "index")

    def __init__(self, frame: Frame, consumed: int, index: int) -> None:
        self.frame = frame
        self.consumed = consumed  # the publisher's `consumed` before this frame
        self.index = index  # position in the submitted items


class _Malformed(NamedTuple):
    """A message that did not decode (its outcome needs no sequence rule)."""

    outcome: Outcome


class Batch:
    """What `begin` made of a poll batch: per message, its outcomes or pending frames."""

    __slots__ = ("items", "messages")

    def __init__(self) -> None:
        self.messages: list[list[Outcome | _Pending | _Malformed]] = []
        self.items: list[tuple[str, np.ndarray, int, int]] = []


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

    def process_message(
        self, buffer: bytes | bytearray | memoryview, check: SymbolCheck | None = None
    ) -> list[Outcome]:
        """Decode all frames, then handle each in order; one outcome per frame.

        A message that does not decode gets one outcome, addressed with the (untrusted) id and
        sequence of its first header, and nothing of it is applied. `check(symbol)`, when
        given, may refuse a frame's symbol (Rejected: the sender's token may not write it).
        """
        self.counters.messages += 1
        try:
            frames = decode_message(buffer)
        except WireError as exc:
            return [self._malformed(buffer, exc)]
        return [self.process_frame(frame, check) for frame in frames]

    def process_frame(self, frame: Frame, check: SymbolCheck | None = None) -> Outcome:
        outcome, consumed, known = self._admit(frame)
        if outcome is not None:
            return outcome
        return self._settle(frame, self._apply(frame, check), consumed, known)

    # -- batches ----------------------------------------------------------------------------

    def begin(
        self,
        buffers: list[bytes | bytearray | memoryview],
        sink: BatchSink,
        checks: Sequence[SymbolCheck | None] | None = None,
    ) -> Batch:
        """Decode and check every message, validate each frame to apply (`sink.prepare`) and
        collect them in `Batch.items` for one `sink.submit_batch`; then call `finish`.
        `checks[i]`, when given, may refuse the symbols of `buffers[i]`'s frames."""
        batch = Batch()
        for position, buffer in enumerate(buffers):
            check = checks[position] if checks is not None else None
            self.counters.messages += 1
            try:
                frames = decode_message(buffer)
            except WireError as exc:
                batch.messages.append([_Malformed(self._malformed(buffer, exc))])
                continue
            answers: list[Outcome | _Pending | _Malformed] = []
            for frame in frames:
                outcome, consumed, known = self._admit(frame)
                if outcome is None:
                    try:
                        if check is not None:
                            check(frame.symbol)
                        values = sink.prepare(frame.symbol, frame.values, frame.timestamps)
                    except Exception as exc:
                        outcome = self._settle(frame, self._refused(frame, exc), consumed, known)
                    else:
                        index = len(batch.items)
                        batch.items.append((frame.symbol, values, frame.publisher_id,
                                            frame.sequence, frame.timestamps))  # fmt: skip
                        self._advance(frame.publisher_id, frame.sequence)  # assumed applied
                        answers.append(_Pending(frame, consumed, index))
                        continue
                answers.append(outcome)
            batch.messages.append(answers)
        return batch

    def finish(self, batch: Batch, results: list[Reason]) -> list[list[Outcome]]:
        """The outcomes of every message of `batch`, given the sink's result per item."""
        broken: dict[int, int] = {}  # publisher -> consumed, from its first retryable failure
        out: list[list[Outcome]] = []
        for answers in batch.messages:
            outcomes: list[Outcome] = []
            for answer in answers:
                if isinstance(answer, _Malformed):  # its own reason; `applied` as it now stands
                    pid = answer.outcome.publisher_id
                    outcome = answer.outcome
                    if pid in broken:
                        outcome = outcome._replace(applied=broken[pid])
                    outcomes.append(outcome)
                    continue
                if isinstance(answer, Outcome):
                    pid = answer.publisher_id
                    # After the failure, the frame-by-frame path would have seen a gap here
                    # (or a duplicate, or a non-DATA frame, which stay as they are).
                    if (
                        pid in broken
                        and answer.reason is not Reason.BAD_HEADER
                        and not (
                            answer.reason is Reason.DUPLICATE and answer.sequence <= broken[pid]
                        )
                    ):
                        answer = Outcome(pid, answer.sequence, broken[pid], Reason.GAP)
                    outcomes.append(answer)
                    continue
                frame = answer.frame
                pid, sequence = frame.publisher_id, frame.sequence
                reason = results[answer.index]
                if pid in broken:  # not applied: the sink stops a publisher at its failure
                    outcomes.append(Outcome(pid, sequence, broken[pid], Reason.GAP))
                    continue
                if reason is Reason.NONE:
                    self.counters.frames_applied += 1
                    self.counters.values_applied += frame.values.shape[0]
                    outcomes.append(Outcome(pid, sequence, sequence, reason))
                    continue
                self.counters.rejected[reason.name.lower()] += 1
                self._log.warn(
                    pid, reason, "frame not applied", sequence=sequence, symbol=frame.symbol
                )
                if reason in RETRYABLE and self.strict_order:
                    broken[pid] = answer.consumed
                    outcomes.append(Outcome(pid, sequence, answer.consumed, reason))
                else:
                    outcomes.append(Outcome(pid, sequence, sequence, reason))
            out.append(outcomes)
        for pid, consumed in broken.items():
            self._advance(pid, consumed)
        return out

    # -- the rules --------------------------------------------------------------------------

    def _malformed(self, buffer: bytes | bytearray | memoryview, exc: WireError) -> Outcome:
        publisher_id, sequence = peek_identity(buffer)
        self.counters.rejected[exc.reason.name.lower()] += 1
        self._log.warn(
            publisher_id, exc.reason, "malformed message rejected",
            error=str(exc), offset=exc.offset, bytes=len(memoryview(buffer).cast("B")),
        )  # fmt: skip
        return Outcome(publisher_id, sequence, self.consumed(publisher_id), exc.reason)

    def _admit(self, frame: Frame) -> tuple[Outcome | None, int, bool]:
        """The sequence rules before applying: an outcome when the frame is not to be applied,
        else None with the publisher's `consumed` baseline and whether it was known."""
        publisher_id, sequence = frame.publisher_id, frame.sequence
        if frame.kind is not Kind.DATA:
            return self._reject(frame, Reason.BAD_HEADER, "only DATA frames are accepted"), 0, False
        known = publisher_id in self._consumed
        if not known and self.strict_order and not frame.first:
            self.counters.rejected["unknown_publisher"] += 1
            self._log.warn(
                publisher_id, Reason.UNKNOWN_PUBLISHER,
                "frame from an unknown publisher without FLAG_FIRST; asking for a restart",
                sequence=sequence,
            )  # fmt: skip
            return Outcome(publisher_id, sequence, 0, Reason.UNKNOWN_PUBLISHER), 0, False
        consumed = self._consumed.get(publisher_id, sequence - 1)
        if known and frame.first and sequence > consumed + 1:
            consumed = sequence - 1  # the publisher restarts its session here
        if known and sequence <= consumed:
            self.counters.rejected["duplicate"] += 1
            self._log.warn(
                publisher_id, Reason.DUPLICATE, "duplicate frame not applied again",
                sequence=sequence, consumed=consumed,
            )  # fmt: skip
            return Outcome(publisher_id, sequence, consumed, Reason.DUPLICATE), consumed, known
        if sequence > consumed + 1:
            self.counters.rejected["gap"] += 1
            self._log.warn(
                publisher_id, Reason.GAP, "sequence gap", sequence=sequence,
                expected=consumed + 1, missing=sequence - consumed - 1,
            )  # fmt: skip
            if self.strict_order:
                return Outcome(publisher_id, sequence, consumed, Reason.GAP), consumed, known
        return None, consumed, known

    def _settle(self, frame: Frame, reason: Reason, consumed: int, known: bool) -> Outcome:
        """The outcome of a frame that was handed to the sink, and `consumed` after it."""
        publisher_id, sequence = frame.publisher_id, frame.sequence
        if reason in RETRYABLE and self.strict_order:
            if not known or frame.first:
                # Keep the baseline this frame set or moved (the outcome reports it): a
                # pipelined next frame is then a gap, not a start.
                self._advance(publisher_id, consumed)
            return Outcome(publisher_id, sequence, consumed, reason)
        self._advance(publisher_id, sequence)
        return Outcome(publisher_id, sequence, sequence, reason)

    def _apply(self, frame: Frame, check: SymbolCheck | None = None) -> Reason:
        try:
            if check is not None:
                check(frame.symbol)
            self.sink(
                frame.symbol, frame.values, frame.publisher_id, frame.sequence, frame.timestamps
            )
        except Exception as exc:
            return self._refused(frame, exc)
        self.counters.frames_applied += 1
        self.counters.values_applied += frame.values.shape[0]
        return Reason.NONE

    def _refused(self, frame: Frame, exc: Exception) -> Reason:
        """Count and log a sink's refusal (`Rejected`) or fault (anything else: INTERNAL)."""
        if isinstance(exc, Rejected):
            self.counters.rejected[exc.reason.name.lower()] += 1
            self._log.warn(
                frame.publisher_id, exc.reason, "frame rejected", sequence=frame.sequence,
                symbol=frame.symbol, error=str(exc),
            )  # fmt: skip
            return exc.reason
        self.counters.rejected["internal"] += 1
        self._log.warn(
            frame.publisher_id, Reason.INTERNAL, "ingest sink failed; frame not applied",
            exc_info=True, sequence=frame.sequence, symbol=frame.symbol,
        )  # fmt: skip
        return Reason.INTERNAL

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
