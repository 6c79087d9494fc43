"""FrameProcessor: the sequence rules every transport shares (see transport/ingest.py).

The sink here only records what it is handed, so each test states exactly which frames reached
the store, in which order, and what the publisher was told.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import example, given, settings
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

    def __call__(self, symbol: str, values: np.ndarray, *origin: int) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)
        if values.size and float(values[0]) in self.fail_with:
            raise self.fail_with[float(values[0])]
        self.applied.append((symbol, values.tolist()))

    @property
    def firsts(self) -> list[float]:
        return [values[0] for _, values in self.applied]


def frame(
    sequence: int, publisher_id: int = PID, symbol: str = "S", n: int = 1, *, first: bool = False
) -> bytes:
    """A DATA frame whose values start with its own sequence number (to see what was applied);
    `first` sets FLAG_FIRST, as a publisher does on the first frame of its session."""
    values = np.arange(sequence, sequence + n, 1.0)
    return encode_data(publisher_id, sequence, symbol, values, first=first)


def make(strict: bool = True) -> tuple[FrameProcessor, RecordingSink]:
    sink = RecordingSink()
    return FrameProcessor(sink, "test", strict_order=strict), sink


def send(
    processor: FrameProcessor, *sequences: int, publisher_id: int = PID, first: bool = False
) -> list[Outcome]:
    """Each sequence in its own message; the outcomes in order. With `first`, the first of them
    is flagged FIRST (where a publisher starts: required by strict transports)."""
    outcomes = []
    for index, sequence in enumerate(sequences):
        message = frame(sequence, publisher_id, first=first and index == 0)
        outcomes += processor.process_message(message)
    return outcomes


def reasons(outcomes: list[Outcome]) -> list[Reason]:
    return [o.reason for o in outcomes]


# --- the ordinary path -----------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_in_order_frames_are_applied_in_order(strict: bool) -> None:
    processor, sink = make(strict)
    outcomes = send(processor, 1, 2, 3, first=True)
    assert sink.firsts == [1.0, 2.0, 3.0]
    assert outcomes == [Outcome(PID, s, s, Reason.NONE) for s in (1, 2, 3)]
    assert all(o.ok for o in outcomes)
    assert processor.consumed(PID) == 3
    assert processor.counters.snapshot() == {
        "messages": 3, "frames_applied": 3, "values_applied": 3, "rejected": {},
    }  # fmt: skip


def test_several_frames_in_one_message_get_one_outcome_each() -> None:
    processor, sink = make()
    message = frame(1, n=3, first=True) + frame(2, symbol="T", n=2) + frame(3)
    outcomes = processor.process_message(message)
    assert [(o.sequence, o.applied, o.reason) for o in outcomes] == [
        (1, 1, Reason.NONE), (2, 2, Reason.NONE), (3, 3, Reason.NONE),
    ]  # fmt: skip
    assert sink.applied == [("S", [1.0, 2.0, 3.0]), ("T", [2.0, 3.0]), ("S", [3.0])]
    assert (processor.counters.messages, processor.counters.values_applied) == (1, 6)


def test_the_first_frame_sets_the_baseline() -> None:
    processor, sink = make()
    assert processor.consumed(PID) == 0
    assert send(processor, 100, 101, first=True) == [
        Outcome(PID, 100, 100, Reason.NONE), Outcome(PID, 101, 101, Reason.NONE),
    ]  # fmt: skip
    assert send(processor, 99) == [Outcome(PID, 99, 101, Reason.DUPLICATE)]
    assert sink.firsts == [100.0, 101.0]


def test_publishers_are_independent() -> None:
    processor, sink = make()
    send(processor, 1, 2, publisher_id=1, first=True)
    send(processor, 1, publisher_id=2, first=True)
    assert send(processor, 3, publisher_id=1)[0].reason is Reason.NONE
    assert send(processor, 3, publisher_id=2)[0].reason is Reason.GAP
    assert (processor.consumed(1), processor.consumed(2)) == (3, 1)
    assert sink.firsts == [1.0, 2.0, 1.0, 3.0]


# --- where a publisher starts: FLAG_FIRST -----------------------------------------------------


def test_strict_an_unknown_publisher_without_first_is_told_so_and_nothing_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor, sink = make(strict=True)
    with caplog.at_level(logging.WARNING, logger="transport.ingest"):
        outcomes = send(processor, 5)
    assert outcomes == [Outcome(PID, 5, 0, Reason.UNKNOWN_PUBLISHER)]
    assert not outcomes[0].ok
    (record,) = caplog.records
    assert (record.publisher_id, record.reason, record.sequence) == (PID, "unknown_publisher", 5)
    # Every frame of a message is answered; none becomes a baseline, so none is applied.
    outcomes = processor.process_message(frame(6) + frame(7))
    assert outcomes == [Outcome(PID, s, 0, Reason.UNKNOWN_PUBLISHER) for s in (6, 7)]
    assert sink.applied == []
    assert processor.consumed(PID) == 0
    assert processor.counters.snapshot() == {
        "messages": 2, "frames_applied": 0, "values_applied": 0,
        "rejected": {"unknown_publisher": 3},
    }  # fmt: skip


def test_strict_a_first_frame_sets_the_baseline_whatever_its_sequence() -> None:
    processor, sink = make(strict=True)
    assert send(processor, 5, first=True) == [Outcome(PID, 5, 5, Reason.NONE)]
    assert send(processor, 6, 4, 8) == [
        Outcome(PID, 6, 6, Reason.NONE),
        Outcome(PID, 4, 6, Reason.DUPLICATE),  # before the start: finished, says the publisher
        Outcome(PID, 8, 6, Reason.GAP),
    ]
    assert sink.firsts == [5.0, 6.0]
    assert processor.counters.rejected == {"duplicate": 1, "gap": 1}


@pytest.mark.parametrize("one_message", [False, True], ids=["separately", "one message"])
def test_a_lost_first_message_is_asked_for_again_and_applied_exactly_once(
    one_message: bool,
) -> None:
    # The publisher sent 1 (FIRST), 2, 3; the message with 1 was lost. Guessing a baseline at
    # 2 would ack the resent 1 as a duplicate without ever applying it: silent loss.
    processor, sink = make(strict=True)
    assert send(processor, 2, 3) == [
        Outcome(PID, 2, 0, Reason.UNKNOWN_PUBLISHER), Outcome(PID, 3, 0, Reason.UNKNOWN_PUBLISHER),
    ]  # fmt: skip
    assert sink.applied == []
    # The publisher resends everything unacked, its oldest frame flagged FIRST.
    if one_message:
        outcomes = processor.process_message(frame(1, first=True) + frame(2) + frame(3))
    else:
        outcomes = send(processor, 1, 2, 3, first=True)
    assert outcomes == [Outcome(PID, s, s, Reason.NONE) for s in (1, 2, 3)]
    assert sink.firsts == [1.0, 2.0, 3.0]
    # Copies still in flight are duplicates: acked, not applied again.
    assert reasons(send(processor, 1, 2, 3, first=True)) == [Reason.DUPLICATE] * 3
    assert sink.firsts == [1.0, 2.0, 3.0]
    assert processor.counters.rejected == {"unknown_publisher": 2, "duplicate": 3}


def test_after_an_appliance_restart_the_publisher_restarts_its_session() -> None:
    before, old_sink = make(strict=True)
    assert reasons(send(before, 1, 2, 3, 4, 5, first=True)) == [Reason.NONE] * 5
    assert old_sink.firsts == [1.0, 2.0, 3.0, 4.0, 5.0]
    # The appliance restarts: a fresh processor (and store) that never heard of the publisher.
    after, sink = make(strict=True)
    assert send(after, 6, 7) == [
        Outcome(PID, 6, 0, Reason.UNKNOWN_PUBLISHER), Outcome(PID, 7, 0, Reason.UNKNOWN_PUBLISHER),
    ]  # fmt: skip
    assert sink.applied == []
    # Resend from the oldest unacked frame, flagged FIRST: everything before it was acked.
    assert send(after, 6, 7, first=True) == [
        Outcome(PID, 6, 6, Reason.NONE), Outcome(PID, 7, 7, Reason.NONE),
    ]  # fmt: skip
    assert sink.firsts == [6.0, 7.0]
    assert after.consumed(PID) == 7
    assert after.counters.rejected == {"unknown_publisher": 2}


def test_a_known_publisher_flagging_first_past_a_gap_moves_the_baseline() -> None:
    processor, sink = make(strict=True)
    send(processor, 1, 2, first=True)
    # FIRST says every earlier sequence is finished: 3 and 4 are not waited for.
    assert send(processor, 5, first=True) == [Outcome(PID, 5, 5, Reason.NONE)]
    assert processor.consumed(PID) == 5
    assert send(processor, 3, 6) == [
        Outcome(PID, 3, 5, Reason.DUPLICATE), Outcome(PID, 6, 6, Reason.NONE),
    ]  # fmt: skip
    assert sink.firsts == [1.0, 2.0, 5.0, 6.0]
    # Without the flag the same jump is a gap, as always.
    assert send(processor, 9) == [Outcome(PID, 9, 6, Reason.GAP)]
    # A FIRST frame that leaves no gap moves nothing: a resent start is still a duplicate, and
    # the next frame is applied as usual.
    assert send(processor, 6, first=True) == [Outcome(PID, 6, 6, Reason.DUPLICATE)]
    assert send(processor, 7, first=True) == [Outcome(PID, 7, 7, Reason.NONE)]
    assert sink.firsts == [1.0, 2.0, 5.0, 6.0, 7.0]
    assert processor.counters.rejected == {"duplicate": 2, "gap": 1}


def test_a_moved_baseline_is_kept_when_the_first_frame_fails() -> None:
    # The answer reports `applied` 4: the appliance must hold that value, or the pipelined 6
    # would be answered with an `applied` that went back to 2.
    processor, sink = make(strict=True)
    send(processor, 1, 2, first=True)
    sink.fail_next.append(RuntimeError("engine broke"))
    assert send(processor, 5, 6, first=True) == [
        Outcome(PID, 5, 4, Reason.INTERNAL), Outcome(PID, 6, 4, Reason.GAP),
    ]  # fmt: skip
    assert processor.consumed(PID) == 4
    assert send(processor, 5, 6, first=True) == [
        Outcome(PID, 5, 5, Reason.NONE), Outcome(PID, 6, 6, Reason.NONE),
    ]  # fmt: skip
    assert sink.firsts == [1.0, 2.0, 5.0, 6.0]


def test_non_strict_the_first_frame_seen_sets_the_baseline_flagged_or_not() -> None:
    # PULL and SUB: nobody can resend, so nothing is asked for; an unflagged start is taken.
    processor, sink = make(strict=False)
    assert send(processor, 5) == [Outcome(PID, 5, 5, Reason.NONE)]
    assert send(processor, 3, first=True, publisher_id=2) == [Outcome(2, 3, 3, Reason.NONE)]
    assert send(processor, 6) == [Outcome(PID, 6, 6, Reason.NONE)]
    assert sink.firsts == [5.0, 3.0, 6.0]
    assert processor.counters.rejected == {}


# --- duplicates and gaps ---------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_a_duplicate_is_acked_and_not_applied_twice(strict: bool) -> None:
    processor, sink = make(strict)
    send(processor, 1, 2, first=True)
    outcomes = send(processor, 2, 1, 2)
    assert outcomes == [Outcome(PID, s, 2, Reason.DUPLICATE) for s in (2, 1, 2)]
    assert all(o.ok for o in outcomes)
    assert sink.firsts == [1.0, 2.0]
    assert processor.counters.rejected == {"duplicate": 3}
    assert processor.counters.frames_applied == 2


def test_a_duplicate_inside_a_message_is_skipped_alone() -> None:
    processor, sink = make()
    outcomes = processor.process_message(frame(1, first=True) + frame(1) + frame(2))
    assert reasons(outcomes) == [Reason.NONE, Reason.DUPLICATE, Reason.NONE]
    assert sink.firsts == [1.0, 2.0]


def test_gap_in_strict_mode_is_nacked_then_accepted_after_the_resend() -> None:
    processor, sink = make(strict=True)
    send(processor, 1, first=True)
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
    outcomes = send(processor, 1, 2, 3, first=True)
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
    send(processor, 1, first=True)
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
    assert reasons(send(processor, 1, 2, first=True)) == [Reason.INTERNAL, Reason.GAP]
    # the resend carries the same bytes: 1 still flagged FIRST
    assert reasons(send(processor, 1, 2, first=True)) == [Reason.NONE, Reason.NONE]
    assert sink.firsts == [1.0, 2.0]


def test_the_sink_failure_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    processor, sink = make()
    sink.fail_next.append(RuntimeError("engine broke"))
    with caplog.at_level(logging.WARNING, logger="transport.ingest"):
        send(processor, 1, first=True)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "engine broke" in str(record.exc_info[1])
    assert (record.transport, record.publisher_id, record.sequence) == ("test", PID, 1)


# --- malformed input -------------------------------------------------------------------------


def test_a_malformed_message_gets_one_outcome_and_applies_nothing() -> None:
    processor, sink = make()
    send(processor, 1, first=True)
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
    send(processor, 1, 2, first=True)
    assert processor.process_message(frame(3)[:-8]) == [Outcome(PID, 3, 2, Reason.BAD_LENGTH)]


def test_acks_sent_to_the_appliance_are_rejected_without_effect() -> None:
    processor, sink = make()
    send(processor, 1, first=True)
    outcomes = processor.process_message(encode_ack(PID, 2, 2) + frame(2))
    assert outcomes == [Outcome(PID, 2, 1, Reason.BAD_HEADER), Outcome(PID, 2, 2, Reason.NONE)]
    assert sink.firsts == [1.0, 2.0]
    assert processor.counters.rejected == {"bad_header": 1}


def test_invalid_content_reaches_the_sink_which_decides() -> None:
    # The wire carries negative and empty batches; rejecting them is the sink's job.
    processor, sink = make()
    outcomes = processor.process_message(
        encode_data(PID, 1, "S", np.array([-1.0]), first=True)
        + encode_data(PID, 2, "S", np.array([]))
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
        send(processor, 10, publisher_id=pid, first=True)
    send(processor, 11, publisher_id=1)  # 1 is now the most recently seen
    send(processor, 10, publisher_id=5, first=True)  # evicts 2, the least recently seen
    assert [processor.consumed(pid) for pid in (1, 2, 3, 4, 5)] == [11, 0, 10, 10, 10]
    assert len(processor._consumed) == 4
    # a forgotten publisher is unknown: told so, and it restarts its session flagged FIRST
    assert reasons(send(processor, 11, publisher_id=2)) == [Reason.UNKNOWN_PUBLISHER]
    assert processor.consumed(2) == 0
    assert reasons(send(processor, 11, publisher_id=2, first=True)) == [Reason.NONE]
    assert processor.consumed(3) == 0
    for pid in range(100, 200):
        send(processor, 1, publisher_id=pid, first=True)
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
    send(processor, 1, first=True)
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
    send(processor, 1, publisher_id=1, first=True)
    send(processor, 1, publisher_id=2, first=True)
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

    Like ZmqPublisher: its first frame is flagged FIRST and it pipelines at once; when told
    UNKNOWN_PUBLISHER (its start never arrived, or the appliance restarted) it flags its oldest
    unacknowledged frame FIRST and goes back to it (docs/wire-format.md, sequence rules).
    """

    total: int
    window: int
    base: int = 1  # lowest sequence not yet confirmed
    next: int = 1  # next sequence to send
    firsts: set[int] = field(default_factory=lambda: {1})  # sequences flagged FIRST

    def sendable(self, count: int) -> list[int]:
        last = min(self.next + count - 1, self.base + self.window - 1, self.total)
        sequences = list(range(self.next, last + 1))
        self.next = max(self.next, last + 1)
        return sequences

    def answer(self, outcome: Outcome) -> None:
        if outcome.publisher_id != PID:
            return  # a nack addressed from a damaged header
        self.base = max(self.base, outcome.applied + 1)
        if outcome.reason is Reason.UNKNOWN_PUBLISHER:
            self.firsts.add(self.base)  # everything before it was confirmed
        if not outcome.ok:
            self.next = self.base  # go back N
        self.next = max(self.next, self.base)

    def timeout(self) -> None:
        self.next = self.base


class FaultyChannel:
    """A FIFO link (like one ZeroMQ connection) between a GoBackN publisher and a processor.

    `restart` replaces the appliance (a fresh processor and store; what was in transit is
    lost). Each incarnation must apply a contiguous run of sequences, in order, each once,
    starting where the publisher stood when it came up.
    """

    def __init__(self, publisher: GoBackN, *, lose_first: bool = False) -> None:
        self.processor, self.sink = make(strict=True)
        self.publisher = publisher
        self.queue: list[bytes] = []
        self.lose_first = lose_first  # the very first message never arrives
        self.start = 1  # the first sequence the current incarnation must apply
        self.incarnations: list[tuple[int, list[int]]] = []  # earlier (start, applied)

    def send(self, count: int) -> None:
        sequences = self.publisher.sendable(count)
        if sequences:
            message = b"".join(frame(s, first=s in self.publisher.firsts) for s in sequences)
            if self.lose_first:
                self.lose_first = False
            else:
                self.queue.append(message)

    def applied(self) -> list[int]:
        return [int(x) for x in self.sink.firsts]

    def deliver(self, message: bytes) -> None:
        for outcome in self.processor.process_message(message):
            self.publisher.answer(outcome)
        applied = self.applied()
        assert applied == list(range(self.start, self.start + len(applied)))  # never twice

    def restart(self) -> None:
        self.incarnations.append((self.start, self.applied()))
        self.processor, self.sink = make(strict=True)
        self.queue.clear()
        self.start = self.publisher.base

    def act(self, action: str, arg: int) -> None:
        if action == "send":
            self.send(1 + arg % 3)
        elif action == "timeout":
            self.publisher.timeout()
        elif action == "fail":
            self.sink.fail_next.append(RuntimeError("transient"))
        elif action == "restart":
            self.restart()
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


ACTIONS = ("send", "deliver", "drop", "duplicate", "corrupt", "fail", "timeout", "restart")


@settings(max_examples=300)
@given(
    total=st.integers(1, 12),
    window=st.integers(1, 4),
    lose_first=st.booleans(),
    script=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 1 << 16)), max_size=80),
)
@example(total=3, window=3, lose_first=True, script=[("send", 2), ("deliver", 0)])
@example(
    total=5,
    window=4,
    lose_first=False,
    script=[("send", 2), ("deliver", 0), ("send", 1), ("restart", 0), ("send", 1)],
)
def test_go_back_n_over_a_faulty_channel_applies_everything_once_in_order(
    total: int, window: int, lose_first: bool, script: list[tuple[str, int]]
) -> None:
    publisher = GoBackN(total, window)
    channel = FaultyChannel(publisher, lose_first=lose_first)
    for action, arg in script:
        channel.act(action, arg)

    # From here on the channel is clean: everything must complete.
    channel.sink.fail_next.clear()
    channel.lose_first = False
    for _ in range(len(channel.queue) + 10 * total + 10):
        if publisher.base > total:
            break
        if not channel.queue:
            publisher.timeout()
            channel.send(window)
        channel.deliver(channel.queue.pop(0))
    assert publisher.base == total + 1
    # The last incarnation applied everything from where it started, in order, once ...
    assert channel.applied() == list(range(channel.start, total + 1))
    assert channel.processor.consumed(PID) == (total if channel.start <= total else 0)
    # ... and each earlier one reached at least the next one's start: nothing was skipped
    # (frames applied but not yet acked when the appliance went down are applied again).
    starts = [start for start, _ in channel.incarnations] + [channel.start]
    assert starts[0] == 1
    for (start, applied), next_start in zip(channel.incarnations, starts[1:], strict=True):
        assert start + len(applied) >= next_start


def test_resume_makes_logged_frames_duplicates_and_continues_without_first() -> None:
    applied: list[list[float]] = []
    processor = FrameProcessor(
        lambda symbol, values, *origin: applied.append(values.tolist()), "t", strict_order=True
    )
    processor.resume({7: 5, 8: 0})
    (dup,) = processor.process_message(encode_data(7, 5, "R", np.array([5.0])))
    (nxt,) = processor.process_message(encode_data(7, 6, "R", np.array([6.0])))
    (unknown,) = processor.process_message(encode_data(8, 1, "R", np.array([1.0])))
    assert (dup.reason, dup.applied) == (Reason.DUPLICATE, 5)
    assert (nxt.reason, nxt.applied) == (Reason.NONE, 6)
    assert unknown.reason is Reason.UNKNOWN_PUBLISHER  # a zero seed is no knowledge
    assert applied == [[6.0]]


# --- batches (begin / finish): the answers of the frame-by-frame path, one submission ----------


class BatchSink(RecordingSink):
    """The recording sink behind the batch interface; applies in order and, like the log's
    writer, stops a publisher at its first retryable failure."""

    def prepare(
        self, symbol: str, values: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        return values

    def submit_batch(self, items: list, done) -> None:
        reasons: list[Reason] = []
        broken: set[int] = set()
        for symbol, values, publisher_id, *_ in items:
            if publisher_id in broken:
                reasons.append(Reason.INTERNAL)
                continue
            try:
                self(symbol, values)
                reasons.append(Reason.NONE)
            except Rejected as exc:
                reasons.append(exc.reason)
            except Exception:
                reasons.append(Reason.INTERNAL)
            if reasons[-1] in ingest_module.RETRYABLE:
                broken.add(publisher_id)
        done(reasons)


def run_batch(processor: FrameProcessor, sink: BatchSink, messages: list[bytes]) -> list[Outcome]:
    batch = processor.begin(messages, sink)
    results: list[list[Reason]] = []
    sink.submit_batch(batch.items, results.append)
    return [o for per_message in processor.finish(batch, results[0]) for o in per_message]


def assert_batch_answers_like_frame_by_frame(messages: list[bytes]):
    """The batched path's outcomes and applied batches equal the frame-by-frame path's;
    returns both processors (batched, sequential)."""
    sequential, seq_sink = make()
    expected = [o for m in messages for o in sequential.process_message(m)]
    sink = BatchSink()
    batched = FrameProcessor(sink, "test", strict_order=True)
    assert run_batch(batched, sink, messages) == expected
    assert sink.applied == seq_sink.applied
    return batched, sequential


def test_batch_without_failures_answers_like_frame_by_frame() -> None:
    messages = [frame(1, first=True), frame(2), frame(2), frame(5), frame(3), frame(1, 9)]
    batched, sequential = assert_batch_answers_like_frame_by_frame(messages)
    assert batched.consumed(PID) == sequential.consumed(PID) == 3


def test_batch_retryable_failure_nacks_the_rest_of_that_publisher_and_rewinds() -> None:
    sink = BatchSink(fail_with={2.0: RuntimeError("engine fault")})
    processor = FrameProcessor(sink, "test", strict_order=True)
    messages = [frame(1, first=True), frame(2), frame(3), frame(2), frame(1, 9, first=True)]
    outcomes = run_batch(processor, sink, messages)
    assert [(o.sequence, o.applied, o.reason) for o in outcomes] == [
        (1, 1, Reason.NONE),
        (2, 1, Reason.INTERNAL),
        (3, 1, Reason.GAP),  # never applied: it would have skipped 2
        (2, 1, Reason.GAP),  # the resend in the same batch: retry later, not a duplicate
        (1, 1, Reason.NONE),  # another publisher is not held back
    ]
    assert sink.firsts == [1.0, 1.0]
    assert processor.consumed(PID) == 1
    sink.fail_with.clear()
    # The publisher resends from 2: applied once, in order.
    assert [o.reason for o in run_batch(processor, sink, [frame(2), frame(3)])] == [
        Reason.NONE,
        Reason.NONE,
    ]
    assert sink.firsts == [1.0, 1.0, 2.0, 3.0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 6), st.integers(1, 2), st.booleans()),
        max_size=12,
    ),
    st.sets(st.integers(1, 6), max_size=2),
)
def test_batch_never_acks_an_unapplied_frame_nor_applies_one_twice(frames, failing) -> None:
    sink = BatchSink(fail_with={float(s): RuntimeError("fault") for s in failing})
    processor = FrameProcessor(sink, "test", strict_order=True)
    messages = [frame(seq, pid, symbol=f"S{pid}", first=first) for seq, pid, first in frames]
    outcomes = run_batch(processor, sink, messages)
    applied = [(symbol, values[0]) for symbol, values in sink.applied]
    assert len(applied) == len(set(applied))  # never applied twice
    for outcome in outcomes:
        if outcome.reason is Reason.NONE:  # acked as applied: it was (duplicates are not)
            assert (f"S{outcome.publisher_id}", float(outcome.sequence)) in applied
    for pid in (1, 2):  # each publisher's frames were applied in sequence order
        firsts = [v for symbol, v in applied if symbol == f"S{pid}"]
        assert firsts == sorted(firsts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 2), st.booleans()), max_size=12))
def test_batch_without_failures_is_frame_by_frame(frames) -> None:
    messages = [frame(seq, pid, symbol=f"S{pid}", first=first) for seq, pid, first in frames]
    assert_batch_answers_like_frame_by_frame(messages)
