"""Timestamps through durability: the log's record format, replay, checkpoints, the warm tier.

Every check compares against an independent reference: hand-packed bytes for the old record
format, a `Store` fed the same batches directly for replayed marks, numpy over per-value times
for history ranges.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import time
from pathlib import Path

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.durability import checkpoint as ckpt
from appliance.durability import fsck, wal
from appliance.durability import writer as writer_module
from appliance.durability.checkpoint import cut_marks, load_latest, write_checkpoint
from appliance.durability.encryption import DataCipher
from appliance.durability.history import stats_by_time
from appliance.durability.records import BatchRecord
from appliance.durability.recovery import recover, replay_batch_by_batch
from appliance.durability.warm import WarmTier
from appliance.durability.warm_segment import read_segment
from appliance.durability.writer import DurableWriter
from appliance.store import Store, time_key
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine

SMALL = Geometry(block=4, fanout=4, chunk=64)
KEY = bytes(range(32))
T0 = 1_700_000_000_000_000_000


def make_store(max_values: int = 500, keep: int = 300, clamp: bool = False) -> Store:
    return Store(
        NumpyEngine(geometry=SMALL),
        retention=RetentionPolicy(max_values, keep),
        max_symbols=10,
        starting_capacity=0,
        clamp_out_of_order=clamp,
    )


def ts_record(lsn=1, symbol="EUR/USD", first=0, values=(1.0, 2.5), times=(T0, T0 + 5)):
    return BatchRecord(
        lsn,
        symbol,
        first,
        123,
        7,
        9,
        np.asarray(values, dtype=np.float64),
        None if times is None else np.asarray(times, dtype=np.int64),
    )


def per_value_times(marks: tuple[np.ndarray, np.ndarray], count: int) -> np.ndarray:
    """Expand marks into one time per value (the numpy reference of what they mean)."""
    index, ns = marks
    runs = np.diff(np.append(index, count))
    return np.repeat(ns, runs)


# --- record format ----------------------------------------------------------------------------


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    symbol=st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 64),
    values=st.lists(st.floats(0, 1e300), min_size=1, max_size=40),
    steps=st.data(),
    timed=st.booleans(),
    encrypted=st.booleans(),
)
def test_round_trip_with_and_without_timestamps(symbol, values, steps, timed, encrypted) -> None:
    count = len(values)
    times = None
    if timed:
        gaps = steps.draw(st.lists(st.integers(0, 10**12), min_size=count, max_size=count))
        times = np.cumsum(np.array(gaps, dtype=np.int64))
    rec = BatchRecord(5, symbol, 11, 22, 33, 44, np.array(values), times)
    cipher = DataCipher(KEY) if encrypted else None
    data = wal.encode(rec, cipher)
    sym_len = len(symbol.encode())
    assert len(data) == wal.record_size(sym_len, count, encrypted, timed)
    assert struct.unpack_from("<H", data, 14)[0] == (wal.FLAG_TIMESTAMPS if timed else 0)
    back, length = wal.decode(b"\0" * 8 + data, 8, cipher)
    assert length == len(data) and back[:6] == rec[:6]
    assert back.values.tolist() == values and not back.values.flags.writeable
    if timed:
        assert back.timestamps.dtype == np.int64 and not back.timestamps.flags.writeable
        assert back.timestamps.tolist() == times.tolist()
    else:
        assert back.timestamps is None
    if encrypted and timed:  # the times are secret too: their bytes appear nowhere in the record
        assert times.tobytes() not in data and np.array(values).tobytes() not in data


def test_encode_parts_hands_the_columns_over_without_a_copy() -> None:
    rec = ts_record(values=np.arange(1000.0), times=np.arange(1000, dtype=np.int64) + T0)
    head, values, times = wal.encode_parts(rec)
    assert np.shares_memory(np.frombuffer(values, np.float64), rec.values)
    assert np.shares_memory(np.frombuffer(times, np.int64), rec.timestamps)
    assert head + bytes(values) + bytes(times) == wal.encode(rec)
    assert len(wal.encode_parts(rec._replace(timestamps=None))) == 2


def test_a_record_without_timestamps_is_the_old_format_byte_for_byte() -> None:
    # Packed by hand from the layout before timestamps (reserved zero at 14): old logs replay.
    values = np.array([1.5, 2.5, 4.0])
    sym = b"OLD"
    body = struct.pack("<BBH QQQQQ II", 1, 3, 0, 9, 100, 555, 7, 8, 3, 0) + sym + b"\0" * 5
    body += values.tobytes()
    length = 12 + len(body)
    crc = crc32c.crc32c(body)
    old = b"HWAL" + struct.pack("<II", length, crc) + body
    assert wal.encode(BatchRecord(9, "OLD", 100, 555, 7, 8, values)) == old
    back, _ = wal.decode(old)
    assert back.timestamps is None and back.values.tolist() == values.tolist()


def test_docs_describe_the_flags_field_as_encoded() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "durability.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([a-z_0-9 ]+) \|", text, re.M)
    offsets = {name.strip(): (int(off), int(size)) for off, size, name in rows}
    at, size = offsets["flags"]
    assert size == 2 and f"`FLAG_TIMESTAMPS` = {wal.FLAG_TIMESTAMPS}" in text
    encoded = wal.encode(ts_record())
    assert struct.unpack_from("<H", encoded, at)[0] == wal.FLAG_TIMESTAMPS
    assert "then (flags & FLAG_TIMESTAMPS) count int64 timestamps" in wal.__doc__


def test_seal_parts_is_the_seal_of_the_concatenation() -> None:
    cipher = DataCipher(KEY)
    nonce, sealed = cipher.seal_parts([b"values..", memoryview(b"times")], b"ad")
    assert cipher.open(nonce, sealed, b"ad") == b"values..times"
    assert len(sealed) == len(b"values..times") + 16


@pytest.mark.parametrize("encrypted", [False, True])
@given(data=st.data())
@settings(max_examples=40)
def test_torn_or_flipped_bytes_in_the_timestamp_column_are_detected(encrypted, data) -> None:
    cipher = DataCipher(KEY) if encrypted else None
    rec = ts_record(values=np.arange(6.0), times=np.arange(6, dtype=np.int64) * 7 + T0)
    encoded = wal.encode(rec, cipher)
    column = len(encoded) - 8 * 6 - (16 if encrypted else 0)  # the timestamps (or their cipher)
    cut = data.draw(st.integers(column, len(encoded) - 1))
    with pytest.raises(wal.RecordError):
        wal.decode(encoded[:cut], 0, cipher)
    at = data.draw(st.integers(column, len(encoded) - 1))
    flipped = bytearray(encoded)
    flipped[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(wal.RecordError, match="CRC"):
        wal.decode(bytes(flipped), 0, cipher)
    if encrypted:  # a deliberate change with the CRC made to match fails authentication
        struct.pack_into("<I", flipped, 8, crc32c.crc32c(bytes(flipped[12:])))
        with pytest.raises(wal.RecordError, match="authentication"):
            wal.decode(bytes(flipped), 0, cipher)


def _with_flags(encoded: bytes, flags: int) -> bytes:
    data = bytearray(encoded)
    struct.pack_into("<H", data, 14, flags)
    struct.pack_into("<I", data, 8, crc32c.crc32c(bytes(data[12:])))
    return bytes(data)


def test_unknown_flags_and_a_cleared_flag_are_refused() -> None:
    encoded = wal.encode(ts_record())
    with pytest.raises(wal.RecordError, match="unknown record flags"):
        wal.decode(_with_flags(encoded, wal.FLAG_TIMESTAMPS | 2))
    with pytest.raises(wal.RecordError, match="length"):
        wal.decode(_with_flags(encoded, 0))  # the column would be read as garbage otherwise
    with pytest.raises(wal.RecordError, match="length"):
        wal.decode(_with_flags(wal.encode(ts_record(times=None)), wal.FLAG_TIMESTAMPS))


def test_fsck_reads_and_repairs_a_log_with_timestamps(tmp_path) -> None:
    records = [
        ts_record(lsn, "A", 2 * (lsn - 1), times=None if lsn % 2 else (lsn * 10, lsn * 10 + 1))
        for lsn in range(1, 7)
    ]
    encoded = [wal.encode(r) for r in records]
    damaged = bytearray(b"".join(encoded))
    damaged[sum(map(len, encoded[:3])) - 3] ^= 0xFF  # inside record 3's timestamp column
    wal.wal_dir(tmp_path).mkdir(parents=True)
    (wal.wal_dir(tmp_path) / wal.segment_name(1)).write_bytes(bytes(damaged))
    out = io.StringIO()
    assert fsck.run(tmp_path, repair=False, out=out) == fsck.EXIT_DAMAGED
    assert "CRC mismatch" in out.getvalue()
    fsck.run(tmp_path, repair=True, out=io.StringIO())
    kept = wal.scan_segment(wal.list_segments(wal.wal_dir(tmp_path))[0]).records
    assert [r.lsn for _, r in kept] == [1, 2, 4, 5, 6]
    assert [None if r.timestamps is None else r.timestamps.tolist() for _, r in kept] == [
        None, [20, 21], [40, 41], None, [60, 61],
    ]  # fmt: skip
    out = io.StringIO()
    fsck.run(tmp_path, repair=False, out=out)
    assert "5 records (3 with timestamps)" in out.getvalue()


# --- replay rebuilds the marks of the live run -------------------------------------------------


def random_batches(rng: np.random.Generator, n: int, clamp: bool) -> list[tuple]:
    """(symbol, values, timestamps | None, received_ns): event-time batches, receive-time
    batches, equal times, and (when clamping) times going back."""
    out = []
    event = {"A": T0, "B": T0}
    received = T0 + 10**9
    for _ in range(n):
        symbol = "A" if rng.random() < 0.7 else "B"
        size = int(rng.integers(1, 90))
        values = rng.uniform(1, 100, size)
        received += int(rng.integers(-(10**6), 10**7))  # the wall clock may step back
        kind = rng.random()
        if kind < 0.3:
            times = None
            event[symbol] = max(event[symbol], received)  # its values' time
        else:
            gaps = rng.integers(0, 3, size) * int(rng.integers(1, 10**6))
            start = event[symbol] + int(rng.integers(0, 10**8))
            if clamp and rng.random() < 0.3:
                start -= 10**9  # goes back: stored at the previous time
                gaps[rng.integers(0, size)] = -5
            times = start + np.cumsum(gaps).astype(np.int64)
            event[symbol] = max(event[symbol], int(times.max()))
        out.append((symbol, values, times, received))
    return out


class Clock:
    """The writer's `time` module with `time_ns` set by the test (its batches' receive times)."""

    def __init__(self) -> None:
        self.now = 0

    def time_ns(self) -> int:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(writer_module, "time", fake)
    return fake


def write_through(
    store: Store, data: Path, batches: list[tuple], clock: Clock, **kwargs
) -> DurableWriter:
    use_checkpoint = kwargs.pop("use_checkpoint", False)
    result = recover(store, data, use_checkpoint=use_checkpoint, cipher=kwargs.get("cipher"))
    writer = DurableWriter(
        store,
        wal.wal_dir(data),
        next_lsn=result.next_lsn,
        totals=result.totals,
        tail=result.tail,
        **kwargs,
    )
    writer.start()
    for symbol, values, times, received in batches:
        clock.now = received  # the generator's clock, not this machine's
        writer.submit(symbol, values, 0, 0, times).result()
    return writer


def assert_same_times(got: Store, want: Store) -> None:
    assert got.symbols() == want.symbols()
    for symbol in want.symbols():
        np.testing.assert_array_equal(got.snapshot_values(symbol), want.snapshot_values(symbol))
        got_marks, want_marks = got.time_marks(symbol), want.time_marks(symbol)
        np.testing.assert_array_equal(got_marks[0], want_marks[0])
        np.testing.assert_array_equal(got_marks[1], want_marks[1])
        assert got.newest_timestamp(symbol) == want.newest_timestamp(symbol)
        for window in (1, 10**6, 10**8, 10**9, 10**12):
            a, b = got.stats_seconds(symbol, window), want.stats_seconds(symbol, window)
            assert a.count == b.count and a.min == b.min and a.max == b.max


def reference(batches: list[tuple], clamp: bool, max_values=500, keep=300) -> Store:
    store = make_store(max_values, keep, clamp)
    for symbol, values, times, received in batches:
        store.ingest(symbol, values, 0, 0, times, received)
    return store


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("clamp", [False, True])
def test_replay_rebuilds_exactly_the_marks_of_the_live_run(tmp_path, clock, seed, clamp) -> None:
    batches = random_batches(np.random.default_rng(seed), 120, clamp)
    live = make_store(clamp=clamp)
    write_through(live, tmp_path, batches, clock).close()
    want = reference(batches, clamp)
    assert_same_times(live, want)  # the writer resolves as the store does
    recovered = make_store(clamp=clamp)
    recover(recovered, tmp_path, use_checkpoint=False)
    assert_same_times(recovered, want)
    one_by_one = make_store(clamp=clamp)
    replay_batch_by_batch(one_by_one, tmp_path)
    assert_same_times(one_by_one, want)


def test_replay_of_a_log_written_before_timestamps(tmp_path) -> None:
    # Old records (no flag): every value has max(received_ns, newest), recomputed in order.
    received = [500, 700, 650, 900]  # the clock stepped back at the third batch
    records = [
        BatchRecord(i + 1, "A", 2 * i, ns, 0, 0, np.array([1.0 + i, 2.0 + i]))
        for i, ns in enumerate(received)
    ]
    wal.wal_dir(tmp_path).mkdir(parents=True)
    segment = wal.wal_dir(tmp_path) / wal.segment_name(1)
    segment.write_bytes(b"".join(wal.encode(r) for r in records))
    assert segment.read_bytes()[14:16] == b"\0\0"  # no flag
    store = make_store()
    recover(store, tmp_path, use_checkpoint=False)
    index, ns = store.time_marks("A")
    assert index.tolist() == [0, 2, 6] and ns.tolist() == [500, 700, 900]
    assert store.stats_seconds("A", 250).count == 6  # 650 was stored at 700


@pytest.mark.parametrize("encrypted", [False, True])
def test_checkpoint_plus_log_tail_gives_the_marks_of_a_store_fed_directly(
    tmp_path, clock, encrypted
) -> None:
    cipher = DataCipher(KEY) if encrypted else None
    batches = random_batches(np.random.default_rng(9), 160, clamp=False)
    first, second = batches[:90], batches[90:]
    live = make_store()
    writer = write_through(live, tmp_path, first, clock, cipher=cipher)
    writer.close()
    path = write_checkpoint(tmp_path, live, writer.next_lsn - 1, writer._totals, cipher)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert all("marks_file" in entry for entry in manifest["symbols"])
    resumed = make_store()
    writer = write_through(resumed, tmp_path, second, clock, cipher=cipher, use_checkpoint=True)
    writer.close()
    want = reference(batches, clamp=False)
    assert_same_times(resumed, want)
    loaded = load_latest(tmp_path, cipher)
    assert loaded is not None and loaded.lsn == 90
    for item in loaded.symbols.values():
        assert item.marks is not None and item.marks[0][0] == 0
    recovered = make_store()
    result = recover(recovered, tmp_path, cipher=cipher)
    assert result.checkpoint_lsn == 90 and result.records == 70
    assert_same_times(recovered, want)


def test_checkpoint_marks_are_restored_and_verified(tmp_path) -> None:
    batches = random_batches(np.random.default_rng(4), 60, clamp=False)
    store = reference(batches, clamp=False)
    path = write_checkpoint(tmp_path, store, 60, {"A": 10**6, "B": 10**6})
    restored = make_store()
    ckpt.restore(restored, load_latest(tmp_path))
    assert_same_times(restored, store)
    # A changed marks file fails its CRC: the checkpoint is not trusted.
    marks_file = next(path.glob("t*.npy"))
    data = bytearray(marks_file.read_bytes())
    data[-3] ^= 1
    marks_file.write_bytes(bytes(data))
    assert load_latest(tmp_path) is None


def test_a_checkpoint_without_marks_still_loads_with_receive_time_marks(tmp_path) -> None:
    store = make_store()
    store.ingest("A", np.arange(5.0), 0, 0, np.arange(5, dtype=np.int64) + T0)
    path = write_checkpoint(tmp_path, store, 1, {"A": 5})
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    for entry in manifest["symbols"]:  # as written before marks existed
        (path / entry.pop("marks_file")).unlink()
        del entry["marks"], entry["marks_crc32c"]
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.symbols["A"].marks is None
    # A log record after it, received before the restore, is moved forward to the restore's time.
    wal.wal_dir(tmp_path).mkdir(parents=True)
    (wal.wal_dir(tmp_path) / wal.segment_name(2)).write_bytes(
        wal.encode(BatchRecord(2, "A", 5, T0, 0, 0, np.array([9.0])))
    )
    before = time.time_ns()
    recovered = make_store()
    recover(recovered, tmp_path)
    np.testing.assert_array_equal(recovered.snapshot_values("A"), [0, 1, 2, 3, 4, 9.0])
    index, ns = recovered.time_marks("A")
    assert index.tolist() == [0] and int(ns[0]) >= before


@given(
    runs=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    drop=st.integers(0, 40),
)
def test_cut_marks_matches_per_value_times(runs, drop) -> None:
    count = sum(runs)
    drop = min(drop, count - 1)
    index = np.concatenate(([0], np.cumsum(runs)[:-1])).astype(np.int64)
    ns = (np.arange(len(runs), dtype=np.int64) + 1) * 100
    cut = cut_marks(index, ns, drop)
    np.testing.assert_array_equal(
        per_value_times(cut, count - drop), per_value_times((index, ns), count)[drop:]
    )


def test_checkpoint_restore_under_a_smaller_retention_cuts_the_marks(tmp_path) -> None:
    batches = random_batches(np.random.default_rng(12), 40, clamp=False)
    store = reference(batches, clamp=False, max_values=5000, keep=3000)
    write_checkpoint(tmp_path, store, 40, {s: 10**6 for s in store.symbols()})
    small = make_store(max_values=100, keep=50)
    ckpt.restore(small, load_latest(tmp_path))
    for symbol in store.symbols():
        full = per_value_times(store.time_marks(symbol), store.length(symbol))
        got = per_value_times(small.time_marks(symbol), small.length(symbol))
        np.testing.assert_array_equal(got, full[-small.length(symbol) :])


# --- the warm tier ----------------------------------------------------------------------------


def warm_feed(warm: WarmTier, batches: list[tuple]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Feed the warm tier as the writer does; return each symbol's values and resolved times."""
    store = make_store(max_values=10**6, keep=10**6)
    sent: dict[str, tuple[list, list]] = {}
    firsts: dict[str, int] = {}
    for lsn, (symbol, values, times, received) in enumerate(batches, 1):
        store.ingest(symbol, values, 0, 0, times, received)
        count = values.shape[0]
        # The resolved times, as the writer logs them (equal to the store's marks' expansion).
        resolved = per_value_times(store.time_marks(symbol), store.length(symbol))[-count:]
        first = firsts.get(symbol, 0)
        logged = None if times is None else resolved
        warm.on_record(BatchRecord(lsn, symbol, first, received, 0, 0, values, logged))
        firsts[symbol] = first + count
        parts = sent.setdefault(symbol, ([], []))
        parts[0].append(values)
        parts[1].append(resolved)
    return {s: (np.concatenate(v), np.concatenate(t)) for s, (v, t) in sent.items()}


def test_warm_marks_follow_event_times_and_history_by_time_matches_numpy(tmp_path) -> None:
    rng = np.random.default_rng(21)
    batches = random_batches(rng, 150, clamp=False)
    warm = WarmTier(tmp_path / "warm", segment_values=300)
    try:
        sent = warm_feed(warm, batches)
        warm.drain()
        for symbol, (values, times) in sent.items():
            view = warm.view(symbol)
            assert view is not None and len(view.sealed) >= 2
            # Marks, sealed and in memory, expand to exactly each value's time.
            pieces = [read_segment(s.path, s.header) for s in view.sealed]
            marks_index = [p.mark_index for p in pieces] + [m.mark_index for m in view.memory]
            marks_ns = [p.mark_ns for p in pieces] + [m.mark_ns for m in view.memory]
            index, ns = np.concatenate(marks_index), np.concatenate(marks_ns)
            np.testing.assert_array_equal(per_value_times((index, ns), values.shape[0]), times)
            assert bool((np.diff(index) > 0).all()) and bool((np.diff(ns) >= 0).all())
            lo_all, hi_all = int(times[0]), int(times[-1])
            for _ in range(25):
                t0, t1 = sorted(int(x) for x in rng.integers(lo_all - 10, hi_all + 10, 2))
                if t0 == t1:
                    t1 += 1
                chosen = values[(times >= t0) & (times < t1)]
                if not chosen.shape[0]:
                    continue
                got = stats_by_time(warm, symbol, t0, t1)
                assert got.count == chosen.shape[0]
                assert (got.min, got.max) == (chosen.min(), chosen.max())
                assert (got.first, got.last) == (chosen[0], chosen[-1])
                assert got.avg == pytest.approx(chosen.mean(), rel=1e-12)
                picked = times[(times >= t0) & (times < t1)]
                assert (got.first_ns, got.last_ns) == (int(picked[0]), int(picked[-1]))
    finally:
        warm.close()


def test_warm_marks_one_per_run_and_clamped_after_a_recreated_symbol(tmp_path) -> None:
    warm = WarmTier(tmp_path / "warm", segment_values=1000)
    try:
        values = np.arange(6.0)
        warm.on_record(BatchRecord(1, "A", 0, 50, 0, 0, values, np.array([10, 10, 20, 20, 20, 30])))
        warm.on_record(BatchRecord(2, "A", 6, 60, 0, 0, values[:2], np.array([30, 31])))
        warm.on_record(BatchRecord(3, "A", 8, 5, 0, 0, values[:1]))  # receive time, behind
        # A symbol deleted and created again may log earlier event times: clamped, not reversed.
        warm.on_record(BatchRecord(4, "A", 9, 70, 0, 0, values[:3], np.array([1, 2, 40])))
        (piece,) = warm.view("A").memory
        assert piece.mark_index.tolist() == [0, 2, 5, 7, 8, 11]
        assert piece.mark_ns.tolist() == [10, 20, 30, 31, 31, 40]
    finally:
        warm.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_the_sealing_process_reads_timestamped_records(tmp_path, clock, encrypted) -> None:
    cipher = DataCipher(KEY) if encrypted else None
    batches = random_batches(np.random.default_rng(33), 60, clamp=False)
    warm = WarmTier(tmp_path / "warm", segment_values=400, log_dir=tmp_path / "wal", cipher=cipher)
    store = Store(NumpyEngine(), retention=RetentionPolicy(), max_symbols=10, starting_capacity=64)
    writer = DurableWriter(store, wal.wal_dir(tmp_path), segment_bytes=1 << 14, cipher=cipher)
    writer.add_listener(warm)
    writer.start()
    try:
        for symbol, values, times, received in batches:
            clock.now = received
            writer.submit(symbol, values, 0, 0, times).result()
        warm.drain()
        assert warm._process is not None and warm._process.sealed >= 2
        for symbol in store.symbols():
            view = warm.view(symbol)
            assert view is not None
            for segment in view.sealed:
                data = read_segment(segment.path, segment.header, cipher)
                first = segment.header.first_index
                want = store.snapshot_values(symbol)[first : first + segment.header.count]
                np.testing.assert_array_equal(data.values, want)
    finally:
        writer.close()
        warm.close()


def test_recovery_feeds_the_warm_tier_the_logged_times(tmp_path, clock) -> None:
    batches = random_batches(np.random.default_rng(44), 80, clamp=False)
    live = make_store(max_values=10**6, keep=10**6)
    write_through(live, tmp_path, batches, clock).close()
    warm = WarmTier(tmp_path / "warm", segment_values=10**6)
    try:
        recover(make_store(), tmp_path, [warm], use_checkpoint=False)
        for symbol in live.symbols():
            (piece,) = warm.view(symbol).memory
            times = per_value_times(live.time_marks(symbol), live.length(symbol))
            got = per_value_times((piece.mark_index, piece.mark_ns), piece.values.shape[0])
            np.testing.assert_array_equal(got, times)
    finally:
        warm.close()


def test_time_key_windows_survive_a_restart_of_the_writer(tmp_path, clock) -> None:
    # Store-level time windows before and after: the same answers from the rebuilt marks.
    batches = random_batches(np.random.default_rng(51), 100, clamp=False)
    live = make_store()
    write_through(live, tmp_path, batches, clock).close()
    keys = [(s, time_key(w)) for s in live.symbols() for w in (10**5, 10**7, 10**9)]
    before = [(r.count, r.min, r.max) for r in live.stats_many(keys)]
    again = make_store()
    recover(again, tmp_path, use_checkpoint=False)
    assert [(r.count, r.min, r.max) for r in again.stats_many(keys)] == before
    assert os.path.exists(wal.wal_dir(tmp_path))


def test_a_deleted_symbol_created_again_with_earlier_times_replays_its_new_marks(
    tmp_path, clock
) -> None:
    live = make_store()
    writer = write_through(live, tmp_path, [("A", np.arange(4.0), np.arange(4) + T0, T0)], clock)
    writer.delete_symbol("A")
    clock.now = T0 + 50
    writer.submit("A", np.arange(3.0), 0, 0, np.array([5, 6, 6], np.int64)).result()
    clock.now = 3  # the wall clock behind the new newest: the batch takes 6
    writer.submit("A", np.array([7.0])).result()
    writer.close()
    assert live.time_marks("A")[1].tolist() == [5, 6]
    recovered = make_store()
    recover(recovered, tmp_path, use_checkpoint=False)
    assert_same_times(recovered, live)
