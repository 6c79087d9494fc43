"""ShmIngest and ShmPublisher in one process: control requests, polling, back-pressure, closing.

The control handlers are called through `transport.control.dispatch` (the JSON encoding the
ZeroMQ control socket uses) but without a socket; one test goes over a real REQ/REP pair.
Rings live in /dev/shm as in production; every test checks that its files are gone at the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from tests.waiting import wait_until
from transport.control import ControlError, dispatch
from transport.ingest import Rejected
from transport.publisher import PublishError, Rejection
from transport.shm.publisher import ShmPublisher
from transport.shm.server import BELL_PREFIX, DEFAULT_DIRECTORY, NAME_PREFIX, ShmIngest
from transport.wire import Reason, max_values_in

pytestmark = pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")

DEADLINE_S = 10.0


class Model:
    """The sink: appends copies per symbol (what the store holds), refuses bad values."""

    def __init__(self) -> None:
        self.data: dict[str, list[np.ndarray]] = {}
        self.calls = 0

    def __call__(self, symbol: str, values: np.ndarray, *origin: int) -> None:
        self.calls += 1
        if values.shape[0] == 0:
            raise Rejected(Reason.EMPTY_BATCH, "empty batch")
        if not np.isfinite(values).all() or (values < 0).any():
            raise Rejected(Reason.INVALID_VALUE, "negative or non-finite")
        self.data.setdefault(symbol, []).append(values.copy())

    def values(self, symbol: str) -> np.ndarray:
        return np.concatenate(self.data.get(symbol, [np.empty(0)]))


def local_control(ingest: ShmIngest) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A control client that runs the handlers in-process through the real JSON dispatch."""
    handlers = ingest.control_handlers()

    def call(body: dict[str, Any]) -> dict[str, Any]:
        reply = msgspec.json.decode(dispatch(msgspec.json.encode(body), handlers))
        if not reply["ok"]:
            raise ControlError(reply["error"])
        return reply

    return call


def ring_files(ingest: ShmIngest) -> list[Path]:
    return sorted(ingest.directory.glob(f"{ingest._prefix}-*"))


@pytest.fixture
def model() -> Model:
    return Model()


@contextlib.contextmanager
def ingest_factory(model: Model, **defaults: Any) -> Iterator[Callable[..., ShmIngest]]:
    """ShmIngest factory with small rings; stops each one and checks its files are unlinked."""
    made: list[ShmIngest] = []

    def make(**kwargs: Any) -> ShmIngest:
        options = {"slots": 16, "slot_bytes": 512, "max_slots": 256, "max_slot_bytes": 8192,
                   "max_rings": 4, "spin_us": 50, "backoff_max_us": 200, **defaults,
                   **kwargs}  # fmt: skip
        ingest = ShmIngest(model, **options)
        made.append(ingest)
        return ingest

    yield make
    for ingest in made:
        ingest.stop(timeout_s=DEADLINE_S)
        assert ring_files(ingest) == []


@pytest.fixture
def make_ingest(model: Model) -> Iterator[Callable[..., ShmIngest]]:
    with ingest_factory(model) as make:
        yield make


@pytest.fixture
def ingest(make_ingest: Callable[..., ShmIngest]) -> ShmIngest:
    running = make_ingest()
    running.start()
    return running


def test_publish_many_wraparounds_equals_numpy(ingest: ShmIngest, model: Model) -> None:
    rng = np.random.default_rng(7)
    expected: dict[str, list[np.ndarray]] = {"AAPL": [], "MSFT": []}
    with ShmPublisher(local_control(ingest), slots=8, slot_bytes=256) as publisher:
        per_frame = max_values_in(publisher.max_frame_bytes, 4)
        for i in range(3000):  # 8 slots: hundreds of laps
            symbol = "AAPL" if i % 3 else "MSFT"
            values = rng.uniform(0.0, 1e6, 1 + i % (2 * per_frame))  # some split in two frames
            publisher.publish(symbol, values)
            expected[symbol].append(values)
        publisher.flush()
        assert publisher.consumer_position == publisher.producer_position == publisher.frames_sent
        assert publisher.frames_sent > 3000  # the split happened
        assert publisher.frames_sent // publisher.slots > 300
    for symbol, batches in expected.items():
        want, got = np.concatenate(batches), model.values(symbol)
        np.testing.assert_array_equal(got, want)
        for stat in (np.sum, np.mean, np.var, np.min, np.max):
            assert stat(got) == stat(want)
    totals = ingest.snapshot()["totals"]
    assert totals["values_applied"] == sum(b.size for bs in expected.values() for b in bs)
    assert not any(key.startswith("rejected.") for key in totals)


def test_totals_never_step_back_while_a_closed_ring_is_retired(
    ingest: ShmIngest, model: Model
) -> None:
    """A closed ring leaves the registry before the poller folds its counters into the totals:
    GET /ingest and /metrics must count it all along (a Prometheus counter that decreases reads
    as a process restart)."""
    for attempt in range(20):
        symbol = f"S{attempt}"
        with ShmPublisher(local_control(ingest)) as publisher:
            publisher.publish(symbol, np.ones(5))
            publisher.flush()
            wait_until(lambda s=symbol: model.values(s).size == 5, "the values applied", DEADLINE_S)
        # Closed (shm.close sent on exit): snapshots taken while the poller retires it.
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            assert ingest.snapshot()["totals"].get("values_applied") == 5 * (attempt + 1)


def test_batch_larger_than_a_slot_is_split_to_fit(ingest: ShmIngest, model: Model) -> None:
    with ShmPublisher(local_control(ingest), slot_bytes=256) as publisher:
        assert publisher.max_frame_bytes == 256 - 16
        values = np.arange(1000, dtype=np.float64)
        last = publisher.publish("BIG", values)
        per_frame = max_values_in(240, 3)
        assert last == publisher.frames_sent == -(-1000 // per_frame)
    np.testing.assert_array_equal(model.values("BIG"), values)
    assert max(len(b) for b in model.data["BIG"]) == per_frame


def test_flush_reports_rejections_with_symbol_and_reason(ingest: ShmIngest, model: Model) -> None:
    with ShmPublisher(local_control(ingest)) as publisher:
        publisher.publish("OK", [1.0])
        bad = publisher.publish("NEG", [-1.0])
        empty = publisher.publish("NADA", [])
        publisher.publish("OK", [2.0])
        with pytest.raises(PublishError, match="2 frame") as caught:
            publisher.flush()
        assert caught.value.rejections == [
            Rejection(bad, "NEG", Reason.INVALID_VALUE),
            Rejection(empty, "NADA", Reason.EMPTY_BATCH),
        ]
        publisher.publish("OK", [3.0])
        publisher.flush()  # reported once; the ring goes on
    np.testing.assert_array_equal(model.values("OK"), [1.0, 2.0, 3.0])


def test_two_publishers_on_two_rings(ingest: ShmIngest, model: Model) -> None:
    control = local_control(ingest)
    errors: list[BaseException] = []

    def run(symbol: str, offset: float) -> None:
        try:
            # release_on_close=False: the rings stay open for the counters below.
            with ShmPublisher(control, slots=4, release_on_close=False) as publisher:
                for i in range(1500):
                    publisher.publish(symbol, [offset + i, offset + i + 0.5])
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s, o)) for s, o in (("ONE", 0.0), ("TWO", 1e4))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert not errors and not any(t.is_alive() for t in threads)
    snapshot = ingest.snapshot()
    assert snapshot["rings_open"] == 2
    assert {r["frames_applied"] for r in snapshot["rings"].values()} == {1500}
    assert len({r["name"] for r in snapshot["rings"].values()}) == 2
    for symbol, offset in (("ONE", 0.0), ("TWO", 1e4)):
        want = np.stack([offset + np.arange(1500.0), offset + np.arange(1500.0) + 0.5], 1)
        np.testing.assert_array_equal(model.values(symbol), want.reshape(-1))


def test_same_publisher_id_reattaches_to_its_ring(ingest: ShmIngest, model: Model) -> None:
    control = local_control(ingest)
    first = ShmPublisher(control, publisher_id=77, slots=8)
    for i in range(20):
        first.publish("RE", [float(i)])
    first.flush()
    first.close(release=False)  # detach only: the ring stays
    with pytest.raises(PublishError, match="belongs to the client that opened it"):
        ShmPublisher(control, publisher_id=77)  # another client, without the ring's secret
    # sizes omitted: the existing ring
    second = ShmPublisher(control, publisher_id=77, secret=first.secret)
    assert second.secret == first.secret
    assert second.ring_name == first.ring_name and second.slots == 8
    assert second.last_sequence == 20  # numbering continues: nothing counted as duplicate
    second.publish("RE", [20.0])
    second.flush()
    second.close(release=True)
    wait_until(lambda: ingest.snapshot()["rings_open"] == 0, "the ring to close", DEADLINE_S)
    wait_until(lambda: ring_files(ingest) == [], "the ring file to be unlinked", DEADLINE_S)
    np.testing.assert_array_equal(model.values("RE"), np.arange(21.0))
    assert ingest.snapshot()["totals"] == {"frames_applied": 21, "values_applied": 21,
                                           "messages": 21}  # fmt: skip


def test_open_requests_are_validated(make_ingest: Callable[..., ShmIngest]) -> None:
    ingest = make_ingest(max_rings=2)
    control = local_control(ingest)
    for body, message in [
        ({"publisher_id": "x"}, "publisher_id must be an integer"),
        ({"publisher_id": -1}, "publisher_id must be in"),
        ({"publisher_id": True}, "publisher_id must be an integer"),
        ({"publisher_id": 1, "slots": 3}, "power of two"),
        ({"publisher_id": 1, "slots": 512}, "slots must be in 2..256"),
        ({"publisher_id": 1, "slot_bytes": 1000}, "multiple of 64"),
        ({"publisher_id": 1, "slot_bytes": 16384}, "slot_bytes must be in 128..8192"),
    ]:
        with pytest.raises(ControlError, match=message):
            control({"op": "shm.open", **body})
    reply = control({"op": "shm.open", "publisher_id": 1, "slots": 32, "slot_bytes": 1024})
    assert reply["slots"] == 32 and reply["slot_bytes"] == 1024
    assert reply["size"] == 4096 + 32 * 1024 == Path(reply["path"]).stat().st_size
    assert Path(reply["path"]).stat().st_mode & 0o777 == 0o600
    assert len(reply["secret"]) == 32  # 128 bits, hex
    mine = {"publisher_id": 1, "secret": reply["secret"]}
    assert control({"op": "shm.open", **mine}) == reply
    with pytest.raises(ControlError, match="already has a ring of 32 slots"):
        control({"op": "shm.open", **mine, "slots": 64})
    control({"op": "shm.open", "publisher_id": 2})
    with pytest.raises(ControlError, match="max_rings is 2"):
        control({"op": "shm.open", "publisher_id": 3})
    assert control({"op": "shm.open", **mine}) == reply  # re-attach: no new ring
    assert control({"op": "shm.close", **mine})["closed"] is True
    assert not Path(reply["path"]).exists()  # not started: closed at once
    assert control({"op": "shm.close", **mine})["closed"] is False
    control({"op": "shm.open", "publisher_id": 3})  # room again


def test_full_ring_without_a_consumer_times_out(make_ingest: Callable[..., ShmIngest]) -> None:
    ingest = make_ingest()  # never started: nobody consumes
    publisher = ShmPublisher(local_control(ingest), slots=4, timeout_s=0.2)
    for i in range(4):
        publisher.publish("STUCK", [float(i)])
    started = time.monotonic()
    with pytest.raises(PublishError, match="has not consumed"):
        publisher.publish("STUCK", [4.0])
    assert 0.2 <= time.monotonic() - started < 0.2 + DEADLINE_S / 2
    with pytest.raises(PublishError, match="timed out"):
        publisher.flush(timeout=0.05)
    publisher.close()


def test_stop_applies_published_frames_then_closes_the_rings(
    make_ingest: Callable[..., ShmIngest], model: Model
) -> None:
    ingest = make_ingest()  # not started: the frames wait in the ring
    publisher = ShmPublisher(local_control(ingest), slots=4, timeout_s=30.0)
    for i in range(3):
        publisher.publish("LAST", [float(i)])
    ingest.stop()
    np.testing.assert_array_equal(model.values("LAST"), [0.0, 1.0, 2.0])
    assert ring_files(ingest) == []
    publisher.flush()  # everything was applied before the ring closed
    with pytest.raises(PublishError, match="closed ring"):
        publisher.publish("LAST", [3.0])
    publisher.close()
    with pytest.raises(ControlError, match="stopping"):
        local_control(ingest)({"op": "shm.open", "publisher_id": 9})


def test_a_publisher_blocked_on_a_full_ring_fails_fast_when_the_appliance_stops(
    make_ingest: Callable[..., ShmIngest],
) -> None:
    """Closed state, not the timeout: the producer learns at once that nobody will consume."""
    ingest = make_ingest()
    publisher = ShmPublisher(local_control(ingest), slots=2, timeout_s=60.0)
    publisher.publish("X", [1.0])
    publisher.publish("X", [2.0])
    outcome: list[BaseException] = []

    def blocked() -> None:
        try:
            publisher.publish("X", [3.0])
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    wait_until(lambda: thread.is_alive(), "the publisher to block", DEADLINE_S)
    ingest.stop()  # applies 1.0 and 2.0 (freeing slots), then closes
    thread.join(DEADLINE_S)
    assert not thread.is_alive()
    # Either the write found a credit after the drain (and flush sees the ring closed with the
    # frame unconsumed) or the wait saw the ring closed: both are errors, neither waits 60 s.
    if not outcome:
        with pytest.raises(PublishError, match="closed ring"):
            publisher.flush(timeout=DEADLINE_S)
    else:
        assert isinstance(outcome[0], PublishError)
    publisher.close()


def test_snapshot_counts_per_ring(ingest: ShmIngest) -> None:
    with ShmPublisher(local_control(ingest), publisher_id=5) as publisher:
        publisher.publish("S", [1.0, 2.0])
        publisher.publish("S", [-1.0])
        with pytest.raises(PublishError):
            publisher.flush()
        ring = ingest.snapshot()["rings"]["5"]
        assert ring["frames_applied"] == 1 and ring["values_applied"] == 2
        assert ring["rejected"] == {"invalid_value": 1}
        assert ring["consumer_position"] == ring["producer_position"] == 2
        assert ring["slots"] == 16 and ring["slot_bytes"] == 512


@contextlib.contextmanager
def control_socket(ingest: ShmIngest, tmp_path: Path) -> Iterator[str]:
    """A REP socket answering the ingest's control ops on a thread; yields its endpoint."""
    endpoint = f"ipc://{tmp_path / 'control.sock'}"
    context = zmq.Context()
    rep = context.socket(zmq.REP)
    rep.bind(endpoint)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if rep.poll(20):
                rep.send(dispatch(rep.recv(), ingest.control_handlers()))

    server = threading.Thread(target=serve)
    server.start()
    try:
        yield endpoint
    finally:
        stop.set()
        server.join(DEADLINE_S)
        rep.close(linger=0)
        context.term()


def test_control_over_a_real_rep_socket(ingest: ShmIngest, model: Model, tmp_path: Path) -> None:
    """ShmPublisher(endpoint) uses transport.control.request: REQ -> REP -> dispatch."""
    with control_socket(ingest, tmp_path) as endpoint:
        publisher = ShmPublisher(endpoint, timeout_s=DEADLINE_S)
        publisher.publish("ZMQ", [4.0, 2.0])
        publisher.flush()
        publisher.close(release=True)
        wait_until(
            lambda: ingest.snapshot()["rings_open"] == 0, "shm.close to take effect", DEADLINE_S
        )
    np.testing.assert_array_equal(model.values("ZMQ"), [4.0, 2.0])


def test_publisher_reports_a_refused_open(make_ingest: Callable[..., ShmIngest]) -> None:
    ingest = make_ingest(max_rings=1)
    control = local_control(ingest)
    with ShmPublisher(control), pytest.raises(PublishError, match=r"shm.open refused: .*max_rings"):
        ShmPublisher(control)


def test_start_sweeps_ring_files_of_dead_appliances(model: Model, tmp_path: Path) -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    stale = tmp_path / f"{NAME_PREFIX}{finished.pid}-0badcafe-1"
    alive = tmp_path / f"{NAME_PREFIX}{os.getpid()}-0badcafe-1"
    unrelated = tmp_path / "hft-ring-notapid-1"
    for path in (stale, alive, unrelated):
        path.write_bytes(b"x")
    stale_bell = tmp_path / f"{BELL_PREFIX}{finished.pid}-0badcafe"
    os.mkfifo(stale_bell)
    ingest = ShmIngest(model, slots=4, slot_bytes=256, directory=tmp_path)
    ingest.start()
    assert ingest._bell_path is not None and ingest._bell_path.exists()
    ingest.stop()
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert not stale_bell.exists() and not any(tmp_path.glob(f"{BELL_PREFIX}{os.getpid()}-*"))


def test_doorbell_wakes_a_blocked_poller(
    make_ingest: Callable[..., ShmIngest], model: Model
) -> None:
    """A poller deep in its back-off (pauses of up to 2 s here) applies a frame in one wake-up:
    the publisher sees `consumer_sleeping` and rings the FIFO named in the open reply."""
    ingest = make_ingest(spin_us=0, backoff_max_us=2_000_000)
    ingest.start()
    with ShmPublisher(local_control(ingest)) as publisher:
        assert publisher._bell is not None
        for round_no in range(3):
            time.sleep(1.5)  # the pause has doubled past 0.5 s: only the doorbell is faster
            wait_until(lambda: publisher._producer.consumer_sleeping, "the poller to block", 5)
            started = time.monotonic()
            publisher.publish("BELL", [float(round_no)])
            publisher.flush(5)
            assert time.monotonic() - started < 0.25
    assert model.values("BELL").tolist() == [0.0, 1.0, 2.0]


def test_without_a_doorbell_the_pause_still_applies(
    make_ingest: Callable[..., ShmIngest], model: Model
) -> None:
    """A publisher that does not ring (another language, an older client) is applied at the
    end of the poller's pause; and an idle poller costs almost no CPU."""
    ingest = make_ingest(spin_us=0, backoff_max_us=20_000)
    ingest.start()
    with ShmPublisher(local_control(ingest)) as publisher:
        os.close(publisher._bell)
        publisher._bell = publisher._hold.bell = None
        time.sleep(0.2)
        cpu = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.1  # the poller blocks, it does not spin
        publisher.publish("NOBELL", [1.0])
        publisher.flush(5)
    assert model.values("NOBELL").tolist() == [1.0]


def test_snapshot_while_rings_open_and_close(ingest: ShmIngest, model: Model) -> None:
    """GET /ingest runs on another thread than the control ops and the poller: never a read
    of an unmapped ring, never a 'dictionary changed size' from the totals."""
    control = local_control(ingest)
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not done.is_set():
                ingest.snapshot()
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(60):
            publisher = ShmPublisher(control, slots=2, slot_bytes=128)
            publisher.publish(f"CHURN{i % 7}", [float(i)])
            publisher.publish("CHURN", [-1.0])  # a rejection: a rejected.* total
            publisher.close(release=True)
    finally:
        done.set()
        reader.join(DEADLINE_S)
    assert not errors
    wait_until(lambda: ingest.snapshot()["rings_open"] == 0, "every ring to close", DEADLINE_S)
    wait_until(
        lambda: ingest.snapshot()["totals"].get("messages") == 120, "the final drains", DEADLINE_S
    )
    assert ingest.snapshot()["totals"] == {
        "messages": 120, "frames_applied": 60, "values_applied": 60, "rejected.invalid_value": 60,
    }  # fmt: skip


def test_poll_loop_spins_without_sleeping_then_waits_with_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within `spin_us` of the last work the loop never sleeps (a zero sleep is a timer wait of
    tens of microseconds), it yields the GIL; after it, every pause goes through `idle_wait`,
    doubling up to `backoff_max_us`."""
    from transport import polling

    slept: list[float] = []
    monkeypatch.setattr(polling.time, "sleep", lambda seconds: slept.append(seconds))
    yields = []
    monkeypatch.setattr(polling.os, "sched_yield", lambda: yields.append(1))
    started = time.monotonic()
    spin_s = 0.05
    passes = {"work": 3, "spinning": 0}
    waits: list[float] = []

    def poll_once() -> int:
        if passes["work"]:
            passes["work"] -= 1
            return 1
        if time.monotonic() - started < spin_s:
            passes["spinning"] += 1
        return 0

    polling.run_poll_loop(
        poll_once, lambda: len(waits) < 8, spin_us=int(spin_s * 1e6), backoff_max_us=80,
        transport="test", idle_wait=waits.append,
    )  # fmt: skip
    assert slept == [] and passes["spinning"] > polling.SPIN_YIELD_EVERY and yields
    assert time.monotonic() - started >= spin_s
    assert waits == pytest.approx([10e-6, 20e-6, 40e-6, 80e-6, 80e-6, 80e-6, 80e-6, 80e-6])


def test_flush_busy_polls_within_its_budget(
    make_ingest: Callable[..., ShmIngest], model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the appliance works on the frames, a flush inside its `spin_us` never sleeps."""
    ingest = make_ingest(spin_us=200_000)
    ingest.start()
    caller, real_sleep = threading.get_ident(), time.sleep
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        if threading.get_ident() == caller:
            slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    with ShmPublisher(local_control(ingest), spin_us=2_000_000) as publisher:
        for i in range(200):
            publisher.publish("FLUSH", [float(i)])
            publisher.flush(5)
    assert slept == []
    assert model.values("FLUSH").tolist() == [float(i) for i in range(200)]
