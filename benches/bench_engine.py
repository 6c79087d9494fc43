"""Engine benchmark: append, window statistics, memory and the cleanup boundary (issue 2).

Measures the numpy segment-tree engine (`fallback.NumpyEngine`) against a plain numpy
"recompute the window each time" baseline in the same run, and prints a markdown table with
the machine, versions and command, ready to paste into benches/RESULTS.md.

    .venv/bin/python benches/bench_engine.py            # full run, N up to 1e8 (about 3 GiB)
    .venv/bin/python benches/bench_engine.py --quick    # smoke run, N up to 1e6
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fallback import NumpyEngine, RetentionPolicy

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


def bench_cleanup(max_values: int, keep: int, rng) -> dict:
    """Append 10k batches until well past one cleanup; compare the slowest append with the
    median, and the cleanup append itself."""
    series = NumpyEngine().new_series(RetentionPolicy(max_values, keep), 1_000_000)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
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


if __name__ == "__main__":
    main()
