"""`ShmPublisher`: the Publisher API over a shared-memory ring, for engines on the same host.

Why a ring per publisher and a control request: the appliance owns the memory (it creates,
sizes and unlinks the file), so a publisher cannot fill /dev/shm or outlive its welcome; the
publisher id names the ring, so a publisher that crashed and restarts with the same id gets the
same ring back and resumes exactly after the last slot its predecessor published (see
`RingProducer`), with its wire sequence numbers continuing from there.

Back-pressure and liveness: `publish` blocks while the ring is full, spinning briefly and then
sleeping with doubling back-off; if the consumer position does not move for `timeout_s` the
appliance is presumed dead or stuck and `PublishError` is raised. `flush` waits until the
consumer reached the producer, then reports the rejections the consumer logged in the ring
header. Both waits busy-poll for `spin_us` after the consumer position last moved before they
sleep: the default covers an apply with the write-ahead log on, so a flush normally never
sleeps. Nothing here talks to a socket after `shm.open`, except the doorbell: when the ring
says its consumer may be blocked, one byte into the appliance's FIFO wakes it (see
`transport.shm.server`).

Lifecycle: a ring counts against the appliance's `max_rings` until it is closed, so `close()`
(and leaving a `with` block) sends `shm.close` by default, and so does a `weakref.finalize`
hook when the publisher is garbage-collected or the interpreter exits without `close()`. While
attached, the publisher holds a shared `flock` on the ring file (and says so at `shm.open`,
with its pid): if the process dies, the kernel drops the lock and the appliance reclaims the
ring after applying what it holds (see `transport.shm.liveness`). `close(release=False)` keeps
the ring for a later publisher with the same id, for as long as this process lives (and, at
most, the appliance's `idle_reclaim_s`).

Ownership: `shm.open` returns the ring's `secret` (`self.secret`); a later publisher re-attaching
to the ring passes it (`secret=`), and `shm.close` sends it. With `[auth] mode = "token"` every
control request carries `token`; `curve` holds the keys for a control socket behind CURVE.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transport.control import ControlError, request
from transport.curve import CurveKeys
from transport.publisher import Publisher, PublishError, Rejection
from transport.shm.ring import STATE_CLOSED, RingError, RingProducer
from transport.wire import Reason

log = logging.getLogger(__name__)

ControlClient = Callable[[dict[str, Any]], dict[str, Any]]

FIRST_BACKOFF_S = 10e-6
SPIN_YIELD_EVERY = 64
# Busy-poll budget of a flush or a full-ring wait since the consumer last moved: above the
# appliance's apply time with the write-ahead log on (~0.1-0.5 ms on a 2-core machine), so a
# flush is answered without a sleep, which would cost a timer wake-up (~60 us or more).
DEFAULT_SPIN_US = 1_000


class RingPublisher(Publisher):
    """What every ring publisher shares (shared memory here, RDMA in `transport.rdma`): credits,
    back-pressure, flush through the consumer position and the ring's rejection log.

    A subclass attaches a `RingProducer` over its copy of the ring with `_attach`, and may hook
    `_published` (a slot was committed locally: RDMA sends it), `_progress` (called while
    waiting: RDMA reaps its completions) and `_refresh_status` (before reading the rejection
    log: RDMA reads the appliance's copy).
    """

    ring_name = ""
    _producer: RingProducer

    def __init__(
        self,
        control: str | ControlClient,
        *,
        publisher_id: int | None,
        timeout_s: float,
        spin_us: int,
        backoff_max_us: int,
        release_on_close: bool,
        token: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(publisher_id=publisher_id, max_frame_bytes=0)
        self.timeout_s = timeout_s
        self._spin_s = spin_us / 1e6
        self._backoff_max_s = backoff_max_us / 1e6
        client = endpoint_client(control, timeout_s, curve) if isinstance(control, str) else control
        self._control: ControlClient = with_token(client, token)
        # One-shot publishers (the CLI) release their ring; long-lived ones keep it so that a
        # restart with the same id re-attaches (see close()).
        self._release_on_close = release_on_close

    def close(self, release: bool | None = None) -> None:
        """Let go of the ring; with `release` (default: the constructor's `release_on_close`),
        also ask the appliance to drain and delete it."""
        if release is not None:
            self._release_on_close = release
        super().close()

    def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._control(body)
        except ControlError as exc:
            raise PublishError(f"{body['op']} refused: {exc}") from None

    def _attach(self, producer: RingProducer) -> None:
        self._producer = producer
        self.max_frame_bytes = producer.frame_capacity
        self.slots = producer.slots
        self.slot_bytes = producer.slot_bytes

    @property
    def producer_position(self) -> int:
        """Slots published so far over the ring's life (all producers of this id)."""
        return self._producer.position

    @property
    def consumer_position(self) -> int:
        """Slots the appliance has finished with (applied or rejected)."""
        return self._producer.consumer_position

    def _published(self, position: int, length: int) -> None:
        """Slot `position` holding a `length`-byte message was committed."""

    def _progress(self) -> None:
        """Called on every pass of a wait."""

    def _refresh_status(self) -> None:
        """Make the producer's view of the consumer's status and log current."""

    def _send_frame(self, sequence: int, symbol: str, frame: bytes) -> None:
        producer = self._producer
        if producer.consumer_state == STATE_CLOSED:
            raise PublishError(f"the appliance closed ring {self.ring_name}; nothing is applied")
        if not producer.has_credit():
            self._wait(producer.has_credit, None, "a free slot")
        position = producer.position
        producer.stage(frame)
        producer.commit()
        self._published(position, len(frame))

    def _flush(self, timeout: float | None) -> None:
        producer = self._producer
        target = producer.position
        self._wait(lambda: producer.consumer_position >= target, timeout, "the appliance")
        self._refresh_status()
        found, lost = producer.take_rejections()
        for entry in found:
            symbol = producer.symbol_at(entry.position)
            self.rejections.append(Rejection(entry.sequence, symbol, entry.reason))
        if lost:
            self.rejections.append(
                Rejection(0, "", Reason.NONE, f"and {lost} more not kept in the ring's log")
            )

    def _wait(self, ready: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Spin, then sleep with doubling back-off, until `ready()`.

        PublishError when the consumer has not moved for `timeout_s` (appliance dead or stuck),
        when the appliance closed the ring, or after `timeout` seconds in all.
        """
        producer = self._producer
        start = last_move = time.monotonic()
        last_position = producer.consumer_position
        backoff = FIRST_BACKOFF_S
        passes = 0
        while not ready():
            self._progress()
            now = time.monotonic()
            position = producer.consumer_position
            if position != last_position:
                last_position, last_move, backoff = position, now, FIRST_BACKOFF_S
            elif producer.consumer_state == STATE_CLOSED:
                raise PublishError(f"the appliance closed ring {self.ring_name} while waiting")
            elif now - last_move > self.timeout_s:
                raise PublishError(
                    f"waited {now - last_move:.1f} s for {what}: the appliance has not consumed "
                    f"from ring {self.ring_name} (stopped or stuck?)"
                )
            if timeout is not None and now - start > timeout:
                raise PublishError(f"flush timed out after {timeout} s waiting for {what}")
            if now - last_move < self._spin_s:
                passes += 1
                if passes % SPIN_YIELD_EVERY == 0:
                    os.sched_yield()  # not time.sleep(0): that is a ~70 us timer wait
                continue
            time.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)


class ShmPublisher(RingPublisher):
    """Publishes into a ring the appliance created for `publisher_id`. Not thread-safe.

    `control` is the appliance's ZeroMQ control endpoint, or a callable that answers control
    requests (tests, or an application that already holds the reply).
    """

    transport = "shm"
    _bell: int | None = None  # write end of the appliance's doorbell FIFO (also in _hold)

    def __init__(
        self,
        control: str | ControlClient,
        *,
        publisher_id: int | None = None,
        slots: int | None = None,
        slot_bytes: int | None = None,
        timeout_s: float = 5.0,
        spin_us: int = DEFAULT_SPIN_US,
        backoff_max_us: int = 1_000,
        release_on_close: bool = True,
        secret: str | None = None,
        token: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(
            control, publisher_id=publisher_id, timeout_s=timeout_s, spin_us=spin_us,
            backoff_max_us=backoff_max_us, release_on_close=release_on_close, token=token,
            curve=curve,
        )  # fmt: skip
        # `pid` and `lock` let the appliance reclaim the ring once this process is gone; an
        # older appliance ignores both. `secret`: re-attach to the ring this id already has.
        body: dict[str, Any] = {
            "op": "shm.open", "publisher_id": self.publisher_id,
            "slots": slots, "slot_bytes": slot_bytes, "pid": os.getpid(), "lock": True,
        }  # fmt: skip
        if secret is not None:
            body["secret"] = secret
        reply = self._call(body)
        self.secret = str(reply.get("secret") or secret or "")
        self.ring_name = str(reply["name"])
        self.ring_path = Path(reply.get("path") or Path("/dev/shm") / self.ring_name)
        memory, fd = _map(self.ring_path, int(reply["size"]))
        try:
            producer = RingProducer(memory, pid=os.getpid())
        except RingError as exc:
            memory.close()
            os.close(fd)
            raise PublishError(f"ring {self.ring_path} is unusable: {exc}") from None
        self._attach(producer)
        owner, sequence = producer.last_published()
        if owner == self.publisher_id:
            self.last_sequence = sequence  # resume the predecessor's numbering
        self._bell = _open_bell(reply.get("doorbell"))
        self._hold = _Hold(
            self._control, self.publisher_id, self.secret, memory, fd, producer, self._bell
        )
        # Runs _hold.close once: from close(), or at garbage collection or interpreter exit
        # for a publisher nobody closed. It must not reference self (it would keep it alive).
        self._finalizer = weakref.finalize(self, self._hold.close)

    def _published(self, position: int, length: int) -> None:
        """Wake the appliance's poller if it may be blocked (one byte; a hint, never needed)."""
        if self._bell is not None and self._producer.consumer_sleeping:
            try:
                os.write(self._bell, b"\x01")
            except BlockingIOError:
                pass  # the FIFO is full: a wake-up is pending already
            except OSError:
                # EPIPE: the appliance is gone (the next wait says so). Stop ringing.
                os.close(self._bell)
                self._bell = self._hold.bell = None

    def _close(self) -> None:
        self._bell = None  # closed by _hold
        self._hold.release = self._release_on_close
        self._finalizer()


class _Hold:
    """What a `ShmPublisher` holds of its ring (mapping, locked descriptor, doorbell) and how
    to let go of it, apart from the publisher so that `weakref.finalize` can run it."""

    def __init__(
        self, control: ControlClient, publisher_id: int, secret: str, memory: mmap.mmap,
        fd: int, producer: RingProducer, bell: int | None,
    ) -> None:  # fmt: skip
        self.control = control
        self.publisher_id = publisher_id
        self.secret = secret
        self.memory = memory
        self.fd = fd
        self.producer = producer
        self.bell = bell
        self.release = True

    def close(self) -> None:
        """Unmap, drop the lock, and (with `release`) send `shm.close`: best effort, since the
        appliance reclaims the ring of a publisher that has gone anyway. Never raises."""
        if self.bell is not None:
            with contextlib.suppress(OSError):
                os.close(self.bell)
            self.bell = None
        closed_by_appliance = self.producer.consumer_state == STATE_CLOSED
        self.producer.release()
        self.memory.close()
        os.close(self.fd)  # drops the flock: the appliance may now reclaim the ring
        if not self.release or closed_by_appliance:
            return
        try:
            self.control(
                {"op": "shm.close", "publisher_id": self.publisher_id, "secret": self.secret}
            )
        except Exception as exc:  # the appliance is gone or refuses: it reclaims the ring
            log.warning("shm.close for publisher %d failed: %s", self.publisher_id, exc)


def endpoint_client(
    endpoint: str, timeout_s: float, curve: CurveKeys | None = None
) -> ControlClient:
    def call(body: dict[str, Any]) -> dict[str, Any]:
        return request(endpoint, body, timeout_s=timeout_s, curve=curve)

    return call


def with_token(client: ControlClient, token: str | None) -> ControlClient:
    """`client`, adding `token` to every request (an appliance with auth on needs it)."""
    if not token:
        return client

    def call(body: dict[str, Any]) -> dict[str, Any]:
        return client({**body, "token": token})

    return call


def _open_bell(path: object) -> int | None:
    """The write end of the appliance's doorbell FIFO, or None (no doorbell: the appliance
    is older, made none, or cannot be reached; its poller then wakes after its pause)."""
    if not path:
        return None
    try:
        return os.open(str(path), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def _map(path: Path, size: int) -> tuple[mmap.mmap, int]:
    """Map the appliance's ring file (it must be on this host) and take a shared lock on it.

    The descriptor stays open (returned) because it carries the lock: the appliance reads a
    free lock as "no publisher maps this ring" (see `transport.shm.liveness`). The lock is
    taken blocking: the appliance's probe holds its own lock for microseconds only.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise PublishError(
                f"ring {path} does not exist: the appliance closed or reclaimed it (open a new "
                "one), or it runs on another host"
            ) from None
        raise PublishError(
            f"cannot open ring {path}: {exc.strerror} (the appliance must run on this host)"
        ) from None
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise PublishError(f"ring {path} holds {actual} bytes; the appliance said {size}")
        fcntl.flock(fd, fcntl.LOCK_SH)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE), fd
    except BaseException:
        os.close(fd)
        raise
