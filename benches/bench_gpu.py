"""GPU engines benchmark (issues 4 and 13): every row next to the compiled `cpu` engine, same run.

Engines: `cpu` (fallback.compiled, the yardstick), `device` (the plain CuPy engine, placement
"device") and `hybrid` (compiled host series + device mirrors, placement "hybrid"). Rows, each
the successor of a row of issue 13's table:

1. one `stats(10^k)` at N values: median and p99 per engine;
2. `stats_table` of 10k queries over 100 series: per engine (the hybrid routes it to the device
   since 10k >= its threshold), plus the hybrid's first call, which syncs the mirrors;
3. append of N values from host memory, GB/s: the device engine (pageable source, staged
   through its pinned buffers), the hybrid's mirror sync (straight from its pinned host
   pages), the cpu engine's append;
4. tree build over N values already on the device (`resummarize`, kernels only);
5. append of 10k values into an N-value series: median and p99 per engine;
6. crossover sweep: batches of 1..10k DISTINCT (series, window) pairs (what the hybrid's
   threshold counts: the store hands the engine its distinct misses), the hybrid's host path
   (compiled `stats_table`) vs its device path (mirrors); a few ticks are appended to every
   series before each timed batch, so the device time includes the mirror sync a batch pays
   after new ticks. The measured crossover (the smallest size from which the device is faster
   at every larger size swept) is what to set `[engine] gpu_batch_min_queries` to.

    .venv/bin/python benches/bench_gpu.py              # CUDA GPU + pip install '.[gpu]'; N = 1e8
    .venv/bin/python benches/bench_gpu.py --n 1000000  # smaller N
    .venv/bin/python benches/bench_gpu.py --emulated --n 200000
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_engine import machine, pct

from engine_core import RetentionPolicy
from fallback.compiled import CompiledEngine, prepare_kernels
from gpu_kernels import CupyEngine
from gpu_kernels.hybrid import HybridEngine
from gpu_kernels.series import query_rows

BATCH = 10_000
QUERIES = 10_000
SYMBOLS = 100
SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 10_000)
TICKS_BEFORE_BATCH = 4  # new values per series before each timed crossover batch
RETENTION = RetentionPolicy()  # the appliance default: 1.5e8 / 1e8


def timed(
    fn: Callable[[], object],
    sync: Callable[[], None],
    repeats: int,
    before: Callable[[], None] | None = None,
) -> list[float]:
    """Microseconds per call of `fn`, each until `sync` says the device has finished;
    `before` (untimed) runs before each call."""
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter_ns()
        fn()
        sync()
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


def summary(samples: list[float]) -> dict:
    return {"median_us": statistics.median(samples), "p99_us": pct(samples, 99)}


def gb_per_s(values: int, us: float) -> float:
    return values * 8 / (us * 1e-6) / 1e9


class Engines:
    """The three engines of one run; the hybrid and the device engine share one device."""

    def __init__(self, gpu: CupyEngine) -> None:
        self.gpu = gpu
        self.cpu = CompiledEngine()
        self.hybrid = HybridEngine(CompiledEngine(), gpu)
        self.sync = gpu.device.synchronize

    def none(self) -> None:
        """The cpu engine's work is done when its call returns."""


def bench_build(e: Engines, n: int, rng) -> tuple[dict, dict]:
    values = rng.uniform(100.0, 200.0, n)
    series = {
        "device": e.gpu.new_series(RETENTION, 0),
        "hybrid": e.hybrid.new_series(RETENTION, 0),
        "cpu": e.cpu.new_series(RETENTION, n),
    }
    device_us = timed(lambda: series["device"].append(values), e.sync, 1)[0]
    cpu_us = timed(lambda: series["cpu"].append(values), e.none, 1)[0]
    hybrid_append_us = timed(lambda: series["hybrid"].append(values), e.none, 1)[0]
    mirror_us = timed(series["hybrid"].synced_mirror, e.sync, 1)[0]
    rebuild = timed(series["device"].resummarize, e.sync, 5)
    row = {
        "n": n,
        "device_append_from_host_us": device_us,
        "device_append_gb_per_s": gb_per_s(n, device_us),
        "hybrid_host_append_us": hybrid_append_us,
        "hybrid_mirror_sync_us": mirror_us,
        "hybrid_mirror_sync_gb_per_s": gb_per_s(n, mirror_us),
        "cpu_append_us": cpu_us,
        "device_tree_build_us": statistics.median(rebuild),
    }
    return row, series


def bench_append(e: Engines, series: dict, repeats: int, rng) -> dict:
    batch = rng.uniform(100.0, 200.0, BATCH)
    out = {}
    for name, one in series.items():
        sync = e.none if name == "cpu" else e.sync
        out[name] = summary(timed(lambda s=one: s.append(batch), sync, repeats))
    return out


def bench_queries(e: Engines, series: dict, repeats: int) -> list[dict]:
    rows = []
    for k in range(0, 9):
        window = 10**k
        if window > len(series["cpu"]) * 10:
            break
        row: dict = {"k": k}
        for name, one in series.items():
            sync = e.none if name == "cpu" else e.sync
            row[name] = summary(timed(lambda s=one, w=window: s.stats(w), sync, repeats))
        rows.append(row)
    return rows


def fill_symbols(e: Engines, values_per_symbol: int, rng) -> dict:
    series: dict[str, list] = {"device": [], "hybrid": [], "cpu": []}
    for _ in range(SYMBOLS):
        values = rng.uniform(100.0, 200.0, values_per_symbol)
        for name, engine in (("device", e.gpu), ("hybrid", e.hybrid), ("cpu", e.cpu)):
            one = engine.new_series(RETENTION, 0)
            one.append(values)
            series[name].append(one)
    return series


def bench_table(e: Engines, series: dict, values_per_symbol: int, repeats: int, rng) -> dict:
    top = len(str(values_per_symbol)) - 1
    which = rng.integers(0, SYMBOLS, QUERIES).astype(np.int64)
    windows = (10 ** rng.integers(0, top + 1, QUERIES)).astype(np.int64)
    engines = {"device": e.gpu, "hybrid": e.hybrid, "cpu": e.cpu}
    first_hybrid_us = timed(
        lambda: e.hybrid.stats_table(series["hybrid"], which, windows), e.sync, 1
    )[0]
    want = e.cpu.stats_table(series["cpu"], which, windows)
    row: dict = {
        "queries": QUERIES,
        "symbols": SYMBOLS,
        "values_per_symbol": values_per_symbol,
        "hybrid_first_call_with_mirror_sync_us": first_hybrid_us,
    }
    for name, engine in engines.items():
        got = engine.stats_table(series[name], which, windows)
        np.testing.assert_array_equal(got[:, :4], want[:, :4])  # count, min, max, last
        sync = e.none if name == "cpu" else e.sync
        runs = repeats if name != "cpu" else max(3, repeats // 10)
        call = lambda en=engine, s=series[name]: en.stats_table(s, which, windows)  # noqa: E731
        row[name] = summary(timed(call, sync, runs))
    kernel = kernel_only_us(e.gpu, series["device"], which, windows, repeats)
    if kernel is not None:
        row["device_kernel_only"] = summary(kernel)
    return row


def distinct_pairs(size: int, values_per_symbol: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """`size` DISTINCT (series, window) pairs as (which, windows): what the hybrid's
    threshold is compared with (the store hands the engine its distinct misses)."""
    flat = rng.choice(SYMBOLS * values_per_symbol, size, replace=False)
    which, windows = np.divmod(flat, values_per_symbol)
    return which.astype(np.int64), (windows + 1).astype(np.int64)


def bench_crossover(e: Engines, series: list, values_per_symbol: int, repeats: int, rng) -> dict:
    """The hybrid's two paths on the same batches of distinct (series, window) pairs. Before
    each timed call TICKS_BEFORE_BATCH new values are appended to every series (untimed), so
    the device time includes the mirror sync a batch pays after new ticks, as in service."""
    device_path = HybridEngine(e.hybrid.host, e.gpu, batch_min_queries=1)
    for one in series:  # the first sync (whole history) is bench_table's, not the sweep's
        one.synced_mirror()
    hosts = [one.host for one in series]
    ticks = rng.uniform(100.0, 200.0, TICKS_BEFORE_BATCH)

    def new_ticks() -> None:
        for one in series:
            one.append(ticks)

    sweep = []
    for size in SWEEP:
        which, windows = distinct_pairs(size, values_per_symbol, rng)
        # As the store calls it: only the series the batch touches (each synced once).
        used, which = np.unique(which, return_inverse=True)
        which = which.astype(np.int64)
        touched, touched_hosts = [series[i] for i in used], [hosts[i] for i in used]
        runs = max(5, min(repeats, 20_000 // size))
        host = timed(
            lambda h=touched_hosts, w=which, k=windows: e.cpu.stats_table(h, w, k),
            e.none,
            runs,
            new_ticks,
        )
        device = timed(
            lambda t=touched, w=which, k=windows: device_path.stats_table(t, w, k),
            e.sync,
            runs,
            new_ticks,
        )
        sweep.append(
            {
                "distinct_pairs": size,
                "series_touched": len(used),
                "host_median_us": statistics.median(host),
                "device_with_sync_median_us": statistics.median(device),
            }
        )
    crossover = None
    for i in range(len(sweep) - 1, -1, -1):  # from the largest size down
        if sweep[i]["device_with_sync_median_us"] >= sweep[i]["host_median_us"]:
            break
        crossover = sweep[i]["distinct_pairs"]
    return {
        "sweep": sweep,
        "ticks_appended_per_series_before_each_batch": TICKS_BEFORE_BATCH,
        "measured_crossover_distinct_pairs": crossover,
    }


def kernel_only_us(gpu: CupyEngine, series: list, which, windows, repeats: int):
    """The `window_stats` launch alone, timed by CUDA events on the engine's stream."""
    stream = getattr(gpu.device, "_stream", None)  # CupyDevice only; a bench may look inside
    if stream is None:
        return None
    import cupy

    device = gpu.device
    requests = [(series[i], int(w)) for i, w in zip(which.tolist(), windows.tolist(), strict=True)]
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
    prepare_kernels()
    engines = Engines(gpu)
    rng = np.random.default_rng(2026)
    build, series = bench_build(engines, args.n, rng)
    result = {
        "machine": machine(),
        "device": gpu_versions(gpu),
        "emulated": args.emulated,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "hybrid_batch_min_queries": engines.hybrid.batch_min_queries,
        "build": build,
        "append_10k": bench_append(engines, series, args.repeats, rng),
        "queries": bench_queries(engines, series, args.repeats),
    }
    del series  # the N-value series: free their memory before the 100 symbols
    per_symbol = min(args.n // 100, 1_000_000)
    symbols = fill_symbols(engines, per_symbol, rng)
    result["stats_table"] = bench_table(engines, symbols, per_symbol, args.repeats, rng)
    result["crossover"] = bench_crossover(engines, symbols["hybrid"], per_symbol, args.repeats, rng)
    print(json.dumps(result, indent=2))
    note = " (EMULATED: not a GPU figure)" if args.emulated else ""
    print(
        f"measured crossover: {result['crossover']['measured_crossover_distinct_pairs']} "
        f"distinct queries{note}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
