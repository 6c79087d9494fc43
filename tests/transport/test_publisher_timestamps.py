"""`Publisher.publish(symbol, values, timestamps)`: the column is split exactly like the values.

A batch larger than one frame is split; each frame must carry the timestamps of its own values
(a shifted column would store every tick at a neighbour's time without any error). Checked on
the frames the base class produces, and end to end through a real ZeroMQ ROUTER/DEALER pair.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.publisher import Publisher
from transport.wire import Frame, decode_message, frame_bytes
from transport.zmq.publisher import ZmqPublisher
from transport.zmq.server import ZmqIngest

T0 = 1_767_225_600_000_000_000


class Capture(Publisher):
    """A publisher whose transport keeps the encoded frames (the base class does the rest)."""

    transport = "capture"

    def __init__(self, max_frame_bytes: int) -> None:
        super().__init__(publisher_id=5, max_frame_bytes=max_frame_bytes)
        self.frames: list[bytes] = []

    def _send_frame(self, sequence: int, symbol: str, frame: bytes) -> None:
        self.frames.append(frame)

    def _flush(self, timeout: float | None) -> None:
        pass

    def _close(self) -> None:
        pass

    def decoded(self) -> list[Frame]:
        return [frame for raw in self.frames for frame in decode_message(raw)]


@settings(max_examples=100)
@given(
    count=st.integers(1, 400),
    frame_values=st.integers(1, 50),
    symbol=st.sampled_from(["A", "EUR/USD", "x" * 64, "日本円-USD"]),
)
def test_splitting_keeps_every_timestamp_with_its_value(
    count: int, frame_values: int, symbol: str
) -> None:
    symbol_len = len(symbol.encode())
    capacity = frame_bytes(symbol_len, frame_values, timestamps=True)
    publisher = Capture(capacity)
    values = np.arange(count, dtype=np.float64)
    stamps = T0 + 3 * np.arange(count, dtype=np.int64)  # value i <-> T0 + 3 i
    last = publisher.publish(symbol, values, stamps)
    frames = publisher.decoded()
    assert len(frames) == -(-count // frame_values) == last == publisher.frames_sent
    assert all(len(raw) <= capacity for raw in publisher.frames)
    for frame in frames:
        assert frame.timestamps is not None
        assert frame.timestamps.tolist() == (T0 + 3 * frame.values.astype(np.int64)).tolist()
    np.testing.assert_array_equal(np.concatenate([f.values for f in frames]), values)
    np.testing.assert_array_equal(np.concatenate([f.timestamps for f in frames]), stamps)
    assert [f.first for f in frames] == [True] + [False] * (len(frames) - 1)


def test_a_frame_with_timestamps_holds_half_as_many_values() -> None:
    capacity = frame_bytes(1, 10)  # 10 values without timestamps, 5 with
    plain, timed = Capture(capacity), Capture(capacity)
    plain.publish("S", np.ones(10))
    timed.publish("S", np.ones(10), np.arange(10))
    assert (plain.frames_sent, timed.frames_sent) == (1, 2)
    assert [f.timestamps for f in plain.decoded()] == [None]


@pytest.mark.parametrize(
    ("values", "stamps"),
    [([1.0, 2.0], [T0]), ([1.0], [T0, T0]), ([1.0, 2.0], [1.5, 2.5]), ([1.0], ["now"])],
)
def test_a_bad_column_is_refused_before_anything_is_sent(values: list, stamps: list) -> None:
    publisher = Capture(1 << 16)
    with pytest.raises(ValueError, match="timestamps"):
        publisher.publish("S", values, stamps)
    assert (publisher.frames, publisher.last_sequence, publisher.frames_sent) == ([], 0, 0)
    publisher.publish("S", [1.0])  # and the publisher is still usable, its first frame FIRST
    assert publisher.decoded()[0].first


def test_datetime64_timestamps_are_sent_as_ns() -> None:
    publisher = Capture(1 << 16)
    publisher.publish("S", [1.0, 2.0], np.array(["2026-01-01", "2026-01-02"], "datetime64[D]"))
    (frame,) = publisher.decoded()
    assert frame.timestamps.tolist() == [T0, T0 + 86_400 * 10**9]


# --- through ZeroMQ -------------------------------------------------------------------------


class TimedSink:
    """Keeps (symbol, values, timestamps) copies, as the appliance's sink gets them."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        self._lock = threading.Lock()

    def __call__(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
    ) -> None:
        with self._lock:
            copied = None if timestamps is None else timestamps.copy()
            self.batches.append((symbol, values.copy(), copied))


@pytest.fixture
def timed() -> Iterator[tuple[ZmqIngest, TimedSink]]:
    sink = TimedSink()
    ingest = ZmqIngest(sink, router_endpoint="tcp://127.0.0.1:0")  # type: ignore[arg-type]
    ingest.bind()
    ingest.start()
    try:
        yield ingest, sink
    finally:
        assert ingest.stop(2.0)


def test_dealer_delivers_split_timestamps_aligned(timed: tuple[ZmqIngest, TimedSink]) -> None:
    ingest, sink = timed
    values = np.random.default_rng(3).random(5_000) * 100
    stamps = T0 + np.cumsum(np.random.default_rng(4).integers(0, 1_000, 5_000))
    with ZmqPublisher(
        ingest.bound_endpoints["router"], max_frame_bytes=1024, window=8
    ) as publisher:
        publisher.publish("TIMED", values, stamps)
        publisher.publish("PLAIN", values[:10])
        publisher.flush()
    timed_batches = [b for b in sink.batches if b[0] == "TIMED"]
    assert len(timed_batches) == publisher.frames_sent - 1 > 8
    assert all(len(v) == len(t) for _, v, t in timed_batches)
    np.testing.assert_array_equal(np.concatenate([v for _, v, _ in timed_batches]), values)
    np.testing.assert_array_equal(np.concatenate([t for _, _, t in timed_batches]), stamps)
    assert [t for s, _, t in sink.batches if s == "PLAIN"] == [None]
