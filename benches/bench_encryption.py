"""Encryption at rest (issue 15, item 5): the cost on ingest, encryption off vs on, same run.

Drives a real `DurableWriter` (sync `interval`, the default) and store in one process through
its two ingest paths: `commit()` inline (the shared-memory / RDMA pollers' call: one batch per
commit, where a per-record cost weighs most) and `submit_group()` (the ZeroMQ loop's call: a
poll batch of frames, one write). Off and on alternate round by round on fresh directories, so
machine noise hits both alike; the median of the rounds is reported, with the ratio. A replay
of the log written is timed too (decryption at start).

    .venv/bin/python benches/bench_encryption.py
    .venv/bin/python benches/bench_encryption.py --rounds 7 --sizes 1,10,100,1000,10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.durability import wal
from appliance.durability.encryption import DataCipher
from appliance.durability.recovery import recover
from appliance.durability.writer import DurableWriter
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine


def _store() -> Store:
    return Store(
        NumpyEngine(), retention=RetentionPolicy(), max_symbols=100, starting_capacity=1 << 16
    )


def run_inline(directory: Path, cipher: DataCipher | None, values: np.ndarray, n: int) -> float:
    """Seconds per inline commit of `values`."""
    writer = DurableWriter(_store(), wal.wal_dir(directory), cipher=cipher)
    writer.start()
    for _ in range(50):  # warm-up: first segment, first pages
        writer.commit("EUR/USD", values)
    started = time.perf_counter()
    for _ in range(n):
        writer.commit("EUR/USD", values)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed / n


def run_group(
    directory: Path, cipher: DataCipher | None, values: np.ndarray, n: int, frames: int = 16
) -> float:
    """Seconds per frame, frames handed over `frames` at a time (the ZeroMQ loop's way)."""
    writer = DurableWriter(_store(), wal.wal_dir(directory), cipher=cipher)
    writer.start()
    done = threading.Event()
    items = [("EUR/USD", values, 1, 0, None)] * frames
    groups = max(1, n // frames)
    started = time.perf_counter()
    for _ in range(groups):
        done.clear()
        writer.submit_group(items, lambda results: done.set())
        done.wait()
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed / (groups * frames)


def run_replay(directory: Path, cipher: DataCipher | None) -> float:
    started = time.perf_counter()
    recover(_store(), directory, use_checkpoint=False, cipher=cipher)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="1,10,100,1000,10000", help="values per batch")
    parser.add_argument("--values", type=int, default=2_000_000, help="values per size and run")
    args = parser.parse_args()
    cipher = DataCipher(os.urandom(32))
    root = Path(tempfile.mkdtemp(prefix="bench-enc-"))
    print(f"{'path':7} {'values':>6} {'off us':>9} {'on us':>9} {'cost':>7}")
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            values = np.random.default_rng(1).uniform(100, 200, size)
            n = max(200, min(50_000, args.values // size))
            for path, fn in (("inline", run_inline), ("group", run_group)):
                times: dict[bool, list[float]] = {False: [], True: []}
                replay: dict[bool, list[float]] = {False: [], True: []}
                for r in range(args.rounds):
                    for on in (False, True) if r % 2 == 0 else (True, False):
                        directory = root / f"{path}-{size}-{r}-{on}"
                        times[on].append(fn(directory, cipher if on else None, values, n))
                        if path == "inline":
                            replay[on].append(run_replay(directory, cipher if on else None))
                        shutil.rmtree(directory)
                off, on = statistics.median(times[False]), statistics.median(times[True])
                print(f"{path:7} {size:>6} {off * 1e6:9.2f} {on * 1e6:9.2f} {on / off - 1:+7.1%}")
                if path == "inline":
                    r_off, r_on = statistics.median(replay[False]), statistics.median(replay[True])
                    rate = n * size / r_on / 1e6
                    print(
                        f"{'replay':7} {size:>6} {r_off * 1e3:8.1f}ms {r_on * 1e3:8.1f}ms "
                        f"{r_on / r_off - 1:+7.1%}  ({n} records, {rate:.0f}M values/s on)"
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
