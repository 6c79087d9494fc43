"""Encryption at rest, in process: the record codec, the log, checkpoints, warm segments (the
sealing child included), archive/verify/restore, fsck, the up-front key check and file modes."""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.durability import checkpoint, fsck, wal
from appliance.durability.archive import archive, run_verify
from appliance.durability.encryption import (
    DataCipher,
    DataKeyError,
    KeyFileError,
    is_encrypted_file,
    load_key,
)
from appliance.durability.keycheck import check_data_dir
from appliance.durability.records import BatchRecord
from appliance.durability.recovery import CorruptLogError, recover
from appliance.durability.restore import RestoreError, restore
from appliance.durability.warm import WarmTier
from appliance.durability.warm_segment import read_header, read_segment
from appliance.durability.writer import DurableWriter
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
# A value whose float64 bytes are searched for in every file: it must never appear in clear.
MARKER = 98765.4321
MARKER_BYTES = struct.pack("<d", MARKER)


def make_store() -> Store:
    return Store(NumpyEngine(), retention=RetentionPolicy(), max_symbols=10, starting_capacity=64)


def record(lsn: int = 1, symbol: str = "EUR/USD", values=(MARKER, 2.5)) -> BatchRecord:
    return BatchRecord(lsn, symbol, 0, 123, 7, 9, np.asarray(values, dtype=np.float64))


def fix_crc(data: bytearray, offset: int = 0) -> None:
    """Recompute a record's CRC: a deliberate change that a CRC alone would not catch."""
    length = struct.unpack_from("<I", data, offset + 4)[0]
    crc = crc32c.crc32c(bytes(data[offset + wal.CRC_END : offset + length]))
    struct.pack_into("<I", data, offset + 8, crc)


def all_files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every data file under `root`: its bytes and mode (to show that nothing changed); the
    empty lock file that a process creates to own the log is not data."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != wal.LOCK_NAME
    }


def write_log(data: Path, cipher: DataCipher | None, batches: int = 20, **kwargs) -> Store:
    store = make_store()
    writer = DurableWriter(store, wal.wal_dir(data), cipher=cipher, **kwargs)
    writer.start()
    for i in range(batches):
        writer.commit("EUR/USD", np.array([MARKER, float(i)]))
    writer.close()
    return store


# --- the record codec ------------------------------------------------------------------------


def test_an_encrypted_record_round_trips_and_holds_no_plaintext_value() -> None:
    cipher = DataCipher(KEY)
    data = wal.encode(record(), cipher)
    assert data[:4] == wal.MAGIC_ENCRYPTED and len(data) % 8 == 0
    assert MARKER_BYTES not in data and MARKER_BYTES in wal.encode(record())
    decoded, length = wal.decode(data, 0, cipher)
    assert length == len(data) == wal.record_size(7, 2, encrypted=True)
    assert decoded._replace(values=None) == record()._replace(values=None)
    assert decoded.values.tolist() == [MARKER, 2.5] and not decoded.values.flags.writeable


def test_plain_and_encrypted_records_are_never_mixed() -> None:
    cipher = DataCipher(KEY)
    with pytest.raises(wal.RecordError, match="unencrypted record in an encrypted log"):
        wal.decode(wal.encode(record()), 0, cipher)
    with pytest.raises(wal.RecordError, match="no data key is configured"):
        wal.decode(wal.encode(record(), cipher), 0, None)
    with pytest.raises(wal.RecordError, match="another data key"):
        wal.decode(wal.encode(record(), cipher), 0, DataCipher(OTHER_KEY))


def test_nonces_never_repeat_within_or_across_instances() -> None:
    first, second = DataCipher(KEY), DataCipher(KEY)
    nonces = [first.nonce() for _ in range(1000)] + [second.nonce() for _ in range(1000)]
    assert len(set(nonces)) == 2000
    assert int.from_bytes(nonces[1], "big") == int.from_bytes(nonces[0], "big") + 1


@settings(max_examples=60, deadline=None)
@given(
    symbol=st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 64),
    values=st.lists(st.floats(allow_nan=False), min_size=0, max_size=40),
    lsn=st.integers(1, 2**63),
    flip=st.integers(0, 10_000),
    bit=st.integers(0, 7),
)
def test_codec_round_trip_and_any_tamper_is_detected(symbol, values, lsn, flip, bit) -> None:
    cipher = DataCipher(KEY)
    rec = BatchRecord(lsn, symbol, 5, 6, 7, 8, np.asarray(values, dtype=np.float64))
    data = bytearray(wal.encode(rec, cipher))
    decoded, _ = wal.decode(bytes(data), 0, cipher)
    assert decoded.symbol == symbol and decoded.lsn == lsn
    assert decoded.values.tobytes() == rec.values.tobytes()
    at = flip % len(data)
    if 8 <= at < 12:  # the CRC field itself: caught by the CRC
        at += 4
    data[at] ^= 1 << bit
    with pytest.raises(wal.RecordError):  # caught by the CRC
        wal.decode(bytes(data), 0, cipher)
    fix_crc(data)
    with pytest.raises(wal.RecordError):  # and with a matching CRC, by the tag or the checks
        wal.decode(bytes(data), 0, cipher)


def test_every_single_byte_change_is_detected_even_with_a_matching_crc() -> None:
    cipher = DataCipher(KEY)
    pristine = wal.encode(record(symbol="EUR/USD-1"), cipher)
    for at in range(len(pristine)):
        if 8 <= at < 12:
            continue  # the CRC field: only the CRC check reads it
        data = bytearray(pristine)
        data[at] ^= 0x80
        fix_crc(data)
        with pytest.raises(wal.RecordError):
            wal.decode(bytes(data), 0, cipher)


# --- the log ---------------------------------------------------------------------------------


def test_log_round_trip_files_hold_no_plaintext_and_are_private(tmp_path: Path) -> None:
    os.umask(0o022)
    cipher = DataCipher(KEY)
    before = write_log(tmp_path, cipher)
    segment = wal.list_segments(wal.wal_dir(tmp_path))[0]
    assert MARKER_BYTES not in segment.read_bytes()
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    assert stat.S_IMODE(wal.wal_dir(tmp_path).stat().st_mode) == 0o700
    store = make_store()
    result = recover(store, tmp_path, use_checkpoint=False, cipher=DataCipher(KEY))
    assert result.records == 20 and result.next_lsn == 21
    assert store.stats("EUR/USD", 2).max == before.stats("EUR/USD", 2).max == MARKER


def test_a_changed_record_is_corruption_and_a_torn_tail_is_still_trimmed(tmp_path: Path) -> None:
    cipher = DataCipher(KEY)
    write_log(tmp_path, cipher)
    segment = wal.list_segments(wal.wal_dir(tmp_path))[0]
    pristine = segment.read_bytes()
    size = len(wal.encode(record(), cipher))  # every record here has the same size

    torn = pristine + pristine[-size:][: size // 2]  # half a record at the end
    segment.write_bytes(torn)
    result = recover(make_store(), tmp_path, use_checkpoint=False, cipher=cipher)
    assert result.truncated == [(segment, len(pristine))] and result.records == 20
    assert segment.read_bytes() == pristine

    changed = bytearray(pristine)
    changed[3 * size + size - 20] ^= 0x01  # a ciphertext byte of record 4, CRC fixed up
    fix_crc(changed, 3 * size)
    segment.write_bytes(bytes(changed))
    with pytest.raises(CorruptLogError, match="authentication failed") as caught:
        recover(make_store(), tmp_path, use_checkpoint=False, cipher=cipher)
    assert caught.value.offset == 3 * size
    out = io.StringIO()
    assert fsck.run(tmp_path, repair=False, out=out, cipher=cipher) == fsck.EXIT_DAMAGED
    assert "corrupt at offset" in out.getvalue() and "authentication failed" in out.getvalue()


def test_wrong_key_plain_data_and_missing_key_are_refused_up_front(tmp_path: Path) -> None:
    write_log(tmp_path / "enc", DataCipher(KEY))
    write_log(tmp_path / "plain", None)
    check_data_dir(tmp_path / "enc", DataCipher(KEY))
    check_data_dir(tmp_path / "plain", None)
    with pytest.raises(DataKeyError, match="data key does not match the key these files") as e:
        check_data_dir(tmp_path / "enc", DataCipher(OTHER_KEY))
    assert DataCipher(KEY).key_id_hex in str(e.value) and "wal-" in str(e.value)
    with pytest.raises(DataKeyError, match=r"is not encrypted but \[security\] data_key_file"):
        check_data_dir(tmp_path / "plain", DataCipher(KEY))
    with pytest.raises(DataKeyError, match=r"is encrypted \(key id"):
        check_data_dir(tmp_path / "enc", None)
    # fsck with the wrong key stops before reading: nothing is quarantined or rewritten.
    before = all_files(tmp_path / "enc")
    with pytest.raises(DataKeyError):
        fsck.run(tmp_path / "enc", repair=True, out=io.StringIO(), cipher=DataCipher(OTHER_KEY))
    assert all_files(tmp_path / "enc") == before


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_and_a_changed_manifest_fails(tmp_path: Path) -> None:
    cipher = DataCipher(KEY)
    store = make_store()
    values = np.full(3000, MARKER)
    store.ingest("EUR/USD", values)
    path = checkpoint.write_checkpoint(tmp_path, store, 7, {"EUR/USD": 5000}, cipher)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "s0000.enc", "t0000.enc"]
    assert MARKER_BYTES not in (path / "s0000.enc").read_bytes()
    newest = store.newest_timestamp("EUR/USD").to_bytes(8, "little")  # the time marks: secret too
    assert newest not in (path / "t0000.enc").read_bytes()
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o600}
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    loaded = checkpoint.load_latest(tmp_path, DataCipher(KEY))
    assert loaded is not None and loaded.symbols["EUR/USD"].total == 5000
    assert np.array_equal(loaded.symbols["EUR/USD"].values, values)
    marks = loaded.symbols["EUR/USD"].marks
    assert marks is not None and marks[1].tolist() == [store.newest_timestamp("EUR/USD")]
    assert checkpoint.load_latest(tmp_path, DataCipher(OTHER_KEY)) is None
    assert checkpoint.load_latest(tmp_path, None) is None
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"total": 5000', '"total": 6000'))
    assert checkpoint.load_latest(tmp_path, cipher) is None  # bound as associated data


# --- warm segments, the sealing child, archive and restore ------------------------------------


def test_warm_segments_sealed_by_the_child_from_an_encrypted_log(tmp_path: Path) -> None:
    cipher = DataCipher(KEY)
    warm = WarmTier(tmp_path / "warm", segment_values=100, log_dir=tmp_path / "wal", cipher=cipher)
    store = make_store()
    writer = DurableWriter(store, wal.wal_dir(tmp_path), cipher=cipher, segment_bytes=1 << 16)
    writer.add_listener(warm)
    writer.start()
    sent = [np.full(37, MARKER) + i for i in range(10)]
    for values in sent:
        writer.submit("EUR/USD", values).result()
    warm.drain()
    writer.close()
    assert warm._process is not None and warm._process.sealed == 3  # by the child, not memory
    view = warm.view("EUR/USD")
    assert view is not None
    got = np.concatenate([read_segment(s.path, s.header, cipher).values for s in view.sealed])
    assert np.array_equal(got, np.concatenate(sent)[:300])
    for segment in view.sealed:
        raw = segment.path.read_bytes()
        assert is_encrypted_file(raw) and MARKER_BYTES not in raw
        assert stat.S_IMODE(segment.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(segment.path.parent.stat().st_mode) == 0o700
        with pytest.raises(Exception, match="data key"):
            read_header(segment.path, DataCipher(OTHER_KEY))
    warm.close()
    # A restart reads the segments back with the key.
    again = WarmTier(tmp_path / "warm", segment_values=100, cipher=DataCipher(KEY))
    assert again.total("EUR/USD") == 300
    again.close()


def test_archive_verify_without_key_and_restore_with_it(tmp_path: Path) -> None:
    cipher = DataCipher(KEY)
    data = tmp_path / "data"
    warm = WarmTier(data / "warm", segment_values=50, cipher=cipher)
    warm.on_record(BatchRecord(1, "EUR/USD", 0, 10, 0, 0, np.full(120, MARKER)))
    warm.drain()
    warm.close()
    cold = tmp_path / "cold"
    manifest = archive(data / "warm", cold, cipher=cipher)
    assert len(manifest.files) == 2
    assert stat.S_IMODE(cold.stat().st_mode) == 0o700
    for entry in manifest.files:
        copy = cold / entry.path
        assert is_encrypted_file(copy.read_bytes()) and MARKER_BYTES not in copy.read_bytes()
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    out = io.StringIO()
    assert run_verify(cold, out) == 0, out.getvalue()  # no key needed
    with pytest.raises(RestoreError, match="data key"):
        restore(cold, tmp_path / "wrong", cipher=DataCipher(OTHER_KEY))
    report = restore(cold, tmp_path / "restored", cipher=cipher)
    assert report.totals == {"EUR/USD": 100}
    check_data_dir(tmp_path / "restored", cipher)  # the checkpoint is encrypted too
    loaded = checkpoint.load_latest(tmp_path / "restored", cipher)
    assert loaded is not None and loaded.symbols["EUR/USD"].total == 100
    again = WarmTier(tmp_path / "restored" / "warm", segment_values=50, cipher=cipher)
    assert again.total("EUR/USD") == 100
    again.close()


# --- the key file ----------------------------------------------------------------------------


def test_key_file_must_be_32_private_bytes(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    assert load_key(key) == KEY
    key.chmod(0o640)
    with pytest.raises(KeyFileError, match=r"security.data_key_file .*mode 0640.*chmod 600"):
        load_key(key)
    key.chmod(0o600)
    key.write_bytes(KEY.hex().encode())
    with pytest.raises(KeyFileError, match="exactly 32 raw bytes"):
        load_key(key)
    with pytest.raises(KeyFileError, match="cannot read it"):
        load_key(tmp_path / "absent")
    assert "key id" in repr(DataCipher(KEY)) and KEY.hex() not in repr(DataCipher(KEY))
