"""The store's hot paths in two checkouts: did a change slow them? (issue 17: timestamps)

Run it alternately in a checkout of the commit before a change and in one after it; it uses only
calls both have (`Store.ingest(symbol, values)`, `Store.stats`), on the compiled engine, in the
steady state (a small retention policy, warmed through two cleanups, so pages are recycled):

    git worktree add /tmp/old f4c3279 && cd /tmp/old && PYTHONPATH=/tmp/old \\
        ~/repo/.venv/bin/python ~/repo/benches/bench_store_before_after.py before
    PYTHONPATH=$PWD .venv/bin/python benches/bench_store_before_after.py after

Prints microseconds per call, medians of 7 rounds: single-value and 10k-value `ingest` (no
timestamps: the receive-time path every existing client takes), uncached `stats` for k = 1, 3, 6
over 3M values, and a cached `stats`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from appliance.engine import load_cpu_engine
from appliance.store import Store
from engine_core.contract import RetentionPolicy

STEADY = RetentionPolicy(max_values=2_000_000, keep_after_cleanup=1_000_000)


def per_call_us(call: Callable[[], object], calls: int, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "now"
    engine = load_cpu_engine()
    out: dict[str, float] = {}
    for size, calls in ((1, 20_000), (10_000, 300)):
        values = np.linspace(1.0, 2.0, size)
        store = Store(engine, retention=STEADY, max_symbols=4, starting_capacity=1 << 20)
        for _ in range(min(2 * STEADY.max_values // size + 1, 200_000)):
            store.ingest("S", values)
        out[f"ingest {size}"] = per_call_us(lambda: store.ingest("S", values), calls)  # noqa: B023
    store = Store(engine, retention=RetentionPolicy(), max_symbols=4, starting_capacity=1 << 22)
    store.ingest("Q", np.linspace(1.0, 2.0, 3_000_000))
    entry = store._entries["Q"]
    for k in (1, 3, 6):

        def uncached(k: int = k) -> None:
            entry.cache = {}
            store.stats("Q", k)

        out[f"stats k={k}"] = per_call_us(uncached, 5_000)
    out["stats cached k=3"] = per_call_us(lambda: store.stats("Q", 3), 50_000)
    print(label, " ".join(f"{name}={us:.3f}" for name, us in out.items()))


if __name__ == "__main__":
    main()
