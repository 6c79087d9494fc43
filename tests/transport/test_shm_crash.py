"""A publisher process killed with SIGKILL: no torn slot applied, nothing twice, the ring goes on.

The child gets the `shm.open` reply on its command line (its control client just returns it),
so the ring and its consumer live in this process while the producer is another process: the
situation of a crashed feed handler, minus the control socket.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.transport.test_shm_ingest import DEADLINE_S, Model, local_control, ring_files
from tests.waiting import wait_until
from transport.shm.publisher import ShmPublisher
from transport.shm.server import DEFAULT_DIRECTORY, ShmIngest

pytestmark = pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")

REPO_ROOT = Path(__file__).resolve().parents[2]
PUBLISHER_ID = 0x5EED

# Publishes forever; frame `s` holds 1 + s % 5 copies of float(s), so every frame is checkable.
LOOPING_CHILD = """
import json, sys
from transport.shm.publisher import ShmPublisher
reply = json.loads(sys.argv[1])
publisher = ShmPublisher(lambda body: reply, publisher_id=int(sys.argv[2]), timeout_s=60)
print("ready", flush=True)
while True:
    s = publisher.last_sequence + 1
    publisher.publish("KILL", [float(s)] * (1 + s % 5))
"""

# Publishes 40 frames, then writes frame 41 (value 999) without its slot sequence and waits.
TORN_CHILD = """
import json, mmap, os, sys, time
import numpy as np
from transport.shm.ring import RingProducer
from transport.wire import encode_data
reply, publisher_id = json.loads(sys.argv[1]), int(sys.argv[2])
fd = os.open(reply["path"], os.O_RDWR)
memory = mmap.mmap(fd, reply["size"])
producer = RingProducer(memory)
for s in range(1, 41):
    assert producer.try_write(encode_data(publisher_id, s, "TORN", np.array([float(s)])))
assert producer.stage(encode_data(publisher_id, 41, "TORN", np.array([999.0])))
print("staged", flush=True)
time.sleep(120)
"""


def expected_frame(sequence: int) -> np.ndarray:
    return np.full(1 + sequence % 5, float(sequence))


def spawn(script: str, reply: dict[str, Any]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get(
        "PYTHONPATH", "")])}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(reply), str(PUBLISHER_ID)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
    )  # fmt: skip


def read_line(child: subprocess.Popen[str], timeout_s: float = DEADLINE_S) -> str:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout_s)
    if not ready:
        child.kill()
        raise AssertionError(f"child said nothing in {timeout_s} s: {child.communicate()[1]}")
    return child.stdout.readline().strip()


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=DEADLINE_S)
    assert child.returncode == -signal.SIGKILL


@pytest.fixture
def model() -> Model:
    return Model()


@pytest.fixture
def ingest(model: Model) -> Iterator[ShmIngest]:
    ingest = ShmIngest(
        model, slots=16, slot_bytes=256, max_slots=64, max_slot_bytes=1024, max_rings=2,
        spin_us=50, backoff_max_us=200,
    )  # fmt: skip
    yield ingest
    ingest.stop(timeout_s=DEADLINE_S)
    assert ring_files(ingest) == []


def test_publisher_killed_mid_stream_then_resumed(ingest: ShmIngest, model: Model) -> None:
    ingest.start()
    control = local_control(ingest)
    reply = control({"op": "shm.open", "publisher_id": PUBLISHER_ID})
    child = spawn(LOOPING_CHILD, reply)
    try:
        assert read_line(child) == "ready"
        ring = lambda: ingest.snapshot()["rings"][str(PUBLISHER_ID)]  # noqa: E731
        wait_until(lambda: ring()["consumer_position"] >= 2000, "many laps of the ring", DEADLINE_S)
    finally:
        kill(child)
    killed_at = ring()["producer_position"]

    with ShmPublisher(
        control, publisher_id=PUBLISHER_ID, release_on_close=False, secret=reply["secret"]
    ) as resumed:
        first = resumed.last_sequence + 1
        assert resumed.producer_position == resumed.last_sequence >= killed_at
        for sequence in range(first, first + 500):
            assert resumed.publish("KILL", expected_frame(sequence)) == sequence
    want = np.concatenate([expected_frame(s) for s in range(1, first + 500)])
    np.testing.assert_array_equal(model.values("KILL"), want)
    counters = ring()
    assert counters["frames_applied"] == first + 499
    assert counters["rejected"] == {}  # no duplicate, no gap, no torn or corrupt frame


def test_torn_slot_of_a_killed_publisher_is_never_applied(ingest: ShmIngest, model: Model) -> None:
    """Deterministic: the child dies between a slot's payload and its sequence word."""
    control = local_control(ingest)
    reply = control({"op": "shm.open", "publisher_id": PUBLISHER_ID, "slots": 64})
    child = spawn(TORN_CHILD, reply)  # the poller is not started: this test polls
    try:
        assert read_line(child) == "staged"
    finally:
        kill(child)
    # Re-attach before the consumer ran: the 40 published slots are still pending, so the
    # producer finds its place by scanning slot sequences, not from the consumer position.
    resumed = ShmPublisher(control, publisher_id=PUBLISHER_ID, secret=reply["secret"])
    assert resumed.consumer_position == 0
    assert resumed.last_sequence == 40 and resumed.producer_position == 40
    applied = 0
    while (done := ingest.poll_once()) > 0:
        applied += done
    assert applied == 40
    assert ingest.poll_once() == 0  # slot 41 holds a complete, valid frame but no sequence

    for sequence in range(41, 51):
        resumed.publish("TORN", [float(sequence)])
    assert ingest.poll_once() == 10
    resumed.flush()
    resumed.close(release=False)  # the ring stays, for its counters below
    np.testing.assert_array_equal(model.values("TORN"), np.arange(1.0, 51.0))
    assert 999.0 not in model.values("TORN")
    assert ingest.snapshot()["rings"][str(PUBLISHER_ID)]["rejected"] == {}
