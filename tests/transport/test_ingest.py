"""FrameProcessor: the sequence rules every transport shares (see transport/ingest.py).

The sink here only records what it is handed, so each test states exactly which frames reached
the store, in which order, and what the publisher was told.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import transport.ingest as ingest_module
from transport.ingest import FrameProcessor, Outcome, Rejected
from transport.wire import Reason, encode_ack, encode_data

PID = 7
XS = int.from_bytes(b"x" * 8, "little")  # a u64 field of b"xxxxxxxx"


@dataclass
class RecordingSink:
    """Records (symbol, values) per call; can be told to fail on chosen calls."""

    applied: list[tuple[str, list[float]]] = field(default_factory=list)
    fail_with: dict[float, BaseException] = field(default_factory=dict)  # first value -> error
    fail_next: list[BaseException] = field(default_factory=list)

    def __call__(self, symbol: str, values: np.ndarray) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)
        if values.size and float(values[0]) in self.fail_with:
            raise self.fail_with[float(values[0])]
        self.applied.append((symbol, values.tolist()))

    @property
    def firsts(self) -> list[float]:
        return [values[0] for _, values in self.applied]


def frame(sequence: int, publisher_id: int = PID, symbol: str = "S", n: int = 1) -> bytes:
    """A DATA frame whose values start with its own sequence number (to see what was applied)."""
    return encode_data(publisher_id, sequence, symbol, np.arange(sequence, sequence + n, 1.0))


def make(strict: bool = True) -> tuple[FrameProcessor, RecordingSink]:
    sink = RecordingSink()
    return FrameProcessor(sink, "test", strict_order=strict), sink


def send(processor: FrameProcessor, *sequences: int, publisher_id: int = PID) -> list[Outcome]:
    """Each sequence in its own message; the outcomes in order."""
    outcomes = []
    for sequence in sequences:
        outcomes += processor.process_message(frame(sequence, publisher_id))
    return outcomes


def reasons(outcomes: list[Outcome]) -> list[Reason]:
    return [o.reason for o in outcomes]


# --- the ordinary path -----------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_in_order_frames_are_applied_in_order(strict: bool) -> None:
    processor, sink = make(strict)
    outcomes = send(processor, 1, 2, 3)
    assert sink.firsts == [1.0, 2.0, 3.0]
    assert outcomes == [Outcome(PID, s, s, Reason.NONE) for s in (1, 2, 3)]
    assert all(o.ok for o in outcomes)
    assert processor.consumed(PID) == 3
    assert processor.counters.snapshot() == {
        "messages": 3, "frames_applied": 3, "values_applied": 3, "rejected": {},
    }  # fmt: skip


def test_several_frames_in_one_message_get_one_outcome_each() -> None:
    processor, sink = make()
    message = frame(1, n=3) + frame(2, symbol="T", n=2) + frame(3)
    outcomes = processor.process_message(message)
    assert [(o.sequence, o.applied, o.reason) for o in outcomes] == [
        (1, 1, Reason.NONE), (2, 2, Reason.NONE), (3, 3, Reason.NONE),
    ]  # fmt: skip
    assert sink.applied == [("S", [1.0, 2.0, 3.0]), ("T", [2.0, 3.0]), ("S", [3.0])]
    assert (processor.counters.messages, processor.counters.values_applied) == (1, 6)


def test_the_first_frame_sets_the_baseline() -> None:
    processor, sink = make()
    assert processor.consumed(PID) == 0
    assert send(processor, 100, 101) == [
        Outcome(PID, 100, 100, Reason.NONE), Outcome(PID, 101, 101, Reason.NONE),
    ]  # fmt: skip
    assert send(processor, 99) == [Outcome(PID, 99, 101, Reason.DUPLICATE)]
    assert sink.firsts == [100.0, 101.0]


def test_publishers_are_independent() -> None:
    processor, sink = make()
    send(processor, 1, 2, publisher_id=1)
    send(processor, 1, publisher_id=2)
    assert send(processor, 3, publisher_id=1)[0].reason is Reason.NONE
    assert send(processor, 3, publisher_id=2)[0].reason is Reason.GAP
    assert (processor.consumed(1), processor.consumed(2)) == (3, 1)
    assert sink.firsts == [1.0, 2.0, 1.0, 3.0]


# --- duplicates and gaps ---------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_a_duplicate_is_acked_and_not_applied_twice(strict: bool) -> None:
    processor, sink = make(strict)
    send(processor, 1, 2)
    outcomes = send(processor, 2, 1, 2)
    assert outcomes == [Outcome(PID, s, 2, Reason.DUPLICATE) for s in (2, 1, 2)]
    assert all(o.ok for o in outcomes)
    assert sink.firsts == [1.0, 2.0]
    assert processor.counters.rejected == {"duplicate": 3}
    assert processor.counters.frames_applied == 2


def test_a_duplicate_inside_a_message_is_skipped_alone() -> None:
    processor, sink = make()
    outcomes = processor.process_message(frame(1) + frame(1) + frame(2))
    assert reasons(outcomes) == [Reason.NONE, Reason.DUPLICATE, Reason.NONE]
    assert sink.firsts == [1.0, 2.0]


def test_gap_in_strict_mode_is_nacked_then_accepted_after_the_resend() -> None:
    processor, sink = make(strict=True)
    send(processor, 1)
    outcomes = send(processor, 3, 4)
    assert outcomes == [Outcome(PID, 3, 1, Reason.GAP), Outcome(PID, 4, 1, Reason.GAP)]
    assert not any(o.ok for o in outcomes)
    assert sink.firsts == [1.0]
    assert processor.consumed(PID) == 1
    # go-back-N: resend from applied + 1
    assert reasons(send(processor, 2, 3, 4)) == [Reason.NONE] * 3
    assert sink.firsts == [1.0, 2.0, 3.0, 4.0]
    assert processor.counters.rejected == {"gap": 2}


def test_gap_in_non_strict_mode_is_applied_and_counted() -> None:
    processor, sink = make(strict=False)
    send(processor, 1)
    assert send(processor, 5) == [Outcome(PID, 5, 5, Reason.NONE)]
    assert sink.firsts == [1.0, 5.0]
    assert processor.counters.rejected == {"gap": 1}
    # the missing sequences, arriving late, are duplicates now
    assert reasons(send(processor, 3)) == [Reason.DUPLICATE]
    assert sink.firsts == [1.0, 5.0]


# --- sink failures ---------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "reason",
    [Reason.INVALID_VALUE, Reason.INVALID_SYMBOL, Reason.EMPTY_BATCH, Reason.SYMBOL_LIMIT],
)
def test_a_content_rejection_advances_applied(strict: bool, reason: Reason) -> None:
    processor, sink = make(strict)
    sink.fail_with[2.0] = Rejected(reason, "no")
    outcomes = send(processor, 1, 2, 3)
    assert outcomes == [
        Outcome(PID, 1, 1, Reason.NONE),
        Outcome(PID, 2, 2, reason),
        Outcome(PID, 3, 3, Reason.NONE),
    ]
    assert not outcomes[1].ok
    assert sink.firsts == [1.0, 3.0]
    assert processor.counters.rejected == {reason.name.lower(): 1}
    assert processor.counters.frames_applied == 2
    # resending the rejected frame cannot apply it: it is finished
    assert reasons(send(processor, 2)) == [Reason.DUPLICATE]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError("engine broke"), Reason.INTERNAL),
        (MemoryError(), Reason.INTERNAL),
        (Rejected(Reason.UNAVAILABLE, "stopping"), Reason.UNAVAILABLE),
    ],
)
def test_a_retryable_failure_does_not_advance_in_strict_mode(
    error: Exception, reason: Reason
) -> None:
    processor, sink = make(strict=True)
    send(processor, 1)
    sink.fail_next.append(error)
    assert send(processor, 2, 3) == [Outcome(PID, 2, 1, reason), Outcome(PID, 3, 1, Reason.GAP)]
    assert processor.consumed(PID) == 1
    assert sink.firsts == [1.0]
    assert reasons(send(processor, 2, 3)) == [Reason.NONE, Reason.NONE]
    assert sink.firsts == [1.0, 2.0, 3.0]
    assert processor.counters.rejected[reason.name.lower()] == 1


def test_a_retryable_failure_advances_in_non_strict_mode() -> None:
    # Nobody can resend on PULL/SUB: the frame is lost, counted, and the stream goes on.
    processor, sink = make(strict=False)
    sink.fail_next.append(RuntimeError("engine broke"))
    assert send(processor, 1, 2) == [
        Outcome(PID, 1, 1, Reason.INTERNAL), Outcome(PID, 2, 2, Reason.NONE),
    ]  # fmt: skip
    assert sink.firsts == [2.0]
    assert processor.counters.rejected == {"internal": 1}


def test_a_failed_first_frame_still_fixes_the_baseline() -> None:
    # The first frame failed (retryable) and the publisher had already sent the next one:
    # that one must be a gap, not a new baseline that would turn the resend into a duplicate.
    processor, sink = make(strict=True)
    sink.fail_next.append(RuntimeError("engine broke"))
    assert reasons(send(processor, 1, 2)) == [Reason.INTERNAL, Reason.GAP]
    assert reasons(send(processor, 1, 2)) == [Reason.NONE, Reason.NONE]
    assert sink.firsts == [1.0, 2.0]


def test_the_sink_failure_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    processor, sink = make()
    sink.fail_next.append(RuntimeError("engine broke"))
    with caplog.at_level(logging.WARNING, logger="transport.ingest"):
        send(processor, 1)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "engine broke" in str(record.exc_info[1])
    assert (record.transport, record.publisher_id, record.sequence) == ("test", PID, 1)


# --- malformed input -------------------------------------------------------------------------


def test_a_malformed_message_gets_one_outcome_and_applies_nothing() -> None:
    processor, sink = make()
    send(processor, 1)
    message = bytearray(frame(2) + frame(3) + frame(4))
    message[-1] ^= 0x01  # damage the last frame only
    outcomes = processor.process_message(bytes(message))
    assert outcomes == [Outcome(PID, 2, 1, Reason.BAD_CRC)]
    assert sink.firsts == [1.0]
    assert processor.consumed(PID) == 1
    assert processor.counters.rejected == {"bad_crc": 1}
    assert processor.counters.messages == 2
    # the publisher resends the message, intact
    assert reasons(processor.process_message(frame(2) + frame(3) + frame(4))) == [Reason.NONE] * 3


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", Outcome(0, 0, 0, Reason.BAD_LENGTH)),
        (b"HFTW", Outcome(0, 0, 0, Reason.BAD_LENGTH)),
        (b"x" * 100, Outcome(XS, XS, 0, Reason.BAD_MAGIC)),
        (frame(5)[:-1], Outcome(PID, 5, 0, Reason.BAD_LENGTH)),
    ],
)
def test_malformed_messages_are_addressed_from_the_untrusted_header(
    data: bytes, expected: Outcome
) -> None:
    processor, sink = make()
    assert processor.process_message(data) == [expected]
    assert sink.applied == []
    assert processor.consumed(expected.publisher_id) == 0


def test_malformed_message_outcome_carries_the_known_applied() -> None:
    processor, _ = make()
    send(processor, 1, 2)
    assert processor.process_message(frame(3)[:-8]) == [Outcome(PID, 3, 2, Reason.BAD_LENGTH)]


def test_acks_sent_to_the_appliance_are_rejected_without_effect() -> None:
    processor, sink = make()
    send(processor, 1)
    outcomes = processor.process_message(encode_ack(PID, 2, 2) + frame(2))
    assert outcomes == [Outcome(PID, 2, 1, Reason.BAD_HEADER), Outcome(PID, 2, 2, Reason.NONE)]
    assert sink.firsts == [1.0, 2.0]
    assert processor.counters.rejected == {"bad_header": 1}


def test_invalid_content_reaches_the_sink_which_decides() -> None:
    # The wire carries negative and empty batches; rejecting them is the sink's job.
    processor, sink = make()
    outcomes = processor.process_message(
        encode_data(PID, 1, "S", np.array([-1.0])) + encode_data(PID, 2, "S", np.array([]))
    )
    assert reasons(outcomes) == [Reason.NONE, Reason.NONE]
    assert sink.applied == [("S", [-1.0]), ("S", [])]


# --- bounded state and logs ------------------------------------------------------------------


def test_the_publisher_table_is_bounded_least_recently_seen_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest_module, "MAX_TRACKED_PUBLISHERS", 4)
    processor, _ = make()
    for pid in (1, 2, 3, 4):
        send(processor, 10, publisher_id=pid)
    send(processor, 11, publisher_id=1)  # 1 is now the most recently seen
    send(processor, 10, publisher_id=5)  # evicts 2, the least recently seen
    assert [processor.consumed(pid) for pid in (1, 2, 3, 4, 5)] == [11, 0, 10, 10, 10]
    assert len(processor._consumed) == 4
    # a forgotten publisher starts again from a new baseline
    assert reasons(send(processor, 10, publisher_id=2)) == [Reason.NONE]
    assert processor.consumed(3) == 0
    for pid in range(100, 200):
        send(processor, 1, publisher_id=pid)
    assert len(processor._consumed) == 4


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    # Start at 0: a monotonic clock may be near 0 (a fresh container); the first warning counts.
    fake = FakeClock(0.0)
    monkeypatch.setattr(ingest_module, "time", fake)
    return fake


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "transport.ingest"]


def test_throttled_logging_does_not_flood(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    processor, _ = make()
    send(processor, 1)
    with caplog.at_level(logging.WARNING, logger="transport.ingest"):
        send(processor, *[1] * 1000)
        assert len(warnings_of(caplog)) == 1
        (first,) = warnings_of(caplog)
        assert (first.reason, first.suppressed_since_last) == ("duplicate", 0)
        clock.now += 1.5
        send(processor, 1)
        assert len(warnings_of(caplog)) == 2
        assert warnings_of(caplog)[-1].suppressed_since_last == 999
    assert processor.counters.rejected["duplicate"] == 1001  # counted even when not logged


def test_throttling_is_per_publisher_and_reason(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    processor, _ = make()
    send(processor, 1, publisher_id=1)
    send(processor, 1, publisher_id=2)
    with caplog.at_level(logging.WARNING, logger="transport.ingest"):
        for _ in range(50):
            send(processor, 1, publisher_id=1)  # duplicate
            send(processor, 1, publisher_id=2)  # duplicate
            send(processor, 5, publisher_id=1)  # gap
            processor.process_message(b"junk")  # bad length, publisher 0
    assert sorted((r.publisher_id, r.reason) for r in warnings_of(caplog)) == [
        (0, "bad_length"), (1, "duplicate"), (1, "gap"), (2, "duplicate"),
    ]  # fmt: skip


def test_a_failing_sink_does_not_flood_the_log(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    processor, sink = make(strict=False)
    sink.fail_next.extend(RuntimeError(f"broken {i}") for i in range(500))
    with caplog.at_level(logging.WARNING, logger="transport.ingest"):
        send(processor, *range(1, 501))
    assert len(warnings_of(caplog)) == 1
    assert processor.counters.rejected == {"internal": 500}


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60))
def test_non_strict_applies_each_sequence_at_most_once_in_increasing_order(
    sequences: list[int],
) -> None:
    processor, sink = make(strict=False)
    send(processor, *sequences)
    expected, high = [], 0
    for sequence in sequences:
        if not expected or sequence > high:
            expected.append(float(sequence))
            high = sequence
    assert sink.firsts == expected


@dataclass
class GoBackN:
    """A publisher with a window of unacknowledged frames that resends from `applied + 1`.

    Its first frame goes alone and is resent until acknowledged: until then the appliance does
    not know where the numbering starts (docs/wire-format.md, sequence rules).
    """

    total: int
    window: int
    base: int = 1  # lowest sequence not yet confirmed
    next: int = 1  # next sequence to send

    def sendable(self, count: int) -> list[int]:
        limit = self.base if self.base == 1 else self.base + self.window - 1
        last = min(self.next + count - 1, limit, self.total)
        sequences = list(range(self.next, last + 1))
        self.next = max(self.next, last + 1)
        return sequences

    def answer(self, outcome: Outcome) -> None:
        if outcome.publisher_id != PID:
            return  # a nack addressed from a damaged header
        self.base = max(self.base, outcome.applied + 1)
        if not outcome.ok:
            self.next = self.base  # go back N
        self.next = max(self.next, self.base)

    def timeout(self) -> None:
        self.next = self.base


class FaultyChannel:
    """A FIFO link (like one ZeroMQ connection) between a GoBackN publisher and a processor."""

    def __init__(self, processor: FrameProcessor, sink: RecordingSink, publisher: GoBackN):
        self.processor, self.sink, self.publisher = processor, sink, publisher
        self.queue: list[bytes] = []

    def send(self, count: int) -> None:
        sequences = self.publisher.sendable(count)
        if sequences:
            self.queue.append(b"".join(frame(s) for s in sequences))

    def deliver(self, message: bytes) -> None:
        for outcome in self.processor.process_message(message):
            self.publisher.answer(outcome)
        applied = [int(x) for x in self.sink.firsts]
        assert applied == list(range(1, len(applied) + 1))  # always a prefix, never twice

    def act(self, action: str, arg: int) -> None:
        if action == "send":
            self.send(1 + arg % 3)
        elif action == "timeout":
            self.publisher.timeout()
        elif action == "fail":
            self.sink.fail_next.append(RuntimeError("transient"))
        elif self.queue:
            message = self.queue.pop(0)
            if action == "duplicate":
                self.queue.append(message)  # delivered now and again later
            elif action == "corrupt":
                damaged = bytearray(message)
                damaged[arg % len(damaged)] ^= 1 << (arg % 8)
                message = bytes(damaged)
            if action != "drop":
                self.deliver(message)


ACTIONS = ("send", "deliver", "drop", "duplicate", "corrupt", "fail", "timeout")


@settings(max_examples=200)
@given(
    total=st.integers(1, 12),
    window=st.integers(1, 4),
    script=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 1 << 16)), max_size=80),
)
def test_go_back_n_over_a_faulty_channel_applies_everything_once_in_order(
    total: int, window: int, script: list[tuple[str, int]]
) -> None:
    processor, sink = make(strict=True)
    publisher = GoBackN(total, window)
    channel = FaultyChannel(processor, sink, publisher)
    for action, arg in script:
        channel.act(action, arg)

    # From here on the channel is clean: everything must complete.
    sink.fail_next.clear()
    for _ in range(len(channel.queue) + 10 * total + 10):
        if publisher.base > total:
            break
        if not channel.queue:
            publisher.timeout()
            channel.send(window)
        channel.deliver(channel.queue.pop(0))
    assert publisher.base == total + 1
    assert sink.firsts == [float(s) for s in range(1, total + 1)]
    assert processor.consumed(PID) == total
