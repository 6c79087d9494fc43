"""Feeding a WarmTier the way the write-ahead log does: BatchRecords in lsn order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from appliance.durability.records import BatchRecord
from appliance.durability.warm import WarmTier


class Feeder:
    """Builds consecutive records per symbol and keeps every value sent, for numpy checks."""

    def __init__(self, warm: WarmTier, start_ns: int = 1_000_000) -> None:
        self.warm = warm
        self.lsn = 0
        self.ns = start_ns
        self.values: dict[str, list[np.ndarray]] = {}
        self.times: dict[str, list[np.ndarray]] = {}
        self.records: list[BatchRecord] = []

    def send(self, symbol: str, values: np.ndarray, *, ns_step: int = 10) -> BatchRecord:
        self.lsn += 1
        self.ns += ns_step
        first = sum(v.shape[0] for v in self.values.get(symbol, []))
        values = np.asarray(values, dtype=np.float64)
        values.flags.writeable = False
        record = BatchRecord(self.lsn, symbol, first, self.ns, 0, 0, values)
        self.values.setdefault(symbol, []).append(values)
        self.times.setdefault(symbol, []).append(np.full(values.shape[0], self.ns, np.int64))
        self.records.append(record)
        self.warm.on_record(record)
        return record

    def all_values(self, symbol: str) -> np.ndarray:
        return np.concatenate(self.values[symbol])

    def all_times(self, symbol: str) -> np.ndarray:
        return np.concatenate(self.times[symbol])


@contextmanager
def warm_tier(directory: Path, **kwargs: object) -> Iterator[WarmTier]:
    warm = WarmTier(directory, **kwargs)  # type: ignore[arg-type]
    try:
        yield warm
    finally:
        warm.close()


def random_batches(
    rng: np.random.Generator, total: int, max_batch: int = 40, scale: float = 100.0
) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    left = total
    while left:
        n = int(min(left, rng.integers(1, max_batch + 1)))
        out.append(rng.uniform(0, scale, n))
        left -= n
    return out
