"""What tick timestamps cost (issue 17), each row next to a yardstick measured in the same run.

In process, one engine (`--engine cpu`, the compiled default; `numpy` for the reference):
- count-window queries (`Store.stats`, cache emptied before each call) on a symbol fed without
  timestamps and on one fed the same values with a distinct event time per value: the
  count-window path must not get slower when timestamps exist;
- time-window queries (`Store.stats_seconds`) next to the count window of the same size;
- `Store.ingest` of 1-value and 10k-value batches without timestamps, with a distinct event time
  per value, and the engine's own `series.append` (the yardstick: what the store adds on top);
- the REST decode (`BatchDecoder.decode`) of a 10k-value body without and with `timestamps`;
- the write-ahead log's inline commit (`DurableWriter.commit`, sync `never`, a temporary
  directory) of 10k-value batches without and with timestamps (the record grows by 8 B/value);
- `Engine.bars` (GET /history/bars' kernel) over 1e7 values in 1,440 bars, next to the numpy
  reference (`engine_core.bars`), one numpy `minimum.reduceat` over the same bars and a copy of
  the values.

Medians of `--rounds` rounds; run on a quiet machine:

    .venv/bin/python benches/bench_timestamps.py --json benches/results/timestamps.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance.durability.writer import DurableWriter
from appliance.engine import load_cpu_engine, load_numpy_engine
from appliance.store import Store
from appliance.validation import BatchDecoder
from engine_core.contract import RetentionPolicy

N_HELD = 3_000_000
BATCH = 10_000


def per_call_us(call: Callable[[], object], calls: int, rounds: int) -> float:
    """Median over `rounds` of the mean time of `calls` calls, in microseconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def new_store(engine: Any) -> Store:
    return Store(
        engine,
        retention=RetentionPolicy(),
        max_symbols=16,
        starting_capacity=N_HELD + 1_000_000,
    )


def fill(store: Store, symbol: str, values: np.ndarray, times: np.ndarray | None) -> None:
    for start in range(0, values.shape[0], 1_000_000):
        part = values[start : start + 1_000_000]
        stamps = None if times is None else times[start : start + 1_000_000]
        store.ingest(symbol, part, timestamps=stamps, received_ns=1 + start)


def queries(store: Store, rounds: int) -> dict[str, float]:
    """Uncached count-window (k = 1..6) and time-window queries, us per call."""
    rng = np.random.default_rng(1)
    values = 1e9 + rng.random(N_HELD) * 1e-3
    times = np.arange(N_HELD, dtype=np.int64) * 1_000 + 1_700_000_000 * 10**9  # 1 tick per us
    fill(store, "PLAIN", values, None)
    fill(store, "TIMED", values, times)
    out: dict[str, float] = {}
    for symbol in ("PLAIN", "TIMED"):
        entry = store._entries[symbol]
        for k in range(1, 7):

            def count_window(entry=entry, k=k, symbol=symbol) -> None:
                entry.cache = {}
                store.stats(symbol, k)

            out[f"stats k={k} {symbol.lower()}"] = per_call_us(count_window, 2_000, rounds)
    entry = store._entries["TIMED"]
    for k in range(1, 7):
        window_ns = 10**k * 1_000 - 1  # exactly 10**k ticks: the same window as k

        def time_window(window_ns=window_ns) -> None:
            entry.cache = {}
            store.stats_seconds("TIMED", window_ns)

        assert store.stats_seconds("TIMED", window_ns).count == 10**k
        out[f"stats_seconds 10^{k} ticks"] = per_call_us(time_window, 2_000, rounds)
    return out


# Steady state: every row runs on a series that has been through retention cycles already, so
# the engine's pages and the marks' chunks are recycled (the first cycle of a series faults in
# fresh memory, ~8 us per 4 KiB page on this VM, and would measure the VM, not the code).
STEADY = RetentionPolicy(max_values=2_000_000, keep_after_cleanup=1_000_000)


def ingest(engine: Any, rounds: int) -> dict[str, float]:
    """Store.ingest without / with timestamps, and the engine's append alone, us per batch."""
    out: dict[str, float] = {}
    for size, calls in ((1, 20_000), (BATCH, 300)):
        out.update(ingest_rows(engine, size, calls, rounds))
    return out


def ingest_rows(engine: Any, size: int, calls: int, rounds: int) -> dict[str, float]:
    values = np.linspace(1.0, 2.0, size)
    warm_up = min(2 * STEADY.max_values // size + 1, 200_000)
    series = engine.new_series(STEADY, 1 << 20)
    for _ in range(warm_up):
        series.append(values)
    store = Store(engine, retention=STEADY, max_symbols=4, starting_capacity=1 << 20)
    clock = [1_700_000_000 * 10**9]

    def timed() -> None:
        clock[0] += size
        store.ingest("T", values, timestamps=np.arange(clock[0], clock[0] + size))

    for _ in range(warm_up):
        store.ingest("S", values)
        timed()
    return {
        f"engine append {size}": per_call_us(lambda: series.append(values), calls, rounds),
        f"ingest {size} no timestamps": per_call_us(
            lambda: store.ingest("S", values), calls, rounds
        ),
        f"ingest {size} timestamps": per_call_us(timed, calls, rounds),
        f"np.arange {size} (in the timed row)": per_call_us(
            lambda: np.arange(0, size, dtype=np.int64), calls, rounds
        ),
    }


def decode(rounds: int) -> dict[str, float]:
    """The REST body decode of 10k values, without and with timestamps, us per body."""
    decoder = BatchDecoder(1_000_000)
    values = np.round(np.linspace(100.0, 101.0, BATCH), 4).tolist()
    plain = json.dumps({"symbol": "S", "values": values}).encode()
    stamps = list(range(1_700_000_000 * 10**9, 1_700_000_000 * 10**9 + BATCH))
    timed = json.dumps({"symbol": "S", "values": values, "timestamps": stamps}).encode()
    out = {"decode 10k no timestamps": per_call_us(lambda: decoder.decode(plain), 200, rounds)}
    try:
        decoder.decode(timed)
    except Exception as exc:  # a checkout without the field: report, do not fail
        out["decode 10k timestamps (unsupported)"] = float("nan")
        print(f"decode with timestamps: {exc}")
        return out
    out["decode 10k timestamps"] = per_call_us(lambda: decoder.decode(timed), 200, rounds)
    return out


def wal(engine: Any, rounds: int) -> dict[str, float]:
    """Inline commits of 10k-value batches to a real log (sync never), us per batch."""
    out: dict[str, float] = {}
    values = np.linspace(1.0, 2.0, BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(engine, retention=STEADY, max_symbols=4, starting_capacity=1 << 20)
        writer = DurableWriter(store, Path(tmp) / "wal", sync="never", segment_bytes=256 << 20)
        writer.start()
        try:
            clock = [1_700_000_000 * 10**9]

            def timed() -> None:
                clock[0] += BATCH
                writer.commit("T", values, timestamps=np.arange(clock[0], clock[0] + BATCH))

            for _ in range(2 * STEADY.max_values // BATCH + 1):  # recycled pages and chunks
                writer.commit("S", values)
                timed()
            out["wal commit 10k no timestamps"] = per_call_us(
                lambda: writer.commit("S", values), 200, rounds
            )
            out["wal commit 10k timestamps"] = per_call_us(timed, 200, rounds)
        finally:
            writer.close()
    return out


def bars(engine: Any, rounds: int) -> dict[str, float]:
    """`Engine.bars` over 1e7 values in 1,440 bars (a day of 1-minute bars), next to one
    `np.minimum.reduceat` over the same bars and a copy of the values, us per call."""
    rng = np.random.default_rng(3)
    values = 1e9 + rng.random(10_000_000) * 1e-3
    offsets = np.linspace(0, values.shape[0], 1_440, endpoint=False).astype(np.int64)
    got = engine.bars(values, offsets)
    assert int(np.asarray(got.count).sum()) == values.shape[0]
    reference = load_numpy_engine()
    return {
        "bars 1e7 values / 1440 bars": per_call_us(lambda: engine.bars(values, offsets), 3, rounds),
        "bars, numpy reference": per_call_us(lambda: reference.bars(values, offsets), 3, rounds),
        "np.minimum.reduceat 1e7 / 1440": per_call_us(
            lambda: np.minimum.reduceat(values, offsets), 3, rounds
        ),
        "copy 1e7 float64": per_call_us(values.copy, 3, rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("cpu", "numpy"), default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engine = load_cpu_engine() if args.engine == "cpu" else load_numpy_engine()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results: dict[str, float] = {}
    for part in (
        lambda: queries(new_store(engine), args.rounds),
        lambda: ingest(engine, args.rounds),
        lambda: decode(args.rounds),
        lambda: wal(engine, args.rounds),
        lambda: bars(engine, args.rounds),
    ):
        got = part()
        for name, us in got.items():
            print(f"{name:40s} {us:10.3f} us")
        results.update(got)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "started": started,
                    "engine": args.engine,
                    "machine": platform.platform(),
                    "processor": platform.processor(),
                    "rounds": args.rounds,
                    "us": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
