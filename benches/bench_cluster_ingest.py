"""Cluster-mode binary ingest (ZeroMQ, shm, RDMA frames): frames/s of `ClusterIngest`'s
one-frame-at-a-time path, against a raw JetStream publish + ack of the same message (same run).

The transports hand a poll batch to `ClusterIngest.submit_group`, which logs its frames one
after another (`ClusterIngest._one` per frame: publish, ack, apply; off the owner a NATS
request/reply to the owner first). This awaits `_one` in a loop exactly as `submit_group` does,
in process, so it measures the cluster part without the ZeroMQ socket:

- owned: node "a"'s ingest, frames for a partition "a" owns;
- forwarded: node "b"'s ingest, frames for a partition "a" owns (both nodes in this process);
- yardstick: `js.publish` + ack of the encoded `BatchMessage` on the same server, sequential.

One nats-server (JetStream file storage, R=1) or three (R=3) on this machine.

    /work/main/.venv/bin/python benches/bench_cluster_ingest.py [--nodes 3] [--frames 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
from datetime import UTC, datetime

import numpy as np

from appliance.cluster.local import NatsCluster
from appliance.cluster.messages import BatchMessage, encode
from appliance.cluster.node import ClusterNode
from appliance.cluster.router import ClusterRouter
from appliance.cluster.sink import ClusterIngest
from appliance.config import ClusterConfig
from appliance.engine import load_numpy_engine
from appliance.store import Store
from engine_core.contract import RetentionPolicy

PARTITIONS = 4


def _store() -> Store:
    return Store(
        load_numpy_engine(),
        retention=RetentionPolicy(max_values=50_000_000, keep_after_cleanup=40_000_000),
        max_symbols=1000,
        starting_capacity=1024,
    )


async def _frames_per_s(ingest: ClusterIngest, symbol: str, values: np.ndarray, n: int,
                        publisher: int) -> float:  # fmt: skip
    started = time.perf_counter()
    for seq in range(1, n + 1):
        await ingest._one(symbol, values, publisher, seq, None)
    return n / (time.perf_counter() - started)


async def _yardstick(router: ClusterRouter, symbol: str, values: np.ndarray, n: int) -> float:
    js = router.node.nc.jetstream(timeout=5)
    await js.add_stream(name="BENCH_YARD", subjects=["bench.yard"])
    data = encode(BatchMessage.of(symbol, values, None, time.time_ns()))
    started = time.perf_counter()
    for i in range(n):
        await js.publish("bench.yard", data, headers={"Nats-Msg-Id": f"y:{i}"})
    rate = n / (time.perf_counter() - started)
    await js.delete_stream("BENCH_YARD")
    return rate


async def main(nodes: int, frames: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsCluster(tmp, nodes=nodes) as cluster:
        routers = []
        for node_id in ("a", "b"):
            config = ClusterConfig(enabled=True, node_id=node_id, nats_urls=tuple(cluster.urls),
                                   partitions=PARTITIONS, replicas=nodes)  # fmt: skip
            routers.append(ClusterRouter(ClusterNode(config, _store())))
        try:
            for router in routers:
                await router.node.start()
            a, b = routers
            while not all(a.node.owned_serving(p) or b.node.owned_serving(p)
                          for p in range(PARTITIONS)):  # fmt: skip
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            symbol = next(s for s in (f"S{i}" for i in range(1000))
                          if a.node.owned_serving(a.node.partition_of(s)))  # fmt: skip
            loop = asyncio.get_running_loop()
            owned = ClusterIngest(a, loop).for_transport("zmq")
            forwarded = ClusterIngest(b, loop).for_transport("zmq")
            cpu = platform.processor() or platform.machine()
            print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu}, "
                  f"nats-servers={nodes} R={nodes}, {frames} frames each, sequential")  # fmt: skip
            print("| frame | yardstick publish+ack /s | owned frames/s | forwarded frames/s | "
                  "owned/yard | fwd/yard |")  # fmt: skip
            print("|---|---:|---:|---:|---:|---:|")
            for publisher, size in enumerate((1, 1000, 10_000), start=1):
                values = np.random.default_rng(size).normal(size=size)
                yard = await _yardstick(a, symbol, values, frames)
                own = await _frames_per_s(owned, symbol, values, frames, publisher)
                fwd = await _frames_per_s(forwarded, symbol, values, frames, publisher + 100)
                print(f"| {size} values | {yard:,.0f} | {own:,.0f} | {fwd:,.0f} | "
                      f"{own / yard:.2f} | {fwd / yard:.2f} |")  # fmt: skip
        finally:
            for router in routers:
                await router.node.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 3))
    parser.add_argument("--frames", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.nodes, args.frames))
