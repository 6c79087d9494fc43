"""One sealed warm-tier segment on disk: its format, its summary, and crash-safe writing.

Why one file with the summary in a header (not a sidecar): a single `rename` commits the values
and their summary together, so a crash can never leave a segment without its summary or a
summary without its values. The layout is

    magic b"HFTWARM1" | u32 LE header length | header (JSON, UTF-8) | zstd frame

where the zstd frame holds `count` float64 values, then `n_marks` int64 mark indexes, then
`n_marks` int64 timestamps (event time, or receive time for batches without one; the header's
`first_received_ns` / `last_received_ns` keep their names and hold these), then one summary
row (`engine_core.summary`, row version `summary_row_version` in the header: count, ref, mean,
M2, min, max) per block of `BLOCK_VALUES` values, the last block possibly short (all
little-endian). The marks live in the
compressed payload rather than the header because a segment of single-value batches has as many
marks as values. The block summaries let a query that cuts a segment read at most two partial
blocks of raw values from it.
The header carries the sha256 of the compressed payload, checked on every read.

The summary rows are a storage format, not an engine's internals: this module depends on
`engine_core.summary` (their definition and version), never on an engine. Segments written
before the header recorded `summary_row_version` hold version-1 rows and read as version 1; a
segment of any other row version is refused on read rather than misread.

Encrypted (`[security] data_key_file`): the file is an `encryption` chunked file of kind WARM
with two chunks, the header JSON (it holds min, max, mean and first/last values, so it is
secret too) and the zstd payload. `read_header` decrypts only the first. Both chunks are bound
to the file's random id, so a header and a payload from two files cannot be spliced; the
header's symbol and first index are checked against the file's name as for plain segments.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import zstandard

from appliance.durability.encryption import (
    KIND_WARM,
    DataCipher,
    DecryptError,
    file_key_id,
    is_encrypted_file,
    key_id_hex,
    open_chunks,
    read_first_chunk,
    seal_chunks,
)
from appliance.durability.fsutil import replace_private
from engine_core.summary import ROW_WIDTH, SUMMARY_ROW_VERSION, summarize_blocks

MAGIC = b"HFTWARM1"
FORMAT_VERSION = 1
SUFFIX = ".seg"
TMP_SUFFIX = ".tmp"  # what fsutil.replace_private names its temp file; the startup scan deletes it
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
    """Decompressed contents: values, the time marks (first index of a run, its timestamp),
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
    cipher: DataCipher | None = None,
) -> tuple[SegmentHeader, bytes]:
    """The header and the full file bytes of a segment (pure: no I/O), encrypted with
    `cipher` if given."""
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
    if cipher is not None:
        return header, b"".join(seal_chunks(cipher, KIND_WARM, (head, payload)))
    return header, MAGIC + _LEN.pack(len(head)) + head + payload


def write_atomically(directory: Path, name: str, data: bytes) -> Path:
    """Write `data` to directory/name so that a crash leaves either nothing or the whole file.

    Invariant: the final name appears only after its bytes are on disk (temp file, fsync,
    rename, fsync of the directory). A crash before the rename leaves `*.tmp`, which the
    startup scan deletes; the values are still in the write-ahead log, which is not retired
    until the segment is sealed.
    """
    final = directory / name
    replace_private(final, data)  # a `<name>.tmp` first, 0600 whatever the umask
    return final


def _check_key(path: Path, prefix: bytes, cipher: DataCipher | None) -> bool:
    """Whether the file is encrypted; raises if it cannot be read with `cipher`."""
    encrypted = is_encrypted_file(prefix)
    if encrypted and cipher is None:
        raise SegmentCorruptError(f"{path}: encrypted, and no data key is configured")
    if not encrypted and cipher is not None:
        raise SegmentCorruptError(f"{path}: not encrypted, but a data key is configured")
    if cipher is not None and file_key_id(prefix) != cipher.key_id:
        raise SegmentCorruptError(
            f"{path}: written with data key {key_id_hex(file_key_id(prefix))}, "
            f"configured {cipher.key_id_hex}"
        )
    return encrypted


def read_header(path: Path, cipher: DataCipher | None = None) -> SegmentHeader:
    with open(path, "rb") as handle:
        prefix = handle.read(max(_PREFIX, 24))
    if cipher is not None or is_encrypted_file(prefix):
        _check_key(path, prefix, cipher)
        assert cipher is not None
        try:
            head = read_first_chunk(cipher, KIND_WARM, path)
        except DecryptError as exc:
            raise SegmentCorruptError(f"{path}: header: {exc}") from None
        return _decode_header(path, head)
    if len(prefix) < _PREFIX or prefix[: len(MAGIC)] != MAGIC:
        raise SegmentCorruptError(f"{path}: not a warm segment (bad magic)")
    (length,) = _LEN.unpack_from(prefix, len(MAGIC))
    with open(path, "rb") as handle:
        handle.seek(_PREFIX)
        head = handle.read(length)
    return _decode_header(path, head)


def _decode_header(path: Path, head: bytes) -> SegmentHeader:
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


def read_segment(
    path: Path, header: SegmentHeader, cipher: DataCipher | None = None
) -> SegmentData:
    """Decompress a segment, checking the payload hash and sizes against the header."""
    data = path.read_bytes()
    if _check_key(path, data[:24], cipher):
        assert cipher is not None
        try:
            chunks = list(open_chunks(cipher, KIND_WARM, data))
        except DecryptError as exc:
            raise SegmentCorruptError(f"{path}: {exc}") from None
        if len(chunks) != 2:
            raise SegmentCorruptError(f"{path}: {len(chunks)} encrypted chunks, expected 2")
        payload = chunks[1]
    else:
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
