"""The appliance's completion logic for one RDMA publisher (`_Link`), without a device.

The verbs objects are replaced by fakes that hand out completions exactly as a completion queue
does; the ring, its consumer and the frame processing are the real ones over a plain buffer, and
a `RingProducer` over the same buffer places slots as the remote write would. The same code runs
over real verbs in tests/rdma (Soft-RoCE lab).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from transport.ingest import FrameProcessor
from transport.rdma.server import _Link, _Ring
from transport.shm.ring import (
    OFF_CONSUMER_POSITION,
    RingConsumer,
    RingGeometry,
    RingProducer,
    init_ring,
)
from transport.wire import encode_data

C = SimpleNamespace(IBV_WC_SUCCESS=0, IBV_WC_RECV_RDMA_WITH_IMM=129, IBV_WC_RDMA_WRITE=1,
                    IBV_WC_RECV=128, IBV_WC_WR_FLUSH_ERR=5)  # fmt: skip
PUBLISHER = 42


@dataclass
class WC:
    status: int
    opcode: int
    imm_data: int = 0


@dataclass
class FakeCQ:
    queued: list[WC] = field(default_factory=list)

    def poll(self, budget: int) -> tuple[int, list[WC]]:
        taken, self.queued = self.queued[:budget], self.queued[budget:]
        return len(taken), taken


@dataclass
class FakeQP:
    receives: int = 0
    sends: list[int] = field(default_factory=list)
    link: Any = None

    def post_recv(self, wr: Any) -> None:
        self.receives += 1

    def post_send(self, wr: Any) -> None:
        self.sends.append(self.link.credit_word.value)


class Harness:
    """A ring in a bytearray, its consumer behind a _Link, and a producer placing slots."""

    def __init__(self, start: int = 0, slots: int = 8) -> None:
        geometry = RingGeometry(slots, 256)
        self.buffer = bytearray(geometry.total_bytes)
        init_ring(self.buffer, geometry, PUBLISHER)
        memoryview(self.buffer)[OFF_CONSUMER_POSITION : OFF_CONSUMER_POSITION + 8] = start.to_bytes(
            8, "little"
        )
        self.applied: list[tuple[str, list[float]]] = []
        processor = FrameProcessor(self.sink, "rdma", strict_order=False)
        consumer = RingConsumer(self.buffer, processor.process_message)
        ring = _Ring(PUBLISHER, geometry, None, None, None, None, None, processor, consumer)  # type: ignore[arg-type]
        self.cq, self.qp = FakeCQ(), FakeQP()
        self.word = SimpleNamespace(value=0)
        self.link = _Link(ring, self.qp, self.cq, None, None, None, self.word, C)
        self.link.credited = start
        self.qp.link = self.link
        self.producer = RingProducer(self.buffer)
        self.sequence = 0

    def sink(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int,
        sequence: int,
        timestamps: np.ndarray | None = None,
    ) -> None:
        self.applied.append((symbol, values.tolist()))

    def place(self, value: float, *, publish: bool = True) -> int:
        """Write one slot as the remote write would (whole, sequence word included)."""
        self.sequence += 1
        frame = encode_data(
            PUBLISHER, self.sequence, "S", np.array([value]), first=self.sequence == 1
        )
        position = self.producer.position
        assert self.producer.stage(frame)
        if publish:
            self.producer.commit()
        else:
            self.producer.position += 1  # announced below, but its sequence word never written
        return position

    def announce(self, position: int, imm: int | None = None, status: int = 0) -> None:
        announced = position & 0xFFFFFFFF if imm is None else imm
        self.cq.queued.append(WC(status, C.IBV_WC_RECV_RDMA_WITH_IMM, socket.htonl(announced)))

    def values(self) -> list[float]:
        return [value for _, values in self.applied for value in values]


def test_announced_writes_are_applied_in_order_with_receives_and_one_credit_in_flight() -> None:
    h = Harness()
    for value in (1.0, 2.0, 3.0):
        h.announce(h.place(value))
    assert h.link.poll() == 6  # three completions, three slots
    assert h.values() == [1.0, 2.0, 3.0]
    assert h.qp.receives == 3 and h.qp.sends == [3] and h.link.credit_in_flight
    h.announce(h.place(4.0))
    h.link.poll()
    assert h.values()[-1] == 4.0 and h.qp.sends == [3]  # the newer credit waits its turn
    h.cq.queued.append(WC(0, C.IBV_WC_RDMA_WRITE))  # the first credit write completed
    h.link.poll()
    assert h.qp.sends == [3, 4] and not h.link.failure


def test_the_32_bit_immediate_wraps_with_the_position() -> None:
    start = (1 << 32) - 2
    h = Harness(start=start)
    positions = [h.place(float(index)) for index in range(4)]
    assert positions == [start, start + 1, start + 2, start + 3]
    for position in positions:
        h.announce(position)  # immediates 0xFFFFFFFE, 0xFFFFFFFF, 0, 1
    h.link.poll()
    assert h.values() == [0.0, 1.0, 2.0, 3.0] and not h.link.failure


@pytest.mark.parametrize(
    "bad",
    [
        WC(0, C.IBV_WC_RECV_RDMA_WITH_IMM, socket.htonl(7)),  # announces another slot
        WC(0, C.IBV_WC_RECV),  # a SEND: not part of the protocol
        WC(C.IBV_WC_WR_FLUSH_ERR, C.IBV_WC_RECV_RDMA_WITH_IMM),  # the queue pair failed
    ],
    ids=["wrong-immediate", "send", "error-status"],
)
def test_a_bad_completion_stops_the_link_after_applying_what_came_before(bad: WC) -> None:
    h = Harness()
    h.announce(h.place(1.0))
    h.cq.queued.append(bad)
    h.announce(h.place(2.0))  # after the bad one: never trusted
    h.link.poll()
    assert h.values() == [1.0]
    assert h.link.failure
    assert h.qp.sends == []  # a failed link returns no credit


def test_a_slot_announced_without_its_sequence_word_is_not_applied() -> None:
    h = Harness()
    h.announce(h.place(1.0))
    h.announce(h.place(2.0, publish=False))
    h.link.poll()
    assert h.values() == [1.0]
    assert "without its sequence word" in h.link.failure


def test_drain_applies_completed_writes_up_to_the_first_flushed_or_suspect_one() -> None:
    h = Harness()
    h.announce(h.place(1.0))
    h.announce(h.place(2.0))
    h.cq.queued.append(WC(C.IBV_WC_WR_FLUSH_ERR, C.IBV_WC_RECV_RDMA_WITH_IMM))
    h.announce(h.place(3.0))  # behind a flushed receive: ignored
    h.link.drain()
    assert h.values() == [1.0, 2.0]
    h2 = Harness()
    h2.announce(h2.place(1.0), imm=99)  # a suspect announcement: nothing is applied
    h2.announce(h2.place(2.0))
    h2.link.drain()
    assert h2.values() == []
