"""Ring lifecycle: the ring of a publisher that has gone, or stayed idle, is reclaimed.

Publishers that must die for real are child processes (killed with SIGKILL, or leaving with
`os._exit`, which runs no finalizer); they reach the rings over a real REQ/REP control socket,
so the appliance learns their pid and lock from their own `shm.open`. Most tests call
`reap_once` themselves (the ingest not started, or with `now` in the future) so that nothing
depends on timing; the threaded tests wait with `wait_until`, never with a sleep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.transport.test_shm_crash import REPO_ROOT, kill, read_line
from tests.transport.test_shm_ingest import (
    DEADLINE_S,
    Model,
    control_socket,
    ingest_factory,
    local_control,
    ring_files,
)
from tests.waiting import wait_until
from transport.control import ControlError
from transport.publisher import PublishError
from transport.shm.liveness import Holder, PidState, lock_held, maps_file, process_start
from transport.shm.publisher import ShmPublisher, _map
from transport.shm.server import DEFAULT_DIRECTORY, ShmIngest

pytestmark = pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")

FAR = 10_000.0  # seconds: "much later" for reap_once(now=...)

# Opens a ring over the control socket, publishes argv[3] frames without waiting for them to be
# applied, says so, then waits to be killed (or, with argv[4] == "exit", leaves at once without
# running finalizers or close(): a publisher that forgot to close and died).
CHILD = """
import os, sys, time
from transport.shm.publisher import ShmPublisher
endpoint, publisher_id, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
publisher = ShmPublisher(endpoint, publisher_id=publisher_id, slots=64, timeout_s=30)
for s in range(1, frames + 1):
    publisher.publish("GONE", [float(s)])
print("published", publisher.ring_name, flush=True)
if sys.argv[4] == "exit":
    os._exit(0)
time.sleep(120)
"""

# Maps a ring file without any lock (an older or foreign publisher), says so, waits.
MAPPING_CHILD = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
memory = mmap.mmap(fd, os.fstat(fd).st_size)
print("mapped", flush=True)
time.sleep(120)
"""


def child(script: str, *args: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
    )  # fmt: skip


@pytest.fixture
def model() -> Model:
    return Model()


@pytest.fixture
def make_ingest(model: Model) -> Iterator[Callable[..., ShmIngest]]:
    # Two rings and no grace after shm.open: the limits and the reaper are reached at once.
    with ingest_factory(model, max_rings=2, attach_grace_s=0) as make:
        yield make


def test_killed_publisher_frames_are_applied_then_its_ring_reclaimed(
    make_ingest: Callable[..., ShmIngest], model: Model, tmp_path: Path
) -> None:
    """Deterministic: no poller, so the 30 frames still wait in the ring when the child dies."""
    ingest = make_ingest()
    with control_socket(ingest, tmp_path) as endpoint:
        publisher = child(CHILD, endpoint, 41, 30, "wait")
        try:
            _, name = read_line(publisher).split()
            assert ingest.reap_once() == 0  # alive and holding its lock: kept
        finally:
            kill(publisher)
    assert ingest.reap_once() == 1  # the kernel dropped its lock; its pid is gone
    np.testing.assert_array_equal(model.values("GONE"), np.arange(1.0, 31.0))
    snapshot = ingest.snapshot()
    assert snapshot["rings_open"] == 0
    assert snapshot["rings_reclaimed"] == {"gone": 1, "idle": 0}
    assert snapshot["totals"]["frames_applied"] == 30
    assert not (ingest.directory / name).exists()
    # A late client naming the reclaimed ring is told so; without a name it gets a new ring.
    control = local_control(ingest)
    with pytest.raises(ControlError, match=f"ring {name} no longer exists: it was reclaimed"):
        control({"op": "shm.open", "publisher_id": 41, "ring": name})
    with pytest.raises(PublishError, match="does not exist: the appliance closed or reclaimed"):
        _map(ingest.directory / name, 4096)
    fresh = control({"op": "shm.open", "publisher_id": 41})
    assert fresh["name"] != name


def test_killed_publisher_ring_is_reclaimed_by_the_running_reaper(
    make_ingest: Callable[..., ShmIngest], model: Model, tmp_path: Path
) -> None:
    ingest = make_ingest(check_interval_s=0.05, attach_grace_s=0.5)
    ingest.start()
    with control_socket(ingest, tmp_path) as endpoint:
        publisher = child(CHILD, endpoint, 42, 200, "wait")
        try:
            read_line(publisher)
        finally:
            kill(publisher)
        killed = time.monotonic()
        wait_until(lambda: ingest.snapshot()["rings_open"] == 0, "the reclaim", DEADLINE_S)
        # Within grace + a few check intervals (generous bound for a loaded 2-core machine).
        assert time.monotonic() - killed < 0.5 + 0.05 * 40
        wait_until(lambda: ring_files(ingest) == [], "the ring file to go", DEADLINE_S)
    np.testing.assert_array_equal(model.values("GONE"), np.arange(1.0, 201.0))
    assert ingest.snapshot()["rings_reclaimed"]["gone"] == 1


def test_more_short_lived_publishers_than_max_rings(
    make_ingest: Callable[..., ShmIngest], model: Model, tmp_path: Path
) -> None:
    """max_rings = 2, five publishers one after the other, none calls close(): the first two
    exit normally (the finalizer sends shm.close), the others die in os._exit (reclaimed)."""
    ingest = make_ingest(check_interval_s=0.05, attach_grace_s=0.5)
    ingest.start()
    with control_socket(ingest, tmp_path) as endpoint:
        for k in range(5):
            script = CHILD.replace("time.sleep(120)", "") if k < 2 else CHILD
            publisher = child(script, endpoint, 100 + k, 3, "normal" if k < 2 else "exit")
            read_line(publisher)
            assert publisher.wait(DEADLINE_S) == 0, publisher.communicate()[1]
            publisher.communicate()
            wait_until(lambda: ingest.snapshot()["rings_open"] == 0, "the ring to go", DEADLINE_S)
    assert model.values("GONE").tolist() == [1.0, 2.0, 3.0] * 5
    assert ingest.snapshot()["rings_reclaimed"] == {"gone": 3, "idle": 0}


def test_idle_rule_for_a_publisher_that_states_nothing(
    make_ingest: Callable[..., ShmIngest], model: Model
) -> None:
    """An old client (no pid, no lock) is reclaimed only after idle_reclaim_s without frames
    and without shm.open; a frame or a re-attach restarts the clock."""
    ingest = make_ingest(idle_reclaim_s=60)
    control = local_control(ingest)
    reply = control({"op": "shm.open", "publisher_id": 7})
    start = time.monotonic()
    assert ingest.reap_once(now=start + 59) == 0
    with ShmPublisher(
        control, publisher_id=7, release_on_close=False, secret=reply["secret"]
    ) as publisher:
        publisher.publish("IDLE", [1.0])
        assert ingest.poll_once() == 1
    # The re-attach above (shm.open) restarted the clock; the frame moves it again when seen.
    assert ingest.reap_once(now=start + 100) == 0  # the frame was seen at +100
    assert ingest.reap_once(now=start + 159) == 0
    assert ingest.reap_once(now=start + 161) == 1
    assert ingest.snapshot()["rings_reclaimed"] == {"gone": 0, "idle": 1}
    assert model.values("IDLE").tolist() == [1.0]
    with pytest.raises(ControlError, match=r"reclaimed: no frame and no shm\.open for 61 s"):
        control({"op": "shm.open", "publisher_id": 7, "ring": reply["name"]})


def test_attached_live_publisher_is_never_reclaimed_and_reattaches(
    make_ingest: Callable[..., ShmIngest], model: Model
) -> None:
    ingest = make_ingest(idle_reclaim_s=60)
    control = local_control(ingest)
    first = ShmPublisher(control, publisher_id=9)
    first.publish("LIVE", [1.0])
    assert ingest.reap_once(now=time.monotonic() + FAR) == 0  # holds its lock: kept
    first.close(release=False)  # lock dropped, but this process (its pid) is alive...
    assert ingest.reap_once() == 0  # ...so not "gone": the idle rule alone may take it
    # re-attach (with the ring's secret): same ring, numbering goes on
    second = ShmPublisher(control, publisher_id=9, secret=first.secret)
    assert second.ring_name == first.ring_name and second.last_sequence == 1
    second.publish("LIVE", [2.0])
    while ingest.poll_once():  # no poller thread here
        pass
    second.flush(0)
    second.close()  # release: shm.close
    assert ingest.snapshot()["rings_open"] == 0
    assert ingest.snapshot()["rings_reclaimed"] == {"gone": 0, "idle": 0}
    assert model.values("LIVE").tolist() == [1.0, 2.0]


def test_pid_rule_without_lock_needs_a_verified_pid(
    make_ingest: Callable[..., ShmIngest], model: Model
) -> None:
    """A publisher without the lock is judged by its pid only once it was seen mapping the
    ring; a pid that maps something else, or that this appliance cannot see, is never 'gone'."""
    ingest = make_ingest(idle_reclaim_s=0)  # no idle rule: only the pid can reclaim
    control = local_control(ingest)
    mapper = None
    bystander = child("import time; print('up', flush=True); time.sleep(120)")
    try:
        read_line(bystander)
        ring = control({"op": "shm.open", "publisher_id": 1})
        mapper = child(MAPPING_CHILD, ring["path"])
        read_line(mapper)
        control({"op": "shm.open", "publisher_id": 1, "pid": mapper.pid,
                 "secret": ring["secret"]})  # fmt: skip
        other = control({"op": "shm.open", "publisher_id": 2, "pid": bystander.pid})
        assert ingest.reap_once() == 0  # both alive; the mapper is now verified
    finally:
        kill(bystander)
        if mapper is not None:
            kill(mapper)
    assert ingest.reap_once() == 1  # the verified one; the bystander never mapped ring 2
    assert set(ingest.snapshot()["rings"]) == {"2"}
    invisible = next(pid for pid in range(4_000_000, 4_100_000) if process_start(pid) is None)
    control({"op": "shm.open", "publisher_id": 2, "pid": invisible, "secret": other["secret"]})
    assert ingest.reap_once(now=time.monotonic() + FAR) == 0  # unknown: not dead


def test_open_validates_pid_lock_and_ring(make_ingest: Callable[..., ShmIngest]) -> None:
    control = local_control(make_ingest())
    for body, message in [
        ({"pid": 0}, "pid must be in"),
        ({"pid": "1"}, "pid must be an integer"),
        ({"lock": 1}, "lock must be true or false"),
        ({"ring": 5}, "ring must be a ring name"),
        ({"ring": "hft-ring-nope"}, "publisher 1 has no ring named hft-ring-nope"),
    ]:
        with pytest.raises(ControlError, match=message):
            control({"op": "shm.open", "publisher_id": 1, **body})
    reply = control({"op": "shm.open", "publisher_id": 1, "pid": None, "lock": None})
    mine = {"publisher_id": 1, "secret": reply["secret"]}
    assert control({"op": "shm.open", **mine, "ring": reply["name"]}) == reply
    control({"op": "shm.close", **mine})
    with pytest.raises(ControlError, match=r"it was closed by shm\.close"):
        control({"op": "shm.open", "publisher_id": 1, "ring": reply["name"]})


def test_liveness_primitives(tmp_path: Path) -> None:
    path = tmp_path / "ring"
    path.write_bytes(bytes(4096))
    probe = os.open(path, os.O_RDWR)
    try:
        assert not lock_held(probe)
        with ShmLock(path):
            assert lock_held(probe)
        assert not lock_held(probe)
    finally:
        os.close(probe)
    assert process_start(os.getpid()) is not None
    me = Holder.declared(os.getpid(), lock=False)
    assert me.pid_state() is PidState.ALIVE
    assert Holder.declared(None, lock=True).pid_state() is PidState.UNKNOWN
    zombie = child("pass")
    wait_until(lambda: process_start(zombie.pid) is None, "the child to exit", DEADLINE_S)
    assert zombie.wait(DEADLINE_S) == 0  # a zombie until reaped: already counted as gone
    zombie.communicate()
    stat = path.stat()
    assert not maps_file(os.getpid(), stat.st_dev, stat.st_ino)


class ShmLock:
    """A shared flock on a file, as ShmPublisher holds on its ring."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
