"""Version-2 DATA frames: the optional timestamp column (FLAG_TIMESTAMPS).

The column is `count` little-endian int64 after the `count` float64 values, inside the CRC. The
same hostile-bytes rules as version 1 hold (tests/transport/test_wire.py): every malformed frame
is a `WireError` with the reason of the first failing check, and nothing is read past the buffer.
Version-1 bytes must not change: a batch without timestamps is still written as version 1.
"""

from __future__ import annotations

import struct

import crc32c
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.transport.test_wire import (
    FIXED,
    SMALL,
    decodes_or_wire_error,
    fields_of,
    reason_of,
    symbols,
)
from transport.wire import (
    FIXED_HEADER_BYTES,
    FLAG_FIRST,
    FLAG_TIMESTAMPS,
    MAGIC,
    MAX_SEQUENCE,
    VERSION,
    VERSION_TIMESTAMPS,
    Kind,
    Reason,
    WireError,
    as_timestamps,
    decode_frame,
    decode_message,
    encode_ack,
    encode_data,
    frame_bytes,
    header_bytes,
    mark_first,
    max_values_in,
)

T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z in ns
STAMPS = [T0, T0 + 500]
SMALL_V2 = encode_data(7, 1, "EUR/USD", np.array([1.0850, 1.0851]), timestamps=STAMPS)

int64s = st.integers(-(2**63), 2**63 - 1)


@st.composite
def v2_frames(draw: st.DrawFn) -> tuple[int, int, str, np.ndarray, np.ndarray]:
    values = draw(hnp.arrays(np.float64, st.integers(0, 30), elements=st.floats(allow_nan=True)))
    stamps = draw(hnp.arrays(np.int64, values.shape[0], elements=int64s))
    return (
        draw(st.integers(0, MAX_SEQUENCE)),
        draw(st.integers(1, MAX_SEQUENCE)),
        draw(symbols),
        values,
        stamps,
    )


def build_v2(
    symbol: bytes = b"EUR/USD",
    values: bytes = struct.pack("<2d", 1.0850, 1.0851),
    stamps: bytes = struct.pack("<2q", *STAMPS),
    *,
    fix_crc: bool = True,
    **overrides: int | bytes,
) -> bytes:
    """A version-2 frame from the byte table, independent of the encoder (as test_wire.build)."""
    head = FIXED_HEADER_BYTES + (len(symbol) + 7) // 8 * 8
    fields: dict[str, object] = {
        "magic": MAGIC, "version": 2, "kind": Kind.DATA, "flags": FLAG_TIMESTAMPS,
        "header_len": head, "symbol_len": len(symbol), "reason": 0, "count": len(values) // 8,
        "publisher_id": 7, "sequence": 1, "applied": 0, "crc": 0, "reserved": 0,
    }  # fmt: skip
    fields.update(overrides)
    padding = bytes(-len(symbol) % 8)
    frame = bytearray(FIXED.pack(*fields.values()) + symbol + padding + values + stamps)
    if fix_crc:
        struct.pack_into("<I", frame, 40, 0)
        struct.pack_into("<I", frame, 40, crc32c.crc32c(frame))
    return bytes(frame)


# --- encoding -------------------------------------------------------------------------------


def test_v2_layout_matches_the_byte_table() -> None:
    assert len(SMALL_V2) == 88 == frame_bytes(7, 2, timestamps=True)
    fields = fields_of(SMALL_V2)
    assert (fields["version"], fields["flags"], fields["count"], fields["header_len"]) == (
        2, FLAG_TIMESTAMPS, 2, 56,
    )  # fmt: skip
    assert struct.unpack_from("<2d", SMALL_V2, 56) == (1.0850, 1.0851)
    assert list(struct.unpack_from("<2q", SMALL_V2, 72)) == STAMPS
    assert build_v2() == SMALL_V2  # the independent builder agrees, CRC included
    zeroed = bytearray(SMALL_V2)
    zeroed[40:44] = bytes(4)
    assert fields["crc"] == crc32c.crc32c(zeroed)  # the column is inside the CRC


def test_without_timestamps_the_frame_is_version_1_byte_for_byte() -> None:
    plain = encode_data(7, 1, "EUR/USD", np.array([1.0850, 1.0851]), timestamps=None)
    assert plain == SMALL and fields_of(plain)["version"] == VERSION == 1
    (frame,) = decode_message(plain)
    assert frame.timestamps is None


def test_constants() -> None:
    assert (VERSION, VERSION_TIMESTAMPS, FLAG_FIRST, FLAG_TIMESTAMPS) == (1, 2, 1, 2)


def test_sizes_with_timestamps() -> None:
    assert frame_bytes(7, 2, timestamps=True) == 56 + 32
    assert frame_bytes(64, 3, True) == 112 + 48
    assert frame_bytes(7, 0, True) == frame_bytes(7, 0) == 56
    assert max_values_in(88, 7, timestamps=True) == 2
    assert max_values_in(87, 7, timestamps=True) == 1
    assert max_values_in(71, 7, timestamps=True) == 0
    assert max_values_in(88, 7) == 4  # the default is unchanged: 8 bytes a value
    for capacity in range(48, 400, 7):
        fits = max_values_in(capacity, 5, True)
        assert frame_bytes(5, fits, True) <= capacity or fits == 0
        assert frame_bytes(5, fits + 1, True) > capacity


def test_first_flag_and_timestamps_together() -> None:
    flagged = encode_data(7, 1, "EUR/USD", [1.0850, 1.0851], first=True, timestamps=STAMPS)
    assert fields_of(flagged)["flags"] == FLAG_FIRST | FLAG_TIMESTAMPS
    assert flagged == build_v2(flags=FLAG_FIRST | FLAG_TIMESTAMPS)
    (frame,) = decode_message(flagged)
    assert frame.first and frame.timestamps.tolist() == STAMPS


def test_mark_first_keeps_working_for_v2() -> None:
    marked = mark_first(SMALL_V2)
    assert marked == encode_data(7, 1, "EUR/USD", [1.0850, 1.0851], first=True, timestamps=STAMPS)
    assert mark_first(marked) == marked
    frames = decode_message(marked + SMALL_V2 + SMALL)
    assert [f.first for f in frames] == [True, False, False]
    assert [None if f.timestamps is None else f.timestamps.tolist() for f in frames] == [
        STAMPS, STAMPS, None,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "stamps",
    [
        [T0, T0],
        np.array([1, 2], dtype=np.int32),
        np.array([1, 2], dtype=np.uint8),
        np.array([1, 2], dtype=">i8"),
        np.array(["2026-01-01T00:00:00", "2026-01-01T00:00:00.000000500"], dtype="datetime64[ns]"),
        np.array(["2026-01-01", "2026-01-02"], dtype="datetime64[D]"),
        [[T0], [T0 + 1]],
    ],
    ids=["list", "int32", "uint8", "big-endian", "datetime64-ns", "datetime64-D", "2d"],
)
def test_timestamps_convert_from_integer_and_datetime_inputs(stamps: object) -> None:
    expected = np.asarray(stamps)
    if expected.dtype.kind == "M":
        expected = expected.astype("datetime64[ns]").view(np.int64)
    (frame,) = decode_message(encode_data(1, 1, "S", [1.0, 2.0], timestamps=stamps))
    assert frame.timestamps.dtype == np.dtype("<i8")
    assert frame.timestamps.tolist() == expected.reshape(-1).tolist()


@pytest.mark.parametrize(
    ("stamps", "match"),
    [
        ([T0], "1 timestamps for 2 values"),
        ([T0, T0, T0], "3 timestamps for 2 values"),
        ([1.5, 2.0], "integer ns"),  # floats are refused, not truncated
        ([True, False], "integer ns"),
        (["1", "2"], "integer ns"),
        ([2**63, 0], "timestamps"),  # numpy reads this list as float64
        (np.array([2**64 - 1, 0], dtype=np.uint64), "fit in int64"),
        ([None, 1], "fit in int64"),
    ],
)
def test_encoding_rejects_timestamps_no_frame_can_carry(stamps: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_data(1, 1, "S", [1.0, 2.0], timestamps=stamps)


def test_as_timestamps_of_an_empty_column() -> None:
    assert as_timestamps([], 0).dtype == np.dtype("<i8")
    (frame,) = decode_message(encode_data(1, 1, "S", [], timestamps=[]))
    assert frame.timestamps is not None and frame.timestamps.size == 0
    assert frame.values.size == 0


# --- round trips ----------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(v2_frames(), min_size=1, max_size=5), st.lists(st.booleans(), min_size=5))
@example([(0, 1, "日本円-USD", np.array([0.0]), np.array([-(2**63)]))], [True] * 5)
def test_v2_round_trip(
    frames: list[tuple[int, int, str, np.ndarray, np.ndarray]], with_column: list[bool]
) -> None:
    """Messages mixing v1 and v2 frames decode to exactly what was encoded."""
    encoded = [
        encode_data(pid, seq, symbol, values, timestamps=stamps if column else None)
        for (pid, seq, symbol, values, stamps), column in zip(frames, with_column, strict=False)
    ]
    message = b"".join(encoded)
    decoded = decode_message(message)
    offset = 0
    for got, raw, column, (pid, seq, symbol, values, stamps) in zip(
        decoded, encoded, with_column, frames, strict=False
    ):
        assert (got.kind, got.publisher_id, got.sequence, got.symbol) == (
            Kind.DATA, pid, seq, symbol,
        )  # fmt: skip
        assert got.values.tobytes() == values.astype("<f8").tobytes()  # bit-exact, NaN too
        assert len(raw) == frame_bytes(len(symbol.encode()), values.size, column)
        assert fields_of(raw)["version"] == (2 if column else 1)
        if column:
            assert got.timestamps.dtype == np.dtype("<i8")
            assert got.timestamps.tolist() == stamps.tolist()
        else:
            assert got.timestamps is None
        _, end = decode_frame(message, offset)
        assert end - offset == len(raw)
        offset = end
    assert len(decoded) == len(frames) and offset == len(message)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_timestamps_are_a_read_only_zero_copy_aligned_view(wrap) -> None:
    message = b"".join(
        encode_data(1, n, "s" * n, np.arange(n, dtype=np.float64), timestamps=np.arange(n) * 7)
        for n in range(1, 20)
    )
    backing = np.frombuffer(message, dtype=np.uint8).copy()
    buffer = wrap(backing.tobytes()) if wrap is not memoryview else memoryview(backing)
    raw = np.frombuffer(buffer, dtype=np.uint8)
    for n, frame in enumerate(decode_message(buffer), start=1):
        assert frame.timestamps.tolist() == [7 * i for i in range(n)]
        assert np.shares_memory(frame.timestamps, raw)
        assert (frame.timestamps.ctypes.data - raw.ctypes.data) % 8 == 0
        assert not frame.timestamps.flags.writeable
        with pytest.raises(ValueError):
            frame.timestamps[0] = 0


def test_v2_ack_without_flags_decodes() -> None:
    # The appliance writes acks as version 1; a version-2 ACK (no flags) is not malformed.
    ack = bytearray(encode_ack(7, 1, 1))
    ack[4] = 2
    struct.pack_into("<I", ack, 40, 0)
    struct.pack_into("<I", ack, 40, crc32c.crc32c(ack))
    (frame,) = decode_message(bytes(ack))
    assert (frame.kind, frame.timestamps) == (Kind.ACK, None)


def test_v2_frame_without_the_flag_has_no_column() -> None:
    frame = build_v2(stamps=b"", flags=0)
    (decoded,) = decode_message(frame)
    assert decoded.timestamps is None and decoded.values.tolist() == [1.0850, 1.0851]


# --- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        # version 1 does not know the flag: its frame has no column, the flag is a header error
        (build_v2(stamps=b"", version=1), Reason.BAD_HEADER),
        (build_v2(stamps=b"", version=1, flags=FLAG_FIRST | FLAG_TIMESTAMPS), Reason.BAD_HEADER),
        # ... and the column bytes after it are not part of that frame (a v1 length)
        (build_v2(version=1), Reason.BAD_CRC),
        (build_v2(flags=FLAG_TIMESTAMPS | 4), Reason.BAD_HEADER),
        (build_v2(flags=FLAG_TIMESTAMPS | 0x8000), Reason.BAD_HEADER),
        (build_v2(stamps=b"", flags=4), Reason.BAD_HEADER),
        (build_v2(reserved=1), Reason.BAD_HEADER),
        (build_v2(sequence=0), Reason.BAD_HEADER),
        (build_v2(version=3), Reason.BAD_VERSION),
        (build_v2(count=3), Reason.BAD_LENGTH),
        (build_v2(count=0xFFFFFFFF), Reason.BAD_LENGTH),
        (build_v2(header_len=64), Reason.BAD_LENGTH),
        (build_v2(stamps=struct.pack("<q", T0)), Reason.BAD_LENGTH),  # half a column
        (build_v2(b"\xff\xfe"), Reason.INVALID_SYMBOL),
        (build_v2(b"", b"", b"", kind=Kind.ACK), Reason.BAD_HEADER),  # an ACK with the flag
    ],
    ids=lambda x: getattr(x, "name", None) or "",
)
def test_malformed_v2_frames(frame: bytes, reason: Reason) -> None:
    assert reason_of(frame) is reason
    assert reason_of(SMALL_V2 + frame) is reason  # also as the second frame of a message


def test_v2_truncation_at_every_length() -> None:
    frames = [
        SMALL_V2,
        encode_data(8, 2, "日本円-USD", np.arange(5.0), timestamps=np.arange(5) + T0),
        SMALL,
        encode_data(9, 3, "x", [], timestamps=[]),
    ]
    message = b"".join(frames)
    boundaries = {sum(map(len, frames[:i])): i for i in range(len(frames) + 1)}
    for cut in range(len(message)):
        if cut in boundaries and cut:
            assert len(decode_message(message[:cut])) == boundaries[cut]
        else:
            assert reason_of(message[:cut]) is Reason.BAD_LENGTH, cut


def test_v2_decode_never_reads_past_the_view() -> None:
    backing = bytearray(SMALL_V2 + SMALL_V2)
    for cut in range(len(SMALL_V2)):
        assert reason_of(memoryview(backing)[:cut]) is Reason.BAD_LENGTH
        with pytest.raises(WireError):
            decode_frame(memoryview(backing)[:cut])


def _expected_for_v2_bit_flip(byte: int, flipped: bytes) -> Reason:
    """The first check a single flipped bit in SMALL_V2 trips (the order of the byte table)."""
    fields = fields_of(flipped)
    if byte < 4:
        return Reason.BAD_MAGIC
    if byte == 4:
        return Reason.BAD_VERSION  # 2 with one bit flipped is never 1 or 2
    if byte in (8, 9):
        return Reason.BAD_LENGTH
    if byte == 10:
        return Reason.BAD_CRC if header_bytes(fields["symbol_len"]) == 56 else Reason.BAD_LENGTH
    if 12 <= byte < 16:
        return Reason.BAD_LENGTH if 56 + 16 * fields["count"] > len(SMALL_V2) else Reason.BAD_CRC
    # Everything else, flags included: clearing FLAG_TIMESTAMPS makes the frame shorter (the
    # column is then trailing bytes), but the CRC over the shorter frame fails first.
    return Reason.BAD_CRC


def test_every_single_bit_flip_of_a_v2_frame_is_detected() -> None:
    for bit in range(8 * len(SMALL_V2)):
        flipped = bytearray(SMALL_V2)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert reason_of(bytes(flipped)) is _expected_for_v2_bit_flip(bit // 8, flipped), bit


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_after_a_v2_header_start_never_raise_anything_but_wire_error(
    data: bytes,
) -> None:
    decodes_or_wire_error(MAGIC + bytes([VERSION_TIMESTAMPS]) + data)
    decodes_or_wire_error(MAGIC + bytes([VERSION_TIMESTAMPS, Kind.DATA, FLAG_TIMESTAMPS]) + data)


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=6),
    st.integers(-20, 20),
)
def test_mutated_v2_messages_never_raise_anything_but_wire_error(
    edits: list[tuple[int, int]], resize: int
) -> None:
    message = bytearray(
        SMALL_V2 + encode_ack(1, 1, 1) + SMALL + encode_data(3, 9, "ab", [2.0], timestamps=[5])
    )
    for position, byte in edits:
        message[position % len(message)] = byte
    if resize < 0:
        del message[resize:]
    else:
        message += bytes(resize)
    decodes_or_wire_error(bytes(message))


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["header_len", "symbol_len", "count", "kind", "flags",
                                        "version"]),
                       st.integers(0, 255), min_size=1))  # fmt: skip
def test_inconsistent_v2_headers_with_valid_crcs_raise_wire_error(overrides: dict) -> None:
    decodes_or_wire_error(build_v2(**overrides))
