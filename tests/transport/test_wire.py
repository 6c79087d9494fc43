"""The binary frame format: round trips, zero-copy payloads, and decoding of hostile bytes.

Every malformed input must raise `WireError` (never IndexError, struct.error, ValueError or
OverflowError) with the reason the first failing check determines, and decoding must never
look past the buffer it was given.
"""

from __future__ import annotations

import re
import struct

import crc32c
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.conftest import REPO_ROOT
from transport.wire import (
    FIXED_HEADER_BYTES,
    FLAG_FIRST,
    MAGIC,
    MAX_SEQUENCE,
    MAX_SYMBOL_BYTES,
    RETRYABLE,
    VERSION,
    Kind,
    Reason,
    WireError,
    decode_frame,
    decode_message,
    encode_ack,
    encode_data,
    encode_nack,
    frame_bytes,
    header_bytes,
    mark_first,
    max_values_in,
    peek_identity,
)

FIXED = struct.Struct("<4sBBHHBBIQQQII")
FIELDS = (
    "magic", "version", "kind", "flags", "header_len", "symbol_len", "reason", "count",
    "publisher_id", "sequence", "applied", "crc", "reserved",
)  # fmt: skip
# Byte offset of each fixed-header field (the table in docs/wire-format.md).
OFFSETS = {
    "magic": 0, "version": 4, "kind": 5, "flags": 6, "header_len": 8, "symbol_len": 10,
    "reason": 11, "count": 12, "publisher_id": 16, "sequence": 24, "applied": 32, "crc": 40,
    "reserved": 44,
}  # fmt: skip

SMALL = encode_data(7, 1, "EUR/USD", np.array([1.0850, 1.0851]))

symbols = st.text(min_size=1, max_size=MAX_SYMBOL_BYTES).filter(
    lambda s: 1 <= len(s.encode("utf-8")) <= MAX_SYMBOL_BYTES
)
value_arrays = hnp.arrays(
    np.float64, st.integers(0, 40), elements=st.floats(allow_nan=True, allow_infinity=True)
)
data_frames = st.tuples(
    st.integers(0, MAX_SEQUENCE), st.integers(1, MAX_SEQUENCE), symbols, value_arrays
)


def fields_of(frame: bytes) -> dict[str, object]:
    return dict(zip(FIELDS, FIXED.unpack_from(frame), strict=True))


def build(
    symbol: bytes = b"EUR/USD",
    values: bytes = struct.pack("<2d", 1.0850, 1.0851),
    *,
    fix_crc: bool = True,
    pad: bytes | None = None,
    **overrides: int | bytes,
) -> bytes:
    """A frame with any header field forced to a value, and (by default) a correct CRC.

    Written independently of the encoder, from the byte table: the CRC is CRC32C of the whole
    frame with its own 4 bytes zero.
    """
    head = FIXED_HEADER_BYTES + (len(symbol) + 7) // 8 * 8
    fields: dict[str, object] = {
        "magic": MAGIC, "version": VERSION, "kind": Kind.DATA, "flags": 0, "header_len": head,
        "symbol_len": len(symbol), "reason": 0, "count": len(values) // 8, "publisher_id": 7,
        "sequence": 1, "applied": 0, "crc": 0, "reserved": 0,
    }  # fmt: skip
    fields.update(overrides)
    padding = pad if pad is not None else bytes(-len(symbol) % 8)
    frame = bytearray(FIXED.pack(*fields.values()) + symbol + padding + values)
    if fix_crc:
        struct.pack_into("<I", frame, 40, 0)
        struct.pack_into("<I", frame, 40, crc32c.crc32c(frame))
    return bytes(frame)


def reason_of(data: bytes | bytearray | memoryview) -> Reason:
    """Decode `data` as a message; it must fail with WireError and nothing else."""
    with pytest.raises(WireError) as info:
        decode_message(data)
    assert isinstance(info.value.reason, Reason)
    return info.value.reason


def decodes_or_wire_error(data: bytes | bytearray | memoryview) -> None:
    """Any outcome but an exception other than WireError."""
    try:
        frames = decode_message(data)
    except WireError as exc:
        assert isinstance(exc.reason, Reason) and exc.reason is not Reason.NONE
    else:
        assert frames


# --- encoding -------------------------------------------------------------------------------


def test_crc32c_is_castagnoli() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_small_frame_layout_matches_the_byte_table() -> None:
    assert len(SMALL) == 72 == frame_bytes(7, 2)
    fields = fields_of(SMALL)
    assert fields == {
        "magic": b"HFTW", "version": 1, "kind": 1, "flags": 0, "header_len": 56,
        "symbol_len": 7, "reason": 0, "count": 2, "publisher_id": 7, "sequence": 1,
        "applied": 0, "crc": fields["crc"], "reserved": 0,
    }  # fmt: skip
    assert SMALL[48:56] == b"EUR/USD\x00"
    assert struct.unpack_from("<2d", SMALL, 56) == (1.0850, 1.0851)
    assert build() == SMALL  # the independent builder agrees, CRC included


def test_crc_covers_the_whole_frame_with_its_own_field_zero() -> None:
    zeroed = bytearray(SMALL)
    zeroed[40:44] = bytes(4)
    assert struct.unpack_from("<I", SMALL, 40)[0] == crc32c.crc32c(zeroed)


def test_ack_and_nack_layout() -> None:
    ack = encode_ack(7, 1, 1)
    nack = encode_nack(7, 3, 1, Reason.GAP)
    assert len(ack) == len(nack) == FIXED_HEADER_BYTES
    assert fields_of(ack) | {"crc": 0} == {
        "magic": b"HFTW", "version": 1, "kind": 2, "flags": 0, "header_len": 48,
        "symbol_len": 0, "reason": 0, "count": 0, "publisher_id": 7, "sequence": 1,
        "applied": 1, "crc": 0, "reserved": 0,
    }  # fmt: skip
    assert (fields_of(nack)["kind"], fields_of(nack)["reason"]) == (3, 11)
    assert ack == build(b"", b"", kind=Kind.ACK, applied=1)
    assert nack == build(b"", b"", kind=Kind.NACK, sequence=3, applied=1, reason=Reason.GAP)


def test_encode_data_first_sets_only_flag_bit_0() -> None:
    flagged = encode_data(7, 1, "EUR/USD", np.array([1.0850, 1.0851]), first=True)
    assert fields_of(flagged)["flags"] == FLAG_FIRST == 1
    assert flagged == build(flags=FLAG_FIRST)  # the independent builder agrees, CRC included
    assert flagged[:6] + flagged[8:40] + flagged[44:] == SMALL[:6] + SMALL[8:40] + SMALL[44:]
    (frame,) = decode_message(flagged)
    assert frame.first is True
    (plain,) = decode_message(SMALL)
    assert plain.first is False


def test_mark_first_round_trip() -> None:
    original = encode_data(9, 42, "日本円-USD", np.array([1.5, 2.5, 3.5]))
    marked = mark_first(original)
    assert marked == encode_data(9, 42, "日本円-USD", np.array([1.5, 2.5, 3.5]), first=True)
    assert original != marked and fields_of(original)["flags"] == 0  # a copy; bytes untouched
    assert fields_of(marked) | {"flags": 0, "crc": 0} == fields_of(original) | {"crc": 0}
    zeroed = bytearray(marked)
    zeroed[40:44] = bytes(4)
    assert fields_of(marked)["crc"] == crc32c.crc32c(zeroed)
    (before,), (after,) = decode_message(original), decode_message(marked)
    assert after.first and not before.first
    assert (after.kind, after.publisher_id, after.sequence, after.symbol, after.applied,
            after.reason) == (before.kind, before.publisher_id, before.sequence, before.symbol,
                              before.applied, before.reason)  # fmt: skip
    assert after.values.tobytes() == before.values.tobytes()
    assert mark_first(marked) == marked  # idempotent
    # inside a message of several frames it is decoded like any other
    message = marked + SMALL + mark_first(SMALL)
    assert [f.first for f in decode_message(message)] == [True, False, True]


@given(data_frames, st.booleans())
def test_first_round_trips(frame: tuple[int, int, str, np.ndarray], first: bool) -> None:
    encoded = encode_data(*frame, first=first)
    (decoded,) = decode_message(encoded)
    assert decoded.first is first
    assert mark_first(encode_data(*frame)) == encode_data(*frame, first=True)


def test_sizes() -> None:
    assert [header_bytes(n) for n in (0, 1, 8, 9, 16, 57, 64)] == [48, 56, 56, 64, 64, 112, 112]
    assert frame_bytes(64, 3) == 112 + 24
    assert max_values_in(72, 7) == 2
    assert max_values_in(71, 7) == 1
    assert max_values_in(10, 7) == 0


@pytest.mark.parametrize("symbol", ["", "x" * 65, "é" * 33, "日" * 22, "\U0001f4c8" * 17], ids=repr)
def test_encoding_rejects_symbols_no_frame_can_carry(symbol: str) -> None:
    with pytest.raises(ValueError, match="symbol"):
        encode_data(1, 1, symbol, np.array([1.0]))


@pytest.mark.parametrize("symbol", ["x" * 64, "é" * 32, "日" * 21 + "x", "\U0001f4c8" * 16])
def test_encoding_accepts_symbols_up_to_64_utf8_bytes(symbol: str) -> None:
    frame, _ = decode_frame(encode_data(1, 1, symbol, np.array([1.0])))
    assert frame.symbol == symbol


@pytest.mark.parametrize(
    ("publisher_id", "sequence"), [(1, 0), (1, MAX_SEQUENCE + 1), (1, -1), (-1, 1), (1 << 64, 1)]
)
def test_encoding_rejects_ids_out_of_range(publisher_id: int, sequence: int) -> None:
    with pytest.raises(ValueError):
        encode_data(publisher_id, sequence, "S", np.array([1.0]))


def test_encoding_converts_any_numeric_input_to_little_endian_float64() -> None:
    for values in (
        np.array([1.5, 2.5], dtype=">f8"),
        np.array([[1.5], [2.5]]),
        np.array([1.5, 2.5], dtype=np.float32),
        [1.5, 2.5],
    ):
        frame, _ = decode_frame(encode_data(1, 1, "S", values))
        assert frame.values.tolist() == [1.5, 2.5]
    frame, _ = decode_frame(encode_data(1, 1, "S", np.arange(10.0)[::3]))  # non-contiguous
    assert frame.values.tolist() == [0.0, 3.0, 6.0, 9.0]


# --- round trips ----------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.lists(data_frames, min_size=1, max_size=5))
@example([(0, 1, "日本円-USD", np.array([]))])
@example([(MAX_SEQUENCE, MAX_SEQUENCE, "é" * 32, np.array([-0.0, np.nan, -np.inf]))])
def test_round_trip(frames: list[tuple[int, int, str, np.ndarray]]) -> None:
    message = b"".join(encode_data(*frame) for frame in frames)
    assert len(message) == sum(frame_bytes(len(s.encode()), v.size) for _, _, s, v in frames)
    decoded = decode_message(message)
    assert len(decoded) == len(frames)
    offset = 0
    for got, (publisher_id, sequence, symbol, values) in zip(decoded, frames, strict=True):
        assert got.kind is Kind.DATA
        assert (got.publisher_id, got.sequence, got.symbol) == (publisher_id, sequence, symbol)
        assert (got.applied, got.reason) == (0, Reason.NONE)
        assert got.values.dtype == np.dtype("<f8")
        assert got.values.tobytes() == values.astype("<f8").tobytes()  # bit-exact, NaN too
        single, end = decode_frame(message, offset)
        assert (single.sequence, single.values.tobytes()) == (sequence, got.values.tobytes())
        assert end - offset == frame_bytes(len(symbol.encode()), values.size)
        offset = end
    assert offset == len(message)


@given(
    st.integers(0, MAX_SEQUENCE),
    st.integers(0, MAX_SEQUENCE),
    st.integers(0, MAX_SEQUENCE),
    st.sampled_from(list(Reason)),
)
def test_ack_and_nack_round_trip(pid: int, sequence: int, applied: int, reason: Reason) -> None:
    (ack,) = decode_message(encode_ack(pid, sequence, applied))
    assert (ack.kind, ack.publisher_id, ack.sequence, ack.applied, ack.reason) == (
        Kind.ACK, pid, sequence, applied, Reason.NONE,
    )  # fmt: skip
    assert (ack.symbol, ack.values.size) == ("", 0)
    (nack,) = decode_message(encode_nack(pid, sequence, applied, reason))
    assert (nack.kind, nack.sequence, nack.applied, nack.reason) == (
        Kind.NACK, sequence, applied, reason,
    )  # fmt: skip


def test_acks_and_data_mix_in_one_message() -> None:
    message = encode_ack(1, 2, 2) + SMALL + encode_nack(1, 5, 2, Reason.BAD_CRC)
    assert [f.kind for f in decode_message(message)] == [Kind.ACK, Kind.DATA, Kind.NACK]


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_payload_is_a_zero_copy_aligned_view(wrap) -> None:
    # Frames of odd symbol lengths: every payload must still start 8-aligned in the buffer.
    message = b"".join(
        encode_data(1, n, "s" * n, np.arange(n, dtype=np.float64)) for n in range(1, 20)
    )
    backing = np.frombuffer(message, dtype=np.uint8).copy()  # numpy memory: 16+-aligned
    assert backing.ctypes.data % 8 == 0
    buffer = wrap(backing.tobytes()) if wrap is not memoryview else memoryview(backing)
    raw = np.frombuffer(buffer, dtype=np.uint8)
    for n, frame in enumerate(decode_message(buffer), start=1):
        assert frame.values.tolist() == list(range(n))
        assert np.shares_memory(frame.values, raw)
        assert (frame.values.ctypes.data - raw.ctypes.data) % 8 == 0
    if wrap is memoryview:
        assert all(frame.values.ctypes.data % 8 == 0 for frame in decode_message(buffer))


def test_payload_of_an_immutable_buffer_is_read_only() -> None:
    (frame,) = decode_message(SMALL)
    assert not frame.values.flags.writeable
    with pytest.raises(ValueError):
        frame.values[0] = 0.0


def test_payload_view_is_read_only_even_over_a_writable_buffer() -> None:
    # A ring slot is writable memory: the decoded view must still not be a way to change it.
    (frame,) = decode_message(bytearray(SMALL))
    assert not frame.values.flags.writeable


# --- malformed input ------------------------------------------------------------------------


def test_empty_message() -> None:
    assert reason_of(b"") is Reason.BAD_LENGTH


def test_truncation_at_every_length() -> None:
    frames = [SMALL, encode_data(8, 2, "日本円-USD", np.arange(5.0)), encode_data(9, 3, "x", [])]
    message = b"".join(frames)
    boundaries = {sum(map(len, frames[:i])): i for i in range(len(frames) + 1)}
    for cut in range(len(message)):
        if cut in boundaries and cut:
            assert len(decode_message(message[:cut])) == boundaries[cut]
        else:
            assert reason_of(message[:cut]) is Reason.BAD_LENGTH, cut


def test_decode_never_reads_past_the_view() -> None:
    # The bytes just past the view would complete the frame: decoding must not see them.
    backing = bytearray(SMALL + SMALL)
    for cut in range(len(SMALL)):
        view = memoryview(backing)[:cut]
        assert reason_of(view) is Reason.BAD_LENGTH
        with pytest.raises(WireError):
            decode_frame(view)
    # A view that starts mid-buffer: offsets are relative to the view.
    (frame,) = decode_message(memoryview(backing)[len(SMALL) :])
    assert frame.symbol == "EUR/USD"


def test_decode_frame_reports_the_offset_of_the_bad_frame() -> None:
    message = SMALL + SMALL[:-1]
    with pytest.raises(WireError) as info:
        decode_message(message)
    assert (info.value.reason, info.value.offset) == (Reason.BAD_LENGTH, len(SMALL))
    _, end = decode_frame(message, 0)
    assert end == len(SMALL)
    for offset in (len(SMALL), len(message), len(message) + 100):
        with pytest.raises(WireError):
            decode_frame(message, offset)


def _expected_for_bit_flip(byte: int, flipped: bytes) -> Reason:
    """The first check that a single flipped bit in SMALL trips (the order of the byte table)."""
    fields = fields_of(flipped)
    if byte < 4:
        return Reason.BAD_MAGIC
    if byte == 4:
        return Reason.BAD_VERSION
    if byte in (8, 9):
        return Reason.BAD_LENGTH  # header_len no longer matches symbol_len
    if byte == 10:  # symbol_len: harmless to the lengths only if the padded size is the same
        return Reason.BAD_CRC if header_bytes(fields["symbol_len"]) == 56 else Reason.BAD_LENGTH
    if 12 <= byte < 16:  # count: claims more bytes than exist, or a shorter (unchecked) frame
        return Reason.BAD_LENGTH if 56 + 8 * fields["count"] > len(SMALL) else Reason.BAD_CRC
    return Reason.BAD_CRC  # everything else, the CRC field itself included


def test_every_single_bit_flip_is_detected() -> None:
    for bit in range(8 * len(SMALL)):
        flipped = bytearray(SMALL)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert reason_of(bytes(flipped)) is _expected_for_bit_flip(bit // 8, flipped), bit


def test_every_single_bit_flip_of_an_ack_is_detected() -> None:
    ack = encode_ack(7, 1, 1)
    for bit in range(8 * len(ack)):
        flipped = bytearray(ack)
        flipped[bit // 8] ^= 1 << (bit % 8)
        reason_of(bytes(flipped))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"magic": b"HFTX"}, Reason.BAD_MAGIC),
        ({"magic": b"WTFH"}, Reason.BAD_MAGIC),
        ({"version": 0}, Reason.BAD_VERSION),
        ({"version": 3}, Reason.BAD_VERSION),  # 2 is the timestamp version (test_wire_v2)
        ({"version": 255}, Reason.BAD_VERSION),
        ({"header_len": 48}, Reason.BAD_LENGTH),
        ({"header_len": 55}, Reason.BAD_LENGTH),
        ({"header_len": 64}, Reason.BAD_LENGTH),
        ({"header_len": 0xFFFF}, Reason.BAD_LENGTH),
        ({"count": 3}, Reason.BAD_LENGTH),
        ({"count": 0xFFFFFFFF}, Reason.BAD_LENGTH),  # a huge claim: checked, not allocated
        ({"kind": 0}, Reason.BAD_HEADER),
        ({"kind": 4}, Reason.BAD_HEADER),
        ({"kind": 255}, Reason.BAD_HEADER),
        ({"flags": 2}, Reason.BAD_HEADER),  # bit 0 (FIRST) is the only version-1 DATA flag
        ({"flags": FLAG_FIRST | 2}, Reason.BAD_HEADER),
        ({"flags": 0x8000}, Reason.BAD_HEADER),
        ({"reserved": 1}, Reason.BAD_HEADER),
        ({"reserved": 0xFFFFFFFF}, Reason.BAD_HEADER),
        ({"reason": int(Reason.GAP)}, Reason.BAD_HEADER),  # a reason in a DATA frame
        ({"sequence": 0}, Reason.BAD_HEADER),
    ],
)
def test_wrong_header_fields_with_a_valid_crc(overrides: dict, reason: Reason) -> None:
    frame = build(**overrides)
    assert reason_of(frame) is reason
    assert reason_of(SMALL + frame) is reason  # also as the second frame of a message


def test_wrong_header_fields_are_found_before_the_crc_only_for_lengths() -> None:
    # Without a fixed CRC a wrong kind is a CRC error (the CRC is checked first) ...
    assert reason_of(build(kind=9, fix_crc=False)) is Reason.BAD_CRC
    # ... but a wrong length is found before any CRC is computed.
    assert reason_of(build(count=1000, fix_crc=False)) is Reason.BAD_LENGTH


def test_count_smaller_than_the_bytes_leaves_trailing_garbage() -> None:
    # count says 1 value and the CRC covers those 64 bytes; 8 more bytes follow
    frame = build(values=struct.pack("<d", 1.0850)) + struct.pack("<d", 1.0851)
    assert reason_of(frame) is Reason.BAD_LENGTH
    first, end = decode_frame(frame)
    assert (first.values.tolist(), end) == ([1.0850], 64)
    # count says 1 value but the CRC was computed over all 72 bytes: a CRC error
    assert reason_of(build(count=1)) is Reason.BAD_CRC


@pytest.mark.parametrize(
    ("symbol", "kwargs"),
    [
        (b"", {}),  # DATA without a symbol
        (b"x" * 65, {}),
        (b"x" * 255, {}),
        (b"\xff\xfe", {}),  # not UTF-8
        (b"\xc3", {}),  # truncated multi-byte sequence
        (b"\xed\xa0\x80", {}),  # an encoded surrogate
    ],
    ids=repr,
)
def test_bad_symbols(symbol: bytes, kwargs: dict) -> None:
    assert reason_of(build(symbol, **kwargs)) is Reason.INVALID_SYMBOL


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": Kind.ACK},  # an ACK carrying a symbol and values
        {"kind": Kind.NACK, "reason": int(Reason.GAP)},
    ],
)
def test_ack_and_nack_carry_no_symbol_or_values(overrides: dict) -> None:
    assert reason_of(build(**overrides)) is Reason.BAD_HEADER
    assert reason_of(build(b"", struct.pack("<d", 1.0), **overrides)) is Reason.BAD_HEADER


@pytest.mark.parametrize("kind", [Kind.ACK, Kind.NACK])
@pytest.mark.parametrize("flags", [FLAG_FIRST, 2, 0x8000])
def test_ack_and_nack_carry_no_flags(kind: Kind, flags: int) -> None:
    reason = int(Reason.GAP) if kind is Kind.NACK else 0
    (control,) = decode_message(build(b"", b"", kind=kind, reason=reason, applied=1))
    assert (control.kind, control.first) == (kind, False)  # the same frame without flags
    frame = build(b"", b"", kind=kind, reason=reason, applied=1, flags=flags)
    assert reason_of(frame) is Reason.BAD_HEADER
    assert reason_of(SMALL + frame) is Reason.BAD_HEADER


@pytest.mark.parametrize("code", [19, 99, 255])
def test_nack_with_an_unknown_reason(code: int) -> None:
    assert reason_of(build(b"", b"", kind=Kind.NACK, reason=code)) is Reason.BAD_HEADER


def test_ack_with_sequence_zero_decodes() -> None:
    # A nack for a message too short to name its sender is addressed to (0, 0).
    (frame,) = decode_message(encode_nack(0, 0, 0, Reason.BAD_LENGTH))
    assert (frame.publisher_id, frame.sequence, frame.reason) == (0, 0, Reason.BAD_LENGTH)


@pytest.mark.parametrize("extra", [1, 7, 8, 47])
def test_short_trailing_garbage_is_a_length_error(extra: int) -> None:
    assert reason_of(SMALL + b"\x00" * extra) is Reason.BAD_LENGTH
    assert reason_of(SMALL + SMALL[:extra]) is Reason.BAD_LENGTH


@pytest.mark.parametrize("extra", [48, 100])
def test_long_trailing_garbage_is_a_magic_error(extra: int) -> None:
    assert reason_of(SMALL + b"\xab" * extra) is Reason.BAD_MAGIC


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    decodes_or_wire_error(data)
    decodes_or_wire_error(MAGIC + bytes([VERSION]) + data)  # past the first two checks


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(-20, 20),
)
def test_mutated_messages_never_raise_anything_but_wire_error(
    edits: list[tuple[int, int]], resize: int
) -> None:
    message = bytearray(SMALL + encode_ack(1, 1, 1) + encode_data(3, 9, "ab", [2.0]))
    for position, byte in edits:
        message[position % len(message)] = byte
    if resize < 0:
        del message[resize:]
    else:
        message += bytes(resize)
    decodes_or_wire_error(bytes(message))


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["header_len", "symbol_len", "count", "kind"]),
                       st.integers(0, 255), min_size=1))  # fmt: skip
def test_inconsistent_headers_with_valid_crcs_raise_wire_error(overrides: dict) -> None:
    decodes_or_wire_error(build(**overrides))


# --- peek_identity --------------------------------------------------------------------------


def test_peek_identity_reads_the_header_untrusted() -> None:
    assert peek_identity(SMALL) == (7, 1)
    damaged = bytearray(build(publisher_id=42, sequence=99, fix_crc=False))
    damaged[0] = 0  # bad magic and CRC: still addressed
    assert peek_identity(bytes(damaged)) == (42, 99)
    message = SMALL + build(publisher_id=5, sequence=6)
    assert peek_identity(message, len(SMALL)) == (5, 6)
    assert peek_identity(memoryview(message)) == (7, 1)


@pytest.mark.parametrize("size", [0, 1, 47])
def test_peek_identity_of_a_short_buffer_is_zero(size: int) -> None:
    assert peek_identity(SMALL[:size]) == (0, 0)
    assert peek_identity(SMALL, len(SMALL) - size) == (0, 0)


# --- reason codes ---------------------------------------------------------------------------


def test_reason_codes_are_stable() -> None:
    # Publishers in other languages hard-code these numbers (docs/wire-format.md).
    assert {r.name: r.value for r in Reason} == {
        "NONE": 0, "BAD_MAGIC": 1, "BAD_VERSION": 2, "BAD_LENGTH": 3, "BAD_CRC": 4,
        "BAD_HEADER": 5, "INVALID_SYMBOL": 6, "INVALID_VALUE": 7, "EMPTY_BATCH": 8,
        "BATCH_TOO_LARGE": 9, "DUPLICATE": 10, "GAP": 11, "SYMBOL_LIMIT": 12, "INTERNAL": 13,
        "UNAVAILABLE": 14, "UNKNOWN_PUBLISHER": 15, "FORBIDDEN": 16, "OUT_OF_ORDER": 17,
        "INVALID_TIMESTAMP": 18,
    }  # fmt: skip
    assert {r.name for r in RETRYABLE} == {
        "BAD_CRC", "GAP", "INTERNAL", "UNAVAILABLE", "UNKNOWN_PUBLISHER",
    }  # fmt: skip
    assert FLAG_FIRST == 0x0001
    assert {k.name: k.value for k in Kind} == {"DATA": 1, "ACK": 2, "NACK": 3}


# --- the documented example -----------------------------------------------------------------


def _documented_frames() -> list[bytes]:
    """The annotated hex dumps of docs/wire-format.md's worked example (offset, bytes, note)."""
    text = (REPO_ROOT / "docs" / "wire-format.md").read_text(encoding="utf-8")
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    frames = []
    for block in re.findall(r"```\n(.*?)```", section, flags=re.S):
        lines = block.splitlines()
        data = bytearray()
        annotated = lines[0].startswith("offset")
        for line in lines[1:] if annotated else lines:
            tokens = line.split()
            if annotated:
                assert int(tokens[0]) == len(data), line
                tokens = tokens[1:]
            for token in tokens:
                if not re.fullmatch(r"[0-9a-f]{2}", token):
                    break
                data.append(int(token, 16))
        frames.append(bytes(data))
    return frames


DOCUMENTED_STAMPS = [1_767_225_600_000_000_000, 1_767_225_600_000_000_500]


def test_the_documented_example_is_the_real_encoding() -> None:
    assert _documented_frames() == [
        encode_data(7, 1, "EUR/USD", np.array([1.0850, 1.0851]), first=True),
        encode_ack(7, 1, 1),
        encode_nack(7, 3, 1, Reason.GAP),
        # the version-2 example: the same frame with a timestamp column (sequence 2)
        encode_data(7, 2, "EUR/USD", [1.0850, 1.0851], timestamps=DOCUMENTED_STAMPS),
    ]
