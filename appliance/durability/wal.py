"""The write-ahead log on disk: record encoding, segment files, and a verifying scanner.

Why this module knows nothing of threads or the store: the writer (`writer.py`), recovery
(`recovery.py`) and `hft-appliance fsck` (`fsck.py`) all need the same byte layout and the same
answer to "is this record whole?", and only that. The layout is documented in
docs/durability.md; a test keeps the two in step.

Record layout (little-endian, every record starts 8-byte aligned within its segment):

    0  magic "HWAL"        16 lsn u64          48 sequence u64
    4  length u32 (total)  24 first_index u64  56 count u32
    8  crc32c u32          32 received_ns u64  60 reserved u32
    12 kind u8, symbol length u8, flags u16     40 publisher_id u64
    64 symbol (UTF-8, zero-padded to 8), then count float64 values,
       then (flags & FLAG_TIMESTAMPS) count int64 timestamps

The CRC covers every byte after the CRC field (12 .. length), padding included, so a torn or
flipped byte anywhere in a record is caught before any of it is trusted.

Timestamps (FLAG_TIMESTAMPS = 1 in the flags u16 at 14, which used to be a reserved zero): a
batch logged with its resolved event times (`BatchRecord.timestamps`, ns since the epoch) carries
them as an int64 column after the values; a batch without them has flags 0 and is byte for byte
what this module wrote before timestamps existed, so old logs replay unchanged (every value then
has the time max(received_ns, the symbol's newest), recomputed in log order). Any other flag bit
is refused: a record written by a newer format is never half understood.

Encrypted records (`[security] data_key_file`, `appliance.durability.encryption`): magic "HWAE",
the u32 at 60 holds the key id, and after the symbol come a 12-byte nonce (padded to 16), the
values (and the timestamps after them, under FLAG_TIMESTAMPS: one message, one tag) encrypted
with AES-256-GCM, and the 16-byte tag. The header and symbol stay readable
(torn-tail detection, resync, fsck and the sealer's index work unchanged) but are authenticated
as associated data, so no field can be changed and no record moved undetected. The CRC still
covers every byte: a torn or flipped byte reads as before (torn tail or corruption), and an
authentication failure of a record whose CRC checks is corruption (or a wrong key, which the
key id tells first).
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np

from appliance.durability.encryption import NONCE_BYTES, TAG_BYTES, DataCipher, DecryptError
from appliance.durability.fsutil import DATA_FILE_MODE, fsync_dir, make_private_dir
from appliance.durability.records import BatchRecord

MAGIC = b"HWAL"
MAGIC_ENCRYPTED = b"HWAE"
NONCE_FIELD = 16  # the nonce, zero-padded to keep the values 8-byte aligned
ENCRYPTION_BYTES = NONCE_FIELD + TAG_BYTES  # what encryption adds to a record
_AD_DOMAIN = b"hft-appliance wal record v1\0"
KIND_BATCH = 1
FLAG_TIMESTAMPS = 1  # an int64 timestamp column follows the values
KNOWN_FLAGS = FLAG_TIMESTAMPS
HEADER = struct.Struct("<4sII BBH QQQQQ II")
HEADER_SIZE = HEADER.size  # 64
assert HEADER_SIZE == 64
CRC_END = 12  # the CRC covers bytes [CRC_END, length)
MAX_SYMBOL_BYTES = 255
SEGMENT_PREFIX = "wal-"
SEGMENT_SUFFIX = ".log"
LSN_DIGITS = 20


class RecordError(ValueError):
    """Bytes that are not one whole, valid record; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def record_size(
    symbol_bytes: int, count: int, encrypted: bool = False, timestamps: bool = False
) -> int:
    columns = 16 * count if timestamps else 8 * count
    return HEADER_SIZE + _pad8(symbol_bytes) + columns + (ENCRYPTION_BYTES if encrypted else 0)


def values_offset(symbol_bytes: int, encrypted: bool = False) -> int:
    """Where the values (plain, or their ciphertext) start within a record."""
    return HEADER_SIZE + _pad8(symbol_bytes) + (NONCE_FIELD if encrypted else 0)


def encode(record: BatchRecord, cipher: DataCipher | None = None) -> bytes:
    """One record's bytes, CRC included. Raises ValueError for a symbol over 255 bytes."""
    return b"".join(encode_parts(record, cipher))


def encode_parts(
    record: BatchRecord, cipher: DataCipher | None = None
) -> tuple[bytes | memoryview, ...]:
    """A record as (header with symbol and CRC, the values' own bytes[, the timestamps' own
    bytes]): the writer hands them to `writev`, so neither column is copied on the way to the
    log (hot path: a 10k-value batch saved three 80 KB copies). The CRC is chained over the
    parts.

    With `cipher` the second part is the ciphertext of the values (and timestamps: sealed as
    one message, reading both columns in place) with its tag; the header up to the nonce is
    the associated data."""
    sym = record.symbol.encode()
    if len(sym) > MAX_SYMBOL_BYTES:
        raise ValueError("symbol longer than 255 UTF-8 bytes")
    values = np.ascontiguousarray(record.values, dtype="<f8")
    count = int(values.shape[0])
    times = record.timestamps
    if times is not None:
        times = np.ascontiguousarray(times, dtype="<i8")
        if times.shape != (count,):
            raise ValueError(f"{times.shape[0]} timestamps for {count} values")
    encrypted = cipher is not None
    values_at = values_offset(len(sym), encrypted)
    length = record_size(len(sym), count, encrypted, times is not None)
    out = bytearray(values_at)
    HEADER.pack_into(
        out,
        0,
        MAGIC_ENCRYPTED if encrypted else MAGIC,
        length,
        0,
        KIND_BATCH,
        len(sym),
        0 if times is None else FLAG_TIMESTAMPS,
        record.lsn,
        record.first_index,
        record.received_ns,
        record.publisher_id,
        record.sequence,
        count,
        cipher.key_id if cipher is not None else 0,
    )
    out[HEADER_SIZE : HEADER_SIZE + len(sym)] = sym
    parts: list[memoryview | bytes] = [memoryview(values).cast("B")]
    if times is not None:
        parts.append(memoryview(times).cast("B"))
    if cipher is not None:
        nonce_at = values_at - NONCE_FIELD
        nonce, sealed = cipher.seal_parts(parts, _AD_DOMAIN + out[:nonce_at])  # CRC still 0
        out[nonce_at : nonce_at + NONCE_BYTES] = nonce
        parts = [sealed]
    crc = crc32c.crc32c(memoryview(out)[CRC_END:])
    for part in parts:
        crc = crc32c.crc32c(part, crc)
    struct.pack_into("<I", out, 8, crc)
    return (bytes(out), *parts)


def decode(
    buf: bytes | bytearray | memoryview, offset: int = 0, cipher: DataCipher | None = None
) -> tuple[BatchRecord, int]:
    """Decode the record at `offset`; return it and its length. Raises `RecordError`.

    The values (and timestamps, under FLAG_TIMESTAMPS) are read-only views into `buf` (no
    copy): keep `buf` alive as long as them. With `cipher` only encrypted records are accepted
    (a plain record slipped into an encrypted log is refused, never trusted) and the columns
    are views of one decrypted copy.
    """
    view = memoryview(buf)
    available = len(view) - offset
    if available < HEADER_SIZE:
        raise RecordError(f"incomplete header ({available} of {HEADER_SIZE} bytes)")
    fields = HEADER.unpack_from(view, offset)
    (magic, length, crc, kind, sym_len, flags, lsn, first, received, publisher, sequence) = fields[
        :11
    ]
    count, kid = fields[11], fields[12]
    _check_magic(magic, cipher)
    if length % 8 or length < HEADER_SIZE:
        raise RecordError(f"bad record length {length}")
    if length > available:
        raise RecordError(f"incomplete record ({available} of {length} bytes)")
    if crc32c.crc32c(view[offset + CRC_END : offset + length]) != crc:
        raise RecordError("CRC mismatch")
    if kind != KIND_BATCH:
        raise RecordError(f"unknown record kind {kind}")
    if flags & ~KNOWN_FLAGS:
        raise RecordError(f"unknown record flags {flags:#06x}")
    has_times = bool(flags & FLAG_TIMESTAMPS)
    if length != record_size(sym_len, count, cipher is not None, has_times):
        raise RecordError(f"length {length} does not match {count} values")
    sym_at = offset + HEADER_SIZE
    try:
        symbol = bytes(view[sym_at : sym_at + sym_len]).decode()
    except UnicodeDecodeError:
        raise RecordError("symbol is not UTF-8") from None
    values_at = offset + values_offset(sym_len, cipher is not None)
    if cipher is not None:
        plain = _decrypt(view, offset, values_at, length, kid, cipher)
        values = np.frombuffer(plain, dtype="<f8", count=count)
        times = np.frombuffer(plain, "<i8", count, 8 * count) if has_times else None
    else:
        values = np.frombuffer(view, dtype="<f8", count=count, offset=values_at)
        times = np.frombuffer(view, "<i8", count, values_at + 8 * count) if has_times else None
    values = _read_only(values)
    if times is not None:
        times = _read_only(times)
    record = BatchRecord(lsn, symbol, first, received, publisher, sequence, values, times)
    return record, length


def _read_only(array: np.ndarray) -> np.ndarray:
    if array.flags.writeable:
        array = array.view()
        array.setflags(write=False)
    return array


def _check_magic(magic: bytes, cipher: DataCipher | None) -> None:
    """Plain records in a plain log, encrypted ones with a key: a plain record slipped into an
    encrypted log would otherwise be trusted without authentication."""
    expected = MAGIC if cipher is None else MAGIC_ENCRYPTED
    if magic != expected:
        if magic == MAGIC_ENCRYPTED:
            raise RecordError("encrypted record, but no data key is configured")
        if magic == MAGIC:
            raise RecordError("unencrypted record in an encrypted log")
        raise RecordError("bad magic")


def _decrypt(
    view: memoryview, offset: int, values_at: int, length: int, kid: int, cipher: DataCipher
) -> bytes:
    """The decrypted columns (values, then timestamps if any) of a record whose CRC checked
    (so a failure here is not a torn write: a wrong key, which the key id tells, or a
    deliberate change)."""
    if kid != cipher.key_id:
        raise RecordError(
            f"written with another data key (key id {kid:08x}, configured {cipher.key_id_hex})"
        )
    nonce_at = values_at - NONCE_FIELD
    if any(view[nonce_at + NONCE_BYTES : values_at]):  # the only bytes outside the AD and tag
        raise RecordError("nonce padding is not zero")
    aad = bytearray(view[offset:nonce_at])
    aad[8:12] = b"\0\0\0\0"  # the CRC is computed over the ciphertext, after sealing
    try:
        plain = cipher.open(
            view[nonce_at : nonce_at + NONCE_BYTES],
            view[values_at : offset + length],
            _AD_DOMAIN + aad,
        )
    except DecryptError:
        raise RecordError("authentication failed (AES-GCM tag mismatch)") from None
    return plain


def resync(buf: bytes | memoryview, start: int, cipher: DataCipher | None = None) -> int | None:
    """Offset of the next valid record at or after `start` (8-aligned magic, CRC checks)."""
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    magic = MAGIC if cipher is None else MAGIC_ENCRYPTED
    at = start + (-start % 8)
    while True:
        at = data.find(magic, at)
        if at < 0:
            return None
        if at % 8 == 0:
            try:
                decode(data, at, cipher)
                return at
            except RecordError:
                pass
        at += 1


# --- segments ----------------------------------------------------------------------------------


def wal_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "wal"


def segment_name(first_lsn: int) -> str:
    return f"{SEGMENT_PREFIX}{first_lsn:0{LSN_DIGITS}d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> list[Path]:
    """Segment files in lsn order (the zero-padded name sorts as the number)."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith(SEGMENT_PREFIX) and p.name.endswith(SEGMENT_SUFFIX)
    )


def segment_first_lsn(path: Path) -> int:
    """The first lsn a segment was created for, from its name."""
    return int(path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)])


def retire_segments(directory: Path, upto_lsn: int) -> list[Path]:
    """Delete sealed segments whose every record has lsn <= `upto_lsn`; return them.

    A segment ends where the next one starts, so segment i holds lsns below the next one's
    name: it can go once that name is <= upto_lsn + 1. The last segment (the tail the writer
    appends to) is never deleted. Callers pass the lsn that checkpoints *and* the warm tier
    already cover, so nothing deleted is needed by a restart.
    """
    segments = list_segments(directory)
    removed = []
    for path, following in itertools.pairwise(segments):
        if segment_first_lsn(following) - 1 > upto_lsn:
            break
        path.unlink()
        removed.append(path)
    if removed:
        fsync_dir(directory)
    return removed


class LogBusyError(OSError):
    """Another process (an appliance, or fsck) holds the log directory."""


LOCK_NAME = ".lock"


def lock_dir(directory: Path) -> int:
    """Take the log directory's exclusive lock; return the fd that holds it (close to release).

    Two writers appending to one segment would interleave records; fsck --repair rewriting a
    segment under a running appliance would lose records. A flock dies with its process, so a
    kill -9 never leaves a stale lock behind.
    """
    import fcntl

    make_private_dir(directory)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, DATA_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogBusyError(
            f"{directory} is in use by another process (a running appliance or fsck)"
        ) from None
    return fd


@dataclass
class Damage:
    """One stretch of bad bytes in a segment: [offset, end) and why the first record failed."""

    offset: int
    end: int
    reason: str


@dataclass
class SegmentScan:
    """What a verifying pass found in one segment."""

    path: Path
    size: int
    records: list[tuple[int, BatchRecord]] = field(default_factory=list)  # (offset, record)
    damage: list[Damage] = field(default_factory=list)

    @property
    def torn_tail(self) -> Damage | None:
        """The damage that runs to the end of the file with nothing valid after it."""
        if self.damage and self.damage[-1].end == self.size:
            return self.damage[-1]
        return None

    @property
    def first_lsn(self) -> int | None:
        return self.records[0][1].lsn if self.records else None

    @property
    def last_lsn(self) -> int | None:
        return self.records[-1][1].lsn if self.records else None


def scan_segment(
    path: Path, data: bytes | None = None, cipher: DataCipher | None = None
) -> SegmentScan:
    """Verify every record of one segment; bad stretches are skipped by resync, never trusted.

    The decoded values are views into the file's bytes (read once, no per-record copy), or
    decrypted copies with `cipher`.
    """
    if data is None:
        data = path.read_bytes()
    scan = SegmentScan(path, len(data))
    offset = 0
    last_lsn = 0
    while offset < len(data):
        try:
            record, length = decode(data, offset, cipher)
            if record.lsn <= last_lsn:
                raise RecordError(f"lsn {record.lsn} does not follow {last_lsn}")
        except RecordError as exc:
            nxt = resync(data, offset + 1, cipher)
            end = len(data) if nxt is None else nxt
            scan.damage.append(Damage(offset, end, exc.reason))
            offset = end
            continue
        scan.records.append((offset, record))
        last_lsn = record.lsn
        offset += length
    return scan


def iter_scans(directory: Path, cipher: DataCipher | None = None) -> Iterator[SegmentScan]:
    for path in list_segments(directory):
        yield scan_segment(path, cipher=cipher)


def segment_key_id(path: Path) -> tuple[bool, int | None]:
    """(whether the segment holds a record, the key id of its first record or None if plain),
    from its first header alone: the up-front wrong-key check at start."""
    with open(path, "rb") as handle:
        head = handle.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        return False, None
    fields = HEADER.unpack(head)
    if fields[0] == MAGIC_ENCRYPTED:
        return True, fields[12]
    return fields[0] == MAGIC, None


def header_record_size(fields: tuple) -> int | None:
    """The length a record with these unpacked `HEADER` fields must have, or None when the
    magic or flags are not this format's (a scanner that reads headers only: warm_sealer)."""
    magic, flags, sym_len, count = fields[0], fields[5], fields[4], fields[11]
    if magic not in (MAGIC, MAGIC_ENCRYPTED) or flags & ~KNOWN_FLAGS:
        return None
    return record_size(sym_len, count, magic == MAGIC_ENCRYPTED, bool(flags & FLAG_TIMESTAMPS))
