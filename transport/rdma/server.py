"""The appliance side of RDMA ingest: rings written by one-sided RDMA, one verbs thread.

Why the shared-memory ring again: a publisher on another host writes whole slots straight into
the appliance's memory with RDMA WRITE WITH IMMEDIATE, so the ring layout, the sequence rules
and the consumer (`transport.shm.ring`) are the same bytes and the same code as on one host.
What differs is how the consumer learns that a slot is complete:

- On one host the consumer trusts the slot's sequence word, written last. An RDMA write gives
  no order among its own bytes, so here a slot is read only after its completion arrived: a
  receive completion with the slot's position (low 32 bits) as immediate data. Completions on
  one queue pair arrive in order, so `pending` completions mean exactly the next `pending`
  positions are whole, and the consumer polls that many. A completion whose slot does not hold
  its own sequence, a wrong immediate, or any other opcode is a broken publisher: its queue pair
  is stopped, the appliance and the other publishers go on.
- Credits: the consumer position goes back to the publisher by an RDMA WRITE of 8 bytes into
  the publisher's copy of the ring header (`consumer_position`), from a staging word that is
  not touched while that write is in flight (so the device never reads a half-updated value).
  At most one credit write per queue pair is in flight; a newer position goes when it completes.
- Every WRITE WITH IMMEDIATE consumes a posted receive; `slots` receives are posted up front and
  one is re-posted per completion, and a publisher cannot have more than `slots` unconsumed
  writes (credits), so it never meets an empty receive queue.

Isolation: each ring has its own protection domain, and the queue pair of its publisher lives
in it, so a publisher can reach no other ring whatever rkey it tries. Within its ring, the slots
are registered for remote write only and the header page for remote read only (the publisher
reads status and the rejection log; it cannot forge them).

Threads: every verbs object is created, polled and destroyed on the one poller thread. Control
requests (`rdma.open`, `rdma.connect`, `rdma.close`, from the ZeroMQ control thread) are queued
to it and answered when it has run them, so no lock guards the hot path. The control socket is
not authenticated: whoever reaches it can open, take over (same publisher id) or close rings, as
with shared memory; keep it on a trusted network.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import queue
import socket
import threading
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

from transport.control import Caller, ControlError, ControlHandler, int_field
from transport.ingest import FrameProcessor, Sink, add_totals
from transport.ownership import check_owner, new_secret, owner_sink, rings_per_token
from transport.polling import run_poll_loop
from transport.rdma import verbs as rdma_verbs
from transport.rdma.verbs import Port, QpInfo, RdmaUnavailable
from transport.shm.ring import (
    HEADER_BYTES,
    RingConsumer,
    RingGeometry,
    init_ring,
)
from transport.shm.server import check_reattach, checked_defaults, requested_ring
from transport.wire import MAX_SEQUENCE

log = logging.getLogger(__name__)

TRANSPORT = "rdma"
POLL_BUDGET = 64  # completions per queue pair per pass
CONTROL_TIMEOUT_S = 5.0
SCRATCH_BYTES = 4096  # per link: the credit staging word and the receives' landing place
_IMM_MASK = 0xFFFFFFFF
_WORD = ctypes.c_uint64


@dataclass(eq=False)
class _Ring:
    """One publisher's ring in appliance memory, in a protection domain of its own."""

    publisher_id: int
    geometry: RingGeometry
    memory: mmap.mmap
    anchor: Any  # ctypes view pinning the mapping's address while it is registered
    pd: Any
    header_region: Any  # the header page: remote read
    slots_region: Any  # the slots: remote write
    processor: FrameProcessor
    consumer: RingConsumer
    link: _Link | None = None
    secret: str = field(default_factory=new_secret)  # re-attach, connect and close need it
    owner: str | None = None  # the opening token's name (auth on)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.anchor)

    def describe(self) -> dict[str, Any]:
        return {
            "publisher_id": self.publisher_id,
            "slots": self.geometry.slots,
            "slot_bytes": self.geometry.slot_bytes,
            "size": self.geometry.total_bytes,
            # Where a (re)connecting publisher starts, and its wire numbering so far.
            "position": self.consumer.position,
            "last_sequence": self.consumer.applied_sequence,
            "secret": self.secret,
        }

    def counters(self) -> dict[str, Any]:
        link = self.link
        return {
            "slots": self.geometry.slots,
            "slot_bytes": self.geometry.slot_bytes,
            "consumer_position": self.consumer.position,
            "connected": link is not None and link.failure == "",
            "writes": link.writes if link else 0,
            "credit_writes": link.credit_writes if link else 0,
            "oversized": self.consumer.oversized,
            **self.processor.counters.snapshot(),
        }


@dataclass(eq=False)
class _Link:
    """A queue pair connected to one publisher, and what polling it needs."""

    ring: _Ring
    qp: Any
    cq: Any
    scratch: Any  # MR with the credit staging word at 0
    recv_wr: Any
    credit_wr: Any
    credit_word: Any  # ctypes u64 over the staging word
    c: SimpleNamespace
    pending: int = 0  # write completions whose slots are not consumed yet
    credited: int = 0  # consumer position last sent to the publisher
    credit_in_flight: bool = False
    writes: int = 0
    credit_writes: int = 0
    failure: str = ""  # why the link stopped ("" while healthy)
    psn: int = 0  # our first packet sequence number, told to the publisher

    def take(self, wc: Any) -> str:
        """Account for one completion; the problem it shows ("" if none). Shared by `poll` and
        `drain`, so a slot is counted only on a successful, well-announced write."""
        c = self.c
        if wc.status != c.IBV_WC_SUCCESS:
            return f"completion error (status {wc.status}, opcode {wc.opcode})"
        if wc.opcode == c.IBV_WC_RECV_RDMA_WITH_IMM:
            expected = (self.ring.consumer.position + self.pending) & _IMM_MASK
            announced = socket.ntohl(wc.imm_data)
            if announced != expected:
                return f"write announced slot {announced}, not {expected}"
            self.pending += 1
            self.writes += 1
            return ""
        if wc.opcode == c.IBV_WC_RDMA_WRITE:
            self.credit_in_flight = False
            return ""
        return f"unexpected operation (completion opcode {wc.opcode})"

    def poll(self) -> int:
        """Reap completions, apply the slots they announce, return credits. The hot path."""
        consumer = self.ring.consumer
        count, completions = self.cq.poll(POLL_BUDGET)
        problem = ""
        for wc in completions:
            before = self.pending
            problem = self.take(wc)
            if problem:
                break
            if self.pending != before:
                self.qp.post_recv(self.recv_wr)  # one receive back for the one consumed
        # Slots announced before a problem are whole: apply them either way.
        done = consumer.poll(self.pending) if self.pending else 0
        self.pending -= done
        if self.pending and not problem:
            problem = f"slot {consumer.position} was written without its sequence word"
        if problem:
            self.pending = 0  # what follows a broken announcement is not trusted
            return self.fail(problem) + done
        if not self.credit_in_flight and consumer.position != self.credited:
            self._send_credit(consumer.position)
        return count + done

    def _send_credit(self, position: int) -> None:
        # The staging word changes only here, while no credit write reads it.
        self.credit_word.value = position
        self.qp.post_send(self.credit_wr)
        self.credit_in_flight = True
        self.credited = position
        self.credit_writes += 1

    def fail(self, why: str) -> int:
        if not self.failure:
            self.failure = why
            log.warning(
                "RDMA publisher %d stopped: %s", self.ring.publisher_id, why,
                extra={"transport": TRANSPORT, "publisher_id": self.ring.publisher_id},
            )  # fmt: skip
        return 0

    def drain(self) -> None:
        """Apply every slot whose write completed, once the queue pair is stopped: the same
        checks as `poll`, up to the first flushed or suspect completion; after a protocol
        failure nothing more is applied."""
        settled = bool(self.failure)
        while not settled:
            _, completions = self.cq.poll(POLL_BUDGET)
            if not completions:
                break
            for wc in completions:
                if self.take(wc):
                    settled = True  # flushed receives follow the last completed write
                    break
        if self.pending and not self.failure:
            self.pending -= self.ring.consumer.poll(self.pending)
        self.pending = 0

    def close(self) -> None:
        # The work requests and SGEs are never closed: the SendWR's sg_list points into an
        # SGE's memory, and closing both would free it twice (pyverbs frees neither on GC).
        for resource in (self.qp, self.cq, self.scratch):
            with contextlib.suppress(Exception):
                resource.close()


class RdmaIngest:
    """Rings for RDMA publishers, created over the control socket, polled on one thread."""

    def __init__(
        self,
        sink: Sink,
        *,
        device: str = "",
        port: int = 1,
        gid_index: int = 1,
        slots: int = 256,
        slot_bytes: int = 65_536,
        max_slots: int = 4096,
        max_slot_bytes: int = 1 << 20,
        max_rings: int = 16,
        max_rings_per_token: int = 0,
        max_total_bytes: int = 1 << 30,
        spin_us: int = 200,
        backoff_max_us: int = 1_000,
    ) -> None:
        if max_total_bytes < 1:
            raise ValueError("max_total_bytes must be >= 1")
        self.max_total_bytes = max_total_bytes
        self.default_geometry = checked_defaults(
            slots, slot_bytes, max_slots, max_slot_bytes, max_rings, spin_us, backoff_max_us
        )
        self.sink = sink
        self.device, self.port_number, self.gid_index = device, port, gid_index
        self.max_slots, self.max_slot_bytes, self.max_rings = max_slots, max_slot_bytes, max_rings
        self.max_rings_per_token = max_rings_per_token  # 0: only max_rings (auth on only)
        self.spin_us, self.backoff_max_us = spin_us, backoff_max_us
        self.port: Port | None = None
        self._rings: dict[int, _Ring] = {}  # changed by the poller thread under _lock
        self._lock = threading.Lock()  # registry + closed totals, for snapshot()
        self._links: tuple[_Link, ...] = ()
        self._requests: queue.SimpleQueue[tuple[Any, dict[str, Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._closed_totals: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._running = False

    def open(self) -> None:
        """Load pyverbs and open the device; RdmaUnavailable says what is missing."""
        verbs = rdma_verbs.load()
        self.port = Port(verbs, self.device, self.port_number, self.gid_index)
        log.info(
            "RDMA device %s port %d open (GID %s)", self.port.device, self.port_number,
            self.port.gid, extra={"transport": TRANSPORT},
        )  # fmt: skip

    # -- control (ZeroMQ control thread) ------------------------------------------------------

    def control_handlers(self) -> dict[str, ControlHandler]:
        ops = {"rdma.open": self._open_ring, "rdma.connect": self._connect,
               "rdma.disconnect": self._disconnect, "rdma.close": self._close_ring}  # fmt: skip
        return {op: self._queued(handler) for op, handler in ops.items()}

    def _queued(self, handler: Any) -> ControlHandler:
        """A control handler that runs `handler(request, caller)` on the poller thread."""
        return lambda request, caller: self._on_poller(partial(handler, caller=caller), request)

    def _on_poller(self, handler: Any, request: dict[str, Any]) -> dict[str, Any]:
        """Run `handler(request)` on the poller thread; inline only before it ever started
        (tests and tools that poll by hand), never beside a poller that is stopping."""
        thread = self._thread
        if thread is None:
            if self.port is None:
                raise ControlError("the RDMA transport is not running")
            return handler(request)
        if not thread.is_alive() or not self._running:
            raise ControlError("the RDMA transport is stopping")
        future: Future[dict[str, Any]] = Future()
        self._requests.put((handler, request, future))
        try:
            return future.result(CONTROL_TIMEOUT_S)
        except FutureTimeout:
            if future.cancel():  # not started: it never will be
                raise ControlError("the RDMA poller did not answer in time") from None
            return future.result()  # it is running now: its answer is close

    def _run_requests(self) -> None:
        while True:
            try:
                handler, request, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up on it
            try:
                future.set_result(handler(request))
            except BaseException as exc:  # the control thread re-raises it
                future.set_exception(exc)

    def _refuse_requests(self) -> None:
        """Answer whatever was queued while the poller stopped."""
        while True:
            try:
                _, _, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(ControlError("the RDMA transport is stopping"))

    def _owned(self, request: dict[str, Any], caller: Caller | None) -> tuple[int, _Ring | None]:
        """The request's publisher id and ring, once the caller proved it owns it."""
        publisher_id = int_field(request, "publisher_id", 0, MAX_SEQUENCE)
        ring = self._rings.get(publisher_id)
        if ring is not None:
            check_owner(publisher_id, ring.secret, ring.owner, request, caller)
        return publisher_id, ring

    def _open_ring(self, request: dict[str, Any], caller: Caller | None) -> dict[str, Any]:
        """rdma.open: the ring of `publisher_id`, created or (same id again, with its secret)
        re-attached."""
        publisher_id, geometry = requested_ring(
            request, self.default_geometry, self.max_slots, self.max_slot_bytes
        )
        _, ring = self._owned(request, caller)
        if ring is not None:
            check_reattach(publisher_id, ring.geometry, request)
            self._unlink(ring)  # a restarted publisher: the old queue pair goes first
            return ring.describe()
        self._check_room(geometry)
        rings_per_token(
            "rdma", caller, self.max_rings_per_token, (r.owner for r in self._rings.values())
        )
        ring = self._create_ring(publisher_id, geometry, owner_sink(self.sink, caller))
        ring.owner = caller.name if caller is not None else None
        with self._lock:
            self._rings[publisher_id] = ring
        log.info(
            "RDMA ring created", extra={"transport": TRANSPORT, "publisher_id": publisher_id,
                                        "slots": geometry.slots,
                                        "slot_bytes": geometry.slot_bytes},
        )  # fmt: skip
        return ring.describe()

    def _check_room(self, geometry: RingGeometry) -> None:
        """Refuse a ring beyond max_rings, max_total_bytes (registered memory is pinned) or the
        device's receive-queue depth, before any memory is touched."""
        if len(self._rings) >= self.max_rings:
            raise ControlError(
                f"{len(self._rings)} RDMA rings are open; transport.rdma.max_rings is "
                f"{self.max_rings}"
            )
        used = sum(ring.geometry.total_bytes for ring in self._rings.values())
        if used + geometry.total_bytes > self.max_total_bytes:
            raise ControlError(
                f"a {geometry.total_bytes}-byte ring would bring RDMA rings to "
                f"{used + geometry.total_bytes} bytes; transport.rdma.max_total_bytes is "
                f"{self.max_total_bytes}"
            )
        port = self._port()
        if geometry.slots > port.max_qp_wr:
            raise ControlError(
                f"{geometry.slots} slots exceed this device's {port.max_qp_wr} receives per "
                "queue pair"
            )

    def _create_ring(self, publisher_id: int, geometry: RingGeometry, sink: Sink) -> _Ring:
        port = self._port()
        c = port.c
        size = geometry.total_bytes
        try:  # anonymous shared mapping: page-aligned, zero-filled, pre-faulted
            memory = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
                               | getattr(mmap, "MAP_POPULATE", 0))  # fmt: skip
        except OSError as exc:
            raise ControlError(f"cannot allocate a {size}-byte ring: {exc.strerror}") from None
        init_ring(memory, geometry, publisher_id)
        anchor = (ctypes.c_char * size).from_buffer(memory)
        base = ctypes.addressof(anchor)
        local = c.IBV_ACCESS_LOCAL_WRITE
        registered: list[Any] = []
        try:
            pd = port.new_pd()
            registered.append(pd)
            header = port.register(base, HEADER_BYTES, local | c.IBV_ACCESS_REMOTE_READ, pd)
            registered.append(header)
            slots = port.register(base + HEADER_BYTES, size - HEADER_BYTES,
                                  local | c.IBV_ACCESS_REMOTE_WRITE, pd)  # fmt: skip
        except port.verbs.pyverbs_error.PyverbsError as exc:
            for resource in reversed(registered):
                with contextlib.suppress(Exception):
                    resource.close()
            del anchor
            memory.close()
            raise ControlError(
                f"cannot register a {size}-byte ring: {exc} (registered memory is locked: "
                "check `ulimit -l` / LimitMEMLOCK)"
            ) from None
        processor = FrameProcessor(sink, TRANSPORT, strict_order=False)
        consumer = RingConsumer(memory, processor.process_message)
        return _Ring(publisher_id, geometry, memory, anchor, pd, header, slots, processor,
                     consumer)  # fmt: skip

    def _connect(self, request: dict[str, Any], caller: Caller | None) -> dict[str, Any]:
        """rdma.connect: a queue pair to the publisher's, receives posted, ring address back."""
        publisher_id, ring = self._owned(request, caller)
        if ring is None:
            raise ControlError(f"publisher {publisher_id} has no ring: send rdma.open first")
        try:
            remote = QpInfo.from_dict(request)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        credit_addr = int_field(request, "credit_addr", 1, (1 << 64) - 1)
        credit_rkey = int_field(request, "credit_rkey", 0, _IMM_MASK)
        port = self._port()
        self._unlink(ring)  # only once the request is known to be well formed
        try:
            link = self._make_link(port, ring, remote, credit_addr, credit_rkey)
        except (ValueError, port.verbs.pyverbs_error.PyverbsError) as exc:
            raise ControlError(f"cannot connect a queue pair: {exc}") from None
        ring.link = link
        self._links = (*self._links, link)
        log.info(
            "RDMA publisher %d connected (qpn %d)", publisher_id, remote.qpn,
            extra={"transport": TRANSPORT, "publisher_id": publisher_id},
        )  # fmt: skip
        return {
            **QpInfo(link.qp.qp_num, link.psn, port.gid).to_dict(),
            "addr": ring.address, "rkey": ring.slots_region.rkey,
            "status_rkey": ring.header_region.rkey, "size": ring.geometry.total_bytes,
            "position": ring.consumer.position,
        }  # fmt: skip

    def _make_link(
        self, port: Port, ring: _Ring, remote: QpInfo, credit_addr: int, credit_rkey: int
    ) -> _Link:
        v, c = port.verbs, port.c
        slots = ring.geometry.slots
        cq = v.cq.CQ(port.context, slots + 8)
        resources: list[Any] = [cq]
        try:
            scratch = v.mr.MR(ring.pd, SCRATCH_BYTES, c.IBV_ACCESS_LOCAL_WRITE)
            resources.append(scratch)
            remote_access = c.IBV_ACCESS_REMOTE_WRITE | c.IBV_ACCESS_REMOTE_READ
            qp = port.rc_qp(cq, send_depth=4, recv_depth=slots, access=remote_access, pd=ring.pd)
            resources.append(qp)
            # Receives of WRITE WITH IMMEDIATE carry no data; the SGE is never written.
            landing = v.wr.SGE(scratch.buf + 64, 64, scratch.lkey)
            recv_wr = v.wr.RecvWR(num_sge=1, sg=[landing])
            for _ in range(slots):
                qp.post_recv(recv_wr)
            psn = rdma_verbs.new_psn()
            port.connect(qp, remote, psn)
            staging = v.wr.SGE(scratch.buf, 8, scratch.lkey)
            credit_wr = v.wr.SendWR(opcode=c.IBV_WR_RDMA_WRITE, num_sge=1, sg=[staging],
                                    send_flags=c.IBV_SEND_SIGNALED)  # fmt: skip
            credit_wr.set_wr_rdma(credit_rkey, credit_addr)
        except BaseException:
            for resource in reversed(resources):
                with contextlib.suppress(Exception):
                    resource.close()
            raise
        link = _Link(ring, qp, cq, scratch, recv_wr, credit_wr, _WORD.from_address(scratch.buf), c)
        link.credited = ring.consumer.position  # the publisher starts there (connect reply)
        link.psn = psn
        return link

    def _disconnect(self, request: dict[str, Any], caller: Caller | None) -> dict[str, Any]:
        """rdma.disconnect: a publisher leaving for now: stop its queue pair, apply what it
        completed, keep the ring for its return (`rdma.open` with the same id)."""
        _, ring = self._owned(request, caller)
        if ring is None or ring.link is None:
            return {"disconnected": False}
        self._unlink(ring)
        return {"disconnected": True}

    def _close_ring(self, request: dict[str, Any], caller: Caller | None) -> dict[str, Any]:
        """rdma.close: drain and forget the publisher's ring."""
        _, ring = self._owned(request, caller)
        if ring is None:
            return {"closed": False}
        self._destroy(ring)
        return {"closed": True}

    def _unlink(self, ring: _Ring) -> None:
        """Stop the ring's queue pair, apply what it completed, release it."""
        link = ring.link
        if link is None:
            return
        ring.link = None
        self._links = tuple(other for other in self._links if other is not link)
        with contextlib.suppress(Exception):
            self._port().to_error(link.qp)
        link.drain()
        link.close()

    def _destroy(self, ring: _Ring) -> None:
        """Drain, fold its counters into the totals (in one step with leaving the registry, so
        GET /ingest never counts it twice or not at all), release everything."""
        self._unlink(ring)
        with self._lock:
            self._rings.pop(ring.publisher_id, None)
            add_totals(self._closed_totals, ring.processor.counters.snapshot())
        ring.consumer.close()
        ring.consumer.release()
        for resource in (ring.slots_region, ring.header_region, ring.pd):
            with contextlib.suppress(Exception):
                resource.close()
        ring.anchor = None
        try:
            ring.memory.close()
        except BufferError:
            log.warning("RDMA ring of publisher %d still referenced at close", ring.publisher_id)

    def _port(self) -> Port:
        if self.port is None:
            raise ControlError("the RDMA device is not open")
        return self.port

    # -- poller thread ------------------------------------------------------------------------

    def start(self) -> None:
        if self.port is None:
            raise RuntimeError("RdmaIngest.open() must succeed before start()")
        if self._thread is not None:
            raise RuntimeError("RdmaIngest.start() may be called once")
        self._running = True
        self._thread = threading.Thread(target=self._run, name="rdma-poller", daemon=True)
        self._thread.start()

    def poll_once(self) -> int:
        """Control requests, then every link once; a failed link is stopped and released (its
        ring stays for a reconnect)."""
        self._run_requests()
        work = 0
        for link in self._links:
            try:
                work += link.poll()
            except Exception as exc:  # a verbs call failed: this publisher only
                link.fail(f"verbs error: {exc}")
        for link in [link for link in self._links if link.failure]:
            self._unlink(link.ring)
        return work

    def _run(self) -> None:
        run_poll_loop(
            self.poll_once, lambda: self._running,
            spin_us=self.spin_us, backoff_max_us=self.backoff_max_us, transport=TRANSPORT,
        )  # fmt: skip

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling, apply what completed, release every ring and the device."""
        self._running = False
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.error("RDMA poller did not stop in %.1f s", timeout_s)
                return
        self._refuse_requests()
        for ring in list(self._rings.values()):
            self._destroy(ring)
        if self.port is not None:
            self.port.close()
            self.port = None

    def snapshot(self, show_ring_ids: bool = True) -> dict[str, Any]:
        """Counters per ring (by publisher id; a list without ids unless `show_ring_ids`)."""
        with self._lock:
            rings = dict(self._rings)
            totals = Counter(self._closed_totals)
        per_ring = {str(pid): ring.counters() for pid, ring in rings.items()}
        for counters in per_ring.values():
            add_totals(totals, counters)
        return {
            "status": "running" if self._running else "stopped",
            "device": self.port.device if self.port else "",
            "rings_open": len(per_ring),
            "rings": per_ring if show_ring_ids else list(per_ring.values()),
            "totals": dict(totals),
        }


__all__ = ["RdmaIngest", "RdmaUnavailable"]
