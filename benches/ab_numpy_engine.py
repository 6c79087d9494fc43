"""A/B of the numpy engine between two source trees, same machine, same run: 1-value and
10k-value appends, stats at k = 1, 3, 6 and a 1e6-value tail on a 1e7-value series (medians, us).

    git worktree add /tmp/before <commit>
    for i in 1 2 3; do
        .venv/bin/python benches/ab_numpy_engine.py /tmp/before
        .venv/bin/python benches/ab_numpy_engine.py .
    done
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np


def median_us(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(samples)


def main(tree: str) -> None:
    sys.path.insert(0, tree)  # the tree under test, before the installed project
    from fallback import NumpyEngine

    try:  # trees from before issue 12 re-export the contract from fallback
        from fallback import RetentionPolicy
    except ImportError:
        from engine_core import RetentionPolicy

    rng = np.random.default_rng(1)
    series = NumpyEngine().new_series(RetentionPolicy(), 1_000_000)
    block = rng.uniform(100, 200, 1_000_000)
    for _ in range(10):
        series.append(block)
    tick, batch = rng.uniform(100, 200, 1), rng.uniform(100, 200, 10_000)
    result = {
        "tick": median_us(lambda: series.append(tick), 20_000),
        "10k": median_us(lambda: series.append(batch), 500),
    }
    for k in (1, 3, 6):
        result[f"k{k}"] = median_us(lambda k=k: series.stats(10**k), 3000)
    result["tail1e6"] = median_us(lambda: series.tail(1_000_000), 30)
    print(Path(tree).resolve().name, {name: round(us, 2) for name, us in result.items()})


if __name__ == "__main__":
    main(sys.argv[1])
