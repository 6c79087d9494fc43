"""Compiled CPU engine benchmark (issue 12): the engine rows of the issue's table, each next to
its yardstick measured in the same run, for the compiled engine (`cpu`) and the numpy
reference engine (`numpy`) side by side.

    row                              yardstick (same run)                 goal
    stats(10^k), every k, at N       a.min() on 1024 float64               <= 2x (stretch 1x)
    append of 10k values             np.copyto of 10k float64 (80 KB)      <= 5x
    single-tick append               -                                     <= 0.5 us
    cleanup 150M -> 100M             the median 10k append                 <= 2x
    memory                           -                                     <= 9 B per value

plus the compiled kernels' cold and warm start (a fresh process compiling into an empty numba
cache, then one loading from it) and, for the append, where the time goes (the kernel on memory
already touched vs the whole append, whose pages are fresh).

    .venv/bin/python benches/bench_compiled.py            # N = 3e7 and 1e8 (about 4 GiB, ~3 min)
    .venv/bin/python benches/bench_compiled.py --quick    # N = 1e6, smoke run (~30 s)
    .venv/bin/python benches/bench_compiled.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benches.bench_engine import bench_cleanup, machine  # noqa: E402
from engine_core import RetentionPolicy  # noqa: E402
from fallback import NumpyEngine  # noqa: E402
from fallback.compiled import CompiledEngine, prepare_kernels  # noqa: E402
from fallback.compiled_kernels import append_values  # noqa: E402

BATCH = 10_000
FILL = 1_000_000


def median_us(fn, repeats: int) -> float:
    """Median of `repeats` timed calls, in microseconds (perf_counter_ns around each call)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000.0


def yardstick_min(repeats: int) -> float:
    a = np.random.default_rng(1).uniform(100.0, 200.0, 1024)
    return median_us(a.min, repeats)


def yardstick_copy(repeats: int) -> float:
    src = np.random.default_rng(2).uniform(100.0, 200.0, BATCH)
    dst = np.empty(BATCH)
    return median_us(lambda: np.copyto(dst, src), repeats)


def filled(engine, n: int, rng, retention: RetentionPolicy | None = None):
    series = engine.new_series(retention or RetentionPolicy(), FILL)
    block = rng.uniform(100.0, 200.0, FILL)
    while len(series) < n:
        series.append(block[: min(FILL, n - len(series))])
    return series


def bench_engine_at(engine, n: int, repeats: int, rng) -> dict:
    series = filled(engine, n, rng)
    series.append(rng.uniform(100.0, 200.0, 12_345))  # an unaligned end: partial nodes
    stats = {}
    for k in range(1, 9):
        stats[k] = median_us(lambda w=10**k: series.stats(w), repeats)
    batch = rng.uniform(100.0, 200.0, BATCH)
    append_10k = median_us(lambda: series.append(batch), min(repeats, 2000))
    tick = np.array([150.0])
    single = median_us(lambda: series.append(tick), repeats * 5)
    row = {
        "n": n,
        "stats_us": stats,
        "append_10k_us": append_10k,
        "tick_us": single,
        "bytes_per_value": series.nbytes / len(series),
    }
    return row  # the series (GiBs at N = 1e8) is freed here


def append_profile(n: int, repeats: int, rng) -> dict:
    """The compiled 10k append, split: the kernel rewriting memory already touched (copy,
    summaries, merges; no page faults) vs the whole append into fresh pages."""
    series = filled(CompiledEngine(), n, rng)
    batch = rng.uniform(100.0, 200.0, BATCH)
    start = series._end - 5 * BATCH  # rewrite old positions with their own block alignment
    hot = median_us(lambda: append_values(series._directory, series._shape, batch, start), repeats)
    fresh = median_us(lambda: series.append(batch), repeats)
    return {"kernel_on_touched_memory_us": hot, "whole_append_fresh_pages_us": fresh}


_START = (
    "import json, sys, time; t = time.perf_counter(); "
    "from fallback.compiled import prepare_kernels; r = prepare_kernels(sys.argv[1]); "
    "print(json.dumps({'total_s': time.perf_counter() - t, 'kernels_s': r.seconds, "
    "'from_cache': r.loaded_from_cache}))"
)


def start_times() -> dict:
    """A cold start (empty cache directory) and a warm one (the cache it wrote), each a fresh
    Python process importing numba and preparing every kernel."""
    with tempfile.TemporaryDirectory() as cache:
        runs = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", _START, cache],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"cold": runs[0], "warm": runs[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1e6, for a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
    prepare_kernels()
    sizes = [1_000_000] if args.quick else [30_000_000, 100_000_000]
    repeats = 2000 if args.quick else 20_000
    result = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "yardstick_min_us": yardstick_min(repeats),
        "yardstick_copy_us": yardstick_copy(repeats),
        "engines": {},
    }
    for name, engine in (("cpu", CompiledEngine()), ("numpy", NumpyEngine())):
        result["engines"][name] = {
            "sizes": [bench_engine_at(engine, n, repeats, rng) for n in sizes],
            # The second cleanup of the series: the steady state of a long-running symbol.
            "cleanup": bench_cleanup(
                2_000_000 if args.quick else 150_000_000,
                1_000_000 if args.quick else 100_000_000,
                rng,
                engine,
                warm_cycles=1,
            ),
        }
    result["append_profile"] = append_profile(sizes[0], 2000, rng)
    result["start"] = start_times()
    # The yardsticks again at the end: how much the machine drifted during the run.
    result["yardstick_min_us_end"] = yardstick_min(repeats)
    result["yardstick_copy_us_end"] = yardstick_copy(repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print_markdown(result)


def print_markdown(r: dict) -> None:
    ymin, ycopy = r["yardstick_min_us"], r["yardstick_copy_us"]
    print(f"Machine: {r['machine']}  \nDate: {r['date']}  \nCommand: `{r['command']}`\n")
    print(
        f"Yardsticks: `a.min()` on 1024 float64 {ymin:.2f} us (at the end "
        f"{r['yardstick_min_us_end']:.2f}); `np.copyto` of 10k float64 {ycopy:.2f} us "
        f"(at the end {r['yardstick_copy_us_end']:.2f}).\n"
    )
    for name, data in r["engines"].items():
        for row in data["sizes"]:
            stats = row["stats_us"]
            worst = max(stats.values())
            print(f"**{name}** at N = {row['n']:.0e}:\n")
            print("| k | " + " | ".join(str(k) for k in stats) + " | worst / a.min() |")
            print("|---|" + "---|" * (len(stats) + 1))
            print(
                "| stats us | "
                + " | ".join(f"{v:.2f}" for v in stats.values())
                + f" | **{worst / ymin:.2f}x** (goal <= 2x) |"
            )
            print(
                f"\nappend 10k: {row['append_10k_us']:.1f} us = "
                f"**{row['append_10k_us'] / ycopy:.1f}x** the copy (goal <= 5x); "
                f"single tick: **{row['tick_us']:.3f} us** (goal <= 0.5); "
                f"{row['bytes_per_value']:.3f} B/value (goal <= 9)\n"
            )
        c = data["cleanup"]
        print(
            f"{name}, second cleanup {c['max_values']:.1e} -> keep: the cleanup append "
            f"{c['cleanup_append_us']:.1f} us = **{c['cleanup_over_median']:.2f}x** the median "
            f"append {c['median_us']:.1f} us (goal <= 2x); slowest of the 100 appends around "
            f"it: {c['max_over_median']:.2f}x\n"
        )
    p = r["append_profile"]
    print(
        f"Compiled 10k append, where the time goes: the kernel alone on memory already touched "
        f"{p['kernel_on_touched_memory_us']:.1f} us; the whole append into fresh pages "
        f"{p['whole_append_fresh_pages_us']:.1f} us.\n"
    )
    s = r["start"]
    print(
        f"Kernel start (fresh process, numba import included): cold (empty cache) "
        f"{s['cold']['total_s']:.2f} s (compile {s['cold']['kernels_s']:.2f} s); warm (cached) "
        f"{s['warm']['total_s']:.2f} s (load {s['warm']['kernels_s']:.2f} s, from cache: "
        f"{s['warm']['from_cache']})."
    )


if __name__ == "__main__":
    main()
