"""The durable ingest path without ZeroMQ (issue 12, item 3): where a 10k-value frame's CPU goes.

Feeds `StoreSink.prepare` + `submit_batch` (the ZeroMQ loop's calls) into a real `DurableWriter`
(default sync `interval`) and store, in one process pinned to one core, and reports values/s and
the process's CPU time per frame, with and without the warm tier listening, so the cost of each
stage shows without the transport or a second process. `--sealer-priority` runs the warm tier's
sealing thread at SCHED_IDLE or a nice value (to show why it is not: it shares the GIL).

    .venv/bin/python benches/bench_wal_path.py
    .venv/bin/python benches/bench_wal_path.py --engine numpy --frames 3000 --batch 16
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.durability.warm import WarmTier
from appliance.durability.writer import DurableWriter
from appliance.engine import select_engine
from appliance.ingest import make_sink
from appliance.store import Store
from engine_core import RetentionPolicy

FRAME_VALUES = 10_000


def priority_setter(kind: str):
    if kind == "idle":
        return lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if kind.startswith("nice"):
        return lambda: os.setpriority(os.PRIO_PROCESS, 0, int(kind[4:]))
    return None


def run(args: argparse.Namespace, warm_on: bool) -> dict:
    values = np.random.default_rng(1).uniform(100.0, 200.0, FRAME_VALUES)
    data = Path(tempfile.mkdtemp(prefix="bench-wal-path-"))
    store = Store(
        select_engine(args.engine).engine,
        retention=RetentionPolicy(),
        max_symbols=10,
        starting_capacity=1024,
    )
    writer = DurableWriter(store, data / "wal", sync=args.sync)
    warm = None
    if warm_on:
        setter = priority_setter(args.sealer_priority)
        log_dir = data / "wal" if args.warm_sealer == "process" else None
        warm = WarmTier(data / "warm", log_dir=log_dir)
        if setter is not None:  # the sealing thread starts lazily: its first task sets it
            warm._sealer.submit(setter).result()
        writer.add_listener(warm)
    writer.start()
    sink = make_sink(writer, 1 << 20)
    sequence = 0

    def feed(frames: int) -> None:
        nonlocal sequence
        groups = frames // args.batch
        left = [groups]
        finished = threading.Event()

        def done(_: list) -> None:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

        for _ in range(groups):
            items = []
            for _ in range(args.batch):
                sequence += 1
                items.append(("S", sink.prepare("S", values), 1, sequence, None))
            sink.submit_batch(items, done)
        finished.wait()

    feed(10 * args.batch)  # warm up: the symbol exists, kernels compiled
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    feed(args.frames)
    seconds = time.perf_counter() - started  # ingest alone: the seals may still be queued
    after = resource.getrusage(resource.RUSAGE_SELF)
    writer.close()
    if warm is not None:
        warm.drain()
        warm.close()  # reaps the sealing process: its CPU shows in RUSAGE_CHILDREN
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    sealed_after = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(data)
    frames = args.frames // args.batch * args.batch
    return {
        "warm": warm_on,
        "values_per_s": frames * FRAME_VALUES / seconds,
        "cpu_us_per_frame": (
            (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        )
        / frames
        * 1e6,
        "sys_us_per_frame": (after.ru_stime - before.ru_stime) / frames * 1e6,
        # What sealing cost after ingest stopped (this process) and in the sealing process.
        "later_us_per_frame": (
            (sealed_after.ru_utime - after.ru_utime)
            + (sealed_after.ru_stime - after.ru_stime)
            + (children.ru_utime - children_before.ru_utime)
            + (children.ru_stime - children_before.ru_stime)
        )
        / frames
        * 1e6,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="cpu")
    p.add_argument("--sync", default="interval", choices=["always", "interval", "never"])
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16, help="frames per poll batch")
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--sealer-priority", default="normal", help="normal, idle or niceN")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--warm-sealer",
        default="process",
        choices=["process", "thread"],
        help="process: the appliance's (a nice-19 child reads the log); thread: in process",
    )
    args = p.parse_args()
    os.sched_setaffinity(0, {args.core})
    for warm_on in (False, True):
        rows = [run(args, warm_on) for _ in range(args.rounds)]
        rate = float(np.median([r["values_per_s"] for r in rows]))
        cpu = float(np.median([r["cpu_us_per_frame"] for r in rows]))
        sys_ = float(np.median([r["sys_us_per_frame"] for r in rows]))
        later = float(np.median([r["later_us_per_frame"] for r in rows]))
        print(
            f"engine {args.engine}, sync {args.sync}, warm tier {'on ' if warm_on else 'off'} "
            f"({args.warm_sealer} sealer, {args.sealer_priority}): {rate / 1e6:.1f}M values/s, "
            f"CPU {cpu:.0f} us per 10k-value frame while ingesting (sys {sys_:.0f}), "
            f"{later:.0f} us after it (sealing), median of {args.rounds}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
