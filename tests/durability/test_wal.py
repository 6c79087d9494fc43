"""Write-ahead log: record format, the writer thread, recovery and fsck, in process."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.durability import fsck, wal
from appliance.durability.records import BatchRecord
from appliance.durability.recovery import CorruptLogError, recover, replay_batch_by_batch
from appliance.durability.writer import DurableWriter, StorageUnavailableError
from appliance.store import Store, SymbolLimitError
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine

SMALL = Geometry(block=4, fanout=4, chunk=64)
REPO = Path(__file__).resolve().parents[2]


def make_store(max_symbols: int = 10, max_values: int = 500, keep: int = 300) -> Store:
    return Store(
        NumpyEngine(geometry=SMALL),
        retention=RetentionPolicy(max_values, keep),
        max_symbols=max_symbols,
        starting_capacity=0,
    )


def make_writer(store: Store, data: Path, **kwargs) -> DurableWriter:
    result = recover(store, data, use_checkpoint=False)
    writer = DurableWriter(
        store,
        wal.wal_dir(data),
        next_lsn=result.next_lsn,
        totals=result.totals,
        tail=result.tail,
        **kwargs,
    )
    writer.start()
    return writer


def hot(store: Store, symbol: str) -> tuple:
    stats = store.stats(symbol, 8)
    return (store.length(symbol), stats.min, stats.max, stats.last, stats.avg, stats.var)


def record(lsn=1, symbol="EUR/USD", first=0, values=(1.0, 2.5)) -> BatchRecord:
    return BatchRecord(lsn, symbol, first, 123, 7, 9, np.asarray(values, dtype=np.float64))


# --- record format ----------------------------------------------------------------------------


@given(
    lsn=st.integers(1, 2**64 - 1),
    first=st.integers(0, 2**64 - 1),
    received=st.integers(0, 2**64 - 1),
    publisher=st.integers(0, 2**64 - 1),
    sequence=st.integers(0, 2**64 - 1),
    symbol=st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 64),
    values=st.lists(st.floats(0, 1e300), min_size=1, max_size=50),
)
def test_record_round_trip(lsn, first, received, publisher, sequence, symbol, values) -> None:
    rec = BatchRecord(lsn, symbol, first, received, publisher, sequence, np.array(values))
    data = wal.encode(rec)
    assert len(data) % 8 == 0 and data[:4] == b"HWAL"
    back, length = wal.decode(b"\0" * 8 + data, 8)
    assert length == len(data)
    assert back[:6] == rec[:6]
    assert back.values.tolist() == values and not back.values.flags.writeable


@given(data=st.data())
def test_any_truncation_or_flipped_byte_is_a_typed_error(data) -> None:
    encoded = wal.encode(record(values=np.arange(5.0)))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(wal.RecordError):
        wal.decode(encoded[:cut])
    at = data.draw(st.integers(0, len(encoded) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(encoded)
    flipped[at] ^= 1 << bit
    with pytest.raises(wal.RecordError):
        wal.decode(bytes(flipped))


def test_docs_byte_table_matches_the_encoder() -> None:
    text = (REPO / "docs" / "durability.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([a-z_0-9 ]+) \|", text, re.M)
    offsets = {name.strip(): (int(off), int(size)) for off, size, name in rows}
    assert offsets["magic"] == (0, 4) and offsets["crc32c"] == (8, 4)
    rec = record(lsn=0x0102030405060708, first=11, values=[3.0])
    data = wal.encode(rec)
    at, size = offsets["lsn"]
    assert struct.unpack_from("<Q", data, at)[0] == rec.lsn and size == 8
    at, _ = offsets["first_index"]
    assert struct.unpack_from("<Q", data, at)[0] == 11
    at, _ = offsets["count"]
    assert struct.unpack_from("<I", data, at)[0] == 1
    assert wal.HEADER_SIZE == 64


# --- the writer -------------------------------------------------------------------------------


def test_group_commit_one_fsync_per_group(tmp_path, monkeypatch) -> None:
    store = make_store(max_values=10**6, keep=10**6)
    writer = make_writer(store, tmp_path, sync="always")
    fsyncs = []
    real_fsync = os.fsync
    gate = threading.Event()

    def slow_fsync(fd):
        fsyncs.append(fd)
        gate.wait(5)  # hold the first fsync so that everything else queues behind it
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    futures = [writer.submit("A", np.array([float(i)])) for i in range(1)]
    threading.Timer(0.2, gate.set).start()
    # more than IOV_MAX (1024) records in one group: written in several writev calls
    futures += [writer.submit("A", np.array([float(i)])) for i in range(1, 2000)]
    records = [f.result(10) for f in futures]
    writer.close()
    assert [r.lsn for r in records] == list(range(1, 2001))
    assert [r.first_index for r in records] == list(range(2000))
    assert writer.groups <= 2
    # 2000 batches: the first group's fsync held the rest, which then shared one or two fsyncs
    assert writer.fsyncs == writer.groups <= 3
    assert len(fsyncs) <= writer.fsyncs + 2  # + the new segment's directory, + the final one
    assert store.length("A") == 2000
    fresh = make_store(max_values=10**6, keep=10**6)
    recover(fresh, tmp_path, use_checkpoint=False)
    assert hot(fresh, "A") == hot(store, "A")


def test_concurrent_submitters_keep_per_symbol_order(tmp_path) -> None:
    store = make_store(max_values=10**6, keep=10**6)
    writer = make_writer(store, tmp_path, sync="never")
    results: dict[int, list[BatchRecord]] = {}

    def submitter(k: int) -> None:
        results[k] = [writer.submit(f"S{k}", np.array([float(i)])).result(10) for i in range(100)]

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    lsns = sorted(r.lsn for rs in results.values() for r in rs)
    assert lsns == list(range(1, 401))
    for k, rs in results.items():
        assert [r.first_index for r in rs] == list(range(100))
        assert store.stats(f"S{k}", 8).last == 99.0
    fresh = make_store(max_values=10**6, keep=10**6)
    recover(fresh, tmp_path, use_checkpoint=False)
    assert all(hot(fresh, s) == hot(store, s) for s in store.symbols())


def test_symbol_limit_is_never_logged(tmp_path) -> None:
    store = make_store(max_symbols=2)
    writer = make_writer(store, tmp_path)
    futures = [writer.submit(s, np.array([1.0])) for s in ("A", "B", "C", "A")]
    assert futures[0].result(5).lsn == 1 and futures[1].result(5).lsn == 2
    with pytest.raises(SymbolLimitError):
        futures[2].result(5)
    assert futures[3].result(5).lsn == 3
    writer.close()
    records = [r for _, r in wal.scan_segment(wal.list_segments(wal.wal_dir(tmp_path))[0]).records]
    assert [r.symbol for r in records] == ["A", "B", "A"]
    assert "C" not in store


class Listener:
    def __init__(self, fail: bool = False) -> None:
        self.seen: list[int] = []
        self.fail = fail

    def on_record(self, rec: BatchRecord) -> None:
        self.seen.append(rec.lsn)
        if self.fail:
            raise RuntimeError("listener bug")


def test_listeners_see_every_record_and_cannot_break_the_writer(tmp_path, caplog) -> None:
    store = make_store()
    good, bad = Listener(), Listener(fail=True)
    writer = make_writer(store, tmp_path)
    writer.add_listener(bad)
    writer.add_listener(good)
    with caplog.at_level(logging.ERROR):
        for i in range(5):
            writer.submit("A", np.array([float(i)])).result(5)
    writer.close()
    assert good.seen == bad.seen == [1, 2, 3, 4, 5]
    assert "listener failed" in caplog.text
    again = Listener()
    recover(make_store(), tmp_path, [again], use_checkpoint=False)
    assert again.seen == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("fail_on", ["write", "fsync"])
def test_disk_full_fails_the_group_applies_nothing_and_recovers(
    tmp_path, monkeypatch, fail_on
) -> None:
    store = make_store()
    writer = make_writer(store, tmp_path, sync="always")
    acked = [writer.submit("A", np.array([1.0, 2.0])).result(5)]
    full = threading.Event()
    full.set()
    real_writev, real_fsync = os.writev, os.fsync

    def writev(fd, chunks):
        if full.is_set() and fail_on == "write":
            # a partial write first, like a file-size limit reached mid-record
            real_writev(fd, [bytes(chunks[0])[:20]])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, chunks)

    def fsync(fd):
        if full.is_set() and fail_on == "fsync":
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(os, "fsync", fsync)
    for _ in range(3):
        with pytest.raises(StorageUnavailableError):
            writer.submit("A", np.array([5.0])).result(5)
        with pytest.raises(StorageUnavailableError):
            writer.submit("B", np.array([5.0])).result(5)
    assert store.length("A") == 2 and "B" not in store  # nothing applied
    full.clear()
    acked.append(writer.submit("A", np.array([3.0])).result(5))
    acked.append(writer.submit("B", np.array([4.0])).result(5))
    writer.close()
    assert [r.lsn for r in acked] == [1, 2, 3]  # the failed groups' lsns were handed back
    assert acked[1].first_index == 2
    fresh = make_store()
    result = recover(fresh, tmp_path, use_checkpoint=False)
    assert not result.truncated
    assert hot(fresh, "A") == hot(store, "A") and hot(fresh, "B") == hot(store, "B")
    assert result.totals == {"A": 3, "B": 1} and result.next_lsn == 4


def test_interval_policy_fsyncs_without_further_traffic(tmp_path, monkeypatch) -> None:
    store = make_store()
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    writer = make_writer(store, tmp_path, sync="interval", interval_ms=20)
    writer.submit("A", np.array([1.0])).result(5)
    from tests.waiting import wait_until

    wait_until(lambda: writer.fsyncs >= 1, "the interval fsync", 5)
    writer.close()


def test_segments_rotate_and_replay_across_them(tmp_path) -> None:
    store = make_store(max_values=10**6, keep=10**6)
    writer = make_writer(store, tmp_path, sync="never", segment_bytes=1 << 16)
    for i in range(40):
        writer.submit("A", np.full(500, float(i))).result(5)
    writer.close()
    segments = wal.list_segments(wal.wal_dir(tmp_path))
    assert len(segments) >= 3
    assert all(p.stat().st_size <= 1 << 16 for p in segments)
    fresh = make_store(max_values=10**6, keep=10**6)
    result = recover(fresh, tmp_path, use_checkpoint=False)
    assert result.next_lsn == 41 and result.totals == {"A": 20_000}
    assert hot(fresh, "A") == hot(store, "A")
    # and appending continues in the last segment with the next lsn
    again = make_store(max_values=10**6, keep=10**6)
    writer = make_writer(again, tmp_path, sync="never", segment_bytes=1 << 16)
    rec = writer.submit("A", np.array([9.0])).result(5)
    assert (rec.lsn, rec.first_index) == (41, 20_000)
    writer.close()


# --- recovery ---------------------------------------------------------------------------------


@given(
    batches=st.lists(
        st.tuples(st.sampled_from("AB"), st.integers(1, 400)), min_size=1, max_size=40
    ),
    max_values=st.integers(1, 600),
    keep_ratio=st.floats(0, 1),
)
def test_arithmetic_replay_equals_batch_by_batch(tmp_path_factory, batches, max_values, keep_ratio):
    data = tmp_path_factory.mktemp("wal")
    keep = int(max_values * keep_ratio)
    rng = np.random.default_rng(len(batches))
    chunks = []
    lsn = 1
    for symbol, size in batches:
        chunks.append(wal.encode(BatchRecord(lsn, symbol, 0, 0, 0, 0, rng.random(size) * 100)))
        lsn += 1
    wal.wal_dir(data).mkdir(parents=True)
    (wal.wal_dir(data) / wal.segment_name(1)).write_bytes(b"".join(chunks))
    reference = make_store(max_values=max_values, keep=keep)
    replay_batch_by_batch(reference, data)
    fast = make_store(max_values=max_values, keep=keep)
    recover(fast, data, use_checkpoint=False)
    assert fast.symbols() == reference.symbols()
    for symbol in reference.symbols():
        assert hot(fast, symbol) == pytest.approx(hot(reference, symbol), rel=1e-12)
        for k in (1, 2):
            ref, got = reference.stats(symbol, k), fast.stats(symbol, k)
            assert (got.min, got.max, got.last) == (ref.min, ref.max, ref.last)


def write_log(data: Path, n: int = 10, segment_bytes: int = 1 << 20) -> Store:
    store = make_store(max_values=10**6, keep=10**6)
    writer = make_writer(store, data, sync="never", segment_bytes=segment_bytes)
    for i in range(n):
        writer.submit("A", np.arange(i * 10.0, i * 10.0 + 10)).result(5)
    writer.close()
    return store


def test_torn_tail_is_truncated_with_one_warning(tmp_path, caplog) -> None:
    write_log(tmp_path)
    segment = wal.list_segments(wal.wal_dir(tmp_path))[-1]
    size = segment.stat().st_size
    record_size = size // 10
    for cut in (size - 1, size - record_size + 1, size - record_size + 64):
        fresh_dir = tmp_path / f"cut{cut}"
        (wal.wal_dir(fresh_dir)).mkdir(parents=True)
        torn = wal.wal_dir(fresh_dir) / segment.name
        torn.write_bytes(segment.read_bytes()[:cut])
        store = make_store(max_values=10**6, keep=10**6)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = recover(store, fresh_dir, use_checkpoint=False)
        assert result.truncated == [(torn, size - record_size)]
        assert torn.stat().st_size == size - record_size
        assert store.length("A") == 90 and result.next_lsn == 10
        assert [r.message for r in caplog.records] == ["torn write-ahead log tail truncated"]


def test_zeroed_tail_is_torn_but_a_flipped_byte_mid_log_is_corrupt(tmp_path) -> None:
    write_log(tmp_path)
    segment = wal.list_segments(wal.wal_dir(tmp_path))[-1]
    good = segment.read_bytes()
    segment.write_bytes(good + b"\0" * 4096)
    assert recover(make_store(), tmp_path, use_checkpoint=False).truncated == [(segment, len(good))]
    data = bytearray(good)
    offset = len(good) // 10 * 3
    data[offset + 70] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError) as caught:
        recover(make_store(), tmp_path, use_checkpoint=False)
    assert caught.value.path == segment and caught.value.offset == offset
    assert str(caught.value) == (
        f"corrupt write-ahead log record in {segment} at offset {offset}: CRC mismatch; "
        'run "hft-appliance fsck --repair"'
    )
    # fsck reports it (exit 1), repairs it (exit 0), quarantines the bytes, and then it starts
    out = io.StringIO()
    assert fsck.run(tmp_path, repair=False, out=out) == fsck.EXIT_DAMAGED
    assert f"corrupt at offset {offset}" in out.getvalue()
    assert fsck.run(tmp_path, repair=True, out=io.StringIO()) == fsck.EXIT_CLEAN
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].stat().st_size == len(good) // 10
    store = make_store()
    result = recover(store, tmp_path, use_checkpoint=False)
    assert result.records == 9 and store.length("A") == 90
    assert fsck.run(tmp_path, repair=False, out=io.StringIO()) == fsck.EXIT_CLEAN


def test_damage_in_an_older_segment_is_corrupt_even_at_its_end(tmp_path) -> None:
    write_log(tmp_path, n=1000, segment_bytes=1 << 16)
    assert len(wal.list_segments(wal.wal_dir(tmp_path))) >= 2
    first = wal.list_segments(wal.wal_dir(tmp_path))[0]
    size = first.stat().st_size
    with open(first, "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(CorruptLogError) as caught:
        recover(make_store(), tmp_path, use_checkpoint=False)
    assert caught.value.path == first
    assert fsck.run(tmp_path, repair=True, out=io.StringIO()) == fsck.EXIT_CLEAN
    recover(make_store(max_values=10**6, keep=10**6), tmp_path, use_checkpoint=False)


# --- checkpoints and segment retirement -------------------------------------------------------


class Unsealed:
    """A listener holding values from `lsn` on only in memory (like the warm tier)."""

    def __init__(self, lsn: int | None) -> None:
        self.lsn = lsn

    def on_record(self, rec: BatchRecord) -> None:
        pass

    def oldest_unsealed_lsn(self) -> int | None:
        return self.lsn


@pytest.mark.parametrize("unsealed", [None, 30])
def test_a_checkpoint_retires_covered_segments_and_recovery_uses_both(tmp_path, unsealed) -> None:
    from appliance.durability.checkpoint import Checkpointer
    from appliance.durability.recovery import retire_covered

    holder = Unsealed(unsealed)
    checkpointer = Checkpointer(
        tmp_path,
        0,
        background=False,
        on_written=lambda lsn: retire_covered(tmp_path, [holder], lsn),
    )
    store = make_store(max_values=3000, keep=2000)
    writer = DurableWriter(
        store, wal.wal_dir(tmp_path), sync="never", segment_bytes=1 << 16, checkpointer=checkpointer
    )
    writer.start()
    for i in range(100):
        writer.submit("A" if i % 3 else "B", np.arange(100.0) + i).result(5)
    writer.close()  # the final checkpoint, at lsn 100
    segments = wal.list_segments(wal.wal_dir(tmp_path))
    first = wal.segment_first_lsn(segments[0])
    if unsealed is None:
        assert len(segments) == 1 and first <= 101  # only the tail is left
    else:
        assert first <= 30 < wal.segment_first_lsn(segments[1])  # lsn 30 is still needed
    fresh = make_store(max_values=3000, keep=2000)
    result = recover(fresh, tmp_path)
    assert result.checkpoint_lsn == 100 and result.next_lsn == 101
    assert result.totals == {"A": 6600, "B": 3400}
    for symbol in ("A", "B"):
        assert hot(fresh, symbol) == pytest.approx(hot(store, symbol), rel=1e-12)
    # without the checkpoint, the retired records are missing: refuse, never serve a wrong store
    if unsealed is None:
        with pytest.raises(CorruptLogError, match="no valid checkpoint covers"):
            recover(make_store(max_values=3000, keep=2000), tmp_path, use_checkpoint=False)


def test_one_process_at_a_time_owns_the_log(tmp_path) -> None:
    from appliance.config import DurabilityConfig
    from appliance.durability.recovery import open_log

    config = DurabilityConfig(dir=str(tmp_path), checkpoint_interval_s=0)
    writer = open_log(config, make_store())
    writer.submit("A", np.array([1.0])).result(5)
    with pytest.raises(wal.LogBusyError):
        open_log(config, make_store())
    with pytest.raises(wal.LogBusyError):
        fsck.run(tmp_path, repair=True, out=io.StringIO())
    writer.close()  # releases the lock
    again = open_log(config, make_store())
    assert again.submit("A", np.array([2.0])).result(5).lsn == 2
    again.close()
    assert fsck.run(tmp_path, repair=False, out=io.StringIO()) == fsck.EXIT_CLEAN


def test_a_transport_batch_is_logged_with_its_publisher_and_sequence(tmp_path) -> None:
    from appliance.ingest import make_sink

    class Records:
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def on_record(self, rec: BatchRecord) -> None:
            self.seen.append((rec.publisher_id, rec.sequence))

    writer = make_writer(make_store(), tmp_path)
    sink = make_sink(writer, max_batch_size=10)
    sink("A", np.array([1.0]), 77, 5)
    sink("A", np.array([2.0]))  # REST-like: no publisher
    writer.close()
    replayed = Records()
    recover(make_store(), tmp_path, [replayed], use_checkpoint=False)
    assert replayed.seen == [(77, 5), (0, 0)]


def test_under_interval_the_log_is_fsynced_before_a_checkpoint_is_taken(tmp_path) -> None:
    class Probe:
        """A checkpointer that is always due and records how many fsyncs preceded each run."""

        def __init__(self) -> None:
            self.fsyncs_at_run: list[int] = []

        def due(self) -> bool:
            return True

        def run(self, store, lsn, totals) -> None:
            self.fsyncs_at_run.append(writer.fsyncs)

        def close(self, store, lsn, totals) -> None:
            pass

    probe = Probe()
    # An interval so long that only the checkpoint can cause the fsync.
    writer = make_writer(make_store(), tmp_path, sync="interval", interval_ms=3_600_000,
                         checkpointer=probe)  # fmt: skip
    writer.submit("A", np.array([1.0])).result(5)
    writer.submit("A", np.array([2.0])).result(5)
    writer.close()
    assert probe.fsyncs_at_run, "the checkpointer never ran"
    assert probe.fsyncs_at_run[0] >= 1  # the log reached the disk before the checkpoint
    assert probe.fsyncs_at_run == sorted(set(probe.fsyncs_at_run))  # one fsync per run


# --- submit_group: a transport's poll batch, answered once by the writer thread -----------------


def group_results(writer: DurableWriter, items: list) -> list:
    box: list = []
    done = threading.Event()

    def finished(results: list) -> None:
        box.append((threading.current_thread().name, list(results)))
        done.set()

    writer.submit_group(items, finished)
    assert done.wait(10)
    assert len(box) == 1
    return box[0]


def test_submit_group_logs_applies_and_answers_once_on_the_writer(tmp_path) -> None:
    store = make_store()
    writer = make_writer(store, tmp_path)
    items = [("A", np.array([1.0, 2.0]), 7, 1, None), ("B", np.array([3.0]), 7, 2, None)]
    items.append(("A", np.array([4.0]), 8, 1, None))
    thread, results = group_results(writer, items)
    assert thread == "wal-writer" and results == [None, None, None]
    assert writer.groups == 1  # one write for the whole batch
    assert store.length("A") == 3 and store.length("B") == 1
    writer.close()
    replayed = make_store()
    recover(replayed, tmp_path, use_checkpoint=False)
    assert hot(replayed, "A") == hot(store, "A") and hot(replayed, "B") == hot(store, "B")


def fail_batches_starting_with(store: Store, monkeypatch, value: float) -> None:
    """Make the store's engine raise on every batch whose first value is `value`."""
    original = store.ingest

    def faulty(symbol, values, *origin):
        if float(values[0]) == value:
            raise RuntimeError("engine fault")
        return original(symbol, values, *origin)

    monkeypatch.setattr(store, "ingest", faulty)


def test_submit_group_symbol_limit_and_an_engine_fault_stop_only_that_publisher(
    tmp_path, monkeypatch
) -> None:
    store = make_store(max_symbols=2)
    writer = make_writer(store, tmp_path)
    fail_batches_starting_with(store, monkeypatch, 66.0)
    items = [
        ("A", np.array([1.0]), 1, 1, None),
        ("B", np.array([66.0]), 1, 2, None),  # logged, not applied
        ("A", np.array([2.0]), 1, 3, None),  # after an unapplied frame of publisher 1: not applied
        ("C", np.array([5.0]), 2, 1, None),  # over the symbol limit (content: publisher 2 goes on)
        ("A", np.array([6.0]), 2, 2, None),
    ]
    _, results = group_results(writer, items)
    assert results[0] is None and results[4] is None
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)
    assert isinstance(results[3], SymbolLimitError)
    assert store.stats("A", 3).last == 6.0 and store.length("A") == 2
    writer.close()


def test_submit_group_on_a_full_disk_fails_all_and_a_closed_writer_answers_at_once(
    tmp_path, monkeypatch
) -> None:
    store = make_store()
    writer = make_writer(store, tmp_path)

    def writev(fd, chunks):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", writev)
    _, results = group_results(
        writer, [("A", np.array([1.0]), 1, 1, None), ("B", np.array([2.0]), 2, 1, None)]
    )
    assert all(isinstance(r, StorageUnavailableError) for r in results)
    assert "A" not in store and "B" not in store
    monkeypatch.undo()
    writer.close()
    _, results = group_results(writer, [("A", np.array([1.0]), 1, 1, None)])
    assert isinstance(results[0], RuntimeError)
