"""The ring protocol over plain buffers: credits, publication order, torn slots, re-attach.

No shared memory and no threads here: producer and consumer take turns on one bytearray, which
is exactly what two processes see through a mapping, minus the timing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.ingest import FrameProcessor, Rejected
from transport.shm import ring
from transport.shm.ring import (
    HEADER_BYTES,
    LOG_ENTRIES,
    SLOT_HEADER_BYTES,
    STATE_CLOSED,
    STATE_RUNNING,
    RingConsumer,
    RingError,
    RingGeometry,
    RingProducer,
    init_ring,
    read_geometry,
)
from transport.wire import Reason, encode_data

PUBLISHER = 42


class Applied:
    """A sink recording (symbol, copy of values); rejects negative values like the store."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, np.ndarray]] = []

    def __call__(self, symbol: str, values: np.ndarray, *origin: int) -> None:
        if values.shape[0] == 0:
            raise Rejected(Reason.EMPTY_BATCH, "empty")
        if (values < 0).any():
            raise Rejected(Reason.INVALID_VALUE, "negative")
        self.batches.append((symbol, values.copy()))

    def firsts(self) -> list[float]:
        return [float(values[0]) for _, values in self.batches]


def make_ring(slots: int = 8, slot_bytes: int = 256) -> tuple[bytearray, RingGeometry]:
    geometry = RingGeometry(slots, slot_bytes)
    buffer = bytearray(geometry.total_bytes)
    init_ring(buffer, geometry, PUBLISHER)
    return buffer, geometry


def frame(sequence: int, value: float | None = None, symbol: str = "ABC", count: int = 1) -> bytes:
    first = float(sequence) if value is None else value
    return encode_data(PUBLISHER, sequence, symbol, first + np.arange(count, dtype=np.float64))


def consumer_for(buffer: bytearray, sink: Applied) -> tuple[RingConsumer, FrameProcessor]:
    processor = FrameProcessor(sink, "shm", strict_order=False)
    return RingConsumer(buffer, processor.process_message), processor


def drain(consumer: RingConsumer, limit: int = 100_000) -> int:
    """Poll until nothing is left; a broken ring that never runs dry fails instead of hanging."""
    total = 0
    while (done := consumer.poll()) > 0:
        total += done
        assert total <= limit, "the consumer kept finding slots: stale sequences applied?"
    return total


def write(producer: RingProducer, consumer: RingConsumer, message: bytes, budget: int = 64) -> None:
    """Write, letting the consumer make room (at most `budget` slots per try, a few tries)."""
    for _ in range(100):
        if producer.try_write(message):
            return
        consumer.poll(budget=budget)
    raise AssertionError("no credit after 100 consumer polls")


def test_geometry_rules() -> None:
    geometry = RingGeometry(16, 1024)
    assert geometry.total_bytes == HEADER_BYTES + 16 * 1024
    assert geometry.frame_capacity == 1024 - SLOT_HEADER_BYTES
    for slots, slot_bytes in [(3, 256), (1, 256), (16, 100), (16, 64), (1 << 25, 256), (True, 256)]:
        with pytest.raises(ValueError):
            RingGeometry(slots, slot_bytes)


def test_header_is_validated() -> None:
    buffer, geometry = make_ring()
    assert read_geometry(buffer) == geometry
    for offset, junk in [(0, b"NOTARING"), (8, b"\x02\x00\x00\x00"), (16, b"\x03\x00\x00\x00")]:
        bad = bytearray(buffer)
        bad[offset : offset + len(junk)] = junk
        with pytest.raises(RingError):
            read_geometry(bad)
    with pytest.raises(RingError, match="needs"):
        RingProducer(buffer[: geometry.total_bytes - 64])
    with pytest.raises(RingError, match="writable"):
        RingProducer(bytes(buffer))


def test_payload_starts_8_byte_aligned_in_every_slot() -> None:
    """Slots start on 64-byte boundaries after a 4096-byte page; data 16 bytes in."""
    buffer, _ = make_ring(slots=4, slot_bytes=192)
    producer = RingProducer(buffer)
    for position in range(4):
        offset = producer.slot_word(position) * 8
        assert offset == HEADER_BYTES + position * 192
        assert (offset + SLOT_HEADER_BYTES) % 8 == 0 and offset % 64 == 0


def test_many_wraparounds_apply_everything_once_in_order() -> None:
    buffer, _ = make_ring(slots=4)
    sink = Applied()
    consumer, processor = consumer_for(buffer, sink)
    producer = RingProducer(buffer)
    for sequence in range(1, 1001):
        write(producer, consumer, frame(sequence), budget=3)
    drain(consumer)
    assert sink.firsts() == [float(s) for s in range(1, 1001)]
    assert consumer.position == producer.position == consumer.consumer_position == 1000
    assert consumer.applied_sequence == 1000
    assert processor.counters.rejected == {}


def test_credits_never_let_the_producer_overwrite_an_unconsumed_slot() -> None:
    buffer, _ = make_ring(slots=8)
    sink = Applied()
    consumer, _ = consumer_for(buffer, sink)
    producer = RingProducer(buffer)
    for sequence in range(1, 9):
        assert producer.try_write(frame(sequence))
    before = bytes(buffer)
    assert not producer.has_credit()
    assert not producer.try_write(frame(9))
    assert bytes(buffer) == before  # a refused write touches nothing
    assert consumer.poll(budget=1) == 1
    assert producer.try_write(frame(9))
    assert not producer.try_write(frame(10))
    drain(consumer)
    assert sink.firsts() == [float(s) for s in range(1, 10)]


def test_staged_slot_is_not_consumed_until_its_sequence_is_written() -> None:
    buffer, _ = make_ring()
    sink = Applied()
    consumer, _ = consumer_for(buffer, sink)
    producer = RingProducer(buffer)
    assert producer.try_write(frame(1))
    assert producer.stage(frame(2))  # payload and length written, sequence not yet
    assert consumer.poll() == 1
    assert consumer.poll() == 0 and consumer.position == 1
    producer.commit()
    assert consumer.poll() == 1
    assert sink.firsts() == [1.0, 2.0]


def test_corrupt_frame_with_valid_sequence_is_rejected_and_logged() -> None:
    buffer, _ = make_ring()
    sink = Applied()
    consumer, processor = consumer_for(buffer, sink)
    producer = RingProducer(buffer)
    damaged = bytearray(frame(1))
    damaged[-1] ^= 0x40  # a payload bit flip: the CRC no longer matches
    assert producer.try_write(damaged)
    assert producer.try_write(frame(2, value=-1.0))  # decodes, but the sink refuses it
    assert producer.try_write(frame(3))
    assert consumer.poll() == 3
    assert sink.firsts() == [3.0]
    assert processor.counters.rejected == {"bad_crc": 1, "invalid_value": 1}
    assert consumer.rejected_total == 2
    found, lost = producer.take_rejections()
    assert lost == 0
    assert [(r.position, r.sequence, r.reason) for r in found] == [
        (0, 1, Reason.BAD_CRC), (1, 2, Reason.INVALID_VALUE),
    ]  # fmt: skip
    assert producer.symbol_at(1) == "ABC"
    assert producer.take_rejections() == ([], 0)  # each entry is reported once


def test_length_word_beyond_the_slot_is_rejected_without_reading_past_it() -> None:
    buffer, _ = make_ring(slot_bytes=256)
    sink = Applied()
    consumer, _ = consumer_for(buffer, sink)
    producer = RingProducer(buffer)
    assert producer.stage(frame(1))
    word = producer.slot_word(0)
    buffer[word * 8 + 8 : word * 8 + 12] = (10_000).to_bytes(4, "little")
    producer.commit()
    assert producer.try_write(frame(2))
    assert consumer.poll() == 2
    assert consumer.oversized == 1
    assert sink.firsts() == [2.0]
    assert [(r.position, r.reason) for r in producer.take_rejections()[0]] == [
        (0, Reason.BAD_LENGTH)
    ]


def test_rejection_log_overflow_is_counted() -> None:
    buffer, _ = make_ring(slots=16)
    consumer, _ = consumer_for(buffer, Applied())
    producer = RingProducer(buffer)
    total = LOG_ENTRIES + 5
    for sequence in range(1, total + 1):
        write(producer, consumer, frame(sequence, value=-1.0))
    drain(consumer)
    found, lost = producer.take_rejections()
    assert lost == 5
    assert [r.sequence for r in found] == list(range(6, total + 1))


def test_oversized_message_is_refused_by_the_producer() -> None:
    buffer, geometry = make_ring(slot_bytes=128)
    producer = RingProducer(buffer)
    with pytest.raises(ValueError, match="slot holds"):
        producer.try_write(frame(1, count=(geometry.frame_capacity // 8)))
    assert producer.position == 0


def test_reattach_resumes_after_published_and_overwrites_the_torn_slot() -> None:
    buffer, _ = make_ring(slots=8)
    sink = Applied()
    consumer, _ = consumer_for(buffer, sink)
    dead = RingProducer(buffer, pid=111)
    for sequence in range(1, 14):  # wraps once; some consumed, some pending
        write(dead, consumer, frame(sequence), budget=2)
    assert dead.stage(frame(14, value=999.0))  # killed here: payload without sequence
    pending = dead.position - consumer.position
    assert 0 < pending < 8

    restarted = RingProducer(buffer, pid=222)
    assert restarted.position == 13
    assert restarted.last_published() == (PUBLISHER, 13)
    assert restarted.producer_position == 13
    for sequence in range(14, 30):
        write(restarted, consumer, frame(sequence), budget=2)
    drain(consumer)
    assert sink.firsts() == [float(s) for s in range(1, 30)]  # 999 never applied


def test_reattach_on_an_empty_or_fully_consumed_ring() -> None:
    buffer, _ = make_ring(slots=4)
    assert RingProducer(buffer).last_published() == (0, 0)
    consumer, _ = consumer_for(buffer, Applied())
    producer = RingProducer(buffer)
    for sequence in range(1, 7):
        write(producer, consumer, frame(sequence))
    drain(consumer)
    again = RingProducer(buffer)
    assert again.position == 6 and again.last_published() == (PUBLISHER, 6)


def test_reattach_skips_rejections_of_the_previous_producer() -> None:
    buffer, _ = make_ring()
    consumer, _ = consumer_for(buffer, Applied())
    first = RingProducer(buffer)
    assert first.try_write(frame(1, value=-1.0))
    second = RingProducer(buffer)  # attached before the consumer rejected position 0
    assert second.try_write(frame(2, value=-1.0))
    assert consumer.poll() == 2
    found, _ = second.take_rejections()
    assert [r.sequence for r in found] == [2]


def test_consumer_state_and_generation() -> None:
    buffer, _ = make_ring()
    producer = RingProducer(buffer)
    assert producer.consumer_state == ring.STATE_NONE
    consumer, _ = consumer_for(buffer, Applied())
    assert producer.consumer_state == STATE_RUNNING
    assert producer.consumer_generation == 1
    consumer.close()
    assert producer.consumer_state == STATE_CLOSED
    consumer.release()
    consumer_for(buffer, Applied())
    assert producer.consumer_generation == 2


def test_sleeping_flag_and_pending_slot() -> None:
    """The doorbell's two words: the consumer's flag as the producer reads it, and `pending`
    (a published slot at the consumer position), which the consumer checks after the flag."""
    buffer, _ = make_ring()
    producer = RingProducer(buffer)
    consumer, _ = consumer_for(buffer, Applied())
    assert not producer.consumer_sleeping and not consumer.pending()
    consumer.set_sleeping(True)
    assert producer.consumer_sleeping
    assert producer.stage(frame(1)) and not consumer.pending()  # staged is not published
    producer.commit()
    assert consumer.pending()
    consumer.set_sleeping(False)
    assert not producer.consumer_sleeping
    assert consumer.poll() == 1 and not consumer.pending()
    consumer.set_sleeping(True)
    consumer.release()
    consumer_for(buffer, Applied())  # a new consumer starts awake
    assert not producer.consumer_sleeping


def test_works_over_a_numpy_buffer() -> None:
    """The RDMA transport hands a registered numpy/mmap buffer, not a bytearray."""
    geometry = RingGeometry(4, 256)
    buffer = np.zeros(geometry.total_bytes + 100, dtype=np.uint8)
    init_ring(buffer, geometry)
    sink = Applied()
    processor = FrameProcessor(sink, "rdma", strict_order=False)
    consumer = RingConsumer(buffer, processor.process_message)
    producer = RingProducer(buffer)
    assert producer.try_write(frame(1, symbol="NP"))
    assert consumer.poll() == 1
    assert sink.batches[0][0] == "NP"


@given(
    slots_log2=st.integers(1, 4),
    steps=st.lists(st.tuples(st.booleans(), st.integers(1, 20)), min_size=1, max_size=40),
)
def test_interleavings_keep_fifo_and_credits(
    slots_log2: int, steps: list[tuple[bool, int]]
) -> None:
    """Any interleaving of produce/consume bursts: FIFO, never more than `slots` in flight."""
    slots = 1 << slots_log2
    buffer, _ = make_ring(slots=slots)
    sink = Applied()
    consumer, _ = consumer_for(buffer, sink)
    producer = RingProducer(buffer)
    sent = 0
    for produce, amount in steps:
        if produce:
            for _ in range(amount):
                accepted = producer.try_write(frame(sent + 1, count=1 + sent % 3))
                assert accepted == (sent - consumer.position < slots)
                sent += accepted
        else:
            applied = consumer.poll(budget=amount)
            assert applied == min(amount, sent - (consumer.position - applied))
        assert 0 <= producer.position - consumer.position <= slots
    drain(consumer)
    assert sink.firsts() == [float(s) for s in range(1, sent + 1)]
    assert [len(values) for _, values in sink.batches] == [1 + i % 3 for i in range(sent)]


def test_documented_layout_matches_the_code(repo_root: Path) -> None:
    """docs/wire-format.md is what publishers in other languages implement: keep it true."""
    text = (repo_root / "docs" / "wire-format.md").read_text(encoding="utf-8")
    section = text.split("## Shared-memory ring layout", 1)[1]
    rows = {
        cells[3].strip("` "): (int(cells[0]), int(cells[1]))
        for line in section.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
        and cells[0].isdigit() and cells[1].isdigit()
    }  # fmt: skip
    assert rows["magic"] == (ring.OFF_MAGIC, len(ring.RING_MAGIC))
    for name, offset, size in [
        ("version", ring.OFF_VERSION, 4), ("header_bytes", ring.OFF_HEADER_BYTES, 4),
        ("slots", ring.OFF_SLOTS, 4), ("slot_bytes", ring.OFF_SLOT_BYTES, 4),
        ("slot_header_bytes", ring.OFF_SLOT_HEADER_BYTES, 4),
        ("log_entries", ring.OFF_LOG_ENTRIES, 4), ("total_bytes", ring.OFF_TOTAL_BYTES, 8),
        ("publisher_id", ring.OFF_PUBLISHER_ID, 8),
        ("producer_position", ring.OFF_PRODUCER_POSITION, 8),
        ("producer_pid", ring.OFF_PRODUCER_PID, 8),
        ("consumer_position", ring.OFF_CONSUMER_POSITION, 8),
        ("applied_sequence", ring.OFF_APPLIED_SEQUENCE, 8),
        ("rejected_total", ring.OFF_REJECTED_TOTAL, 8),
        ("consumer_state", ring.OFF_CONSUMER_STATE, 8),
        ("consumer_generation", ring.OFF_CONSUMER_GENERATION, 8),
        ("consumer_sleeping", ring.OFF_CONSUMER_SLEEPING, 8),
        ("rejection log", ring.OFF_LOG, ring.LOG_ENTRIES * ring.LOG_ENTRY_BYTES),
        ("slot_sequence", 0, 8), ("length", 8, 4),
    ]:  # fmt: skip
        assert rows[name] == (offset, size), name
    assert f"`{ring.HEADER_BYTES}`: slots start here" in section
    assert f"| `{ring.SLOT_HEADER_BYTES}` |" in section
    assert ring.RING_MAGIC == b"HFTRING\x00"
    assert "ASCII `HFTRING` and a zero byte" in section
