"""The warm tier's sealing process: it rebuilds each block from the write-ahead log, at low
priority, and writes the same segment the sealing thread would; anything it cannot do exactly
falls back to sealing from memory (see appliance/durability/warm_sealer.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.durability import wal
from appliance.durability.warm import WarmTier
from appliance.durability.warm_segment import read_segment
from appliance.durability.writer import DurableWriter
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine


def durable(data: Path, warm: WarmTier, **kwargs: object) -> tuple[DurableWriter, Store]:
    store = Store(NumpyEngine(), retention=RetentionPolicy(), max_symbols=10, starting_capacity=64)
    writer = DurableWriter(store, wal.wal_dir(data), **kwargs)  # type: ignore[arg-type]
    writer.add_listener(warm)
    writer.start()
    return writer, store


def sealed_values(warm: WarmTier, symbol: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    view = warm.view(symbol)
    assert view is not None and len(view.memory) <= 1  # only the live buffer is left
    parts = [read_segment(s.path, s.header) for s in view.sealed]
    return (
        np.concatenate([p.values for p in parts]),
        np.concatenate([p.mark_index for p in parts]),
        np.concatenate([p.mark_ns for p in parts]),
    )


def feed(writer: DurableWriter, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    sent: dict[str, list[np.ndarray]] = {"A": [], "BB": []}
    for i in range(40):
        symbol = "A" if i % 3 else "BB"
        values = rng.uniform(1.0, 2.0, int(rng.integers(1, 700)))
        sent[symbol].append(values)
        writer.submit(symbol, values).result()
    return sent


def test_the_process_seals_from_the_log_exactly_what_the_thread_would(tmp_path) -> None:
    rng = np.random.default_rng(5)
    by_process = WarmTier(tmp_path / "p" / "warm", segment_values=1000, log_dir=tmp_path / "p/wal")
    writer, _ = durable(tmp_path / "p", by_process, segment_bytes=1 << 16)  # several segments
    sent = feed(writer, rng)
    by_process.drain()
    writer.close()
    assert by_process._process is not None and by_process._process.sealed >= 4
    by_thread = WarmTier(tmp_path / "t" / "warm", segment_values=1000)
    for path in wal.list_segments(wal.wal_dir(tmp_path / "p")):
        for _, record in wal.scan_segment(path).records:
            by_thread.on_record(record)
    by_thread.drain()
    for symbol, parts in sent.items():
        values, marks, times = sealed_values(by_process, symbol)
        full = np.concatenate(parts)
        assert np.array_equal(values, full[: values.shape[0]])
        assert values.shape[0] == full.shape[0] // 1000 * 1000
        reference = sealed_values(by_thread, symbol)
        assert np.array_equal(values, reference[0]) and np.array_equal(marks, reference[1])
        assert len(times) == len(reference[2])
    by_process.close()
    by_thread.close()


def test_a_block_the_log_does_not_hold_is_sealed_from_memory(tmp_path, caplog) -> None:
    # The log's directory is wrong (e.g. retired too early): the process refuses, the thread
    # seals the block from memory, nothing is lost.
    warm = WarmTier(tmp_path / "warm", segment_values=100, log_dir=tmp_path / "elsewhere")
    writer, _ = durable(tmp_path, warm)
    values = np.arange(250, dtype=np.float64) + 1.0
    writer.submit("A", values).result()
    warm.drain()
    writer.close()
    view = warm.view("A")
    assert view is not None and len(view.sealed) == 2
    got = np.concatenate([read_segment(s.path, s.header).values for s in view.sealed])
    assert np.array_equal(got, values[:200])
    assert "sealing it here" in caplog.text
    warm.close()
