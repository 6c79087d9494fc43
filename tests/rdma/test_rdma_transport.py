"""RdmaIngest and RdmaPublisher over real verbs, in one process: rxe1 writes into rxe0's ring.

Everything the transport promises is checked on real queue pairs, memory regions and
completions: frames arrive in order across many ring wraps; a full ring blocks the publisher and
no unconsumed slot is overwritten; slots with a bad CRC or a bad length are rejected and
reported without applying anything; a publisher that breaks the protocol or whose queue pair
fails is stopped alone, and a restarted publisher with the same id continues its numbering.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.rdma.lab import Lab
from tests.waiting import wait_until
from transport.control import ControlError
from transport.publisher import PublishError
from transport.rdma.publisher import RdmaPublisher
from transport.rdma.server import RdmaIngest
from transport.wire import Reason, encode_data

pytestmark = pytest.mark.rdma


class Collector:
    """A sink that keeps a copy of every applied batch, in order (values alias ring memory)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, np.ndarray, int, int]] = []

    def __call__(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int,
        sequence: int,
        timestamps: np.ndarray | None = None,
    ) -> None:
        self.batches.append((symbol, np.array(values, copy=True), publisher_id, sequence))

    def values(self, symbol: str) -> np.ndarray:
        parts = [values for name, values, _, _ in self.batches if name == symbol]
        return np.concatenate(parts) if parts else np.empty(0)


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def ingest(lab: Lab, collector: Collector) -> Iterator[RdmaIngest]:
    server = RdmaIngest(collector, device=lab.server_device, gid_index=lab.gid_index,
                        slots=8, slot_bytes=512, max_slots=64, spin_us=0,
                        backoff_max_us=200)  # fmt: skip
    server.open()
    yield server
    server.stop(5.0)


def client_for(ingest: RdmaIngest) -> Any:
    """Answers control requests the way the ZeroMQ control socket would (errors raise)."""
    handlers = ingest.control_handlers()

    def call(body: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, **handlers[body["op"]](body, None)}

    return call


def publisher(lab: Lab, ingest: RdmaIngest, **options: Any) -> RdmaPublisher:
    return RdmaPublisher(client_for(ingest), device=lab.client_device, gid_index=lab.gid_index,
                         **options)  # fmt: skip


def write_raw(pub: RdmaPublisher, message: bytes, *, length_word: int | None = None,
              sequence_word: int | None = None) -> None:  # fmt: skip
    """Send one slot as a broken publisher would: any bytes, any length or sequence word."""
    producer = pub._producer
    assert producer.has_credit()
    position = producer.position
    word = producer.slot_word(position)
    producer.stage(message)
    if length_word is not None:
        producer._words[word + 1] = length_word
    producer.commit()
    if sequence_word is not None:
        producer._words[word] = sequence_word
    pub._published(position, len(message))


def test_frames_cross_many_ring_wraps_in_order(
    lab: Lab, ingest: RdmaIngest, collector: Collector
) -> None:
    ingest.start()
    rng = np.random.default_rng(6)
    sent: dict[str, list[np.ndarray]] = {"A": [], "B/C": [], "日本": []}
    with publisher(lab, ingest) as pub:
        assert (pub.slots, pub.slot_bytes) == (8, 512)
        for index in range(1500):
            symbol = list(sent)[index % 3]
            values = rng.random(int(rng.integers(1, 40))) * 100
            pub.publish(symbol, values)
            sent[symbol].append(values)
        pub.flush(60)
        assert pub.producer_position > 100 * pub.slots  # the ring wrapped many times
    for symbol, parts in sent.items():
        np.testing.assert_array_equal(collector.values(symbol), np.concatenate(parts))
    sequences = [sequence for *_, sequence in collector.batches]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    totals = ingest.snapshot()["totals"]
    assert totals["frames_applied"] >= 1500
    assert not [key for key in totals if key.startswith("rejected.")]


def test_a_full_ring_blocks_the_publisher_and_no_slot_is_overwritten(
    lab: Lab, ingest: RdmaIngest, collector: Collector
) -> None:
    # No poller thread: the appliance consumes only when the test calls poll_once().
    pub = publisher(lab, ingest, slots=4, timeout_s=0.5)
    try:
        frames = [np.full(3, float(index)) for index in range(4)]
        for values in frames:
            pub.publish("FULL", values)
        started = time.monotonic()
        with pytest.raises(PublishError, match="has not consumed"):
            pub.publish("FULL", [99.0])  # a fifth slot would overwrite the first
        assert time.monotonic() - started >= 0.5
        assert pub.producer_position == 4
        wait_until(lambda: ingest.poll_once() > 0 or bool(collector.batches), "the writes")
        while ingest.poll_once():
            pass
        np.testing.assert_array_equal(collector.values("FULL"), np.concatenate(frames))
        assert ingest.snapshot()["rings"][str(pub.publisher_id)]["consumer_position"] == 4
        pub.publish("FULL", [5.0])  # credits came back: the publisher goes on
        wait_until(lambda: ingest.poll_once() > 0 and len(collector.batches) == 5, "frame 5")
        assert collector.values("FULL")[-1] == 5.0
    finally:
        pub.close()


def test_malformed_slots_are_rejected_reported_and_never_applied(
    lab: Lab, ingest: RdmaIngest, collector: Collector
) -> None:
    ingest.start()
    with publisher(lab, ingest) as pub:
        pub.publish("OK", [1.0])
        pub.flush(10)
        good = encode_data(pub.publisher_id, 2, "BAD", np.array([2.0, 3.0]))
        damaged = bytearray(good)
        damaged[-3] ^= 0x40  # a payload bit flipped after the CRC was computed
        write_raw(pub, bytes(damaged))
        write_raw(pub, good, length_word=1 << 20)  # longer than the slot
        pub.publish("OK", [4.0])
        with pytest.raises(PublishError) as error:
            pub.flush(10)
    reasons = sorted(rejection.reason for rejection in error.value.rejections)
    assert reasons == [Reason.BAD_LENGTH, Reason.BAD_CRC]
    assert collector.values("BAD").size == 0
    np.testing.assert_array_equal(collector.values("OK"), [1.0, 4.0])


def test_a_slot_without_its_sequence_stops_only_that_publisher(
    lab: Lab, ingest: RdmaIngest, collector: Collector
) -> None:
    ingest.start()
    broken = publisher(lab, ingest, timeout_s=1.0)
    try:
        with publisher(lab, ingest) as healthy:
            broken.publish("BROKEN", [1.0])
            broken.flush(10)
            frame = encode_data(broken.publisher_id, 2, "BROKEN", np.array([2.0]))
            write_raw(broken, frame, sequence_word=12345)  # announced, but not published
            rings = lambda: ingest.snapshot()["rings"]  # noqa: E731
            wait_until(lambda: not rings()[str(broken.publisher_id)]["connected"], "the stop")
            healthy.publish("HEALTHY", np.arange(1.0, 50.0))
            healthy.flush(10)
            assert rings()[str(healthy.publisher_id)]["connected"]
        with pytest.raises(PublishError, match="has not consumed"):
            broken.flush(10)  # its slot is never consumed: the publisher learns it in time
    finally:
        broken.close()
    np.testing.assert_array_equal(collector.values("BROKEN"), [1.0])
    np.testing.assert_array_equal(collector.values("HEALTHY"), np.arange(1.0, 50.0))


def test_a_failed_queue_pair_stops_only_that_publisher_and_a_restart_continues(
    lab: Lab, ingest: RdmaIngest, collector: Collector
) -> None:
    ingest.start()
    other = publisher(lab, ingest)
    first = publisher(lab, ingest, timeout_s=2.0)
    other_sent: list[float] = []
    try:
        first.publish("CUT", [1.0, 2.0])
        first.flush(10)
        first._port.to_error(first._qp)  # the link breaks (a cable, a crashed process)
        with pytest.raises(PublishError, match="queue pair"):
            for value in range(3, 200):
                first.publish("CUT", [float(value)])
                other.publish("OTHER", [float(value)])
                other_sent.append(float(value))
            first.flush(10)
        other.publish("OTHER", [1000.0])
        other.flush(10)
    finally:
        first.close()
    assert collector.values("OTHER").tolist() == [*other_sent, 1000.0]
    np.testing.assert_array_equal(collector.values("CUT"), [1.0, 2.0])
    # A restarted publisher with the same id and the ring's secret gets the same ring and goes
    # on numbering; without the secret it is refused (the ring belongs to its opener).
    applied_before = collector.values("CUT").size
    with pytest.raises(PublishError, match="secret"):
        publisher(lab, ingest, publisher_id=first.publisher_id)
    with publisher(lab, ingest, publisher_id=first.publisher_id, secret=first.secret) as again:
        assert again.last_sequence >= 1
        again.publish("CUT", [7.0])
        again.flush(10)
    assert collector.values("CUT").tolist() == [1.0, 2.0, 7.0]
    assert applied_before == 2
    rings = ingest.snapshot()["rings"]
    assert not rings[str(first.publisher_id)]["connected"]  # closed: disconnected, ring kept
    assert rings[str(other.publisher_id)]["connected"]
    other.close()


def test_bad_control_requests_are_refused_and_change_nothing(
    lab: Lab, ingest: RdmaIngest, collector: Collector
) -> None:
    ingest.start()
    client = client_for(ingest)
    with publisher(lab, ingest) as pub:
        pub.publish("KEEP", [1.0])
        pub.flush(10)
        good = {"op": "rdma.connect", "publisher_id": pub.publisher_id, "qpn": 5, "psn": 1,
                "gid": "0000:0000:0000:0000:0000:ffff:0a63:0002", "credit_addr": 4096,
                "credit_rkey": 1, "secret": pub.secret}  # fmt: skip
        with pytest.raises(ControlError, match="secret"):  # the ring is not anyone's to touch
            client({**good, "secret": "0" * 32})
        for field, bad in (("gid", "zzzz:0000:0000:0000:0000:ffff:0a63:0002"), ("qpn", -1),
                           ("credit_addr", 0)):  # fmt: skip
            with pytest.raises(ControlError, match=field):
                client({**good, field: bad})
        with pytest.raises(ControlError, match=r"rdma\.open first"):
            client({**good, "publisher_id": pub.publisher_id + 1})
        pub.publish("KEEP", [2.0])  # the publisher's queue pair is still connected
        pub.flush(10)
    np.testing.assert_array_equal(collector.values("KEEP"), [1.0, 2.0])


def test_pinned_memory_is_bounded_by_max_total_bytes(lab: Lab, collector: Collector) -> None:
    small = RdmaIngest(collector, device=lab.server_device, gid_index=lab.gid_index,
                       slots=2, slot_bytes=1024, max_total_bytes=8192)  # fmt: skip
    small.open()
    try:
        client = client_for(small)
        assert client({"op": "rdma.open", "publisher_id": 1})["size"] == 4096 + 2048
        with pytest.raises(ControlError, match="max_total_bytes"):
            client({"op": "rdma.open", "publisher_id": 2})
    finally:
        small.stop(5.0)


def test_a_publisher_cannot_write_into_another_ring(
    lab: Lab, ingest: RdmaIngest, collector: Collector
) -> None:
    ingest.start()
    replies: dict[int, dict[str, Any]] = {}
    handlers = ingest.control_handlers()

    def recording(body: dict[str, Any]) -> dict[str, Any]:
        reply = {"ok": True, **handlers[body["op"]](body, None)}
        replies[body["publisher_id"]] = reply
        return reply

    options = {"device": lab.client_device, "gid_index": lab.gid_index}
    victim = RdmaPublisher(recording, timeout_s=2.0, **options)
    intruder = RdmaPublisher(recording, timeout_s=2.0, **options)
    try:
        victim.publish("VICTIM", [1.0])
        victim.flush(10)
        target = replies[victim.publisher_id]
        port, c = intruder._port, intruder._port.c
        source = port.verbs.wr.SGE(intruder._slots_region.buf, 64, intruder._slots_region.lkey)
        attack = port.verbs.wr.SendWR(opcode=c.IBV_WR_RDMA_WRITE, num_sge=1, sg=[source],
                                      send_flags=c.IBV_SEND_SIGNALED)  # fmt: skip
        attack.set_wr_rdma(target["rkey"], target["addr"] + 4096)  # the victim's first slot
        intruder._qp.post_send(attack)
        with pytest.raises(PublishError, match="queue pair"):
            intruder.publish("INTRUDER", [9.0])
            intruder.flush(10)
        victim.publish("VICTIM", [2.0])
        victim.flush(10)
    finally:
        intruder.close()
        victim.close()
    np.testing.assert_array_equal(collector.values("VICTIM"), [1.0, 2.0])
