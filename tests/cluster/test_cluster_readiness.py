"""Readiness in cluster mode: /ready answers 503 until the node has joined AND restored every
partition it should own; here each partition's lease is still held by a node that is gone
(its keys expire after lease_s), so the new node must wait out the lease before serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from appliance.cluster.local import NatsCluster
from appliance.cluster.node import OWNERS_BUCKET
from appliance.cluster.partitions import partition_key
from tests.cluster.cluster_harness import PARTITIONS, start_node

LEASE_S = 3.0


async def _hold_every_partition(url: str) -> None:
    import nats

    nc = await nats.connect(servers=[url], connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        kv = await js.create_key_value(bucket=OWNERS_BUCKET, ttl=LEASE_S, history=1, replicas=1)
        for p in range(PARTITIONS):
            await kv.create(partition_key(p), b"ghost")
    finally:
        await nc.close()


def test_ready_only_once_the_partitions_of_a_dead_owner_are_taken_over(tmp_path: Path) -> None:
    with NatsCluster(tmp_path / "nats", nodes=1) as nats:
        asyncio.run(_hold_every_partition(nats.urls[0]))
        held_at = time.monotonic()
        server = start_node(
            tmp_path,
            "solo",
            nats.urls,
            APP_CLUSTER__REPLICAS="1",
            APP_CLUSTER__LEASE_S=str(LEASE_S),
        )
        try:
            seen_503 = False
            while time.monotonic() - held_at < LEASE_S * 0.8:
                try:
                    response = server.request("GET", "/ready", timeout_s=5)
                except OSError:
                    time.sleep(0.05)  # not listening yet
                    continue
                assert response.status == 503, "ready while a live lease holds its partitions"
                assert response.json["code"] == "not_ready"
                stats = server.request("GET", "/stats/?symbol=X&exponent=1")
                assert stats.status == 503 and stats.json["code"] == "not_ready"
                seen_503 = True
                time.sleep(0.1)
            assert seen_503
            server.wait_ready(30)
            waited = time.monotonic() - held_at
            assert waited >= LEASE_S * 0.8
            assert server.stats("X", 1).json["code"] == "unknown_symbol"
            assert server.post_batch("X", [1.0, 2.0]).status == 200
            assert server.stats("X", 1).json["last"] == 2.0
        finally:
            server.stop()
