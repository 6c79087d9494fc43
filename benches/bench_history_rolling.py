"""GET /history/rolling, the REST side (issue 13 item 4): what the route costs around the
engine's one `Engine.rolling` call, each part next to a same-run yardstick.

- gather: the values of [0, N) copied from the warm tier (sealed segments decompressed with
  `warm.load`, memory values sliced) into one float64 array (`history_rolling._gather`), on a
  freshly opened tier (no decoded segment cached; files in the page cache), against a plain
  `np.copy` of the same N values already in memory (memory bandwidth, the floor of a copy)
  and against decompressing the same segments alone (the floor of reading them);
- answer: `HistoryRolling.to_dict()` plus the app's msgspec encoder for P output positions,
  against msgspec encoding the five columns' `tolist()` alone (what any JSON answer costs);
- route total without the engine: `rolling_by_index` with an engine stand-in that returns
  ready-made columns (so the figure is the route's own work, not a kernel's), plus encoding.

The engine's own time is measured by the engine benchmarks (benches/bench_gpu.py,
bench_compiled.py); none of it is included here.

    .venv/bin/python benches/bench_history_rolling.py                # N = 1e7, P = 1e6
    .venv/bin/python benches/bench_history_rolling.py --n 1000000 --positions 100000
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import machine

from appliance.durability.history import _pieces
from appliance.durability.history_rolling import (
    HistoryRolling,
    _gather,
    rolling_by_index,
)
from appliance.durability.records import BatchRecord
from appliance.durability.warm import WarmTier
from engine_core.rolling import Rolling, rolling_count

ENCODER = msgspec.json.Encoder()  # as appliance.app encodes every answer
BATCH = 100_000


class ReadyColumns:
    """An engine stand-in: answers `rolling` with precomputed columns of the right length
    (the values at the output positions), so only the route's work is timed."""

    def rolling(self, values: np.ndarray, window: int, step: int) -> Rolling:
        at = values[window - 1 :: step]
        return Rolling(at, at, at, at)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="values held")
    parser.add_argument("--positions", type=int, default=1_000_000, help="output positions")
    parser.add_argument("--segment", type=int, default=1_000_000, help="values per segment")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, p = args.n, args.positions
    rng = np.random.default_rng(1)
    x = 1e9 + np.round(rng.uniform(0, 1e-3, n), 6)  # 1e9-scale prices, as the anchor
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}  {machine()}")
    print(f"# N = {n:,} values held ({args.segment:,} per segment), P = {p:,} positions")
    with tempfile.TemporaryDirectory() as tmp:
        warm = WarmTier(Path(tmp), segment_values=args.segment)
        for lsn, start in enumerate(range(0, n, BATCH), start=1):
            warm.on_record(
                BatchRecord(lsn, "S", start, 10**18 + start, 0, 0, x[start : start + BATCH])
            )
        warm.drain(600)
        warm.close()

        def fresh_gather() -> np.ndarray:
            tier = WarmTier(Path(tmp), segment_values=args.segment)  # nothing decoded yet
            try:
                return _gather(tier, _pieces(tier.view("S")), 0, n)
            finally:
                tier.close()

        gathered = fresh_gather()
        assert np.array_equal(gathered, x)
        view = WarmTier(Path(tmp), segment_values=args.segment).view("S")
        sealed, memory = len(view.sealed), len(view.memory)

        def fresh_loads() -> None:
            tier = WarmTier(Path(tmp), segment_values=args.segment)
            try:
                for segment in tier.view("S").sealed:
                    tier.load(segment)
            finally:
                tier.close()

        gather_s = best_of(fresh_gather, args.repeats)
        loads_s = best_of(fresh_loads, args.repeats)
        copy_s = best_of(lambda: np.copy(x), args.repeats)
        print(f"gather [0, N) over {sealed} sealed segments + {memory} memory pieces: "
              f"{gather_s * 1e3:.1f} ms; np.copy of N: {copy_s * 1e3:.1f} ms; "
              f"ratio {gather_s / copy_s:.1f}x; decompressing the segments alone "
              f"(warm.load): {loads_s * 1e3:.1f} ms, ratio {gather_s / loads_s:.2f}x")  # fmt: skip

        window = 100
        step = max(1, (n - window) // p + (1 if (n - window) % p else 0))
        outputs = rolling_count(n, window, step)
        cols = x[window - 1 :: step][:outputs]
        result = HistoryRolling("S", window, 0, n, step, Rolling(cols, cols, cols, cols))
        encode_s = best_of(lambda: ENCODER.encode(result.to_dict()), args.repeats)
        size = len(ENCODER.encode(result.to_dict()))
        plain_s = best_of(
            lambda: ENCODER.encode([c.tolist() for c in (result.positions(), *result.rolling)]),
            args.repeats,
        )
        print(f"answer of {outputs:,} positions ({size / 1e6:.1f} MB): to_dict + encode "
              f"{encode_s * 1e3:.1f} ms; encoding the five columns alone {plain_s * 1e3:.1f} ms; "
              f"ratio {encode_s / plain_s:.2f}x")  # fmt: skip

        def route() -> bytes:
            tier = WarmTier(Path(tmp), segment_values=args.segment)
            try:
                answer = rolling_by_index(
                    tier, ReadyColumns(), "S", window, None, None, step,
                    max_positions=outputs, max_values=n,
                )  # fmt: skip
            finally:
                tier.close()
            return ENCODER.encode(answer.to_dict())

        route_s = best_of(route, args.repeats)
        print(f"route without the engine (W = {window}, step = {step}): {route_s * 1e3:.1f} ms "
              f"= {route_s / copy_s:.1f}x the np.copy of N")  # fmt: skip


if __name__ == "__main__":
    main()
