"""GPU engine benchmark (issue 4): each figure next to the numpy engine on the same host, same run.

1. build: the pyramid over N values already on the device (`resummarize`, kernels only), and
   the whole append of N values from host memory (staging + copies + kernels); numpy: append.
2. append of 10k values into an N-value series: median and p99, device work included.
3. one window query per k at N values (`stats`, no store cache): median and p99.
4. 10k (symbol, k) queries in one `stats_many`: end to end, and the kernel alone (CUDA events).

    .venv/bin/python benches/bench_gpu.py              # CUDA GPU + pip install '.[gpu]'; N = 1e8
    .venv/bin/python benches/bench_gpu.py --n 1000000  # smaller N
    .venv/bin/python benches/bench_gpu.py --emulated --n 100000
        # smoke test of this script on the CPU build of the kernels (needs g++):
        # the figures are NOT GPU figures and must not be reported as such
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_engine import machine, pct

from engine_core import RetentionPolicy
from fallback import NumpyEngine
from gpu_kernels import CupyEngine
from gpu_kernels.series import query_rows

BATCH = 10_000
QUERIES = 10_000
SYMBOLS = 100
RETENTION = RetentionPolicy()  # the appliance default: 1.5e8 / 1e8


def synced_times(engine, fn, repeats: int) -> list[float]:
    """Microseconds per call of `fn`, each waiting for the device to finish its work."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        if engine is not None:  # None: the numpy engine, nothing runs after the call
            engine.device.synchronize()
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


def summary(samples: list[float]) -> dict:
    return {"median_us": statistics.median(samples), "p99_us": pct(samples, 99)}


def bench_build(gpu: CupyEngine, n: int, rng) -> tuple[dict, object, object]:
    values = rng.uniform(100.0, 200.0, n)
    series = gpu.new_series(RETENTION, 0)
    t0 = time.perf_counter_ns()
    series.append(values)
    gpu.device.synchronize()
    append_us = (time.perf_counter_ns() - t0) / 1000.0
    rebuild = synced_times(gpu, series.resummarize, 5)
    cpu_series = NumpyEngine().new_series(RETENTION, n)
    t0 = time.perf_counter_ns()
    for lo in range(0, n, 1_000_000):  # as the numpy bench fills: 1e6-value batches
        cpu_series.append(values[lo : lo + 1_000_000])
    cpu_us = (time.perf_counter_ns() - t0) / 1000.0
    row = {
        "n": n,
        "gpu_tree_build_us": statistics.median(rebuild),
        "gpu_append_from_host_us": append_us,
        "numpy_append_us": cpu_us,
    }
    return row, series, cpu_series


def bench_append(gpu: CupyEngine, series, cpu_series, repeats: int, rng) -> dict:
    batch = rng.uniform(100.0, 200.0, BATCH)
    gpu_times = synced_times(gpu, lambda: series.append(batch), repeats)
    cpu_times = synced_times(None, lambda: cpu_series.append(batch), repeats)
    return {"gpu": summary(gpu_times), "numpy": summary(cpu_times)}


def bench_queries(gpu: CupyEngine, series, cpu_series, repeats: int) -> list[dict]:
    rows = []
    for k in range(0, 9):
        window = 10**k
        if window > len(series) * 10:
            break
        gpu_times = synced_times(gpu, lambda w=window: series.stats(w), repeats)
        cpu_times = synced_times(None, lambda w=window: cpu_series.stats(w), repeats)
        rows.append({"k": k, "gpu": summary(gpu_times), "numpy": summary(cpu_times)})
    return rows


def bench_batch(gpu: CupyEngine, values_per_symbol: int, repeats: int, rng) -> dict:
    cpu = NumpyEngine()
    gpu_series, cpu_series = [], []
    for _ in range(SYMBOLS):
        values = rng.uniform(100.0, 200.0, values_per_symbol)
        gpu_series.append(gpu.new_series(RETENTION, 0))
        gpu_series[-1].append(values)
        cpu_series.append(cpu.new_series(RETENTION, values_per_symbol))
        cpu_series[-1].append(values)
    top = len(str(values_per_symbol)) - 1
    picks = rng.integers(0, SYMBOLS, QUERIES)
    ks = rng.integers(0, top + 1, QUERIES)
    gpu_requests = [(gpu_series[s], 10 ** int(k)) for s, k in zip(picks, ks, strict=True)]
    cpu_requests = [(cpu_series[s], 10 ** int(k)) for s, k in zip(picks, ks, strict=True)]
    for got, want in zip(gpu.stats_many(gpu_requests), cpu.stats_many(cpu_requests), strict=True):
        assert (got.count, got.min, got.max) == (want.count, want.min, want.max)
    end_to_end = synced_times(gpu, lambda: gpu.stats_many(gpu_requests), repeats)
    cpu_times = synced_times(None, lambda: cpu.stats_many(cpu_requests), max(3, repeats // 10))
    row = {
        "queries": QUERIES,
        "symbols": SYMBOLS,
        "values_per_symbol": values_per_symbol,
        "gpu_end_to_end": summary(end_to_end),
        "numpy": summary(cpu_times),
    }
    kernel = kernel_only_us(gpu, gpu_requests, repeats)
    if kernel is not None:
        row["gpu_kernel"] = summary(kernel)
    return row


def kernel_only_us(gpu: CupyEngine, requests, repeats: int) -> list[float] | None:
    """The `window_stats` launch alone, timed by CUDA events on the engine's stream."""
    stream = getattr(gpu.device, "_stream", None)  # CupyDevice only; a bench may look inside
    if stream is None:
        return None
    import cupy

    device = gpu.device
    with gpu.lock:
        queries = device.new_int64(query_rows(device, requests).ravel())
        out = device.new_output(len(requests))
        times = []
        for _ in range(repeats):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            device.launch("window_stats", len(requests), queries, out, len(requests))
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) * 1000.0)
    return times


def gpu_versions(engine: CupyEngine) -> str:
    try:
        import cupy

        runtime = cupy.cuda.runtime
        return (
            f"{engine.device_name}, CuPy {cupy.__version__}, CUDA runtime "
            f"{runtime.runtimeGetVersion()}, driver {runtime.driverGetVersion()}"
        )
    except ImportError:
        return engine.device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000_000, help="series length (1e8)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--emulated", action="store_true", help="CPU build of the kernels")
    args = parser.parse_args()
    if args.emulated:
        from tests.engine.emulated_device import EmulatedDevice

        gpu = CupyEngine(device=EmulatedDevice.build())
    else:
        gpu = CupyEngine()  # raises with the reason when there is no usable GPU
    rng = np.random.default_rng(2026)
    build, series, cpu_series = bench_build(gpu, args.n, rng)
    result = {
        "machine": machine(),
        "device": gpu_versions(gpu),
        "emulated": args.emulated,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "build": build,
        "append": bench_append(gpu, series, cpu_series, args.repeats, rng),
        "queries": bench_queries(gpu, series, cpu_series, args.repeats),
        "batch": bench_batch(gpu, min(args.n // 100, 1_000_000), args.repeats, rng),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
