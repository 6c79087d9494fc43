"""WarmTier: sealing, crash safety, restart, replay idempotence, retention, lsn accounting."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from appliance.durability.records import BatchRecord
from appliance.durability.warm import WarmTier, WarmTierError, symbol_from_key, symbol_key
from appliance.durability.warm_segment import (
    SegmentCorruptError,
    read_header,
    read_segment,
    segment_name,
)
from engine_core import SUMMARY_ROW_VERSION
from tests.durability.warm_helpers import Feeder, random_batches, warm_tier

N = 100  # values per segment: many segments quickly


def _sealed_values(warm: WarmTier, symbol: str) -> np.ndarray:
    view = warm.view(symbol)
    assert view is not None
    return np.concatenate([warm.load(s).values for s in view.sealed])


def test_segments_hold_every_value_with_summaries(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with warm_tier(tmp_path, segment_values=N) as warm:
        feed = Feeder(warm)
        for batch in random_batches(rng, 1234):
            feed.send("EUR/USD", batch)
        warm.drain()
        values = feed.all_values("EUR/USD")
        totals = warm.symbols()["EUR/USD"]
        assert (totals.total, totals.sealed_end, totals.segments) == (1234, 1200, 12)
        assert np.array_equal(_sealed_values(warm, "EUR/USD"), values[:1200])
        view = warm.view("EUR/USD")
        assert view is not None
        (buffer,) = view.memory
        assert buffer.first_index == 1200
        assert np.array_equal(buffer.values, values[1200:])
        for segment in view.sealed:
            h = segment.header
            chunk = values[h.first_index : h.end_index]
            assert segment.path.name == segment_name(h.first_index)
            assert h.count == N and (h.min, h.max) == (chunk.min(), chunk.max())
            assert (h.first_value, h.last_value) == (chunk[0], chunk[-1])
            assert h.ref + h.mean == pytest.approx(chunk.mean(), rel=1e-12)
            assert h.m2 / h.count == pytest.approx(chunk.var(), rel=1e-9)
            times = feed.all_times("EUR/USD")[h.first_index : h.end_index]
            assert (h.first_received_ns, h.last_received_ns) == (times[0], times[-1])
            data = read_segment(segment.path, h)
            assert data.mark_index[0] == h.first_index  # every segment starts with a mark
            assert np.array_equal(
                np.repeat(data.mark_ns, np.diff(np.append(data.mark_index, h.end_index))), times
            )


def test_symbol_keys_are_filesystem_safe_for_any_symbol(tmp_path: Path) -> None:
    symbols = ["EUR/USD", "../etc", "日本円-USD", "a" * 64, "SPY INDEX", ".", "x\\y:z*?"]
    with warm_tier(tmp_path, segment_values=2) as warm:
        feed = Feeder(warm)
        for symbol in symbols:
            feed.send(symbol, np.array([1.0, 2.0, 3.0]))
            key = symbol_key(symbol)
            assert key.isalnum() and len(key) <= 128 and symbol_from_key(key) == symbol
        warm.drain()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(symbol_key(s) for s in symbols)
    with warm_tier(tmp_path, segment_values=2) as warm:
        assert set(warm.symbols()) == set(symbols)


def test_oldest_unsealed_lsn_follows_the_seals(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=N) as warm:
        assert warm.oldest_unsealed_lsn() is None
        feed = Feeder(warm)
        feed.send("A", np.ones(60))  # lsn 1
        feed.send("B", np.ones(10))  # lsn 2
        assert warm.oldest_unsealed_lsn() == 1
        feed.send("A", np.ones(50))  # lsn 3: A seals [0, 100) (lsns 1..3); 10 values remain
        warm.drain()
        assert warm.oldest_unsealed_lsn() == 2  # B's buffer, then A's remainder from lsn 3
        feed.send("B", np.ones(90))  # lsn 4: B seals exactly, nothing left
        warm.drain()
        assert warm.oldest_unsealed_lsn() == 3
        assert read_header(warm.view("A").sealed[0].path).last_lsn == 3  # type: ignore[union-attr]


def test_restart_rebuilds_sealed_ends_and_replay_is_idempotent(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with warm_tier(tmp_path, segment_values=N) as warm:
        feed = Feeder(warm)
        for batch in random_batches(rng, 777):
            feed.send("S", batch)
        warm.drain()
    # Restart: only the sealed part survives; the log replays every record (all of them here).
    with warm_tier(tmp_path, segment_values=N) as warm:
        totals = warm.symbols()["S"]
        assert (totals.sealed_end, totals.total) == (700, 700)
        assert warm.oldest_unsealed_lsn() is None
        straddling = [
            r for r in feed.records if r.first_index < 700 < r.first_index + len(r.values)
        ]
        for record in feed.records:
            warm.on_record(record)
        for record in feed.records:  # a second replay changes nothing
            warm.on_record(record)
        warm.drain()
        view = warm.view("S")
        assert view is not None
        assert len(view.sealed) == 7
        (buffer,) = view.memory
        assert buffer.first_index == 700
        assert np.array_equal(buffer.values, feed.all_values("S")[700:])
        # The partially covered record was sliced; its lsn is the oldest still unsealed.
        if straddling:
            assert warm.oldest_unsealed_lsn() == straddling[0].lsn
        assert buffer.mark_index[0] == 700


def test_a_leftover_temp_file_is_ignored_and_removed(tmp_path: Path, caplog) -> None:
    with warm_tier(tmp_path, segment_values=N) as warm:
        Feeder(warm).send("S", np.arange(250.0))
        warm.drain()
    directory = tmp_path / symbol_key("S")
    torn = directory / (segment_name(200) + ".tmp")
    torn.write_bytes(b"HFTWARM1\x10\x00\x00\x00{half")  # a crash mid-seal
    with caplog.at_level(logging.WARNING), warm_tier(tmp_path, segment_values=N) as warm:
        assert warm.symbols()["S"].sealed_end == 200
    assert not torn.exists()
    assert any("unfinished seal" in r.message for r in caplog.records)


def test_a_corrupt_sealed_segment_refuses_with_its_name(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=N) as warm:
        Feeder(warm).send("S", np.arange(100.0))
        warm.drain()
    path = tmp_path / symbol_key("S") / segment_name(0)
    path.write_bytes(b"garbage" + path.read_bytes())
    with pytest.raises(WarmTierError, match=segment_name(0)):
        WarmTier(tmp_path, segment_values=N)


def _rewrite_header(path: Path, edit) -> None:
    """Replace a sealed segment's JSON header by `edit(header dict)`, payload untouched."""
    data = path.read_bytes()
    length = int.from_bytes(data[8:12], "little")
    header = edit(json.loads(data[12 : 12 + length]))
    head = json.dumps(header).encode()
    path.write_bytes(data[:8] + len(head).to_bytes(4, "little") + head + data[12 + length :])


def test_segments_record_their_summary_row_version(tmp_path: Path) -> None:
    """Headers name the row version; a header from before the field reads as version 1 (what
    those segments hold), and a segment of another row version is refused, not misread."""
    with warm_tier(tmp_path, segment_values=N) as warm:
        Feeder(warm).send("S", np.arange(250.0))
        warm.drain()
    old, other = (tmp_path / symbol_key("S") / segment_name(i) for i in (0, 100))
    assert read_header(old).summary_row_version == SUMMARY_ROW_VERSION == 1

    def without_field(header: dict) -> dict:
        del header["summary_row_version"]
        return header

    _rewrite_header(old, without_field)
    header = read_header(old)
    assert header.summary_row_version == 1
    assert np.array_equal(read_segment(old, header).values, np.arange(100.0))
    _rewrite_header(other, lambda header: {**header, "summary_row_version": 2})
    with pytest.raises(SegmentCorruptError, match=r"summary rows of version 2"):
        read_header(other)
    with pytest.raises(WarmTierError, match=segment_name(100)):
        WarmTier(tmp_path, segment_values=N)


def test_a_failed_seal_keeps_the_values_and_retries(tmp_path: Path, monkeypatch) -> None:
    import appliance.durability.warm as warm_module

    calls = {"n": 0}
    real = warm_module.write_atomically

    def flaky(directory: Path, name: str, data: bytes) -> Path:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(directory, name, data)

    monkeypatch.setattr(warm_module, "write_atomically", flaky)
    monkeypatch.setattr(warm_module, "RETRY_AFTER_S", 0.0)
    with warm_tier(tmp_path, segment_values=N) as warm:
        feed = Feeder(warm)
        feed.send("S", np.arange(150.0))
        warm._sealer.submit(lambda: None).result()
        assert warm.symbols()["S"].segments == 0
        assert warm.oldest_unsealed_lsn() == 1  # still held back: the log keeps it
        view = warm.view("S")
        assert view is not None and sum(p.values.shape[0] for p in view.memory) == 150
        feed.send("S", np.arange(5.0))  # the next record retries the failed seal
        warm.drain()
        assert warm.symbols()["S"].segments == 1
        assert np.array_equal(_sealed_values(warm, "S"), np.arange(100.0))
        assert warm.oldest_unsealed_lsn() == 1  # the remainder of lsn 1


def test_a_gap_seals_the_buffer_short_and_restarts(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING), warm_tier(tmp_path, segment_values=N) as warm:
        warm.on_record(BatchRecord(1, "S", 0, 10, 0, 0, np.arange(30.0)))
        warm.on_record(BatchRecord(2, "S", 500, 20, 0, 0, np.arange(10.0)))
        warm.drain()
        view = warm.view("S")
        assert view is not None
        assert [(s.header.first_index, s.header.count) for s in view.sealed] == [(0, 30)]
        assert view.memory[0].first_index == 500
        assert warm.symbols()["S"].total == 510
    assert any("gap" in r.message for r in caplog.records)


def test_receive_times_never_go_back(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=N) as warm:
        warm.on_record(BatchRecord(1, "S", 0, 1000, 0, 0, np.ones(3)))
        warm.on_record(BatchRecord(2, "S", 3, 900, 0, 0, np.ones(3)))  # clock stepped back
        view = warm.view("S")
        assert view is not None
        assert view.memory[0].mark_ns.tolist() == [1000, 1000]


def test_retention_deletes_only_old_segments_and_logs_each(tmp_path: Path, caplog) -> None:
    day = 86_400 * 10**9
    now = 100 * day
    with warm_tier(tmp_path, segment_values=N, retain_days=7, clock=lambda: now) as warm:
        # Segment 0: all 8+ days old; segment 1: old except its last batch; then recent.
        warm.on_record(BatchRecord(1, "S", 0, now - 9 * day, 0, 0, np.ones(100)))
        warm.on_record(BatchRecord(2, "S", 100, now - 8 * day, 0, 0, np.ones(99)))
        warm.on_record(BatchRecord(3, "S", 199, now - 6 * day, 0, 0, np.ones(1)))
        warm.on_record(BatchRecord(4, "S", 200, now - day, 0, 0, np.ones(150)))
        warm.drain()
        # Sealed just now (real file times): nothing goes, however old the timestamps.
        assert warm.apply_retention() == []
        for segment in warm.view("S").sealed:  # type: ignore[union-attr]
            sealed_at = segment.header.last_received_ns  # as if sealed when the data arrived
            os.utime(segment.path, ns=(sealed_at, sealed_at))
        with caplog.at_level(logging.INFO, logger="appliance.durability.warm"):
            warm.apply_retention()
        view = warm.view("S")
        assert view is not None
        assert [s.header.first_index for s in view.sealed] == [100, 200]
        assert not (tmp_path / symbol_key("S") / segment_name(0)).exists()
        deletions = [r for r in caplog.records if "retention deleted" in r.message]
        assert len(deletions) == 1 and deletions[0].levelno == logging.INFO
        assert deletions[0].path.endswith(segment_name(0))  # type: ignore[attr-defined]
        totals = warm.symbols()["S"]
        assert (totals.warm_start, totals.total) == (100, 350)
        # A later clock: the second segment goes too, never the newest one.
        assert [p.name for p in warm.apply_retention(now + 2 * day)] == [segment_name(100)]
        assert [s.header.first_index for s in warm.view("S").sealed] == [200]  # type: ignore[union-attr]
        # Replayed old records do not come back.
        warm.on_record(BatchRecord(1, "S", 0, now - 9 * day, 0, 0, np.ones(100)))
        assert warm.symbols()["S"].warm_start == 200


def test_retain_days_zero_keeps_everything(tmp_path: Path) -> None:
    with warm_tier(tmp_path, segment_values=N, clock=lambda: 10**30) as warm:
        warm.on_record(BatchRecord(1, "S", 0, 1, 0, 0, np.ones(300)))
        warm.drain()
        assert warm.apply_retention() == []
        assert warm.symbols()["S"].segments == 3


def test_a_slow_sealer_holds_back_the_writer(tmp_path: Path, monkeypatch) -> None:
    import threading

    import appliance.durability.warm as warm_module

    gate = threading.Event()
    real = warm_module.write_atomically

    def slow(directory: Path, name: str, data: bytes) -> Path:
        gate.wait(10)
        return real(directory, name, data)

    monkeypatch.setattr(warm_module, "write_atomically", slow)
    monkeypatch.setattr(warm_module, "BACKLOG_BYTES", 0)  # the writer waits once past the count
    with warm_tier(tmp_path, segment_values=N) as warm:
        # Registered after the tier, so it runs first: a failing assertion never leaves the
        # sealer gated while close() waits for it.
        monkeypatch.setattr(warm, "close", lambda real_close=warm.close: (gate.set(), real_close()))
        feed = Feeder(warm)
        writer = threading.Thread(
            target=lambda: [feed.send("S", np.ones(N)) for _ in range(12)], daemon=True
        )
        writer.start()
        writer.join(0.5)
        assert writer.is_alive()  # waiting for the sealer, not piling up blocks
        view = warm.view("S")
        assert view is not None and len(view.memory) <= warm_module.MAX_QUEUED_SEALS + 2
        gate.set()
        writer.join(10)
        assert not writer.is_alive()
        warm.drain()
        assert warm.symbols()["S"].segments == 12


def test_history_after_retention_deleted_everything(tmp_path: Path) -> None:
    from appliance.durability.history import HistoryError, stats_by_index

    with warm_tier(tmp_path, segment_values=N, retain_days=1, clock=lambda: 9 * 10**18) as warm:
        warm.on_record(BatchRecord(1, "S", 0, 1, 0, 0, np.ones(N)))
        warm.drain()
        assert warm.symbols()["S"] == (N, N, N, 0)  # total, warm_start, sealed_end, segments
        with pytest.raises(HistoryError, match="retain_days") as info:
            stats_by_index(warm, "S")
        assert info.value.code == "empty_range"


def test_from_config(tmp_path: Path) -> None:
    from appliance.config import DurabilityConfig

    config = DurabilityConfig(dir=str(tmp_path), warm_segment_values=7, retain_days=3)
    warm = WarmTier.from_config(config)
    try:
        assert (warm.directory, warm.segment_values, warm.retain_days) == (tmp_path / "warm", 7, 3)
    finally:
        warm.close()
