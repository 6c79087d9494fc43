"""ZmqPublisher against an in-process ZmqIngest: the delivery contract of transport.publisher.

Every test ends by comparing what the sink received with what was published, value for value
and in order: delivery is exactly once, whatever had to be resent on the way.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Container, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.transport.test_zmq_server import Recorder, running_ingest, wait_until
from transport.publisher import PublishError
from transport.wire import Reason
from transport.zmq.publisher import ZmqPublisher
from transport.zmq.server import ZmqIngest


@pytest.fixture
def sink() -> Recorder:
    return Recorder()


@pytest.fixture
def ingest(sink: Recorder) -> Iterator[ZmqIngest]:
    with running_ingest(sink) as running:
        yield running


def publish_series(publisher: ZmqPublisher, symbol: str, count: int, per_call: int) -> np.ndarray:
    values = np.arange(count, dtype=np.float64)
    for start in range(0, count, per_call):
        publisher.publish(symbol, values[start : start + per_call])
    return values


def test_dealer_splits_large_batches_and_delivers_in_order(
    ingest: ZmqIngest, sink: Recorder
) -> None:
    values = np.random.default_rng(1).random(10_000) * 100
    # 1 KiB frames: 10 000 values need 90-odd frames, more than the window of 8.
    with ZmqPublisher(
        ingest.bound_endpoints["router"], max_frame_bytes=1024, window=8
    ) as publisher:
        last = publisher.publish("SPLIT", values)
        publisher.flush()
        assert publisher.in_flight == 0
    assert last == publisher.frames_sent > 8
    np.testing.assert_array_equal(sink.values("SPLIT"), values)


def test_the_window_bounds_frames_in_flight(ingest: ZmqIngest, sink: Recorder) -> None:
    publisher = ZmqPublisher(ingest.bound_endpoints["router"], window=4)
    try:
        peak = 0
        for value in range(300):
            publisher.publish("WIN", [float(value)])
            peak = max(peak, publisher.in_flight)
        publisher.flush()
    finally:
        publisher.close()
    assert 1 <= peak <= 4
    np.testing.assert_array_equal(sink.values("WIN"), np.arange(300.0))


def test_a_content_rejection_is_raised_by_flush_and_the_publisher_goes_on(
    ingest: ZmqIngest, sink: Recorder
) -> None:
    with ZmqPublisher(ingest.bound_endpoints["router"]) as publisher:
        publisher.publish("REJ", [1.0])
        bad = publisher.publish("REJ", [2.0, -1.0])
        publisher.publish("REJ", [3.0])
        with pytest.raises(PublishError, match="1 frame") as error:
            publisher.flush()
        (rejection,) = error.value.rejections
        assert (rejection.sequence, rejection.symbol, rejection.reason) == (
            bad,
            "REJ",
            Reason.INVALID_VALUE,
        )
        publisher.publish("REJ", [4.0])
        publisher.flush()  # the rejection was reported once
    np.testing.assert_array_equal(sink.values("REJ"), [1.0, 3.0, 4.0])


def test_go_back_n_after_internal_failures_applies_everything_exactly_once(
    ingest: ZmqIngest, sink: Recorder
) -> None:
    failures = iter(range(3))

    def fail_three_times(symbol: str, values: np.ndarray) -> None:
        if values[0] in (10.0, 20.0) and next(failures, None) is not None:
            raise RuntimeError("store hiccup")

    sink.fail = fail_three_times
    with ZmqPublisher(ingest.bound_endpoints["router"], window=32) as publisher:
        values = publish_series(publisher, "GBN", 64, per_call=1)
        publisher.flush()
        # One resend per failure, not one per GAP nack of the frames in flight behind it.
        assert 1 <= publisher.resends <= 3
    np.testing.assert_array_equal(sink.values("GBN"), values)
    rejected = ingest.snapshot()["router"]["rejected"]
    assert rejected["internal"] == 3
    assert rejected["gap"] > 0


class LossyPublisher(ZmqPublisher):
    """Loses the messages numbered in `lose` (from 1) on the way, as a network or a restarted
    peer would."""

    lose: Container[int] = (3,)

    def _send_pending(self) -> None:
        if self.messages_sent + 1 in self.lose and self._pending:
            self._pending.clear()
            self._pending_bytes = 0
            self._sent_messages += 1
            self.messages_sent += 1
            return
        super()._send_pending()


def test_a_lost_message_is_detected_as_a_gap_and_resent(ingest: ZmqIngest, sink: Recorder) -> None:
    with LossyPublisher(ingest.bound_endpoints["router"], retry_interval_s=0.2) as publisher:
        values = publish_series(publisher, "LOST", 20, per_call=1)
        publisher.flush()
        assert publisher.resends >= 1
    np.testing.assert_array_equal(sink.values("LOST"), values)
    assert ingest.snapshot()["router"]["rejected"]["gap"] >= 1


def test_silence_is_answered_by_resending(ingest: ZmqIngest, sink: Recorder) -> None:
    # The only message is lost: no reply ever comes, so only the retry timer can recover.
    publisher = LossyPublisher(ingest.bound_endpoints["router"], retry_interval_s=0.1)
    publisher.lose = (1,)
    try:
        publisher.publish("QUIET", [1.0])
        publisher.flush(timeout=5.0)
        assert publisher.resends == 1
    finally:
        publisher.close()
    np.testing.assert_array_equal(sink.values("QUIET"), [1.0])


def test_retries_are_bounded(ingest: ZmqIngest, sink: Recorder) -> None:
    def always_fail(symbol: str, values: np.ndarray) -> None:
        raise RuntimeError("store down")

    sink.fail = always_fail
    publisher = ZmqPublisher(ingest.bound_endpoints["router"], max_retries=3)
    try:
        publisher.publish("DOWN", [1.0])
        with pytest.raises(PublishError, match="gave up after 3 resends"):
            publisher.flush(timeout=5.0)
    finally:
        publisher.close()
    assert ingest.snapshot()["router"]["rejected"]["internal"] == 4


def test_flush_times_out_when_nobody_answers() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # nothing listens: the DEALER keeps reconnecting
    publisher = ZmqPublisher(f"tcp://127.0.0.1:{port}", retry_interval_s=0.05, timeout_s=1.0)
    try:
        publisher.publish("NOBODY", [1.0])
        started = time.monotonic()
        with pytest.raises(PublishError, match="not acknowledged"):
            publisher.flush(timeout=0.3)
        assert time.monotonic() - started < 2.0
    finally:
        started = time.monotonic()
        publisher.close()
        assert time.monotonic() - started < 1.0  # a DEALER never lingers on close


def test_push_mode_delivers_without_acks(ingest: ZmqIngest, sink: Recorder) -> None:
    with ZmqPublisher(ingest.bound_endpoints["pull"], mode="push") as publisher:
        values = publish_series(publisher, "PUSH", 500, per_call=7)
        publisher.flush()  # nothing to wait for
        assert publisher.in_flight == 0
    wait_until(lambda: sink.values("PUSH").size == values.size)
    np.testing.assert_array_equal(sink.values("PUSH"), values)


def test_coalescing_packs_frames_into_fewer_messages(ingest: ZmqIngest, sink: Recorder) -> None:
    with ZmqPublisher(
        ingest.bound_endpoints["router"], coalesce_bytes=4096, window=256
    ) as publisher:
        values = publish_series(publisher, "PACK", 200, per_call=1)
        publisher.flush()
        assert publisher.frames_sent == 200
        assert publisher.messages_sent < 20
    np.testing.assert_array_equal(sink.values("PACK"), values)
    counters = ingest.snapshot()["router"]
    assert counters["messages"] == publisher.messages_sent
    assert counters["frames_applied"] == 200


def test_two_publishers_are_sequenced_independently(ingest: ZmqIngest, sink: Recorder) -> None:
    endpoint = ingest.bound_endpoints["router"]
    with ZmqPublisher(endpoint) as first, ZmqPublisher(endpoint) as second:
        assert first.publisher_id != second.publisher_id
        for value in range(50):
            first.publish("TWO-A", [float(value)])
            second.publish("TWO-B", [float(value)])
    np.testing.assert_array_equal(sink.values("TWO-A"), np.arange(50.0))
    np.testing.assert_array_equal(sink.values("TWO-B"), np.arange(50.0))
    assert "gap" not in ingest.snapshot()["router"]["rejected"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        ZmqPublisher("tcp://127.0.0.1:1", mode="pub")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        ZmqPublisher("tcp://127.0.0.1:1", window=0)


# --- where a publisher starts: FLAG_FIRST and UNKNOWN_PUBLISHER -------------------------------


@pytest.mark.parametrize(("coalesce_bytes", "window"), [(0, 64), (4096, 256)])
def test_a_lost_first_message_is_resent_flagged_first_and_applied_exactly_once(
    ingest: ZmqIngest, sink: Recorder, coalesce_bytes: int, window: int
) -> None:
    # The message carrying the FIRST frame never arrives: the frames behind it are nacked
    # UNKNOWN_PUBLISHER (a guessed start would have acked the resent frame 1 as a duplicate).
    publisher = LossyPublisher(
        ingest.bound_endpoints["router"],
        coalesce_bytes=coalesce_bytes,
        window=window,
        retry_interval_s=0.2,
    )
    publisher.lose = (1,)
    try:
        values = publish_series(publisher, "FIRSTLOST", 200, per_call=1)
        publisher.flush(timeout=10.0)
        assert publisher.resends >= 1
    finally:
        publisher.close()
    np.testing.assert_array_equal(sink.values("FIRSTLOST"), values)
    counters = ingest.snapshot()["router"]
    assert counters["rejected"]["unknown_publisher"] >= 1
    assert counters["frames_applied"] == 200


def test_an_appliance_restart_mid_publishing_loses_nothing_published_after_it(
    tmp_path: Path,
) -> None:
    # The appliance goes down with frames in flight and comes back with no memory of the
    # publisher (a fresh FrameProcessor and store) on the same endpoint; the publisher goes on.
    endpoint = f"ipc://{tmp_path}/router.sock"
    window = 8
    before = Recorder(lambda symbol, values, *origin: time.sleep(0.005))  # keeps frames in flight
    after = Recorder()
    values = np.arange(400, dtype=np.float64)
    publisher = ZmqPublisher(endpoint, window=window, retry_interval_s=0.2, timeout_s=10.0)
    try:
        # One message per loop turn: what is still queued when it stops is lost with it.
        with running_ingest(before, router_endpoint=endpoint, pull_endpoint="",
                            control_endpoint="", batch_messages=1):  # fmt: skip
            for value in values[:200]:
                publisher.publish("RESTART", [value])
            in_flight = publisher.in_flight
            assert in_flight > 0  # the restart really is in the middle of publishing
        with running_ingest(after, router_endpoint=endpoint, pull_endpoint="",
                            control_endpoint="") as restarted:  # fmt: skip
            for value in values[200:]:
                publisher.publish("RESTART", [value])
            publisher.flush(timeout=10.0)
            assert publisher.in_flight == 0
            counters = restarted.snapshot()["router"]
    finally:
        publisher.close()
    old, new = before.values("RESTART"), after.values("RESTART")
    # Each incarnation applied a contiguous run, in order, each value once ...
    np.testing.assert_array_equal(old, values[: old.size])
    start = values.size - new.size
    np.testing.assert_array_equal(new, values[start:])
    # ... the new one from the publisher's oldest unacked frame: nothing acked is applied
    # again, nothing is skipped, and everything published after the restart is in exactly once.
    assert 200 - in_flight <= start <= old.size
    assert counters["rejected"]["unknown_publisher"] >= 1
    assert counters["frames_applied"] == new.size
    assert publisher.resends >= 1


def test_a_restart_that_loses_the_frames_in_flight_does_not_stall_a_full_window(
    tmp_path: Path,
) -> None:
    # The old appliance died with a full window of messages unread: they get no reply, so the
    # publisher's reply count runs behind and every answer to its resends looks stale. Only the
    # retry timer resends then, and it must carry FLAG_FIRST, or the new appliance answers
    # UNKNOWN_PUBLISHER forever and publish() gives up with "window full".
    endpoint = f"ipc://{tmp_path}/router.sock"
    window = 4
    before, after = Recorder(), Recorder()
    publisher = LossyPublisher(endpoint, window=window, retry_interval_s=0.1, timeout_s=5.0)
    publisher.lose = ()
    values = np.arange(40, dtype=np.float64)
    try:
        with running_ingest(before, router_endpoint=endpoint, pull_endpoint="",
                            control_endpoint=""):  # fmt: skip
            for value in values[:10]:
                publisher.publish("STALL", [value])
            publisher.flush(timeout=5.0)
        with running_ingest(after, router_endpoint=endpoint, pull_endpoint="",
                            control_endpoint="") as restarted:  # fmt: skip
            lost = range(publisher.messages_sent + 1, publisher.messages_sent + window + 1)
            publisher.lose = lost  # the next `window` messages died with the old appliance
            started = time.monotonic()
            for value in values[10:]:
                publisher.publish("STALL", [value])
            publisher.flush(timeout=5.0)
            assert time.monotonic() - started < 3.0  # a few retry intervals, not a stall
            counters = restarted.snapshot()["router"]
    finally:
        publisher.close()
    assert publisher.messages_sent > lost[-1]
    np.testing.assert_array_equal(before.values("STALL"), values[:10])
    np.testing.assert_array_equal(after.values("STALL"), values[10:])
    assert counters["rejected"]["unknown_publisher"] >= 1
    assert counters["frames_applied"] == 30
