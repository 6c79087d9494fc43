"""In-process cost breakdown of the REST hot paths, to explain `bench_rest.py`'s figures.

Measures, on one core and without HTTP:
- POST /add_batch/ body handling for 10k values: the app's `BatchDecoder.decode` (msgspec typed
  decode with the `>= 0` constraint + np.fromiter + checks) and its parts and alternatives;
- engine append of a 10k batch (median over enough appends to cross the default retention
  boundary), for the segment tree and the flat-array baseline;
- engine append of 1 value and an uncached `stats` over the whole series at N = 1e6 and 1e7
  (what the 1:1 append+stats mix of `bench_rest.py` costs per pair besides HTTP).

    .venv/bin/python benches/bench_post_path.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
from msgspec import Meta, Struct

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_engine import FlatArrayEngine

from appliance.validation import BatchDecoder
from engine_core import RetentionPolicy
from fallback import NumpyEngine


class _Typed(Struct):
    symbol: str
    values: list[Annotated[float, Meta(ge=0)]]


class _TypedNoBound(Struct):
    symbol: str
    values: list[float]


def per_call_us(fn: Callable[[], object], reps: int) -> float:
    """Median of 5 timings of `reps` calls, in microseconds per call."""
    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps * 1e6)
    return float(np.median(samples))


def decode_rows(reps: int) -> list[tuple[str, float]]:
    values = np.round(np.random.default_rng(1).uniform(100.0, 200.0, 10_000), 2)
    body = msgspec.json.encode({"symbol": "P", "values": values.tolist()})
    parsed = msgspec.json.decode(body)["values"]
    app_decoder = BatchDecoder(1_000_000)
    typed = msgspec.json.Decoder(_Typed)
    unbounded = msgspec.json.Decoder(_TypedNoBound)
    untyped = msgspec.json.Decoder()
    rows = [
        (
            "app BatchDecoder.decode (as served)",
            per_call_us(lambda: app_decoder.decode(body), reps),
        ),
        ("msgspec typed, values >= 0 constraint", per_call_us(lambda: typed.decode(body), reps)),
        ("msgspec typed, list[float]", per_call_us(lambda: unbounded.decode(body), reps)),
        ("msgspec untyped", per_call_us(lambda: untyped.decode(body), reps)),
        (
            "np.fromiter(list, float64, count)",
            per_call_us(lambda: np.fromiter(parsed, dtype=np.float64, count=len(parsed)), reps),
        ),
        ("np.array(list, float64)", per_call_us(lambda: np.array(parsed, np.float64), reps)),
    ]
    try:
        import orjson

        rows.append(
            ("orjson.loads (not a dependency)", per_call_us(lambda: orjson.loads(body), reps))
        )
    except ImportError:
        pass
    return rows


def append_10k_rows(batches: int) -> list[tuple[str, float, float, float]]:
    batch = np.round(np.random.default_rng(2).uniform(100.0, 200.0, 10_000), 2)
    rows = []
    for engine in (NumpyEngine(), FlatArrayEngine()):
        series = engine.new_series(RetentionPolicy(), 1_000_000)
        times = np.empty(batches)
        for i in range(batches):
            start = time.perf_counter()
            series.append(batch)
            times[i] = time.perf_counter() - start
        times *= 1e6
        rows.append((engine.name, float(np.median(times)), float(times.mean()), float(times.max())))
    return rows


def single_rows(sizes: list[int]) -> list[tuple[int, str, float, float]]:
    rng = np.random.default_rng(3)
    one = np.array([150.25])
    rows = []
    for n in sizes:
        data = rng.uniform(100.0, 200.0, n)
        for engine in (NumpyEngine(), FlatArrayEngine()):
            series = engine.new_series(RetentionPolicy(), 1_000_000)
            for start in range(0, n, 1_000_000):
                series.append(data[start : start + 1_000_000])
            reps = 1000 if engine.name == "numpy" else max(5, 2000 * 10**6 // n // 10)
            appends, queries = np.empty(reps), np.empty(reps)
            for i in range(reps):
                t0 = time.perf_counter()
                series.append(one)
                t1 = time.perf_counter()
                series.stats(n)
                queries[i] = time.perf_counter() - t1
                appends[i] = t1 - t0
            rows.append(
                (n, engine.name, float(np.median(appends)) * 1e6, float(np.median(queries)) * 1e6)
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps, batches = (50, 2_000) if args.quick else (400, 20_000)
    print("| POST body handling, 10k values (2 decimals, 69 kB) | us per call |")
    print("|---|---|")
    for name, us in decode_rows(reps):
        print(f"| {name} | {us:.0f} |")
    print(
        f"\n| engine append of 10k values ({batches} batches, from empty) | median us | mean us "
        "| max us |"
    )
    print("|---|---|---|---|")
    for name, med, mean, worst in append_10k_rows(batches):
        print(f"| {name} | {med:.1f} | {mean:.1f} | {worst:.0f} |")
    print("\n| N | engine | append 1 value, median us | stats(window = N) uncached, median us |")
    print("|---|---|---|---|")
    for n, name, app_us, q_us in single_rows([10**5, 10**6] if args.quick else [10**6, 10**7]):
        print(f"| {n:.0e} | {name} | {app_us:.1f} | {q_us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
