"""One sealed warm-tier segment on disk: its format, its summary, and crash-safe writing.

Why one file with the summary in a header (not a sidecar): a single `rename` commits the values
and their summary together, so a crash can never leave a segment without its summary or a
summary without its values. The layout is

    magic b"HFTWARM1" | u32 LE header length | header (JSON, UTF-8) | zstd frame

where the zstd frame holds `count` float64 values, then `n_marks` int64 batch-start indexes,
then `n_marks` int64 receive times, then one summary row (`engine_core.summary`, row version
`summary_row_version` in the header: count, ref, mean, M2, min, max) per block of `BLOCK_VALUES`
values, the last block possibly short (all little-endian). The batch marks live in the
compressed payload rather than the header because a segment of single-value batches has as many
marks as values. The block summaries let a query that cuts a segment read at most two partial
blocks of raw values from it.
The header carries the sha256 of the compressed payload, checked on every read.

The summary rows are a storage format, not an engine's internals: this module depends on
`engine_core.summary` (their definition and version), never on an engine. Segments written
before the header recorded `summary_row_version` hold version-1 rows and read as version 1; a
segment of any other row version is refused on read rather than misread.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import zstandard

from appliance.durability.fsutil import fsync_dir
from engine_core.summary import ROW_WIDTH, SUMMARY_ROW_VERSION, summarize_blocks

MAGIC = b"HFTWARM1"
FORMAT_VERSION = 1
SUFFIX = ".seg"
TMP_SUFFIX = ".tmp"
_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _LEN.size
_ZSTD_LEVEL = 1  # float64 prices compress the same at 1 and 3 (1.151 vs 1.135 B/value on a
# cent random walk, 7.43 vs 7.44 on noise) and level 1 seals 1M values in 23-25 ms, not 28-35:
# the sealer shares the cores with ingest, so its speed is ingest capacity (measured 2026-11-22).
_LE_F8 = np.dtype("<f8")
_LE_I8 = np.dtype("<i8")
BLOCK_VALUES = 4096  # a power of two: summarize_blocks' 1/width is exact


class SegmentCorruptError(Exception):
    """A sealed segment file does not match its own header (names the file)."""


class SegmentHeader(msgspec.Struct, frozen=True):
    """The summary of one sealed segment, kept in memory for every segment after the scan.

    `ref`/`mean`/`m2` follow the anchored layout of `engine_core.summary`: the mean is
    `ref + mean`, with `ref` the first value, so whole-segment summaries merge without losing
    the precision of 1e9-scale prices. `summary_row_version` is the `SUMMARY_ROW_VERSION` of
    the block rows in the payload; headers written before it existed decode as version 1,
    which is what those segments hold.
    """

    version: int
    symbol: str
    first_index: int
    count: int
    ref: float
    mean: float
    m2: float
    min: float
    max: float
    first_value: float
    last_value: float
    first_received_ns: int
    last_received_ns: int
    n_marks: int
    block_values: int
    first_lsn: int
    last_lsn: int
    payload_sha256: str
    summary_row_version: int = SUMMARY_ROW_VERSION

    @property
    def end_index(self) -> int:
        return self.first_index + self.count

    @property
    def n_blocks(self) -> int:
        return -(-self.count // self.block_values)


class SegmentData(NamedTuple):
    """Decompressed contents: values, the batch marks (start index, receive ns) of each batch,
    and the (n_blocks, 6) block summaries."""

    values: np.ndarray
    mark_index: np.ndarray
    mark_ns: np.ndarray
    blocks: np.ndarray


class SealedSegment(NamedTuple):
    path: Path
    header: SegmentHeader


def segment_name(first_index: int) -> str:
    """20 digits: names sort as the indexes do, for any int64 index."""
    return f"{first_index:020d}{SUFFIX}"


def summarize(values: np.ndarray) -> tuple[float, float, float, float, float]:
    """(ref, mean of x - ref, M2, min, max) of a non-empty float64 array.

    Two passes around an anchor: x - ref is exact for values within a factor of two of the
    first (Sterbenz), so 1e9 + 1e-3 noise keeps its deviations intact (see engine_core.summary).
    """
    ref = float(values[0])
    dev = values - ref
    mean = float(dev.mean())
    dev -= mean
    return ref, mean, float(dev @ dev), float(values.min()), float(values.max())


def block_summaries(values: np.ndarray, block_values: int = BLOCK_VALUES) -> np.ndarray:
    """(n_blocks, 6) rows over consecutive blocks of `block_values`; the last may be short."""
    full = values.shape[0] // block_values
    n_blocks = -(-values.shape[0] // block_values)
    rows = np.empty((n_blocks, ROW_WIDTH))
    if full:
        summarize_blocks(values[: full * block_values].reshape(full, block_values), rows[:full])
    if n_blocks > full:
        tail = values[full * block_values :]
        rows[full] = (tail.shape[0], *summarize(tail))
    return rows


def build_segment(
    symbol: str,
    first_index: int,
    values: np.ndarray,
    mark_index: np.ndarray,
    mark_ns: np.ndarray,
    first_lsn: int,
    last_lsn: int,
) -> tuple[SegmentHeader, bytes]:
    """The header and the full file bytes of a segment (pure: no I/O)."""
    values = np.ascontiguousarray(values, dtype=_LE_F8)
    mark_index = np.ascontiguousarray(mark_index, dtype=_LE_I8)
    mark_ns = np.ascontiguousarray(mark_ns, dtype=_LE_I8)
    blocks = np.ascontiguousarray(block_summaries(values, BLOCK_VALUES), dtype=_LE_F8)
    # Streamed part by part: concatenating the parts first copied the values twice (8 MB each
    # per 1M-value segment) before compressing them. The payload is one zstd frame either way.
    stream = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compressobj()
    payload = b"".join(
        [
            stream.compress(memoryview(part).cast("B"))
            for part in (values, mark_index, mark_ns, blocks)
        ]
        + [stream.flush()]
    )
    ref, mean, m2, lo, hi = summarize(values)
    header = SegmentHeader(
        version=FORMAT_VERSION,
        symbol=symbol,
        first_index=first_index,
        count=int(values.shape[0]),
        ref=ref,
        mean=mean,
        m2=m2,
        min=lo,
        max=hi,
        first_value=float(values[0]),
        last_value=float(values[-1]),
        first_received_ns=int(mark_ns[0]),
        last_received_ns=int(mark_ns[-1]),
        n_marks=int(mark_index.shape[0]),
        block_values=BLOCK_VALUES,
        first_lsn=first_lsn,
        last_lsn=last_lsn,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        summary_row_version=SUMMARY_ROW_VERSION,
    )
    head = msgspec.json.encode(header)
    return header, MAGIC + _LEN.pack(len(head)) + head + payload


def write_atomically(directory: Path, name: str, data: bytes) -> Path:
    """Write `data` to directory/name so that a crash leaves either nothing or the whole file.

    Invariant: the final name appears only after its bytes are on disk (temp file, fsync,
    rename, fsync of the directory). A crash before the rename leaves `*.tmp`, which the
    startup scan deletes; the values are still in the write-ahead log, which is not retired
    until the segment is sealed.
    """
    final = directory / name
    tmp = directory / (name + TMP_SUFFIX)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_dir(directory)
    return final


def read_header(path: Path) -> SegmentHeader:
    with open(path, "rb") as handle:
        prefix = handle.read(_PREFIX)
        if len(prefix) != _PREFIX or prefix[: len(MAGIC)] != MAGIC:
            raise SegmentCorruptError(f"{path}: not a warm segment (bad magic)")
        (length,) = _LEN.unpack_from(prefix, len(MAGIC))
        head = handle.read(length)
    try:
        header = msgspec.json.decode(head, type=SegmentHeader)
    except msgspec.DecodeError as exc:
        raise SegmentCorruptError(f"{path}: unreadable header: {exc}") from None
    if header.version != FORMAT_VERSION:
        raise SegmentCorruptError(f"{path}: unsupported format version {header.version}")
    if header.summary_row_version != SUMMARY_ROW_VERSION:
        raise SegmentCorruptError(
            f"{path}: summary rows of version {header.summary_row_version}, this build reads"
            f" version {SUMMARY_ROW_VERSION} (engine_core.summary.SUMMARY_ROW_VERSION)"
        )
    return header


def read_segment(path: Path, header: SegmentHeader) -> SegmentData:
    """Decompress a segment, checking the payload hash and sizes against the header."""
    data = path.read_bytes()
    (length,) = _LEN.unpack_from(data, len(MAGIC))
    payload = data[_PREFIX + length :]
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise SegmentCorruptError(f"{path}: payload sha256 does not match its header")
    expected = 8 * (header.count + 2 * header.n_marks + ROW_WIDTH * header.n_blocks)
    raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    if len(raw) != expected:
        raise SegmentCorruptError(f"{path}: payload holds {len(raw)} bytes, expected {expected}")
    values = np.frombuffer(raw, dtype=_LE_F8, count=header.count)
    marks = np.frombuffer(raw, dtype=_LE_I8, offset=8 * header.count, count=2 * header.n_marks)
    blocks = np.frombuffer(raw, dtype=_LE_F8, offset=8 * (header.count + 2 * header.n_marks))
    return SegmentData(
        values, marks[: header.n_marks], marks[header.n_marks :], blocks.reshape(-1, ROW_WIDTH)
    )
