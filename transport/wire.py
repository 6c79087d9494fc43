"""The binary frame format shared by every transport (ZeroMQ, shared memory, RDMA).

Why this shape (byte table and a worked example in docs/wire-format.md):
- Self-delimiting: a frame says its own header length and value count, so several frames can be
  packed into one message or one ring slot and split again without a separate index.
- The header is padded to a multiple of 8 bytes, so the float64 payload of a frame is 8-byte
  aligned whenever the frame starts on an 8-byte boundary, and `np.frombuffer` views it without
  copying.
- Version 2 adds an optional timestamp column (FLAG_TIMESTAMPS): `count` int64 ns since the
  epoch after the `count` float64 values, so both columns stay 8-byte aligned and are viewed in
  place. Version 1 frames (no column) are still written for batches without timestamps, byte for
  byte as before, so old publishers and old decoders keep working.
- CRC32C (hardware path via the `crc32c` package) covers the whole frame, header and payload, with
  the CRC field itself taken as zero. A torn write, a bit flip or a wrong length is detected
  before anything of the frame reaches the store.

Decoding never reads out of bounds and raises exactly one exception type, `WireError`, which
carries a `Reason` code that the transports send back in nacks.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

import crc32c
import numpy as np

MAGIC = b"HFTW"
VERSION = 1  # what every frame without a timestamp column is written as
VERSION_TIMESTAMPS = 2  # a DATA frame that may carry FLAG_TIMESTAMPS
_VERSIONS = (VERSION, VERSION_TIMESTAMPS)

MAX_SYMBOL_BYTES = 64
MAX_SEQUENCE = (1 << 64) - 1

# magic, version, kind, flags, header_len, symbol_len, reason, count,
# publisher_id, sequence, applied, crc32c, reserved
_FIXED = struct.Struct("<4sBBHHBBIQQQII")
FIXED_HEADER_BYTES = _FIXED.size  # 48
_CRC_OFFSET = 40
_ZERO_CRC = b"\x00\x00\x00\x00"
VALUE_BYTES = 8
TIMESTAMP_BYTES = 8

assert FIXED_HEADER_BYTES == 48


class Kind(enum.IntEnum):
    """Frame type (byte 5)."""

    DATA = 1  # publisher -> appliance: values for one symbol
    ACK = 2  # appliance -> publisher: `sequence` was applied (or was a harmless duplicate)
    NACK = 3  # appliance -> publisher: `sequence` was not applied, `reason` says why


class Reason(enum.IntEnum):
    """Why a frame was not applied (byte 11 of a NACK). Retryable reasons are marked."""

    NONE = 0
    BAD_MAGIC = 1
    BAD_VERSION = 2
    BAD_LENGTH = 3  # truncated frame, header length or count inconsistent with the bytes
    BAD_CRC = 4  # retryable: the bytes were damaged on the way
    BAD_HEADER = 5  # unknown kind, non-zero reserved fields or flags, zero sequence
    INVALID_SYMBOL = 6
    INVALID_VALUE = 7  # a value is negative, NaN or infinite
    EMPTY_BATCH = 8
    BATCH_TOO_LARGE = 9
    DUPLICATE = 10  # already applied: not applied again (sent as an ACK where acks exist)
    GAP = 11  # retryable: earlier sequences are missing; resend from `applied` + 1
    SYMBOL_LIMIT = 12
    INTERNAL = 13  # retryable: the appliance failed (logged); nothing was applied
    UNAVAILABLE = 14  # retryable: the appliance is stopping or cannot accept now
    # retryable: the appliance has no sequence state for this publisher (its first frame was
    # lost, or the appliance restarted): resend from the oldest unacked frame, flagged FIRST.
    UNKNOWN_PUBLISHER = 15
    # the publisher's token may not write this symbol (its symbol patterns); not retryable
    FORBIDDEN = 16
    # the frame's timestamps go back (before the symbol's newest, or within the frame) under
    # store.out_of_order = "reject"; not retryable: nothing of the frame was applied
    OUT_OF_ORDER = 17
    INVALID_TIMESTAMP = 18  # a timestamp is negative (int64 ns since the epoch)


RETRYABLE = frozenset(
    {Reason.BAD_CRC, Reason.GAP, Reason.INTERNAL, Reason.UNAVAILABLE, Reason.UNKNOWN_PUBLISHER}
)

# DATA flag: "every earlier sequence of mine is finished; start tracking me here". Set by a
# publisher on its first frame, and on its oldest unacked frame when it resends after
# UNKNOWN_PUBLISHER. Without it, a transport with acks never guesses where a publisher starts,
# since a guess made after a lost first message would ack that message as a duplicate.
FLAG_FIRST = 0x0001
# DATA flag, version 2 only: `count` little-endian int64 timestamps (ns since the epoch) follow
# the `count` values, one per value, covered by the frame's CRC.
FLAG_TIMESTAMPS = 0x0002
_DATA_FLAGS = {VERSION: FLAG_FIRST, VERSION_TIMESTAMPS: FLAG_FIRST | FLAG_TIMESTAMPS}


# Enum constructors cost about a microsecond each; decoding looks codes up instead.
_KINDS = {kind.value: kind for kind in Kind}
_REASONS = {reason.value: reason for reason in Reason}


class WireError(Exception):
    """Malformed bytes. `reason` is the nack code; `offset` is where in the message it was."""

    def __init__(self, reason: Reason, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.offset = offset


class Frame(NamedTuple):
    """One decoded frame. For DATA frames `values` is a read-only view into the message.

    A NamedTuple, not a frozen dataclass: one is built per frame on the ingest hot path, and a
    frozen dataclass costs ~2 us to construct against ~0.3 us for a tuple (measured).
    """

    kind: Kind
    publisher_id: int
    sequence: int
    symbol: str
    values: np.ndarray
    applied: int = 0
    reason: Reason = Reason.NONE
    first: bool = False  # FLAG_FIRST (DATA frames only)
    # int64 ns since the epoch, one per value (a version-2 frame's timestamp column); None
    # when the frame has none (every value then gets the batch's receive time)
    timestamps: np.ndarray | None = None


def header_bytes(symbol_len: int) -> int:
    """Fixed header plus the symbol, padded to a multiple of 8 (the payload alignment)."""
    return FIXED_HEADER_BYTES + ((symbol_len + 7) & ~7)


def _per_value(timestamps: bool) -> int:
    return VALUE_BYTES + TIMESTAMP_BYTES if timestamps else VALUE_BYTES


def frame_bytes(symbol_len: int, count: int, timestamps: bool = False) -> int:
    """Total size of a DATA frame (with `timestamps`: a version-2 frame with the column)."""
    return header_bytes(symbol_len) + _per_value(timestamps) * count


def max_values_in(frame_capacity: int, symbol_len: int, timestamps: bool = False) -> int:
    """How many values fit in a frame of at most `frame_capacity` bytes (16 bytes a value
    with `timestamps`, 8 without)."""
    return max(0, (frame_capacity - header_bytes(symbol_len)) // _per_value(timestamps))


def as_timestamps(timestamps: object, count: int) -> np.ndarray:
    """`timestamps` as a contiguous little-endian int64 array of `count` elements.

    Accepts integers (any integer dtype or Python ints within int64) and numpy datetime64
    (converted to ns). Floats are refused rather than truncated, since a float64 cannot hold
    every ns timestamp of this century exactly. ValueError names what is wrong.
    """
    try:
        array = np.asarray(timestamps)
        kind = array.dtype.kind
        if kind == "M":
            array = array.astype("datetime64[ns]").view(np.int64)
        elif kind == "O":
            array = np.asarray(array.tolist() if array.ndim else [array.item()], dtype=np.int64)
        elif kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise OverflowError
        elif kind not in "iu" and array.size:  # bool, float, text: not ns
            raise ValueError(
                f"timestamps must be integer ns since the epoch (or datetime64), got dtype "
                f"{array.dtype}"
            )
    except (OverflowError, TypeError):
        raise ValueError(
            "timestamps must be integers that fit in int64 (ns since the epoch)"
        ) from None
    array = np.ascontiguousarray(array, dtype="<i8").reshape(-1)
    if array.shape[0] != count:
        raise ValueError(f"{array.shape[0]} timestamps for {count} values: one per value")
    return array


def _pack(
    kind: Kind,
    publisher_id: int,
    sequence: int,
    symbol: bytes,
    payload: bytes | memoryview | np.ndarray,
    count: int,
    applied: int = 0,
    reason: Reason = Reason.NONE,
    flags: int = 0,
    timestamps: np.ndarray | None = None,
) -> bytes:
    head_len = header_bytes(len(symbol))
    version = VERSION if timestamps is None else VERSION_TIMESTAMPS
    values_end = head_len + VALUE_BYTES * count
    out = bytearray(frame_bytes(len(symbol), count, timestamps is not None))
    _FIXED.pack_into(
        out, 0, MAGIC, version, kind, flags, head_len, len(symbol), reason, count,
        publisher_id, sequence, applied, 0, 0,
    )  # fmt: skip
    out[FIXED_HEADER_BYTES : FIXED_HEADER_BYTES + len(symbol)] = symbol
    if count:
        out[head_len:values_end] = memoryview(payload).cast("B")
        if timestamps is not None:
            out[values_end:] = memoryview(timestamps).cast("B")
    struct.pack_into("<I", out, _CRC_OFFSET, crc32c.crc32c(out))
    return bytes(out)


def encode_data(
    publisher_id: int,
    sequence: int,
    symbol: str,
    values: np.ndarray,
    *,
    first: bool = False,
    timestamps: object = None,
) -> bytes:
    """One DATA frame. `values` is converted to little-endian float64 (a copy only if needed).
    `first` sets FLAG_FIRST (see there). Without `timestamps` the frame is version 1 (the bytes
    every publisher wrote before timestamps existed); with them (one per value, see
    `as_timestamps`) it is version 2 with FLAG_TIMESTAMPS and the column after the values.

    Raises ValueError for an argument no frame can carry (the appliance would nack the rest:
    negative or non-finite values are the receiver's to reject, so a test can send them).
    """
    encoded = symbol.encode("utf-8")
    if not 1 <= len(encoded) <= MAX_SYMBOL_BYTES:
        raise ValueError(f"symbol must be 1..{MAX_SYMBOL_BYTES} UTF-8 bytes, got {len(encoded)}")
    _check_ids(publisher_id, sequence)
    array = np.ascontiguousarray(values, dtype="<f8").reshape(-1)
    if array.shape[0] > 0xFFFFFFFF:
        raise ValueError("a frame holds at most 2**32 - 1 values")
    flags = FLAG_FIRST if first else 0
    column = None
    if timestamps is not None:
        column = as_timestamps(timestamps, array.shape[0])
        flags |= FLAG_TIMESTAMPS
    return _pack(
        Kind.DATA, publisher_id, sequence, encoded, array, array.shape[0], flags=flags,
        timestamps=column,
    )  # fmt: skip


def mark_first(frame: bytes) -> bytes:
    """A copy of the valid DATA frame `frame` (version 1 or 2, with or without timestamps)
    with FLAG_FIRST set and its CRC recomputed over the whole frame."""
    out = bytearray(frame)
    struct.pack_into("<H", out, 6, struct.unpack_from("<H", out, 6)[0] | FLAG_FIRST)
    struct.pack_into("<I", out, _CRC_OFFSET, 0)
    struct.pack_into("<I", out, _CRC_OFFSET, crc32c.crc32c(out))
    return bytes(out)


def encode_ack(publisher_id: int, sequence: int, applied: int) -> bytes:
    """`sequence` is applied (or was already); `applied` is the highest in-order sequence."""
    return _pack(Kind.ACK, publisher_id, sequence, b"", b"", 0, applied)


def encode_nack(publisher_id: int, sequence: int, applied: int, reason: Reason) -> bytes:
    """`sequence` was not applied because of `reason`; `applied` as in `encode_ack`."""
    return _pack(Kind.NACK, publisher_id, sequence, b"", b"", 0, applied, reason)


def _check_ids(publisher_id: int, sequence: int) -> None:
    if not 0 <= publisher_id <= MAX_SEQUENCE:
        raise ValueError("publisher_id must fit in an unsigned 64-bit integer")
    if not 1 <= sequence <= MAX_SEQUENCE:
        raise ValueError("sequence must be 1..2**64-1 (0 means 'none' in acks)")


def decode_frame(buffer: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Frame, int]:
    """Decode the frame starting at `offset`; return it and the offset just past it.

    Every check happens before any field is trusted: length first (no read past the end),
    then magic, version, header fields, and the CRC over the exact bytes of the frame.
    """
    view = memoryview(buffer).cast("B")
    total = len(view)
    if total - offset < FIXED_HEADER_BYTES:
        raise WireError(
            Reason.BAD_LENGTH,
            f"truncated frame: {total - offset} bytes, a header needs {FIXED_HEADER_BYTES}",
            offset,
        )
    (magic, version, kind, flags, head_len, symbol_len, reason, count,
     publisher_id, sequence, applied, crc, reserved) = _FIXED.unpack_from(view, offset)  # fmt: skip
    if magic != MAGIC:
        raise WireError(Reason.BAD_MAGIC, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}", offset)
    if version not in _VERSIONS:
        raise WireError(
            Reason.BAD_VERSION,
            f"unsupported version {version}, expected {VERSION} or {VERSION_TIMESTAMPS}",
            offset,
        )
    if head_len != header_bytes(symbol_len):
        raise WireError(
            Reason.BAD_LENGTH,
            f"header length {head_len} does not match a {symbol_len}-byte symbol "
            f"(expected {header_bytes(symbol_len)})",
            offset,
        )
    # The column's presence is read from the flags before any length is trusted; whether the
    # flag is allowed here (version 2, DATA) is a header check after the CRC, as for any flag.
    # A version-1 frame never has the column, so old frames keep their exact length.
    with_column = version == VERSION_TIMESTAMPS and flags & FLAG_TIMESTAMPS
    values_end = offset + head_len + VALUE_BYTES * count
    end = values_end + TIMESTAMP_BYTES * count if with_column else values_end
    if end > total:
        raise WireError(
            Reason.BAD_LENGTH,
            f"frame claims {end - offset} bytes ({count} values) but only {total - offset} remain",
            offset,
        )
    actual = crc32c.crc32c(view[offset + _CRC_OFFSET + 4 : end], crc32c.crc32c(_ZERO_CRC,
        crc32c.crc32c(view[offset : offset + _CRC_OFFSET])))  # fmt: skip
    if actual != crc:
        raise WireError(
            Reason.BAD_CRC, f"CRC32C mismatch: frame says {crc:#010x}, bytes give {actual:#010x}",
            offset,
        )  # fmt: skip
    frame_kind = _check_header(
        kind, version, flags, reason, reserved, symbol_len, count, sequence, offset
    )
    symbol = _decode_symbol(view[offset + FIXED_HEADER_BYTES : offset + FIXED_HEADER_BYTES +
                                 symbol_len], offset)  # fmt: skip
    values = np.frombuffer(view, dtype="<f8", count=count, offset=offset + head_len)
    values.flags.writeable = False  # also over writable memory (a ring slot), as documented
    timestamps = None
    if with_column:
        timestamps = np.frombuffer(view, dtype="<i8", count=count, offset=values_end)
        timestamps.flags.writeable = False
    return (
        Frame(
            frame_kind,
            publisher_id,
            sequence,
            symbol,
            values,
            applied,
            _REASONS[reason],
            bool(flags & FLAG_FIRST),
            timestamps,
        ),
        end,
    )


def _check_header(
    kind: int, version: int, flags: int, reason: int, reserved: int, symbol_len: int,
    count: int, sequence: int, offset: int,
) -> Kind:  # fmt: skip
    """Field checks that the CRC cannot catch (a buggy publisher computes a valid CRC)."""
    frame_kind = _KINDS.get(kind)
    if frame_kind is None:
        raise WireError(Reason.BAD_HEADER, f"unknown frame kind {kind}", offset)
    allowed = _DATA_FLAGS[version] if frame_kind is Kind.DATA else 0
    if flags & ~allowed or reserved:
        raise WireError(
            Reason.BAD_HEADER,
            f"flags ({flags:#06x}; allowed in version {version}: {allowed:#06x}) and reserved "
            f"({reserved}) must not carry unknown bits",
            offset,
        )
    if frame_kind is Kind.DATA:
        if reason:
            raise WireError(Reason.BAD_HEADER, "a DATA frame carries reason 0", offset)
        if sequence == 0:
            raise WireError(Reason.BAD_HEADER, "sequence 0 is reserved (start at 1)", offset)
        if not 1 <= symbol_len <= MAX_SYMBOL_BYTES:
            raise WireError(
                Reason.INVALID_SYMBOL,
                f"symbol is {symbol_len} bytes; 1..{MAX_SYMBOL_BYTES} are allowed",
                offset,
            )
    else:
        if symbol_len or count:
            raise WireError(Reason.BAD_HEADER, "ACK/NACK frames carry no symbol or values", offset)
        if reason not in _REASONS:
            raise WireError(Reason.BAD_HEADER, f"unknown reason code {reason}", offset)
    return frame_kind


def _decode_symbol(raw: memoryview, offset: int) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise WireError(Reason.INVALID_SYMBOL, "symbol is not valid UTF-8", offset) from None


def decode_message(buffer: bytes | bytearray | memoryview) -> list[Frame]:
    """All frames of a message, or WireError for the first malformed one.

    All or nothing: a message is decoded completely before any frame is handed on, so a bad
    frame in the middle never lets the frames before it through while the rest is lost.
    """
    view = memoryview(buffer).cast("B")
    if len(view) == 0:
        raise WireError(Reason.BAD_LENGTH, "empty message")
    frames: list[Frame] = []
    offset = 0
    while offset < len(view):
        frame, offset = decode_frame(view, offset)
        frames.append(frame)
    return frames


def peek_identity(buffer: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """(publisher_id, sequence) of a frame header without validating it: only for nacks.

    Used to address a nack for a frame that failed to decode; returns (0, 0) when even the
    fixed header is incomplete. The values are untrusted and never used for anything else.
    """
    view = memoryview(buffer).cast("B")
    if len(view) - offset < FIXED_HEADER_BYTES:
        return 0, 0
    fields = _FIXED.unpack_from(view, offset)
    return fields[8], fields[9]
