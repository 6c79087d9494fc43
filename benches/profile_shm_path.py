"""Where the time of a shared-memory publish -> applied goes (issue 12, item 4): each stage of
the path timed alone, in one process, median and p99 over many calls.

`bench_ingest.py --only shm` measures the whole path between two processes; this splits it:

- publisher: `encode_data` of a 1-value frame, and `publish()` whole (encode, slot write,
  commit, the doorbell check);
- appliance, poller thread: an empty pass over a ring, `decode_message`, the frame rules of
  `FrameProcessor` (with a no-op sink), the sink (validation + `Store.ingest`, log off), and
  one published slot polled end to end (decode, rules, sink, consumer position);
- write-ahead log (log on, default sync `interval`; the log's pipeline, not the transport's):
  `DurableWriter.ingest`, the call a ring's sink makes (an inline commit on the calling thread:
  encode, write, apply, listeners under the commit lock), `submit().result()` (the hand-off to
  the writer thread that the ring's sink made before inline commits: queue, wake, write, apply,
  future) and `submit_group` with completion (done on the writer thread);
- the OS: `time.sleep(0)` against `os.sched_yield()` (why the poll loops yield, never sleep).

    .venv/bin/python benches/profile_shm_path.py [--engine cpu|numpy] [--repeats 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.app import build_store  # noqa: E402
from appliance.config import build_config  # noqa: E402
from appliance.engine import select_engine  # noqa: E402
from appliance.ingest import make_sink  # noqa: E402
from transport.ingest import FrameProcessor  # noqa: E402
from transport.shm.ring import RingConsumer, RingGeometry, RingProducer, init_ring  # noqa: E402
from transport.wire import decode_message, encode_data  # noqa: E402

SYMBOL = "SHM-1"


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(p50, p99) in microseconds of `fn()`, after a warm-up of a tenth of `repeats`."""
    clock = time.perf_counter_ns
    for _ in range(repeats // 10):
        fn()
    samples = np.empty(repeats, dtype=np.int64)
    for i in range(repeats):
        started = clock()
        fn()
        samples[i] = clock() - started
    return float(np.percentile(samples, 50)) / 1e3, float(np.percentile(samples, 99)) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="cpu")
    parser.add_argument("--repeats", type=int, default=20_000)
    args = parser.parse_args()
    n = args.repeats
    config = build_config({}, {"APP_ENGINE__BACKEND": args.engine})
    engine = select_engine(config.engine.backend).engine
    rows: list[tuple[str, tuple[float, float]]] = []
    value = np.array([150.0])
    frame = encode_data(1, 1, SYMBOL, value)

    # publisher
    rows.append(
        ("publisher: encode_data, 1 value", timed(lambda: encode_data(1, 5, SYMBOL, value), n))
    )
    geometry = RingGeometry(1024, 65_536)
    ring = bytearray(geometry.total_bytes)
    init_ring(ring, geometry, 1)
    store = build_store(config, engine)
    sink = make_sink(store, config.store.max_batch_size)
    sink(SYMBOL, value, 1, 1)
    processor = FrameProcessor(sink, "shm", strict_order=False)
    consumer = RingConsumer(ring, processor.process_message)
    producer = RingProducer(ring)
    sequence = [1]

    def publish_like() -> None:  # what ShmPublisher.publish does per 1-value frame
        array = np.ascontiguousarray(value, dtype=np.float64).reshape(-1)
        sequence[0] += 1
        message = encode_data(1, sequence[0], SYMBOL, array)
        producer.stage(message)
        producer.commit()
        _ = producer.consumer_sleeping

    clock = time.perf_counter_ns
    publish_samples, poll_samples = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for i in range(n):
        started = clock()
        publish_like()
        middle = clock()
        consumer.poll(64)
        poll_samples[i] = clock() - middle
        publish_samples[i] = middle - started

    def pct(samples: np.ndarray) -> tuple[float, float]:
        return float(np.percentile(samples, 50)) / 1e3, float(np.percentile(samples, 99)) / 1e3

    rows.append(("publisher: publish() of 1 value into the ring", pct(publish_samples)))
    # appliance, poller thread
    rows.append(("poller: empty pass over one ring", timed(lambda: consumer.poll(64), n)))
    rows.append(("poller: decode_message, 1-value frame", timed(lambda: decode_message(frame), n)))
    noop = FrameProcessor(lambda *a: None, "shm", strict_order=False)
    decoded = iter([decode_message(encode_data(7, s, SYMBOL, value))[0] for s in range(1, 2 * n)])
    rows.append(("poller: frame rules (FrameProcessor.process_frame, no-op sink)",
                 timed(lambda: noop.process_frame(next(decoded)), n)))  # fmt: skip
    rows.append(("poller: sink, log off (validation + Store.ingest)",
                 timed(lambda: sink(SYMBOL, value, 1, 2), n)))  # fmt: skip
    rows.append(("poller: one slot end to end, log off (decode, rules, sink, position)",
                 pct(poll_samples)))  # fmt: skip

    # write-ahead log
    from appliance.durability.recovery import open_log

    with tempfile.TemporaryDirectory(prefix="profile-shm-") as tmp:
        durability = build_config({"durability": {"dir": tmp}}, {}).durability
        logged_store = build_store(config, engine)
        writer = open_log(durability, logged_store, [])
        try:
            writer.ingest(SYMBOL, value, 1, 1)
            wal_n = max(1000, n // 4)

            def blocking() -> None:
                sequence[0] += 1
                writer.ingest(SYMBOL, value, 1, sequence[0])

            rows.append(("log: DurableWriter.ingest (the ring sink: inline commit)",
                         timed(blocking, wal_n)))  # fmt: skip

            def handed_off() -> None:
                sequence[0] += 1
                writer.submit(SYMBOL, value, 1, sequence[0]).result()

            rows.append(("log: submit().result(), hand-off to the writer thread",
                         timed(handed_off, wal_n)))  # fmt: skip
            submit_group = getattr(writer, "submit_group", None)
            if submit_group is not None:
                finished = threading.Event()

                def grouped() -> None:
                    sequence[0] += 1
                    finished.clear()
                    submit_group([(SYMBOL, value, 1, sequence[0], None)], lambda _: finished.set())
                    finished.wait()

                rows.append(("log: submit_group + done on the writer thread (+ Event wake)",
                             timed(grouped, wal_n)))  # fmt: skip
        finally:
            writer.close()
    # OS
    rows.append(("os: time.sleep(0)", timed(lambda: time.sleep(0), 2000)))
    rows.append(("os: os.sched_yield()", timed(os.sched_yield, 2000)))

    print(f"Stage costs, one process, engine {args.engine}, {n} repeats (us):\n")
    print("| stage | p50 | p99 |\n|---|---|---|")
    for name, (p50, p99) in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
