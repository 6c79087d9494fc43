"""Durability benchmark (issue 5): checkpoints, log replay, ingest through the log, history.

Measures, in one process and one run, whatever of `appliance.durability` exists:

- checkpoint write and restore of N values of one symbol (target: replay of 1e8 values with a
  checkpoint <= 5 s), next to a raw `np.save` + fsync / `np.fromfile` of the same bytes;
- recovery of N values from the write-ahead log alone, with a checkpoint covering the whole
  log, and with the checkpoint only (the covered segments retired);
- ingest throughput through `DurableWriter` under each sync policy as a ratio to
  `Store.ingest` without a log (10k-value batches submitted from one thread, 64 in flight),
  and the ack latency p50 / p99 (one batch in flight, and under that load);
- history query latency over a warm tier of H values (sealed segments + summaries).

Reads are measured cold: written files are dropped from the page cache with
posix_fadvise(DONTNEED) after their fsync (no root needed). Everything lives in a temporary
directory (`--tmp`), removed at the end.

    .venv/bin/python benches/bench_durability.py                 # N = 1e8, H = 1e8
    .venv/bin/python benches/bench_durability.py --quick         # N = H = 1e6, smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_engine import machine  # the same machine line as the engine benchmark

from appliance.durability import checkpoint as ckpt
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine

try:
    from appliance.durability import recovery, wal
    from appliance.durability.writer import DurableWriter
except ImportError:  # the log is written by another change; measure what exists
    recovery = wal = DurableWriter = None  # type: ignore[assignment]
try:
    from appliance.durability import history
    from appliance.durability.records import BatchRecord
    from appliance.durability.warm import WarmTier
    from appliance.durability.warm_segment import read_segment
except ImportError:
    history = WarmTier = None  # type: ignore[assignment]

BATCH = 10_000
FILL = 1_000_000


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return "?"


def new_store(max_symbols: int = 10) -> Store:
    return Store(
        NumpyEngine(),
        retention=RetentionPolicy(),
        max_symbols=max_symbols,
        starting_capacity=1_000_000,
    )


def drop_cache(root: Path) -> None:
    """Evict every file under `root` from the page cache (they are fsynced, so clean)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def pct(samples, q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


# -- checkpoints ----------------------------------------------------------------------------


def bench_checkpoint(tmp: Path, n: int, rng: np.random.Generator) -> dict:
    store = new_store()
    block = rng.uniform(100.0, 200.0, FILL)
    for start in range(0, n, FILL):
        store.ingest("S", block[: min(FILL, n - start)])
    data = tmp / "ckpt"
    snap_s, taken = timed(lambda: ckpt.snapshot(store, 1, {"S": n}))
    write_s, path = timed(lambda: ckpt.write_snapshot(data, taken))
    raw = tmp / "raw.npy"
    # The pause an engine without zero-copy views would cause: a copy of the hot window.
    copy_s, copied = timed(lambda: store.snapshot_values("S"))
    taken = None

    def raw_save() -> None:
        with open(raw, "wb") as f:
            np.save(f, copied)
            f.flush()
            os.fsync(f.fileno())

    raw_save_s, _ = timed(raw_save)
    copied = None
    gc.collect()
    drop_cache(tmp)
    raw_load_s, raw_values = timed(lambda: np.load(raw))
    raw_values = None  # noqa: F841 (free it before the next read)
    drop_cache(tmp)
    load_s, loaded = timed(lambda: ckpt.load_latest(data))
    restored = new_store()
    restore_s, _ = timed(lambda: ckpt.restore(restored, loaded))
    assert restored.length("S") == n
    for exponent in (1, 4, 8):
        assert restored.stats("S", exponent) == store.stats("S", exponent)
    out = {
        "values": n,
        "snapshot_views_s": snap_s,
        "snapshot_copy_s": copy_s,
        "write_s": write_s,
        "raw_save_fsync_s": raw_save_s,
        "load_verify_cold_s": load_s,
        "restore_s": restore_s,
        "load_plus_restore_s": load_s + restore_s,
        "raw_np_load_cold_s": raw_load_s,
        "bytes": sum(p.stat().st_size for p in path.iterdir()),
    }
    loaded = restored = store = None
    gc.collect()
    shutil.rmtree(data)
    raw.unlink()
    return out


# -- log replay -----------------------------------------------------------------------------


def bench_replay(tmp: Path, n: int, rng: np.random.Generator) -> dict:
    data = tmp / "replay"
    store = new_store()
    writer = DurableWriter(store, wal.wal_dir(data), sync="never")
    writer.start()
    block = rng.uniform(100.0, 200.0, BATCH * 16)
    pending: deque = deque()
    t0 = time.perf_counter()
    for i in range(n // BATCH):
        offset = (i % 16) * BATCH
        pending.append(writer.submit("S", block[offset : offset + BATCH]))
        if len(pending) >= 256:
            pending.popleft().result()
    for future in pending:
        future.result()
    lsn = writer.next_lsn - 1
    writer.close()
    write_s = time.perf_counter() - t0
    log_bytes = sum(p.stat().st_size for p in wal.list_segments(wal.wal_dir(data)))
    expected = {e: store.stats("S", e) for e in (1, 4, 8)}

    def recover(use_checkpoint: bool):
        gc.collect()
        drop_cache(data)
        fresh = new_store()
        seconds, result = timed(
            lambda: recovery.recover(fresh, data, use_checkpoint=use_checkpoint)
        )
        assert fresh.length("S") == n, (fresh.length("S"), n)
        for e, stats in expected.items():
            assert fresh.stats("S", e) == stats
        return seconds, result

    full_s, result = recover(False)
    ckpt.write_checkpoint(data, store, lsn, {"S": n})
    store = None
    with_log_s, result2 = recover(True)
    assert result2.checkpoint_lsn == lsn and result2.records == 0
    # What segment retirement leaves: the checkpoint covers every record, so no segment.
    for segment in wal.list_segments(wal.wal_dir(data)):
        segment.unlink()
    ckpt_only_s, _ = recover(True)
    out = {
        "values": n,
        "records": result.records,
        "log_bytes": log_bytes,
        "write_never_s": write_s,
        "replay_full_log_s": full_s,
        "replay_checkpoint_plus_covered_log_s": with_log_s,
        "replay_checkpoint_only_s": ckpt_only_s,
    }
    shutil.rmtree(data)
    return out


# -- ingest through the log -----------------------------------------------------------------


def bench_throughput(tmp: Path, batches: int, window: int, rng: np.random.Generator) -> dict:
    block = rng.uniform(100.0, 200.0, BATCH * 16)
    views = [block[i * BATCH : (i + 1) * BATCH] for i in range(16)]
    results: dict = {}
    for policy in ("none", "never", "interval", "always"):
        store = new_store()
        data = tmp / f"tp-{policy}"
        writer = None
        if policy != "none":
            writer = DurableWriter(store, wal.wal_dir(data), sync=policy, interval_ms=5)
            writer.start()
        lat_load: list[float] = []
        box: dict = {}

        def load(store=store, writer=writer, lat_load=lat_load, box=box) -> None:
            pending: deque = deque()
            t0 = time.perf_counter()
            for i in range(batches):
                sent = time.perf_counter()
                if writer is None:
                    store.ingest("S", views[i % 16])
                    lat_load.append(time.perf_counter() - sent)
                    continue
                future = writer.submit("S", views[i % 16])
                future.add_done_callback(
                    lambda _f, sent=sent: lat_load.append(time.perf_counter() - sent)
                )
                pending.append(future)
                if len(pending) >= window:
                    pending.popleft().result()
            for future in pending:
                future.result()
            box["s"] = time.perf_counter() - t0

        thread = threading.Thread(target=load)
        thread.start()
        thread.join()
        # One batch in flight: the ack latency a lone publisher sees.
        lat_one = []
        for i in range(min(batches, 1000)):
            sent = time.perf_counter()
            if writer is None:
                store.ingest("S", views[i % 16])
            else:
                writer.submit("S", views[i % 16]).result()
            lat_one.append(time.perf_counter() - sent)
        fsyncs = writer.fsyncs if writer else 0
        groups = writer.groups if writer else 0
        if writer is not None:
            writer.close()
        results[policy] = {
            "values_per_s": batches * BATCH / box["s"],
            "load_p50_us": pct(lat_load, 50) * 1e6,
            "load_p99_us": pct(lat_load, 99) * 1e6,
            "one_p50_us": pct(lat_one, 50) * 1e6,
            "one_p99_us": pct(lat_one, 99) * 1e6,
            "fsyncs": fsyncs,
            "groups": groups,
        }
        store = None
        gc.collect()
        shutil.rmtree(data, ignore_errors=True)
    base = results["none"]["values_per_s"]
    for policy in results:
        results[policy]["ratio"] = results[policy]["values_per_s"] / base
    return results


def bench_checkpoint_interference(tmp: Path, n: int, rng: np.random.Generator) -> dict:
    """Ack latency under `always` (one batch in flight) before and while the writer's own
    Checkpointer writes a checkpoint of n values in the background (same disk)."""
    store = new_store()
    block = rng.uniform(100.0, 200.0, FILL)
    for start in range(0, n, FILL):
        store.ingest("S", block[: min(FILL, n - start)])
    data = tmp / "interference"
    now = [0.0]
    checkpointer = ckpt.Checkpointer(data, 1, clock=lambda: now[0])
    writer = DurableWriter(
        store, wal.wal_dir(data), sync="always", totals={"S": n}, checkpointer=checkpointer
    )
    writer.start()
    batch = block[:BATCH]

    def acks(until) -> list[float]:
        out = []
        while not until(len(out)):
            sent = time.perf_counter()
            writer.submit("S", batch).result()
            out.append(time.perf_counter() - sent)
        return out

    quiet = acks(lambda k: k >= 300)
    now[0] += 10  # due: the next group is followed by a checkpoint, written in the background
    t0 = time.perf_counter()
    during = acks(lambda k: k > 5 and not checkpointer.busy)
    checkpoint_s = time.perf_counter() - t0
    writer.close()  # (writes the shutdown checkpoint inline, not timed)
    out = {
        "values": n,
        "checkpoint_wall_s": checkpoint_s,
        "acks_during": len(during),
        "quiet_p50_us": pct(quiet, 50) * 1e6,
        "quiet_p99_us": pct(quiet, 99) * 1e6,
        "during_p50_us": pct(during, 50) * 1e6,
        "during_p99_us": pct(during, 99) * 1e6,
        "during_max_us": max(during) * 1e6,
    }
    store = None
    gc.collect()
    shutil.rmtree(data)
    return out


# -- history --------------------------------------------------------------------------------


def bench_history(tmp: Path, h: int, segment_values: int, rng: np.random.Generator) -> dict:
    directory = tmp / "warm"
    warm = WarmTier(directory, segment_values=segment_values)
    # Prices, not noise: a random walk in cents, as a tick series (compresses like one).
    block = np.round(100.0 + np.cumsum(rng.normal(0, 0.01, FILL)), 2)
    block = np.abs(block)
    keep = h <= 100_000_000
    held = np.empty(h) if keep else None
    t0 = time.perf_counter()
    ns0 = 1_700_000_000_000_000_000
    step = BATCH * 10
    for lsn, start in enumerate(range(0, h, step), start=1):
        count = min(step, h - start)
        offset = start % FILL
        values = block[offset : offset + count] if offset + count <= FILL else block[:count]
        values = values + 0.01 * (start // FILL % 100)  # no two segments alike
        warm.on_record(BatchRecord(lsn, "S", start, ns0 + start, 0, 0, values))
        if held is not None:
            held[start : start + count] = values
        if lsn % 200 == 0:
            warm.drain(600)  # bound the blocks waiting for the sealing thread
    warm.drain(600)
    build_s = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    warm.close()
    drop_cache(directory)
    warm = WarmTier(directory, segment_values=segment_values)  # as after a restart: cold
    lats: dict[str, list[float]] = {"whole": [], "random": [], "random_time": []}
    base: list[float] = []
    for _ in range(3):
        s, _r = timed(lambda: history.stats_by_index(warm, "S"))
        lats["whole"].append(s)
    for _ in range(50):
        a, b = sorted(int(x) for x in rng.integers(0, h, 2))
        b = max(b, a + 1)
        s, r = timed(lambda a=a, b=b: history.stats_by_index(warm, "S", a, b))
        lats["random"].append(s)
        if held is not None and len(base) < 10:
            bs, _ = timed(lambda a=a, b=b: (held[a:b].min(), held[a:b].max(), held[a:b].var()))
            base.append(bs)
            assert r.count == b - a and r.min == held[a:b].min()
        # A new range (the edges of the last one are in the decoded cache). Batches of `step`
        # values were received at ns0 + first index: a time range covers whole batches.
        a, b = sorted(int(x) for x in rng.integers(0, h, 2))
        ta, tb = ns0 + a - a % step, ns0 + b - b % step + step
        s, _r = timed(lambda ta=ta, tb=tb: history.stats_by_time(warm, "S", ta, tb))
        lats["random_time"].append(s)
    # Same-run baseline: what a whole-range query costs without per-segment summaries
    # (decompress and scan every sealed segment), once, cold.
    warm.close()
    drop_cache(directory)
    sealed = WarmTier(directory, segment_values=segment_values).view("S").sealed
    t0 = time.perf_counter()
    scanned, low, high, total = 0, np.inf, -np.inf, 0.0
    for segment in sealed:
        values = read_segment(segment.path, segment.header).values
        scanned += values.shape[0]
        low, high = min(low, values.min()), max(high, values.max())
        total += float(values.sum())
    scan_s = time.perf_counter() - t0
    shutil.rmtree(directory)
    out = {
        "baseline_scan_all_segments_s": scan_s,
        "baseline_scanned_values": scanned,
        "values": h,
        "segment_values": segment_values,
        "build_s": build_s,
        "disk_bytes": disk,
        "baseline_numpy_in_memory_median_ms": float(np.median(base)) * 1e3 if base else None,
    }
    for name, samples in lats.items():
        out[f"{name}_median_ms"] = float(np.median(samples)) * 1e3
        out[f"{name}_max_ms"] = float(np.max(samples)) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = H = 1e6, a smoke run")
    parser.add_argument("--values", type=float, default=1e8, help="N for checkpoint and replay")
    parser.add_argument("--history-values", type=float, default=1e8, help="H (warm tier)")
    parser.add_argument("--segment-values", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=2000, help="10k batches per policy")
    parser.add_argument("--window", type=int, default=64, help="batches in flight")
    parser.add_argument("--only", default="checkpoint,replay,interference,throughput,history")
    parser.add_argument("--tmp", default=None, help="parent of the temporary directory")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args()
    n, h, batches = int(args.values), int(args.history_values), args.batches
    if args.quick:
        n, h, batches = 1_000_000, 1_000_000, 200
    only = set(args.only.split(","))
    rng = np.random.default_rng(2026)
    report: dict = {
        "machine": machine(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "not_measured": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-durability-", dir=args.tmp))
    try:
        if "checkpoint" in only:
            report["checkpoint"] = bench_checkpoint(tmp, n, rng)
            print("checkpoint", json.dumps(report["checkpoint"]), flush=True)
        if DurableWriter is None:
            report["not_measured"].append("replay and throughput: no write-ahead log module")
        else:
            if "replay" in only:
                report["replay"] = bench_replay(tmp, n, rng)
                print("replay", json.dumps(report["replay"]), flush=True)
            if "interference" in only:
                report["interference"] = bench_checkpoint_interference(tmp, n, rng)
                print("interference", json.dumps(report["interference"]), flush=True)
            if "throughput" in only:
                report["throughput"] = bench_throughput(tmp, batches, args.window, rng)
                print("throughput", json.dumps(report["throughput"]), flush=True)
        if WarmTier is None:
            report["not_measured"].append("history: no warm tier / history module")
        elif "history" in only:
            report["history"] = bench_history(tmp, h, args.segment_values, rng)
            print("history", json.dumps(report["history"]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
