"""The appliance side of the shared-memory transport: rings on request, one poller thread.

Why files in /dev/shm mapped with `mmap` rather than `multiprocessing.shared_memory`: that
class registers every segment with Python's resource tracker in each process that attaches, and
the tracker of a publisher that exits unlinks the appliance's segment and warns about a "leak".
A plain file in a tmpfs directory has no such side effects, its path is what a publisher in any
language opens, and the mapping is page-aligned, so it can be registered as an RDMA memory
region or page-locked for a GPU as it is.

Ownership: the appliance creates, sizes (with `posix_fallocate`, so a full /dev/shm is a clear
refusal at `shm.open` rather than a SIGBUS on first write), maps and unlinks every ring; a
publisher only maps it. Files are created 0600: only the appliance's user can publish.

Threads: control handlers run on the ZeroMQ control thread, the poller on its own thread. The
registry is guarded by a lock, but the poller never takes it per frame: it iterates a tuple of
bound `poll` methods that the handlers replace wholesale (copy on write). A ring being closed is
moved to a `retired` list and unmapped by the poller itself at the start of its next pass, so a
ring is never unmapped while the poller is inside it.

Doorbell: after its busy-poll budget (`spin_us`) the poller blocks instead of sleeping blindly:
it marks every ring `consumer_sleeping`, looks at each once more, and waits on a FIFO next to
the rings (`hft-bell-<pid>-<random>`, 0600, its path in the `shm.open` reply) for at most its
back-off pause. A publisher that sees the flag after publishing writes one byte there, so a
frame sent to an idle appliance waits for one wake-up rather than up to `backoff_max_us`, and an
idle appliance still costs no CPU. The FIFO is a hint: a publisher that never rings (or a missed
ring, see `transport.shm.ring`) is applied at the end of the pause, as without a doorbell.

Reclaim (why rings do not pile up): a publisher that exits without `shm.close` used to leave
its ring, and its slot in `max_rings`, until the appliance stopped. A reaper thread now looks at
every ring once per `check_interval_s` and reclaims the ring of a publisher that has gone (the
lock or pid rule of `transport.shm.liveness`) or, whatever its publisher, that saw no frame and
no `shm.open` for `idle_reclaim_s` (0: never), except a ring whose publisher still holds its
lock: a live, attached publisher keeps its ring however quiet it is. Reclaiming is `shm.close`
done by the appliance: the ring leaves the registry (its slot is free at once) and goes to the
poller, which applies what it holds, marks it closed, unmaps and unlinks it. Nothing of this
runs on the frame path: the poller's only cost is the `_retired` test it always made. A ring
is not judged for `attach_grace_s` after an `shm.open`, the time its publisher needs to map
and lock it. Its name is remembered, so a late `shm.open` naming it (`ring`) gets a clear
error instead of a new, empty ring.

Ownership (docs/security.md): a ring belongs to the client that opened it. `shm.open` returns a
random 128-bit `secret`; re-attaching (`shm.open` naming an id that has a ring) and `shm.close`
need it, so knowing a publisher id (GET /ingest shows them to admins) takes nothing over. With
`[auth] mode = "token"` the ring also records its owner's token: only that token may re-attach
or close it, it counts against the token's `max_rings_per_token`, and a frame for a symbol the
token may not access is rejected (FORBIDDEN, content error) by a sink wrapped per ring.

Sequence rules: one `FrameProcessor` per ring, `strict_order=False`: nobody resends on a ring,
and a lossless ring cannot have gaps, but duplicates or garbage from a buggy producer are still
counted and reported in the ring's rejection log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import select
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transport.control import Caller, ControlError, ControlHandler, int_field
from transport.ingest import FrameProcessor, Sink, add_totals
from transport.ownership import check_owner, new_secret, owner_sink, rings_per_token
from transport.polling import run_poll_loop
from transport.shm.liveness import Holder, lock_held
from transport.shm.ring import (
    MIN_SLOT_BYTES,
    RingConsumer,
    RingGeometry,
    init_ring,
)
from transport.wire import MAX_SEQUENCE

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = Path("/dev/shm")
NAME_PREFIX = "hft-ring-"  # then "<pid>-<random>-<n>": the pid lets a later start sweep stale ones
TRANSPORT = "shm"
POLL_BUDGET = 64  # slots per ring per pass, so one busy ring cannot starve the others
BELL_PREFIX = "hft-bell-"  # the doorbell FIFO: then "<pid>-<random>", swept like the rings
BELL_DRAIN_BYTES = 4096
CHECK_INTERVAL_S = 1.0  # how often the reaper looks at every ring
ATTACH_GRACE_S = 5.0  # after shm.open, time for the publisher to map and lock the ring
GONE_NAMES = 1024  # names of closed or reclaimed rings remembered for a late shm.open
RECLAIM_REASONS = ("gone", "idle")
MAX_PID = (1 << 31) - 1


@dataclass(eq=False)
class _Ring:
    """One publisher's ring: its file, mapping, consumer and sequence state."""

    publisher_id: int
    name: str
    path: Path
    geometry: RingGeometry
    memory: mmap.mmap
    processor: FrameProcessor
    consumer: RingConsumer
    fd: int  # kept open: the reaper probes the publisher's lock through it
    device: int
    inode: int
    secret: str = field(default_factory=new_secret)  # re-attach and close need it
    owner: str | None = None  # the opening token's name (auth on), else None
    # Liveness, read and written under ShmIngest._lock (control thread and reaper):
    holder: Holder = field(default_factory=Holder)
    attached_at: float = 0.0  # monotonic time of the last shm.open
    active_at: float = 0.0  # when the reaper last saw consumer_position move
    seen_position: int = 0
    ended: str = ""  # how it ended, for the one log line (closed, stopped, reclaimed...)

    def attach(self, holder: Holder, now: float) -> None:
        """A (re-)attaching publisher: its liveness replaces the previous one's."""
        self.holder = holder
        self.attached_at = now

    def describe(self, doorbell: Path | None = None) -> dict[str, Any]:
        """The `shm.open` reply (`doorbell`: the FIFO to wake the poller, when it has one)."""
        return {
            "publisher_id": self.publisher_id,
            "name": self.name,
            "path": str(self.path),
            "size": self.geometry.total_bytes,
            "slots": self.geometry.slots,
            "slot_bytes": self.geometry.slot_bytes,
            "doorbell": str(doorbell) if doorbell is not None else None,
            "secret": self.secret,
        }

    def counters(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "slots": self.geometry.slots,
            "slot_bytes": self.geometry.slot_bytes,
            "consumer_position": self.consumer.position,
            "producer_position": self.consumer.producer_position,
            "oversized": self.consumer.oversized,
            **self.processor.counters.snapshot(),
        }

    def drain(self) -> None:
        """Apply whatever the producer published before the ring goes away."""
        while self.consumer.poll(POLL_BUDGET):
            pass

    def destroy(self) -> None:
        """Mark closed, unmap and unlink. Only the thread that polls may call this."""
        self.consumer.close()
        self.consumer.release()
        try:
            self.memory.close()
        except BufferError:
            # A view escaped (a sink kept values); the mapping is freed when it is collected.
            log.warning("ring %s still referenced at close; unmapped later", self.name)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


class ShmIngest:
    """Creates rings over the control socket and applies their frames on one poller thread."""

    def __init__(
        self,
        sink: Sink,
        *,
        slots: int = 1024,
        slot_bytes: int = 65_536,
        max_slots: int = 65_536,
        max_slot_bytes: int = 1 << 20,
        max_rings: int = 64,
        spin_us: int = 200,
        backoff_max_us: int = 1_000,
        directory: str | os.PathLike[str] = DEFAULT_DIRECTORY,
        idle_reclaim_s: float = 600.0,
        max_rings_per_token: int = 0,
        check_interval_s: float = CHECK_INTERVAL_S,
        attach_grace_s: float = ATTACH_GRACE_S,
    ) -> None:
        self.default_geometry = checked_defaults(
            slots, slot_bytes, max_slots, max_slot_bytes, max_rings, spin_us, backoff_max_us
        )
        if idle_reclaim_s < 0 or check_interval_s <= 0 or attach_grace_s < 0:
            raise ValueError("idle_reclaim_s and attach_grace_s must be >= 0, check_interval_s > 0")
        self.idle_reclaim_s = idle_reclaim_s  # 0: never reclaim for idleness
        self.check_interval_s = check_interval_s
        self.attach_grace_s = attach_grace_s
        self.sink = sink
        self.max_slots = max_slots
        self.max_slot_bytes = max_slot_bytes
        self.max_rings = max_rings
        self.max_rings_per_token = max_rings_per_token  # 0: only max_rings (auth on only)
        self.spin_us = spin_us
        self.backoff_max_us = backoff_max_us
        self.directory = Path(directory)
        # pid and a random token keep names unique across appliances sharing /dev/shm.
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._prefix = f"{NAME_PREFIX}{self._token}"
        self._open_lock = threading.Lock()  # serializes control ops (see _handle_open)
        self._lock = threading.Lock()
        self._rings: dict[int, _Ring] = {}  # publisher id -> ring; under _lock
        self._retired: list[_Ring] = []  # closed, to be unmapped by the poller; under _lock
        self._pollers: tuple[Any, ...] = ()  # bound RingConsumer.poll of every open ring
        self._consumers: tuple[RingConsumer, ...] = ()  # the same rings, for the doorbell flag
        self._bell_path: Path | None = None  # the doorbell FIFO, once start() made it
        self._bell_fd: int | None = None
        self._closed_totals: Counter[str] = Counter()
        # Rings out of the registry whose counters are not in _closed_totals yet (draining):
        # snapshot() counts them too, so a total never steps back while a ring is retired (a
        # Prometheus counter that decreases reads as a restart). id(ring) -> ring; under _lock.
        self._retiring: dict[int, _Ring] = {}
        self._reclaimed: Counter[str] = Counter({reason: 0 for reason in RECLAIM_REASONS})
        self._gone: OrderedDict[str, str] = OrderedDict()  # ring name -> how it ended; _lock
        self._created = 0
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._reaper_stop = threading.Event()
        self._running = False
        self._stopped = False

    # -- control handlers (ZeroMQ control thread) --------------------------------------------

    def control_handlers(self) -> dict[str, ControlHandler]:
        return {"shm.open": self._handle_open, "shm.close": self._handle_close}

    def _handle_open(self, request: dict[str, Any], caller: Caller | None) -> dict[str, Any]:
        publisher_id, geometry = requested_ring(
            request, self.default_geometry, self.max_slots, self.max_slot_bytes
        )
        holder = declared_holder(request)  # reads /proc: before any lock is taken
        wanted = request.get("ring")
        if wanted is not None and not isinstance(wanted, str):
            raise ControlError(f"ring must be a ring name (string), got {wanted!r}")
        # Control ops are serialized by _open_lock; _lock (which GET /ingest and the poller's
        # retirement take) is held only around registry reads and writes, never while a file
        # is allocated and pre-faulted (tens of ms for a large ring).
        with self._open_lock:
            with self._lock:
                if self._stopped:
                    raise ControlError("the shared-memory transport is stopping")
                existing = self._rings.get(publisher_id)
                if wanted is not None:
                    self._check_wanted(publisher_id, wanted, existing)
                if existing is not None:
                    check_owner(existing.publisher_id, existing.secret, existing.owner, request,
                                caller)  # fmt: skip
                    check_reattach(existing.publisher_id, existing.geometry, request)
                    # Under _lock: the reaper decides under it too, so it either sees this
                    # attach (and keeps the ring) or reclaimed the ring before (not found).
                    existing.attach(holder, time.monotonic())
                    return existing.describe(self._bell_path)
                self._check_room(caller)
            ring = self._create(publisher_id, geometry, owner_sink(self.sink, caller))
            ring.owner = caller.name if caller is not None else None
            with self._lock:
                stopped = self._stopped
                if not stopped:
                    now = time.monotonic()
                    ring.attach(holder, now)
                    ring.active_at = now
                    self._rings[publisher_id] = ring
                    self._publish_pollers()
            if stopped:
                ring.destroy()
                raise ControlError("the shared-memory transport is stopping")
        log.info(
            "shared-memory ring created",
            extra={"transport": TRANSPORT, "publisher_id": publisher_id, "ring": ring.name,
                   "slots": geometry.slots, "slot_bytes": geometry.slot_bytes},
        )  # fmt: skip
        return ring.describe(self._bell_path)

    def _check_wanted(self, publisher_id: int, name: str, existing: _Ring | None) -> None:
        """`shm.open` with `ring`: re-attach to exactly that ring, or a clear refusal (under
        _lock). A client holding the name of a reclaimed ring must not be handed a new, empty
        ring as if it were the old one."""
        if existing is not None and existing.name == name:
            return
        ended = self._gone.get(name)
        if ended is not None:
            raise ControlError(
                f"ring {name} no longer exists: it was {ended}; send shm.open without `ring` "
                "for a new ring"
            )
        raise ControlError(f"publisher {publisher_id} has no ring named {name}")

    def _forget(self, ring: _Ring, ended: str) -> None:
        """Remember how a ring left the registry, for a late `shm.open` naming it (_lock)."""
        ring.ended = ended
        self._gone[ring.name] = ended
        while len(self._gone) > GONE_NAMES:
            self._gone.popitem(last=False)

    def _check_room(self, caller: Caller | None) -> None:
        """Refuse a new ring at max_rings, or at the caller's max_rings_per_token (under _lock;
        re-attaching is always allowed)."""
        if len(self._rings) >= self.max_rings:
            raise ControlError(
                f"{len(self._rings)} rings are open; transport.shm.max_rings is "
                f"{self.max_rings} (close one with shm.close)"
            )
        rings_per_token(
            "shm", caller, self.max_rings_per_token, (r.owner for r in self._rings.values())
        )

    def _handle_close(self, request: dict[str, Any], caller: Caller | None) -> dict[str, Any]:
        publisher_id = int_field(request, "publisher_id", 0, MAX_SEQUENCE)
        with self._open_lock:
            with self._lock:
                ring = self._rings.get(publisher_id)
                if ring is None:
                    return {"closed": False}
                check_owner(publisher_id, ring.secret, ring.owner, request, caller)
                del self._rings[publisher_id]
                self._retiring[id(ring)] = ring
                self._forget(ring, "closed by shm.close")
                self._publish_pollers()
                deferred = self._running
                if deferred:
                    self._retired.append(ring)  # the poller drains and unmaps it
            if not deferred:
                self._retire(ring)  # no poller thread: nobody else touches the ring
        return {"closed": True}

    def _create(self, publisher_id: int, geometry: RingGeometry, sink: Sink) -> _Ring:
        """File, size, map, initialise (under _open_lock only)."""
        self._created += 1
        name = f"{self._prefix}-{self._created}"
        path = self.directory / name
        size = geometry.total_bytes
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ControlError(f"cannot create ring file {path}: {exc.strerror}") from None
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                hint = " (is /dev/shm too small?)" if exc.errno == errno.ENOSPC else ""
                raise ControlError(
                    f"cannot allocate {size} bytes for ring {path}: {exc.strerror}{hint}"
                ) from None
            # MAP_POPULATE pre-faults the pages: no page fault on the poller's first lap.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            memory = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            stat = os.fstat(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise
        # The descriptor stays open for the ring's life: the reaper probes the publisher's
        # flock through it (see transport.shm.liveness); destroy() closes it.
        init_ring(memory, geometry, publisher_id)
        processor = FrameProcessor(sink, TRANSPORT, strict_order=False)
        consumer = RingConsumer(memory, processor.process_message)
        return _Ring(
            publisher_id, name, path, geometry, memory, processor, consumer,
            fd, stat.st_dev, stat.st_ino,
        )  # fmt: skip

    def _publish_pollers(self) -> None:
        """Replace the poller's tuple (a single reference store; called under the lock)."""
        self._pollers = tuple(ring.consumer.poll for ring in self._rings.values())
        self._consumers = tuple(ring.consumer for ring in self._rings.values())

    def _retire(self, ring: _Ring) -> None:
        """Drain, keep its counters in the totals, unmap and unlink (poller thread or stopped)."""
        ring.drain()
        with self._lock:  # snapshot() copies the totals under the same lock
            add_totals(self._closed_totals, ring.processor.counters.snapshot())
            self._retiring.pop(id(ring), None)
        ring.destroy()
        log.info(
            "shared-memory ring %s %s", ring.name, ring.ended or "closed",
            extra={"transport": TRANSPORT, "publisher_id": ring.publisher_id, "ring": ring.name},
        )  # fmt: skip

    # -- poller thread ------------------------------------------------------------------------

    def start(self) -> None:
        """Sweep rings left by dead appliances, then start the poller thread."""
        removed = sweep_stale_rings(self.directory)
        if removed:
            log.info(
                "removed %d ring file(s) of appliances that are no longer running", removed,
                extra={"transport": TRANSPORT, "directory": str(self.directory)},
            )  # fmt: skip
        with self._lock:
            if self._thread is not None or self._stopped:
                raise RuntimeError("ShmIngest.start() may be called once")
            self._open_bell()
            self._running = True
            self._thread = threading.Thread(target=self._run, name="shm-poller", daemon=True)
            self._thread.start()
            self._reaper = threading.Thread(target=self._reap, name="shm-reaper", daemon=True)
            self._reaper.start()

    def poll_once(self) -> int:
        """One pass over every ring (the poller's unit of work; also for tests without it)."""
        if self._retired:
            self._release_retired()
        work = 0
        for poll in self._pollers:
            work += poll(POLL_BUDGET)
        return work

    def _run(self) -> None:
        run_poll_loop(
            self.poll_once, lambda: self._running,
            spin_us=self.spin_us, backoff_max_us=self.backoff_max_us, transport=TRANSPORT,
            idle_wait=self._idle_wait,
        )  # fmt: skip

    # -- reaper thread ------------------------------------------------------------------------

    def _reap(self) -> None:
        """Every `check_interval_s`: `reap_once`. Never raises (a failure is logged)."""
        while not self._reaper_stop.wait(self.check_interval_s):
            try:
                self.reap_once()
            except Exception:
                log.exception("shared-memory reaper pass failed", extra={"transport": TRANSPORT})

    def reap_once(self, now: float | None = None) -> int:
        """Reclaim the rings whose publisher has gone or that stayed idle; return how many.

        The verdicts are taken under _lock, so a ring in the registry is still mapped and its
        descriptor open (it is removed before it is retired), and an `shm.open` re-attaching
        it is either seen (attached_at moved: kept) or comes after (a new ring). Cost per ring
        and pass: one flock probe (two system calls) for a lock holder, else a read of
        /proc/<pid>/stat (and, until the pid is verified, of /proc/<pid>/maps): microseconds,
        on this thread; the poller only finds the ring in `_retired` on its next pass.
        """
        now = time.monotonic() if now is None else now
        doomed: list[_Ring] = []
        with self._lock:
            if self._stopped:
                return 0
            for ring in self._rings.values():
                verdict = self._verdict(ring, now)
                if verdict is not None:
                    reason, detail = verdict
                    self._reclaimed[reason] += 1
                    self._forget(ring, f"reclaimed: {detail}")
                    doomed.append(ring)
            if not doomed:
                return 0
            for ring in doomed:
                del self._rings[ring.publisher_id]
                self._retiring[id(ring)] = ring
            self._publish_pollers()
            deferred = self._running
            if deferred:
                self._retired.extend(doomed)  # the poller drains and unmaps them
        if not deferred:
            for ring in doomed:  # no poller thread: nobody else touches the ring
                self._retire(ring)
        return len(doomed)

    def _verdict(self, ring: _Ring, now: float) -> tuple[str, str] | None:
        """(reason, detail) if `ring` is to be reclaimed now, else None (under _lock)."""
        position = ring.consumer.position  # the poller's int: a racy read is fine here
        if position != ring.seen_position:
            ring.seen_position, ring.active_at = position, now
        if now - ring.attached_at < self.attach_grace_s:
            return None  # its publisher may not have mapped and locked it yet
        holder = ring.holder
        if holder.lock and lock_held(ring.fd):
            return None  # a live publisher maps it: kept, however quiet
        if holder.gone(ring.device, ring.inode):
            return "gone", f"its publisher{holder.describe()} has gone"
        quiet = now - max(ring.attached_at, ring.active_at)
        if self.idle_reclaim_s and quiet >= self.idle_reclaim_s:
            return "idle", f"no frame and no shm.open for {quiet:.0f} s"
        return None

    def _open_bell(self) -> None:
        """Create the doorbell FIFO; without one (a filesystem without FIFOs) the poller sleeps
        its back-off pauses as before and the `shm.open` reply names no doorbell."""
        path = self.directory / f"{BELL_PREFIX}{self._token}"
        try:
            os.mkfifo(path, 0o600)
            # Read and write: the FIFO always has a writer (this end), so it never reports
            # end-of-file (readable forever) when a publisher closes its end.
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            path.unlink(missing_ok=True)
            log.warning(
                "no shared-memory doorbell (%s): an idle poller wakes only after its pause",
                exc, extra={"transport": TRANSPORT, "path": str(path)},
            )  # fmt: skip
            return
        self._bell_path, self._bell_fd = path, fd

    def _close_bell(self) -> None:
        if self._bell_fd is not None:
            os.close(self._bell_fd)
            self._bell_fd = None
        if self._bell_path is not None:
            self._bell_path.unlink(missing_ok=True)
            self._bell_path = None

    def _idle_wait(self, timeout_s: float) -> None:
        """The poller's back-off pause: block on the doorbell for at most `timeout_s`.

        Every ring is flagged `consumer_sleeping` first and looked at once more, so a frame
        published before a producer could see the flag is not left waiting for the pause.
        """
        fd = self._bell_fd
        consumers = self._consumers
        if fd is None or not consumers:
            time.sleep(timeout_s)
            return
        for consumer in consumers:
            consumer.set_sleeping(True)
        try:
            for consumer in consumers:
                if consumer.pending():
                    return
            if select.select((fd,), (), (), timeout_s)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, BELL_DRAIN_BYTES)
        finally:
            for consumer in consumers:
                consumer.set_sleeping(False)

    def _release_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for ring in retired:
            self._retire(ring)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling, apply what was published, mark every ring closed, unmap and unlink."""
        with self._lock:
            self._stopped = True
            self._running = False
            thread = self._thread
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout_s)
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.error(
                    "shared-memory poller did not stop in %.1f s; rings left mapped",
                    timeout_s, extra={"transport": TRANSPORT},
                )  # fmt: skip
                return
        self._close_bell()
        with self._lock:
            rings = [*self._retired, *self._rings.values()]
            self._retiring.update((id(ring), ring) for ring in self._rings.values())
            self._retired = []
            self._rings = {}
            self._pollers = ()
            self._consumers = ()
        for ring in rings:
            ring.ended = ring.ended or "closed: the appliance stopped"
            self._retire(ring)

    def snapshot(self, show_ring_ids: bool = True) -> dict[str, Any]:
        """Counters per open ring (keyed by publisher id), totals including closed rings, and
        `rings_reclaimed` by reason (`gone`, `idle`).

        Without `show_ring_ids` (a caller that is not an admin) `rings` is a list of the
        counters without publisher ids or ring names: nothing that names a ring to attack.

        Read under the lock: a ring in the registry is never unmapped (it is removed first),
        so its header can be read; the counters themselves are the poller's, read racily.
        """
        with self._lock:
            per_ring = {str(ring.publisher_id): ring.counters() for ring in self._rings.values()}
            totals = Counter(self._closed_totals)
            reclaimed = dict(self._reclaimed)
            retiring = [ring.processor.counters.snapshot() for ring in self._retiring.values()]
        for counters in (*per_ring.values(), *retiring):
            add_totals(totals, counters)
        rings: dict[str, Any] | list[dict[str, Any]] = per_ring
        if not show_ring_ids:
            rings = [redacted(counters) for counters in per_ring.values()]
        return {
            "rings_open": len(per_ring), "rings": rings, "totals": dict(totals),
            "rings_reclaimed": reclaimed,
        }  # fmt: skip


def redacted(counters: dict[str, Any]) -> dict[str, Any]:
    """A ring's counters without what identifies it (its name holds no secret, but names the
    file a same-user process could open)."""
    return {key: value for key, value in counters.items() if key != "name"}


def checked_defaults(
    slots: int, slot_bytes: int, max_slots: int, max_slot_bytes: int,
    max_rings: int, spin_us: int, backoff_max_us: int,
) -> RingGeometry:  # fmt: skip
    """The default ring of a ring transport, after checking its limits (ValueError)."""
    RingGeometry(max_slots, max_slot_bytes)  # validates both limits
    default = RingGeometry(slots, slot_bytes)
    if slots > max_slots or slot_bytes > max_slot_bytes:
        raise ValueError("default slots / slot_bytes exceed max_slots / max_slot_bytes")
    if max_rings < 1 or spin_us < 0 or backoff_max_us < 1:
        raise ValueError("max_rings and backoff_max_us must be >= 1, spin_us >= 0")
    return default


def requested_ring(
    request: dict[str, Any], default: RingGeometry, max_slots: int, max_slot_bytes: int
) -> tuple[int, RingGeometry]:
    """The publisher id and ring size of an open request (`shm.open`, `rdma.open`), checked
    against the limits; ControlError says what is wrong."""
    publisher_id = int_field(request, "publisher_id", 0, MAX_SEQUENCE)
    slots = int_field(request, "slots", 2, max_slots, default.slots)
    slot_bytes = int_field(
        request, "slot_bytes", MIN_SLOT_BYTES, max_slot_bytes, default.slot_bytes
    )
    try:
        return publisher_id, RingGeometry(slots, slot_bytes)
    except ValueError as exc:
        raise ControlError(str(exc)) from None


def declared_holder(request: dict[str, Any]) -> Holder:
    """What an `shm.open` says about its publisher: `pid` (optional, its process id as it sees
    it) and `lock` (optional, true: it holds a shared flock on the ring file while mapped)."""
    pid = request.get("pid")
    if pid is not None:
        pid = int_field(request, "pid", 1, MAX_PID)
    lock = request.get("lock")
    lock = False if lock is None else lock
    if not isinstance(lock, bool):
        raise ControlError(f"lock must be true or false, got {lock!r}")
    return Holder.declared(pid, lock)


def check_reattach(publisher_id: int, have: RingGeometry, request: dict[str, Any]) -> None:
    """A re-opened ring keeps its size: sizes in the request must match it or be left out."""
    for key, value in (("slots", have.slots), ("slot_bytes", have.slot_bytes)):
        if request.get(key) is not None and request[key] != value:
            raise ControlError(
                f"publisher {publisher_id} already has a ring of {have.slots} slots x "
                f"{have.slot_bytes} bytes; re-open it with those sizes or none"
            )


def sweep_stale_rings(directory: Path) -> int:
    """Unlink ring files (and doorbell FIFOs) whose creating process is gone (an appliance
    killed with SIGKILL cannot unlink them, and tmpfs keeps them until reboot). Returns how
    many."""
    removed = 0
    for prefix in (NAME_PREFIX, BELL_PREFIX):
        for path in directory.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix) :].split("-", 1)[0]
            if not pid_text.isdigit() or _process_exists(int(pid_text)):
                continue
            with contextlib.suppress(FileNotFoundError, PermissionError):
                path.unlink()
                removed += 1
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
