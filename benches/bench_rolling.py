"""Rolling statistics benchmark (issue 13 item 4): `Engine.rolling` over N values, window W,
step 1, per engine, next to the same-run yardstick: the naive running-sums formula a user would
write in numpy (`engine_core.rolling.rolling_naive`, avg and var only), whose variance error is
reported too (it loses the variance of 1e9-scale prices).

    row                   what is timed
    naive cumsum          rolling_naive (2 cumsums, avg + var only): the yardstick
    numpy engine          engine_core.rolling.rolling_summaries (all four stats)
    cpu engine            CompiledEngine.rolling (numba, after prepare_kernels)
    gpu engine            CupyEngine.rolling end to end (upload, 3 launches, download), and
                          the 3 launches alone on values already on the device
                          (--gpu: real CuPy; --emulated: CPU build of the kernels, small N)

Accuracy: each row's max relative var error against `rolling_reference` on a sample of 32
windows (the oracle costs O(W) per window). Data: 1e9 + U(0, 1e-3) noise.
Goal on the H200 (not measurable without one): GPU all four stats <= 10 ms, >= 20x the cpu engine.

    .venv/bin/python benches/bench_rolling.py                        # N = 1e7, W = 4e5
    .venv/bin/python benches/bench_rolling.py --gpu --json out.json  # on a GPU machine
    .venv/bin/python benches/bench_rolling.py --emulated --n 200000 --window 5000
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_core.rolling import (  # noqa: E402
    rolling_count,
    rolling_naive,
    rolling_reference,
    rolling_summaries,
)
from fallback.compiled import CompiledEngine, prepare_kernels  # noqa: E402

SAMPLE_WINDOWS = 32


def timed(name: str, fn: Callable[[], object], repeats: int) -> tuple[dict, object]:
    """({name, median and best wall time of `repeats` calls in ms}, the last call's result).
    Both times: the machine may be shared, and the two say how much that moved the figure."""
    samples = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
    row = {"name": name, "ms": statistics.median(samples) * 1e3, "best_ms": min(samples) * 1e3}
    return row, result


def var_error(var: np.ndarray, values: np.ndarray, window: int, step: int) -> float:
    """Max relative error of `var` against the oracle on SAMPLE_WINDOWS spread-out outputs."""
    outputs = var.shape[0]
    picks = np.unique(np.linspace(0, outputs - 1, SAMPLE_WINDOWS).astype(np.int64))
    worst = 0.0
    for m in picks.tolist():
        lo = m * step
        want = rolling_reference(values[lo : lo + window], window, 1).var[0]
        worst = max(worst, abs(var[m] - want) / want)
    return worst


def gpu_rows(engine, values: np.ndarray, window: int, step: int, repeats: int) -> list[dict]:
    """End-to-end `engine.rolling` and the kernels alone (values uploaded once, synchronize)."""
    from gpu_kernels.engine import launch_rolling

    rows = []
    row, got = timed(
        "gpu engine (end to end)", lambda: engine.rolling(values, window, step), repeats
    )
    rows.append({**row, "var": got.var})
    device = engine.device
    n = values.shape[0]
    with engine.lock:
        on_device = device.new_values(n)
        device.upload(on_device, values)
        device.synchronize()

        def kernels_only():
            out = launch_rolling(device, on_device, n, window, step)
            device.synchronize()
            return out

        row, out = timed("gpu engine (3 kernels, data on device)", kernels_only, repeats)
        var = device.download(out).reshape(4, -1)[3]  # column-major: min, max, avg, var
    rows.append({**row, "var": var})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e7)
    parser.add_argument("--window", type=float, default=4e5)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="the GPU engine on real CuPy")
    parser.add_argument("--emulated", action="store_true", help="CPU build of the kernels")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    n, window, step = int(args.n), int(args.window), args.step
    if rolling_count(n, window, step) == 0:
        parser.error("--window must be <= --n")
    values = 1e9 + np.random.default_rng(1).uniform(0, 1e-3, n)
    outputs = rolling_count(n, window, step)

    report = prepare_kernels()
    cpu = CompiledEngine()
    warm = values[: 2 * window]  # first calls pay one-off costs (numba's dispatch set-up: ~10 ms)
    rolling_naive(warm, window, step)
    rolling_summaries(warm, window, step)
    cpu.rolling(warm, window, step)
    rows = []
    row, (_, naive_var) = timed(
        "naive cumsum (avg, var only)", lambda: rolling_naive(values, window, step), args.repeats
    )
    rows.append({**row, "var": naive_var})
    row, got = timed(
        "numpy engine (rolling_summaries)",
        lambda: rolling_summaries(values, window, step),
        args.repeats,
    )
    rows.append({**row, "var": got.var})
    row, got = timed(
        "cpu engine (compiled)", lambda: cpu.rolling(values, window, step), args.repeats
    )
    rows.append({**row, "var": got.var})
    if args.gpu or args.emulated:
        from gpu_kernels import CupyEngine

        if args.emulated:
            from tests.engine.emulated_device import EmulatedDevice

            engine = CupyEngine(device=EmulatedDevice.build())
        else:
            engine = CupyEngine()
        engine.rolling(values[: 2 * window], window, step)  # warm: module load, pool
        rows += gpu_rows(engine, values, window, step, args.repeats)

    naive_ms = rows[0]["ms"]
    cpu_ms = rows[2]["ms"]
    for row in rows:
        row["var_rel_error"] = var_error(row.pop("var"), values, window, step)
        row["x_naive"] = naive_ms / row["ms"]
        row["x_cpu_engine"] = cpu_ms / row["ms"]

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"N = {n:.0e}, W = {window:.0e}, step {step}, {outputs} outputs; {when}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}; "
        f"prepare_kernels {report.seconds:.1f} s"
    )
    print()
    print(f"load average before the run: {load}")
    print()
    print(
        "| engine | ms (median) | ms (best) | speed vs naive | speed vs cpu engine "
        "| max var rel error |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['ms']:.1f} | {row['best_ms']:.1f} | {row['x_naive']:.2f}x | "
            f"{row['x_cpu_engine']:.2f}x | {row['var_rel_error']:.1e} |"
        )
    if args.json:
        meta = {"n": n, "window": window, "step": step, "outputs": outputs, "utc": when}
        meta.update(gpu=args.gpu, emulated=args.emulated, repeats=args.repeats, load=load)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
