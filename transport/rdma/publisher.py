"""`RdmaPublisher`: the Publisher API over RDMA, for engines on another host of the fabric.

Why a local copy of the ring: the publisher builds each slot exactly as on shared memory, in
its own registered copy of the ring (`RingProducer`, same layout), and sends the finished slot
with one RDMA WRITE WITH IMMEDIATE to the same offset of the appliance's ring; the immediate
is the slot's position. The appliance returns credits by writing its consumer position into
this copy's header, so `RingProducer.has_credit()` works unchanged, and a slot is reused only
after the appliance consumed it, which is after the write that read it from here completed.

Send queue: writes are signalled every `signal_every` posts (a signalled completion retires
every earlier work request); once half the send queue is outstanding, each publish reaps
completions without waiting, and it waits only when the queue is full.
A failed completion means the queue pair broke (the appliance stopped, or the link went down):
`PublishError`, and the publisher must be recreated.

Flush: wait for the credits to reach the last position, then read the appliance's status lines
and rejection log (one RDMA READ into a scratch buffer, copied into the local header without
its consumer position, so a read never moves credits) and report rejections as shared memory
does.

Memory ordering assumption (as in `transport.shm.ring`): the appliance's 8-byte credit write
lands as one aligned store, which holds for x86-64 hosts and the NICs and Soft-RoCE seen here.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
from typing import Any

from transport.curve import CurveKeys
from transport.publisher import PublishError
from transport.rdma import verbs as rdma_verbs
from transport.rdma.verbs import Port, QpInfo, RdmaUnavailable
from transport.shm.publisher import ControlClient, RingPublisher
from transport.shm.ring import (
    HEADER_BYTES,
    OFF_APPLIED_SEQUENCE,
    OFF_CONSUMER_POSITION,
    SLOT_HEADER_BYTES,
    RingGeometry,
    RingProducer,
    init_ring,
)

SEND_DEPTH = 128
READ_WR_ID = 1 << 63  # wr_id of the status read (slot writes use their position)
_IMM_MASK = 0xFFFFFFFF


class RdmaPublisher(RingPublisher):
    """Publishes into the appliance's ring for `publisher_id` over an RC queue pair.

    `control` is the appliance's ZeroMQ control endpoint (or a callable answering control
    requests). `device` / `port` / `gid_index` choose the local RDMA port ("" = first device).
    Not thread-safe.
    """

    transport = "rdma"

    def __init__(
        self,
        control: str | ControlClient,
        *,
        publisher_id: int | None = None,
        slots: int | None = None,
        slot_bytes: int | None = None,
        device: str = "",
        port: int = 1,
        gid_index: int = 1,
        timeout_s: float = 5.0,
        spin_us: int = 50,
        backoff_max_us: int = 1_000,
        signal_every: int = 16,
        release_on_close: bool = False,
        secret: str | None = None,
        token: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        if not 1 <= signal_every <= SEND_DEPTH // 2:
            raise ValueError(f"signal_every must be in 1..{SEND_DEPTH // 2}")
        super().__init__(
            control, publisher_id=publisher_id, timeout_s=timeout_s, spin_us=spin_us,
            backoff_max_us=backoff_max_us, release_on_close=release_on_close, token=token,
            curve=curve,
        )  # fmt: skip
        self.secret = secret or ""  # the ring's, from rdma.open (pass it to re-attach)
        self._signal_every = signal_every
        self._resources: list[Any] = []  # closed in reverse order
        try:
            self._port = Port(rdma_verbs.load(), device, port, gid_index)
        except RdmaUnavailable as exc:
            raise PublishError(str(exc)) from None
        try:
            self._setup(slots, slot_bytes)
        except BaseException:
            self._release()
            raise

    def _owner(self) -> dict[str, str]:
        """The ring's secret for a request on it (none before the first rdma.open)."""
        return {"secret": self.secret} if self.secret else {}

    def _setup(self, slots: int | None, slot_bytes: int | None) -> None:
        port = self._port
        v, c = port.verbs, port.c
        opened = self._call({"op": "rdma.open", "publisher_id": self.publisher_id,
                             "slots": slots, "slot_bytes": slot_bytes,
                             **self._owner()})  # fmt: skip
        self.secret = str(opened.get("secret") or self.secret)
        geometry = RingGeometry(int(opened["slots"]), int(opened["slot_bytes"]))
        self.ring_name = f"rdma:{self.publisher_id}"
        size = geometry.total_bytes
        self._memory = mmap.mmap(-1, size)
        init_ring(self._memory, geometry, self.publisher_id)
        # The appliance may be past position 0 (a restart with the same id): start there.
        ctypes.c_uint64.from_buffer(self._memory, OFF_CONSUMER_POSITION).value = int(
            opened["position"]
        )
        self._anchor = (ctypes.c_char * size).from_buffer(self._memory)
        base = ctypes.addressof(self._anchor)
        local = c.IBV_ACCESS_LOCAL_WRITE
        # The appliance may write only the header page (credits); slots are sent, never received.
        self._header = self._keep(
            port.register(base, HEADER_BYTES, local | c.IBV_ACCESS_REMOTE_WRITE)
        )
        self._slots_region = self._keep(port.register(base + HEADER_BYTES, size - HEADER_BYTES,
                                                      local))  # fmt: skip
        self._scratch = self._keep(v.mr.MR(port.pd, HEADER_BYTES, local))
        self._cq = self._keep(v.cq.CQ(port.context, SEND_DEPTH + 8))
        self._qp = self._keep(port.rc_qp(self._cq, send_depth=SEND_DEPTH, recv_depth=1,
                                         access=c.IBV_ACCESS_REMOTE_WRITE))  # fmt: skip
        psn = rdma_verbs.new_psn()
        reply = self._call({
            "op": "rdma.connect", "publisher_id": self.publisher_id,
            **QpInfo(self._qp.qp_num, psn, port.gid).to_dict(),
            "credit_addr": base + OFF_CONSUMER_POSITION, "credit_rkey": self._header.rkey,
            **self._owner(),
        })  # fmt: skip
        if int(reply["size"]) != size:
            raise PublishError(f"the appliance's ring is {reply['size']} bytes, expected {size}")
        try:
            port.connect(self._qp, QpInfo.from_dict(reply), psn)
        except (ValueError, v.pyverbs_error.PyverbsError) as exc:
            raise PublishError(f"cannot connect to the appliance's queue pair: {exc}") from None
        self._attach(RingProducer(self._memory, pid=os.getpid()))
        # A slot's last write must have completed before the slot is rebuilt, so at least one
        # signalled write per half ring.
        self._signal_every = max(1, min(self._signal_every, self.slots // 2))
        self.last_sequence = int(opened["last_sequence"])  # resume the predecessor's numbering
        self._build_requests(int(reply["addr"]), int(reply["rkey"]), int(reply["status_rkey"]),
                             base)  # fmt: skip
        self._retired = self._posted = self._producer.position

    def _build_requests(self, remote: int, rkey: int, status_rkey: int, base: int) -> None:
        """One write request per slot (reused; only length, immediate and flags change) and the
        status read. Per-post Python objects would cost microseconds each."""
        v, c = self._port.verbs, self._port.c
        self._sges, self._writes = [], []
        for slot in range(self.slots):
            offset = HEADER_BYTES + slot * self.slot_bytes
            sge = v.wr.SGE(base + offset, SLOT_HEADER_BYTES, self._slots_region.lkey)
            wr = v.wr.SendWR(opcode=c.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1, sg=[sge])
            # The request now reads this SGE, so a new length needs no new object. Neither is
            # ever closed: the SendWR would free the SGE's memory a second time.
            wr.sg_list = sge
            wr.set_wr_rdma(rkey, remote + offset)
            self._sges.append(sge)
            self._writes.append(wr)
        status_length = HEADER_BYTES - OFF_CONSUMER_POSITION
        sge = v.wr.SGE(self._scratch.buf + OFF_CONSUMER_POSITION, status_length, self._scratch.lkey)
        self._read = v.wr.SendWR(wr_id=READ_WR_ID, opcode=c.IBV_WR_RDMA_READ, num_sge=1, sg=[sge],
                                 send_flags=c.IBV_SEND_SIGNALED)  # fmt: skip
        self._read.set_wr_rdma(status_rkey, remote + OFF_CONSUMER_POSITION)
        self._read_done = False
        self._signalled = c.IBV_SEND_SIGNALED

    def _keep(self, resource: Any) -> Any:
        self._resources.append(resource)
        return resource

    # -- RingPublisher hooks ------------------------------------------------------------------

    def _send_frame(self, sequence: int, symbol: str, frame: bytes) -> None:
        # Credits say the appliance consumed the slot; the device must also be done reading
        # our copy of it (its write completed) before we rebuild it.
        reused = self._producer.position - self.slots
        if self._retired <= reused:
            self._progress()
            if self._retired <= reused:
                self._wait(lambda: self._retired > reused, None, "the slot's last write")
        super()._send_frame(sequence, symbol, frame)

    def _published(self, position: int, length: int) -> None:
        if self._posted - self._retired >= SEND_DEPTH // 2:
            self._progress()  # reap without waiting: the queue rarely fills
            if not self._send_queue_has_room():
                self._wait(self._send_queue_has_room, None, "room in the send queue")
        slot = position & (self.slots - 1)
        wr = self._writes[slot]
        self._sges[slot].length = SLOT_HEADER_BYTES + length
        wr.imm_data = socket.htonl(position & _IMM_MASK)
        wr.wr_id = position
        wr.send_flags = self._signalled if position % self._signal_every == 0 else 0
        try:
            self._qp.post_send(wr)
        except self._port.verbs.pyverbs_error.PyverbsError as exc:
            raise PublishError(f"cannot post an RDMA write: {exc}") from None
        self._posted = position + 1

    def _send_queue_has_room(self) -> bool:
        return self._posted - self._retired < SEND_DEPTH - 1

    def _progress(self) -> None:
        """Reap send completions: retire writes, note the status read, surface a broken QP."""
        count, completions = self._cq.poll(16)
        if not count:
            return
        c = self._port.c
        for wc in completions:
            if wc.status != c.IBV_WC_SUCCESS:
                raise PublishError(
                    f"RDMA work request failed (status {wc.status}): the appliance's queue pair "
                    "is gone (appliance stopped or link down); create a new publisher"
                )
            if wc.wr_id == READ_WR_ID:
                self._read_done = True
            else:
                self._retired = max(self._retired, wc.wr_id + 1)

    def _refresh_status(self) -> None:
        """Read the appliance's status lines and log, copy all but the credits into ours."""
        self._read_done = False
        try:
            self._qp.post_send(self._read)
        except self._port.verbs.pyverbs_error.PyverbsError as exc:
            raise PublishError(f"cannot read the appliance's ring status: {exc}") from None
        self._wait(lambda: self._read_done, None, "the status read")
        status = ctypes.string_at(
            self._scratch.buf + OFF_APPLIED_SEQUENCE, HEADER_BYTES - OFF_APPLIED_SEQUENCE
        )
        ctypes.memmove(ctypes.addressof(self._anchor) + OFF_APPLIED_SEQUENCE, status, len(status))

    # -- closing ------------------------------------------------------------------------------

    def _close(self) -> None:
        # The appliance first: it applies what completed and stops listening, then the queue
        # pair goes. Without release the ring stays for a publisher with the same id.
        try:
            if self._release_on_close:
                self._call({"op": "rdma.close", "publisher_id": self.publisher_id,
                            **self._owner()})  # fmt: skip
            else:
                with contextlib.suppress(PublishError):  # a courtesy: the appliance may be gone
                    self._call({"op": "rdma.disconnect", "publisher_id": self.publisher_id,
                                **self._owner()})  # fmt: skip
        finally:
            self._release()

    def _release(self) -> None:
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.release()
        for resource in reversed(self._resources):
            with contextlib.suppress(Exception):
                resource.close()
        self._resources = []
        self._anchor = None
        memory = getattr(self, "_memory", None)
        if memory is not None:
            memory.close()
        with contextlib.suppress(Exception):
            self._port.close()
