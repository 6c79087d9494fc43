"""The publisher API shared by every transport: `publish(symbol, values)`, `flush()`, acks.

Why a base class: a feed handler should switch from ZeroMQ to shared memory (or RDMA) by
changing one constructor. Everything that does not depend on how bytes move lives here:
publisher ids, sequence numbers, splitting a large batch into frames that fit the transport,
the record of rejected frames, and the context-manager protocol (flush on a clean exit, close
always). A subclass implements `_send_frame`, `_flush` and `_close`.

Delivery contract (the same for every transport): `publish` returns once the frames are handed
to the transport, blocking while the transport applies back-pressure (unacknowledged window
full, ring full). `flush` returns once every frame published so far was applied by the
appliance or definitively rejected, and raises `PublishError` listing rejections since the last
flush. A batch larger than one frame is split; each frame is applied atomically, so a reader may
observe a batch half-applied between two of its frames.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from transport.wire import MAX_SEQUENCE, Reason, as_timestamps, encode_data, max_values_in


@dataclass(frozen=True, slots=True)
class Rejection:
    """A frame the appliance refused for good (a content error, never a retryable one)."""

    sequence: int
    symbol: str
    reason: Reason
    detail: str = ""


class PublishError(Exception):
    """Frames were rejected, or the appliance did not confirm them in time."""

    def __init__(self, message: str, rejections: list[Rejection] | None = None) -> None:
        super().__init__(message)
        self.rejections = rejections or []


def new_publisher_id() -> int:
    """A random 63-bit id: a restarted publisher is a new publisher, never a duplicate."""
    return secrets.randbits(63) or 1


class Publisher(ABC):
    """Base of ZmqPublisher, ShmPublisher (and RdmaPublisher). Not thread-safe."""

    transport = "abstract"

    def __init__(self, *, publisher_id: int | None, max_frame_bytes: int) -> None:
        self.publisher_id = new_publisher_id() if publisher_id is None else publisher_id
        self.max_frame_bytes = max_frame_bytes
        self.last_sequence = 0  # the sequence of the last frame handed to the transport
        self.frames_sent = 0
        self.values_sent = 0
        self.rejections: list[Rejection] = []  # since the last flush
        self._started = False  # True once a frame flagged FIRST was handed to the transport
        self._closed = False

    def publish(
        self,
        symbol: str,
        values: np.ndarray | list[float] | float,
        timestamps: np.ndarray | list[int] | None = None,
    ) -> int:
        """Send `values` for `symbol` (split into frames if needed); return the last sequence.

        `timestamps`: optional event times, int64 ns since the epoch (or datetime64), one per
        value; they travel in version-2 frames, split exactly like the values, so every frame
        carries the times of its own values. Without them the appliance stamps each batch with
        its receive time. A length mismatch or a non-integer column is a ValueError here,
        before anything is sent; the order of the times is the appliance's to judge
        (OUT_OF_ORDER, or clamped under `store.out_of_order = "clamp"`).
        """
        if self._closed:
            raise PublishError("publisher is closed")
        array = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        column = None if timestamps is None else as_timestamps(timestamps, array.shape[0])
        for start, chunk in self._chunks(symbol, array, column is not None):
            self.last_sequence = _next_sequence(self.last_sequence)
            # The first frame of a publisher's life carries FLAG_FIRST: the appliance starts
            # tracking its sequence there (see transport.ingest).
            # Decided before the send: if that send raises after handing the frame over, the
            # next frame must not claim to be the start as well.
            first, self._started = not self._started, True
            times = None if column is None else column[start : start + chunk.shape[0]]
            frame = encode_data(
                self.publisher_id, self.last_sequence, symbol, chunk, first=first, timestamps=times
            )
            self._send_frame(self.last_sequence, symbol, frame)
            self.frames_sent += 1
            self.values_sent += chunk.shape[0]
        return self.last_sequence

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every frame so far is applied or rejected; raise on rejections."""
        if self._closed:
            raise PublishError("publisher is closed")
        self._flush(timeout)
        if self.rejections:
            rejected, self.rejections = self.rejections, []
            first = rejected[0]
            raise PublishError(
                f"{len(rejected)} frame(s) rejected; first: sequence {first.sequence} "
                f"({first.symbol!r}): {first.reason.name.lower()} {first.detail}".rstrip(),
                rejected,
            )

    def close(self) -> None:
        """Release sockets / shared memory without waiting for outstanding frames."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self.flush()
        finally:
            self.close()

    def _chunks(
        self, symbol: str, values: np.ndarray, timestamps: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start index, frame-sized piece of `values`); with `timestamps` a value takes 16
        bytes of the frame instead of 8. An empty batch is one empty frame (the appliance
        rejects it with EMPTY_BATCH, as REST does, rather than the publisher hiding it)."""
        per_frame = max_values_in(self.max_frame_bytes, len(symbol.encode("utf-8")), timestamps)
        if per_frame < 1:
            raise ValueError(f"a frame of {self.max_frame_bytes} bytes cannot hold one value")
        if values.shape[0] == 0:
            yield 0, values
        for start in range(0, values.shape[0], per_frame):
            yield start, values[start : start + per_frame]

    @abstractmethod
    def _send_frame(self, sequence: int, symbol: str, frame: bytes) -> None:
        """Hand one encoded DATA frame to the transport, blocking under back-pressure."""

    @abstractmethod
    def _flush(self, timeout: float | None) -> None:
        """Wait for the outcome of every frame sent; append content rejections to
        `self.rejections`; raise PublishError on timeout."""

    @abstractmethod
    def _close(self) -> None:
        """Release transport resources."""


def _next_sequence(sequence: int) -> int:
    if sequence >= MAX_SEQUENCE:
        raise PublishError("sequence numbers exhausted: use a new publisher id")
    return sequence + 1
