"""A single-producer / single-consumer ring of fixed-size slots over any writable buffer.

Why a pure layout module: the same bytes serve the shared-memory transport (a file in /dev/shm
mapped by the appliance and by one publisher process) and the RDMA transport (a registered
memory region written remotely). This module only knows offsets and the publication protocol;
who allocates, names and maps the buffer is the transport's business. The byte table is in
docs/wire-format.md ("Shared-memory ring layout").

Layout: a 4096-byte header page, then `slots` slots of `slot_bytes` bytes each. Every field
that one side writes and the other reads sits on its own 64-byte cache line, so the producer's
stores never invalidate the line the consumer spins on and the other way round. Each slot is
`[slot sequence u64 | frame length u32 | reserved u32 | message bytes]`: the message (one or
more wire frames) starts 16 bytes into a 64-byte aligned slot, so float64 payloads are 8-byte
aligned and `np.frombuffer` views them in place.

Publication protocol (the invariants everything else relies on):
- Positions count slots from 0 and never wrap; position `p` lives in slot `p % slots`.
- The producer writes the length word and the message bytes of position `p` first and the slot
  sequence `p + 1` LAST. The consumer applies slot `p` only when it reads exactly `p + 1` there,
  so a slot whose writer died between the payload and the sequence is never applied.
- The consumer advances `consumer_position` (one aligned 8-byte store) only after the message
  was decoded and handed to the sink, which copies the values; from then on the producer may
  overwrite that slot. Credits: the producer writes position `p` only while
  `p - consumer_position < slots`.
- Memory ordering: on x86-64 (TSO) stores become visible to other cores in program order and
  loads are not reordered with older loads, and every store here is a separate C-level store
  (memoryview item or slice assignment, each its own interpreter call that the C compiler cannot
  reorder across), so "payload, then sequence" on one side and "sequence, then payload" on the
  other is enough, and aligned 8-byte stores are atomic. On a weakly ordered CPU (ARM, POWER)
  this module issues no fences: a reader could see the sequence before the payload. The CRC32C
  of every frame still detects such a torn read, so the frame is rejected (and reported in the
  status log), never applied with wrong values; a port to such a CPU needs release/acquire
  fences around the sequence word.

Doorbell (optional, a latency hint, never needed for correctness): before the consumer blocks
(after its busy-poll budget) it sets `consumer_sleeping`, looks at its next slot once more,
and only then blocks, for at most its current back-off pause. A producer that sees the flag
after publishing wakes it (the shared-memory transport: one byte into a FIFO). x86-64 may
reorder a store with a later load, so both sides can miss each other; the wake-up is then late
by at most that pause, which is what a consumer without a doorbell always pays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from transport.ingest import Outcome
from transport.wire import FIXED_HEADER_BYTES, Reason, peek_identity

RING_MAGIC = b"HFTRING\x00"
RING_VERSION = 1
HEADER_BYTES = 4096
CACHE_LINE = 64
SLOT_HEADER_BYTES = 16
MIN_SLOT_BYTES = 128
MAX_SLOT_BYTES = 1 << 30  # the frame length is a u32
MAX_SLOTS = 1 << 24
LOG_ENTRIES = 64
LOG_ENTRY_BYTES = 32

# Byte offsets in the header page (all fields little-endian; see docs/wire-format.md).
OFF_MAGIC = 0
OFF_VERSION = 8  # u32
OFF_HEADER_BYTES = 12  # u32
OFF_SLOTS = 16  # u32
OFF_SLOT_BYTES = 20  # u32
OFF_SLOT_HEADER_BYTES = 24  # u32
OFF_LOG_ENTRIES = 28  # u32
OFF_TOTAL_BYTES = 32  # u64
OFF_PUBLISHER_ID = 40  # u64
OFF_PRODUCER_POSITION = 64  # u64, producer's line (informational)
OFF_PRODUCER_PID = 72  # u64, producer's line (informational)
OFF_CONSUMER_POSITION = 128  # u64, consumer's line: the credits
OFF_APPLIED_SEQUENCE = 192  # u64, consumer status line
OFF_REJECTED_TOTAL = 200  # u64, consumer status line: rejections ever logged
OFF_CONSUMER_STATE = 256  # u64, consumer liveness line
OFF_CONSUMER_GENERATION = 264  # u64
OFF_CONSUMER_SLEEPING = 272  # u64, consumer liveness line: 1 while it may block (doorbell)
OFF_LOG = 1024  # LOG_ENTRIES x [position u64 | wire sequence u64 | reason u32 | 0 u32 | 0 u64]

STATE_NONE = 0  # no consumer attached yet
STATE_RUNNING = 1
STATE_CLOSED = 2  # the appliance stopped or closed the ring: nothing written now is applied

# Word (u64) indices of the fields above, for the memoryview cast to "Q".
_W_PRODUCER_POSITION = OFF_PRODUCER_POSITION // 8
_W_PRODUCER_PID = OFF_PRODUCER_PID // 8
_W_CONSUMER_POSITION = OFF_CONSUMER_POSITION // 8
_W_APPLIED_SEQUENCE = OFF_APPLIED_SEQUENCE // 8
_W_REJECTED_TOTAL = OFF_REJECTED_TOTAL // 8
_W_CONSUMER_STATE = OFF_CONSUMER_STATE // 8
_W_CONSUMER_GENERATION = OFF_CONSUMER_GENERATION // 8
_W_CONSUMER_SLEEPING = OFF_CONSUMER_SLEEPING // 8
_W_LOG = OFF_LOG // 8
_W_LOG_ENTRY = LOG_ENTRY_BYTES // 8
_W_HEADER = HEADER_BYTES // 8
_LENGTH_MASK = 0xFFFFFFFF
_SYMBOL_LEN_OFFSET = 10  # of a wire frame's fixed header (transport/wire.py)

assert OFF_LOG + LOG_ENTRIES * LOG_ENTRY_BYTES <= HEADER_BYTES


class RingError(Exception):
    """The buffer does not hold a usable ring (bad magic, version, geometry or size)."""


@dataclass(frozen=True, slots=True)
class RingGeometry:
    """Slot count and size of a ring; everything else follows from them."""

    slots: int
    slot_bytes: int

    def __post_init__(self) -> None:
        check_geometry(self.slots, self.slot_bytes)

    @property
    def total_bytes(self) -> int:
        """Header page plus slots: a multiple of 64, and of 4096 when slot_bytes * slots is."""
        return HEADER_BYTES + self.slots * self.slot_bytes

    @property
    def frame_capacity(self) -> int:
        """The largest message one slot holds (publishers split batches to fit)."""
        return self.slot_bytes - SLOT_HEADER_BYTES


@dataclass(frozen=True, slots=True)
class RingRejection:
    """One entry of the consumer's rejection log: a message it did not apply, and why."""

    position: int  # ring position of the slot
    sequence: int  # wire sequence of the frame (untrusted if the message did not decode)
    reason: Reason


def check_geometry(slots: int, slot_bytes: int) -> None:
    """ValueError unless slots is a power of two and slot_bytes a multiple of 64, in range."""
    if isinstance(slots, bool) or not isinstance(slots, int):
        raise ValueError(f"slots must be an integer, got {slots!r}")
    if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int):
        raise ValueError(f"slot_bytes must be an integer, got {slot_bytes!r}")
    if not 2 <= slots <= MAX_SLOTS or slots & (slots - 1):
        raise ValueError(f"slots must be a power of two in 2..{MAX_SLOTS}, got {slots}")
    if not MIN_SLOT_BYTES <= slot_bytes <= MAX_SLOT_BYTES or slot_bytes % CACHE_LINE:
        raise ValueError(
            f"slot_bytes must be a multiple of {CACHE_LINE} in {MIN_SLOT_BYTES}..{MAX_SLOT_BYTES}"
            f", got {slot_bytes}"
        )


def _views(buffer: object, size: int) -> tuple[memoryview, memoryview]:
    """(bytes view, u64 view) of the first `size` bytes of a writable buffer."""
    if sys.byteorder != "little":
        raise RingError("the ring layout is little-endian; this host is big-endian")
    raw = memoryview(buffer)  # type: ignore[arg-type]
    if raw.readonly:
        raw.release()
        raise RingError("the ring buffer must be writable")
    data = raw.cast("B")
    raw.release()
    if len(data) < size:
        have = len(data)
        data.release()
        raise RingError(f"buffer holds {have} bytes; the ring needs {size}")
    view = data[:size]
    data.release()
    return view, view.cast("Q")


def init_ring(buffer: object, geometry: RingGeometry, publisher_id: int = 0) -> None:
    """Write a fresh header and clear every slot sequence (creator only, before sharing).

    The slot sequences are cleared so that no stale sequence from an earlier use of the memory
    can equal `position + 1` for a position not yet written.
    """
    data, words = _views(buffer, geometry.total_bytes)
    try:
        data[:HEADER_BYTES] = bytes(HEADER_BYTES)
        data[OFF_MAGIC : OFF_MAGIC + 8] = RING_MAGIC
        for offset, value in (
            (OFF_VERSION, RING_VERSION), (OFF_HEADER_BYTES, HEADER_BYTES),
            (OFF_SLOTS, geometry.slots), (OFF_SLOT_BYTES, geometry.slot_bytes),
            (OFF_SLOT_HEADER_BYTES, SLOT_HEADER_BYTES), (OFF_LOG_ENTRIES, LOG_ENTRIES),
        ):  # fmt: skip
            data[offset : offset + 4] = value.to_bytes(4, "little")
        words[OFF_TOTAL_BYTES // 8] = geometry.total_bytes
        words[OFF_PUBLISHER_ID // 8] = publisher_id
        for slot in range(geometry.slots):
            words[_W_HEADER + slot * (geometry.slot_bytes // 8)] = 0
    finally:
        words.release()
        data.release()


def read_geometry(buffer: object) -> RingGeometry:
    """Validate the header of an existing ring and return its geometry (RingError if bad)."""
    data, words = _views(buffer, HEADER_BYTES)
    try:
        if bytes(data[OFF_MAGIC : OFF_MAGIC + 8]) != RING_MAGIC:
            raise RingError(f"not a ring: magic {bytes(data[:8])!r}, expected {RING_MAGIC!r}")

        def u32(offset: int) -> int:
            return int.from_bytes(data[offset : offset + 4], "little")

        if u32(OFF_VERSION) != RING_VERSION:
            raise RingError(f"ring version {u32(OFF_VERSION)}; this code reads {RING_VERSION}")
        if (u32(OFF_HEADER_BYTES), u32(OFF_SLOT_HEADER_BYTES), u32(OFF_LOG_ENTRIES)) != (
            HEADER_BYTES, SLOT_HEADER_BYTES, LOG_ENTRIES,
        ):  # fmt: skip
            raise RingError("ring header sizes differ from this version's layout")
        try:
            geometry = RingGeometry(u32(OFF_SLOTS), u32(OFF_SLOT_BYTES))
        except ValueError as exc:
            raise RingError(f"ring geometry is invalid: {exc}") from None
        if words[OFF_TOTAL_BYTES // 8] != geometry.total_bytes:
            raise RingError("ring total size does not match its slot count and size")
        return geometry
    finally:
        words.release()
        data.release()


class _RingView:
    """Shared plumbing: validated views over the buffer and the header words both sides read."""

    def __init__(self, buffer: object) -> None:
        self.geometry = read_geometry(buffer)
        self.slots = self.geometry.slots
        self.slot_bytes = self.geometry.slot_bytes
        self.frame_capacity = self.geometry.frame_capacity
        self._mask = self.slots - 1
        self._slot_words = self.slot_bytes // 8
        self._data, self._words = _views(buffer, self.geometry.total_bytes)

    def slot_word(self, position: int) -> int:
        """u64 index of the sequence word of the slot holding `position`."""
        return _W_HEADER + (position & self._mask) * self._slot_words

    @property
    def consumer_position(self) -> int:
        return self._words[_W_CONSUMER_POSITION]

    @property
    def producer_position(self) -> int:
        """The producer's own record (informational: may lag the slots by one publication)."""
        return self._words[_W_PRODUCER_POSITION]

    @property
    def consumer_state(self) -> int:
        return self._words[_W_CONSUMER_STATE]

    @property
    def consumer_generation(self) -> int:
        return self._words[_W_CONSUMER_GENERATION]

    @property
    def consumer_sleeping(self) -> bool:
        """The consumer may be blocked waiting for a doorbell (see "Doorbell" below)."""
        return self._words[_W_CONSUMER_SLEEPING] != 0

    @property
    def applied_sequence(self) -> int:
        """The consumer's `applied` (highest finished wire sequence) after its last message."""
        return self._words[_W_APPLIED_SEQUENCE]

    @property
    def rejected_total(self) -> int:
        return self._words[_W_REJECTED_TOTAL]

    def release(self) -> None:
        """Drop the views so the owner can close or unmap the buffer. Idempotent."""
        self._words.release()
        self._data.release()


class RingProducer(_RingView):
    """The publishing side. Attaching resumes after the last published slot.

    Resuming: a producer that died may have published slots the consumer has not reached yet,
    and may have left one slot half written. Scanning forward from the consumer position while
    each slot holds its own `position + 1` finds the first unpublished position exactly; the
    half-written slot (payload without sequence) is that position, and the next write
    overwrites it. Only one producer may be attached at a time (nothing enforces it).
    """

    def __init__(self, buffer: object, *, pid: int = 0) -> None:
        super().__init__(buffer)
        words = self._words
        position = start = words[_W_CONSUMER_POSITION]
        while position - start < self.slots and words[self.slot_word(position)] == position + 1:
            position += 1
        self.position = position  # next position to write
        self.resumed_at = position
        self.rejections_seen = words[_W_REJECTED_TOTAL]  # cursor into the rejection log
        words[_W_PRODUCER_PID] = pid
        words[_W_PRODUCER_POSITION] = position

    def last_published(self) -> tuple[int, int]:
        """(publisher id, wire sequence) of the first frame of the last published slot.

        (0, 0) for an empty ring. The slot is intact: it was published, and it cannot have been
        overwritten since only this producer writes and it has not written there yet.
        """
        if self.position == 0:
            return 0, 0
        base = self.slot_word(self.position - 1) * 8 + SLOT_HEADER_BYTES
        return peek_identity(self._data[base : base + self.frame_capacity])

    def has_credit(self) -> bool:
        return self.position - self._words[_W_CONSUMER_POSITION] < self.slots

    def stage(self, message: bytes | bytearray | memoryview) -> bool:
        """Write length and bytes of the next slot without publishing it; False if no credit.

        Split from `commit` so a caller (or a test simulating a crash) can stop in between.
        """
        length = len(message)
        if length > self.frame_capacity:
            raise ValueError(f"{length}-byte message; a slot holds {self.frame_capacity}")
        position = self.position
        if position - self._words[_W_CONSUMER_POSITION] >= self.slots:
            return False
        word = self.slot_word(position)
        start = word * 8 + SLOT_HEADER_BYTES
        self._words[word + 1] = length  # length u32 | reserved u32 = 0
        self._data[start : start + length] = message
        return True

    def commit(self) -> None:
        """Publish the staged slot: its sequence word is the last store (see module docstring)."""
        position = self.position + 1
        self._words[self.slot_word(self.position)] = position
        self._words[_W_PRODUCER_POSITION] = position
        self.position = position

    def try_write(self, message: bytes | bytearray | memoryview) -> bool:
        """Stage and commit one message; False (nothing written) when the ring is full."""
        if not self.stage(message):
            return False
        self.commit()
        return True

    def take_rejections(self) -> tuple[list[RingRejection], int]:
        """Rejections logged since the last call, and how many were lost to log overflow.

        Call when the consumer is idle for this ring (after it caught up), so no entry is being
        rewritten while it is read. Entries for positions before this producer attached belong
        to a previous producer and are skipped.
        """
        words = self._words
        total = words[_W_REJECTED_TOTAL]
        first = max(self.rejections_seen, total - LOG_ENTRIES)
        lost = first - self.rejections_seen
        found: list[RingRejection] = []
        for index in range(first, total):
            entry = _W_LOG + (index % LOG_ENTRIES) * _W_LOG_ENTRY
            position = words[entry]
            if position >= self.resumed_at:
                reason = words[entry + 2] & _LENGTH_MASK
                found.append(RingRejection(position, words[entry + 1], _reason(reason)))
        self.rejections_seen = total
        return found, lost

    def symbol_at(self, position: int) -> str:
        """The symbol of the first frame in the slot of `position`, or "" if it was overwritten
        since or does not hold a readable symbol (used to name rejected frames)."""
        word = self.slot_word(position)
        if self._words[word] != position + 1:  # a newer position overwrote it
            return ""
        start = word * 8 + SLOT_HEADER_BYTES
        length = self._words[word + 1] & _LENGTH_MASK
        if not FIXED_HEADER_BYTES <= length <= self.frame_capacity:
            return ""
        symbol_len = min(self._data[start + _SYMBOL_LEN_OFFSET], length - FIXED_HEADER_BYTES)
        symbol_start = start + FIXED_HEADER_BYTES
        raw = bytes(self._data[symbol_start : symbol_start + symbol_len])
        return raw.decode("utf-8", errors="replace")


class RingConsumer(_RingView):
    """The applying side: `poll` applies every published slot in order through `process`.

    `process` is `FrameProcessor.process_message` (or anything with its contract: never raises,
    one outcome per frame or one for an undecodable message). It receives a view into the slot;
    the values it hands to the sink alias ring memory, so the sink must copy them (the store
    does) and keep no reference once it returns.
    """

    def __init__(self, buffer: object, process: Callable[[memoryview], list[Outcome]]) -> None:
        super().__init__(buffer)
        self._process = process
        self.position = self._words[_W_CONSUMER_POSITION]
        self._rejected = self._words[_W_REJECTED_TOTAL]
        self.oversized = 0  # slots whose length word exceeded the slot (a broken producer)
        self._words[_W_CONSUMER_GENERATION] += 1
        self._words[_W_CONSUMER_SLEEPING] = 0
        self._words[_W_CONSUMER_STATE] = STATE_RUNNING

    def pending(self) -> bool:
        """A published slot waits at the consumer position."""
        word = _W_HEADER + (self.position & self._mask) * self._slot_words
        return self._words[word] == self.position + 1

    def set_sleeping(self, sleeping: bool) -> None:
        """Tell producers whether this consumer may be blocked (ring the doorbell if so)."""
        self._words[_W_CONSUMER_SLEEPING] = 1 if sleeping else 0

    def poll(self, budget: int = 64) -> int:
        """Apply up to `budget` published slots; return how many. The hot path: no allocation
        beyond decoding, no locks, no logging (the processor throttles its own warnings)."""
        words = self._words
        data = self._data
        mask, slot_words, capacity = self._mask, self._slot_words, self.frame_capacity
        position = self.position
        done = 0
        while done < budget:
            word = _W_HEADER + (position & mask) * slot_words
            if words[word] != position + 1:
                break
            # Loads after the sequence load: see "Memory ordering" in the module docstring.
            length = words[word + 1] & _LENGTH_MASK
            start = word * 8 + SLOT_HEADER_BYTES
            if length > capacity:
                self.oversized += 1
                self._log_rejection(position, 0, Reason.BAD_LENGTH)
            else:
                outcomes = self._process(data[start : start + length])
                for outcome in outcomes:
                    if not outcome.ok:
                        self._log_rejection(position, outcome.sequence, outcome.reason)
                words[_W_APPLIED_SEQUENCE] = outcomes[-1].applied
            position += 1
            done += 1
            # The credit goes back only now, after the sink copied the values out of the slot.
            words[_W_CONSUMER_POSITION] = position
        self.position = position
        return done

    def _log_rejection(self, position: int, sequence: int, reason: Reason) -> None:
        """Entry first, then the total that makes it visible (same rule as slot sequences)."""
        entry = _W_LOG + (self._rejected % LOG_ENTRIES) * _W_LOG_ENTRY
        words = self._words
        words[entry] = position
        words[entry + 1] = sequence
        words[entry + 2] = int(reason)
        self._rejected += 1
        words[_W_REJECTED_TOTAL] = self._rejected

    def close(self) -> None:
        """Tell the producer that nothing written from now on will be applied."""
        self._words[_W_CONSUMER_STATE] = STATE_CLOSED


def _reason(code: int) -> Reason:
    try:
        return Reason(code)
    except ValueError:
        return Reason.INTERNAL
