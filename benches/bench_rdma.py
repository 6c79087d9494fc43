"""RDMA ingest in the Soft-RoCE lab (issue 6): emulated throughput and latency, and the
per-frame Python cost of the verbs path, each next to shared memory measured in the same run.

Soft-RoCE is the kernel emulating a NIC over a veth pair, inside a TCG-emulated VM: absolute
figures say nothing about a real NIC. What carries over is the Python cost per frame on each
side (publisher: encode, stage, post; appliance: poll the completion queue, re-post the receive,
decode, apply, return credits), which a real NIC does not remove, measured here as a ratio to
the shared-memory path doing the same ring work without verbs.

1. Throughput into a real appliance process (`python -m appliance serve`, durability off so
   the transport is what is measured): 100-value frames, publish until N frames, flush.
2. Latency publish -> applied as the publisher sees it: from `publish()` of a 1-value frame
   until the appliance's consumer position (RDMA: its credit write; shm: the shared word)
   passes the slot.
3. Per-frame Python cost in one process, no threads: the publisher's `publish()` of 1-value
   frames into free slots, and the appliance's `poll_once()` over frames already delivered,
   into a real store.

Run inside the lab:  deploy/rdma-lab/lab.sh -- python3 benches/bench_rdma.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.app import build_store  # noqa: E402
from appliance.config import AppConfig  # noqa: E402
from appliance.ingest import make_sink  # noqa: E402
from fallback import NumpyEngine  # noqa: E402
from tests.integration.server_harness import running_server  # noqa: E402
from tests.waiting import wait_until  # noqa: E402
from transport.publishers import connect  # noqa: E402
from transport.rdma.publisher import RdmaPublisher  # noqa: E402
from transport.rdma.server import RdmaIngest  # noqa: E402
from transport.shm.publisher import ShmPublisher  # noqa: E402
from transport.shm.server import ShmIngest  # noqa: E402

SERVER_DEVICE = os.environ.get("HFT_RDMA_SERVER_DEVICE", "rxe0")
CLIENT_DEVICE = os.environ.get("HFT_RDMA_CLIENT_DEVICE", "rxe1")
GID_INDEX = int(os.environ.get("HFT_RDMA_GID_INDEX", "1"))
SLOTS, SLOT_BYTES = 256, 4096


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return {"n": len(ordered), "p50_us": pick(0.5), "p99_us": pick(0.99),
            "mean_us": statistics.fmean(ordered) * 1e6}  # fmt: skip


def appliance_env(transport: str) -> dict[str, str]:
    env = {"APP_DURABILITY__ENABLED": "false", "APP_LOG__LEVEL": "warning"}
    if transport == "rdma":
        env |= {"APP_TRANSPORT__RDMA__ENABLED": "required",
                "APP_TRANSPORT__RDMA__DEVICE": SERVER_DEVICE,
                "APP_TRANSPORT__RDMA__GID_INDEX": str(GID_INDEX),
                "APP_TRANSPORT__RDMA__SLOTS": str(SLOTS),
                "APP_TRANSPORT__RDMA__SLOT_BYTES": str(SLOT_BYTES),
                "APP_TRANSPORT__SHM__ENABLED": "false"}  # fmt: skip
    else:
        env |= {"APP_TRANSPORT__SHM__SLOTS": str(SLOTS),
                "APP_TRANSPORT__SHM__SLOT_BYTES": str(SLOT_BYTES)}  # fmt: skip
    return env


def open_publisher(transport: str, control: str) -> Any:
    if transport == "rdma":
        return connect("rdma", control_endpoint=control, device=CLIENT_DEVICE,
                       gid_index=GID_INDEX)  # fmt: skip
    return connect("shm", control_endpoint=control)


def through_appliance(transport: str, frames: int, latency_samples: int) -> dict[str, Any]:
    """Throughput and publish -> applied latency against a real appliance process."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(Path(tmp), appliance_env(transport)) as server,
    ):
        pub = open_publisher(transport, server.control_endpoint)
        try:
            values = np.linspace(100.0, 101.0, 100)
            pub.publish("WARM", values)
            pub.flush(60)
            started = time.perf_counter()
            for _ in range(frames):
                pub.publish("THROUGHPUT", values)
            pub.flush(120)
            elapsed = time.perf_counter() - started
            samples = []
            for index in range(latency_samples):
                target = pub.producer_position + 1
                began = time.perf_counter()
                pub.publish("LATENCY", [float(index + 1)])
                while pub.consumer_position < target:
                    pass
                samples.append(time.perf_counter() - began)
            pub.flush(60)
        finally:
            pub.close()
        assert server.stats("THROUGHPUT", 1).json["last"] == values[-1]
    return {
        "frames": frames,
        "values_per_frame": values.size,
        "frames_per_s": frames / elapsed,
        "values_per_s": frames * values.size / elapsed,
        "latency_1_value": percentiles(samples),
    }


class Timed:
    """Stands in for a pyverbs QP or CQ and adds up the time spent inside its verbs calls, so
    the Python around them can be told apart from the (here emulated) device work. The proxy's
    own method dispatch lands on the Python side (a slight overstatement of it)."""

    def __init__(self, target: Any, clock: dict[str, float]) -> None:
        self._target = target
        self._clock = clock

    def post_send(self, *args: Any) -> Any:
        return self._timed(self._target.post_send, args)

    def post_recv(self, *args: Any) -> Any:
        return self._timed(self._target.post_recv, args)

    def poll(self, *args: Any) -> Any:
        return self._timed(self._target.poll, args)

    def _timed(self, call: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._clock["verbs_s"] += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def per_frame_costs(transport: str, frames: int) -> dict[str, Any]:
    """Python cost per 1-value frame on each side, one process, no poller thread."""
    store = build_store(AppConfig(), NumpyEngine())
    sink = make_sink(store, 1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        if transport == "rdma":
            ingest: Any = RdmaIngest(sink, device=SERVER_DEVICE, gid_index=GID_INDEX,
                                     slots=SLOTS, slot_bytes=SLOT_BYTES)  # fmt: skip
            ingest.open()
        else:
            ingest = ShmIngest(sink, slots=SLOTS, slot_bytes=SLOT_BYTES, directory=tmp)
        handlers = ingest.control_handlers()
        client: Callable[[dict[str, Any]], dict[str, Any]] = lambda body: {  # noqa: E731
            "ok": True, **handlers[body["op"]](body)
        }  # fmt: skip
        publisher_clock = {"verbs_s": 0.0}
        appliance_clock = {"verbs_s": 0.0}
        if transport == "rdma":
            pub: Any = RdmaPublisher(client, device=CLIENT_DEVICE, gid_index=GID_INDEX)
            pub._qp = Timed(pub._qp, publisher_clock)
            pub._cq = Timed(pub._cq, publisher_clock)
            for link in ingest._links:
                link.qp = Timed(link.qp, appliance_clock)
                link.cq = Timed(link.cq, appliance_clock)
        else:
            pub = ShmPublisher(client)
        publish_s = poll_s = publish_verbs_s = poll_verbs_s = 0.0
        done = 0
        batch = SLOTS // 4  # the send queue never fills: no wait for the device is timed
        try:
            while done < frames:
                started = time.perf_counter()
                for index in range(batch):
                    pub.publish("COST", [float(done + index + 1)])
                publish_s += time.perf_counter() - started
                publish_verbs_s = publisher_clock["verbs_s"]
                target = done + batch
                applied = lambda: ingest.snapshot()["totals"].get("frames_applied", 0)  # noqa: E731
                while applied() < target:  # only passes that did work count (writes in flight)
                    started = time.perf_counter()
                    verbs_before = appliance_clock["verbs_s"]
                    work = ingest.poll_once()
                    if work:
                        poll_s += time.perf_counter() - started
                        poll_verbs_s += appliance_clock["verbs_s"] - verbs_before
                done += batch
                wait_until(
                    lambda: (
                        ingest.poll_once() >= 0 and pub.consumer_position >= pub.producer_position
                    ),
                    "credits",
                )
        finally:
            pub.close()
            ingest.stop(5.0)
    assert store.stats("COST", 1).last == float(done)
    return {"frames": done, "publish_us_per_frame": publish_s / done * 1e6,
            "publish_verbs_us_per_frame": publish_verbs_s / done * 1e6,
            "poll_us_per_frame": poll_s / done * 1e6,
            "poll_verbs_us_per_frame": poll_verbs_s / done * 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames (about a minute)")
    parser.add_argument(
        "--shm-only", action="store_true",
        help="only the shared-memory baseline (runs anywhere: the host's side of the scale)",
    )  # fmt: skip
    args = parser.parse_args()
    frames, samples, cost_frames = (500, 200, 1024) if args.quick else (3000, 1000, 4096)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": (
            f"{os.cpu_count()} vCPU, {platform.release()}"
            if args.shm_only
            else f"Soft-RoCE lab: qemu TCG guest, {os.cpu_count()} vCPU, {platform.release()}"
        ),
        "python": platform.python_version(),
        "note": "emulated: rxe over veth inside a TCG VM; only the ratios carry over",
    }
    transports = ("shm",) if args.shm_only else ("shm", "rdma")
    for transport in transports:
        report[transport] = {
            "appliance": through_appliance(transport, frames, samples),
            "per_frame": per_frame_costs(transport, cost_frames),
        }
    if "rdma" in report:
        for side in ("publish_us_per_frame", "poll_us_per_frame"):
            report[f"rdma_over_shm_{side}"] = (
                report["rdma"]["per_frame"][side] / report["shm"]["per_frame"][side]
            )
    print("BENCH-RDMA-JSON " + json.dumps(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
