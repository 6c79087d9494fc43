"""Engine benchmark: append, window statistics, memory and the cleanup boundary (issue 2), and
batched statistics through the store (issue 4, POST /stats/batch).

Measures the numpy segment-tree engine (`fallback.NumpyEngine`) against a plain numpy
"recompute the window each time" baseline in the same run, and a 10k-query
`Store.stats_many` against 10k `Store.stats` calls in the same run, and prints a markdown
table with the machine, versions and command, ready to paste into benches/RESULTS.md.

    .venv/bin/python benches/bench_engine.py                # full run, N up to 1e8 (about 3 GiB)
    .venv/bin/python benches/bench_engine.py --quick        # smoke run, N up to 1e6
    .venv/bin/python benches/bench_engine.py --stats-batch  # only the batch (about 30 s)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.stats_batch import StatsBatchDecoder, answer
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine

BATCH = 10_000
FILL_BATCH = 1_000_000


def machine() -> str:
    model = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = f"Python {platform.python_version()}, numpy {np.__version__}"
    return f"{model}, {os.cpu_count()} vCPU, {versions}"


def fill(series, target: int, rng: np.random.Generator) -> None:
    block = rng.uniform(100.0, 200.0, FILL_BATCH)
    while len(series) < target:
        series.append(block[: min(FILL_BATCH, target - len(series))])


def time_calls(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


def bench_append(n: int, repeats: int, rng) -> dict:
    series = NumpyEngine().new_series(RetentionPolicy(), 1_000_000)
    fill(series, n, rng)
    batch = rng.uniform(100.0, 200.0, BATCH)
    samples = time_calls(lambda: series.append(batch), repeats)
    flat = np.empty(n + BATCH * (repeats + 1))
    flat[:n] = rng.uniform(100.0, 200.0, n)
    end = [n]

    def baseline_append() -> None:
        # The baseline stores a flat, pre-sized array: its append is a copy into place.
        flat[end[0] : end[0] + BATCH] = batch
        end[0] += BATCH

    base = time_calls(baseline_append, repeats)
    return {
        "n": n,
        "median_us": statistics.median(samples),
        "p99_us": pct(samples, 99),
        "baseline_median_us": statistics.median(base),
    }


def bench_stats(n: int, repeats: int, rng) -> tuple[list[dict], float]:
    series = NumpyEngine().new_series(RetentionPolicy(), 1_000_000)
    fill(series, n, rng)
    series.append(rng.uniform(100.0, 200.0, 12_345))  # unaligned end: partial nodes
    assert series.stats(len(series)).count == len(series)  # warm-up
    # The baseline keeps a flat array and recomputes each window with numpy's reductions.
    flat = rng.uniform(100.0, 200.0, len(series))
    rows = []
    for k in range(1, 9):
        window = 10**k
        if window > len(series) * 10:
            break
        tree = time_calls(lambda w=window: series.stats(w), repeats)
        reps = max(3, min(repeats, int(2e8 // max(window, 1)) // 10))

        def recompute(w=window) -> None:
            view = flat[-w:]
            view.min(), view.max(), view[-1], view.mean(), view.var()

        base = time_calls(recompute, reps)
        rows.append(
            {
                "k": k,
                "median_us": statistics.median(tree),
                "p99_us": pct(tree, 99),
                "baseline_median_us": statistics.median(base),
            }
        )
    return rows, series.nbytes / len(series)


def bench_cleanup(max_values: int, keep: int, rng, engine=None, warm_cycles: int = 0) -> dict:
    """Append 10k batches until well past one cleanup; compare the slowest append with the
    median, and the cleanup append itself (numpy engine unless `engine` is given).

    `warm_cycles` > 0 first runs that many cleanups and regrowths, so that the measured one is
    the steady state of a long-running series rather than its first fill."""
    engine = engine or NumpyEngine()
    series = engine.new_series(RetentionPolicy(max_values, keep), 1_000_000)
    fill(series, max_values - 50 * BATCH, rng)
    block = rng.uniform(100.0, 200.0, FILL_BATCH)
    for _ in range(warm_cycles):
        while not series.append(block[: 50 * BATCH + 1]):
            pass
        fill(series, max_values - 50 * BATCH, rng)
    batch = rng.uniform(100.0, 200.0, BATCH)
    samples, cleanup_us = [], None
    for _ in range(100):
        t0 = time.perf_counter_ns()
        evicted = series.append(batch)
        elapsed = (time.perf_counter_ns() - t0) / 1000.0
        samples.append(elapsed)
        if evicted:
            cleanup_us = elapsed
    median = statistics.median(samples)
    return {
        "max_values": max_values,
        "median_us": median,
        "max_us": max(samples),
        "cleanup_append_us": cleanup_us,
        "max_over_median": max(samples) / median,
        "cleanup_over_median": cleanup_us / median if cleanup_us else None,
        "len_after": len(series),
        "bytes_per_value_after": series.nbytes / len(series),
    }


STATS_BATCH = 10_000


def bench_stats_batch(repeats: int, rng) -> list[dict]:
    """10k (symbol, exponent) queries: one `Store.stats_many` vs 10k `Store.stats`, same run.

    Two mixes: the default 10 symbols x 8 exponents (a dashboard: 80 distinct queries, the
    rest repeats) and 1250 symbols x 8 (10k distinct queries, no repeat). "cold": every
    symbol got a 1-value append just before (outside the timing), so no answer is cached;
    "warm": the same batch again, every answer cached. The handler column is the whole
    POST /stats/batch work in process (decode the JSON body, ask the store, encode the answer)
    without HTTP.
    """
    rows = []
    for symbols, values in ((10, 1_000_000), (1250, 10_000)):
        rows += _bench_batch_mix(symbols, values, repeats, rng)
    return rows


def _bench_batch_mix(symbols: int, values: int, repeats: int, rng) -> list[dict]:
    store = Store(
        NumpyEngine(), retention=RetentionPolicy(), max_symbols=symbols, starting_capacity=values
    )
    names = [f"SYM{i:04d}" for i in range(symbols)]
    block = rng.uniform(100.0, 200.0, values)
    for name in names:
        store.ingest(name, block)
    pairs = [(name, k) for name in names for k in range(1, 9)]
    queries = [pairs[i % len(pairs)] for i in range(STATS_BATCH)]
    rng.shuffle(queries)
    body = msgspec.json.encode({"queries": [{"symbol": s, "exponent": k} for s, k in queries]})
    decoder = StatsBatchDecoder(STATS_BATCH)
    tick = np.array([150.0])

    def invalidate() -> None:
        for name in names:
            store.ingest(name, tick)

    def singles() -> None:
        for symbol, exponent in queries:
            store.stats(symbol, exponent)

    def handler() -> None:
        answer(store, decoder.decode(body))  # the response body, encoded

    rows = []
    for cache in ("cold", "warm"):
        timed = {}
        for label, fn in (
            ("batch", lambda: store.stats_many(queries)),
            ("singles", singles),
            ("handler", handler),
        ):
            samples = []
            for _ in range(repeats):
                if cache == "cold":
                    invalidate()
                else:
                    fn()  # fill the cache
                t0 = time.perf_counter_ns()
                fn()
                samples.append((time.perf_counter_ns() - t0) / 1000.0)
            timed[label] = statistics.median(samples)
        rows.append(
            {
                "symbols": symbols,
                "values_per_symbol": values,
                "distinct": len(pairs),
                "cache": cache,
                "batch_us": timed["batch"],
                "singles_us": timed["singles"],
                "handler_us": timed["handler"],
                "body_bytes": len(body),
            }
        )
    return rows


def print_stats_batch(rows: list[dict]) -> None:
    print(
        f"\n| {STATS_BATCH // 1000}k queries through the store | cache | stats_many ms | "
        f"{STATS_BATCH // 1000}k x stats ms | singles / batch | handler ms (decode + "
        "stats_many + encode) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['symbols']} symbols x 8 exponents ({row['distinct']} distinct), "
            f"{row['values_per_symbol']:.0e} values each | {row['cache']} | "
            f"{row['batch_us'] / 1000:.2f} | {row['singles_us'] / 1000:.2f} | "
            f"{row['singles_us'] / row['batch_us']:.1f}x | {row['handler_us'] / 1000:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument(
        "--stats-batch", action="store_true", help="only the batched statistics (issue 4)"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
    if args.stats_batch:
        result = {
            "machine": machine(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv),
            "stats_batch": bench_stats_batch(5 if args.quick else 21, rng),
        }
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(f"Machine: {result['machine']}  \nDate: {result['date']}  ")
        print(f"Command: `{result['command']}`")
        print_stats_batch(result["stats_batch"])
        return
    big = 1_000_000 if args.quick else 100_000_000
    repeats = 200 if args.quick else 2000
    result = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "append": [bench_append(n, repeats, rng) for n in sorted({1_000_000, big})],
    }
    result["stats"], result["bytes_per_value"] = bench_stats(big, repeats, rng)
    if args.quick:
        result["cleanup"] = bench_cleanup(2_000_000, 1_000_000, rng)
    else:
        result["cleanup"] = bench_cleanup(150_000_000, 100_000_000, rng)
    result["stats_batch"] = bench_stats_batch(5 if args.quick else 21, rng)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"Machine: {result['machine']}  \nDate: {result['date']}  ")
    print(f"Command: `{result['command']}`\n")
    print("| append 10k values | median us | p99 us | flat-array copy median us | target |")
    print("|---|---|---|---|---|")
    for row in result["append"]:
        print(
            f"| N = {row['n']:.0e} | {row['median_us']:.1f} | {row['p99_us']:.1f} | "
            f"{row['baseline_median_us']:.1f} | <= 50 us median |"
        )
    print(
        f"\n| stats at N = {big:.0e} | tree median us | tree p99 us | numpy recompute median us "
        "| recompute / tree | target |"
    )
    print("|---|---|---|---|---|---|")
    for row in result["stats"]:
        print(
            f"| k = {row['k']} | {row['median_us']:.1f} | {row['p99_us']:.1f} | "
            f"{row['baseline_median_us']:.1f} | "
            f"{row['baseline_median_us'] / row['median_us']:.1f}x | <= 10 us median |"
        )
    c = result["cleanup"]
    bpv = result["bytes_per_value"]
    print(f"\nBytes per retained value at N = {big:.0e}: {bpv:.3f} (target <= 9)")
    print(
        f"\nCleanup boundary (max {c['max_values']:.1e}): median append {c['median_us']:.1f} us, "
        f"the cleanup append {c['cleanup_append_us']:.1f} us = "
        f"{c['cleanup_over_median']:.2f}x median (target <= 2); slowest of the 100 appends "
        f"{c['max_us']:.1f} us = {c['max_over_median']:.2f}x median; after cleanup "
        f"{c['len_after']} values at {c['bytes_per_value_after']:.3f} B/value"
    )
    print_stats_batch(result["stats_batch"])


if __name__ == "__main__":
    main()
