"""Finding 6 (issue 16) against a real nats-server: a node started with a different lease_s or
duplicate_window_s than the existing buckets/streams were made with brings them to its config
(else the owners' keys would expire between renews), instead of binding them as they are."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appliance.cluster.local import NatsCluster
from appliance.cluster.node import OWNERS_BUCKET, ClusterNode
from appliance.cluster.partitions import stream_name
from appliance.config import ClusterConfig
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine


def _node(urls: list[str], lease_s: float, window_s: float) -> ClusterNode:
    store = Store(NumpyEngine(), retention=RetentionPolicy(), max_symbols=10, starting_capacity=64)
    config = ClusterConfig(
        enabled=True, node_id="a", nats_urls=tuple(urls), partitions=2, lease_s=lease_s,
        request_timeout_s=1.0, duplicate_window_s=window_s,
    )  # fmt: skip
    return ClusterNode(config, store)


async def _scenario(urls: list[str]) -> tuple[float, float, float]:
    first = _node(urls, 3.0, 120.0)
    await first.start()
    await first.stop()
    second = _node(urls, 4.5, 60.0)
    await second.start()
    try:
        owners = await second.js.stream_info(f"KV_{OWNERS_BUCKET}")
        stream = await second.js.stream_info(stream_name(1))
        return owners.config.max_age, owners.config.duplicate_window, stream.config.duplicate_window
    finally:
        await second.stop()


def test_existing_buckets_and_streams_follow_a_changed_config(tmp_path: Path) -> None:
    with NatsCluster(tmp_path, nodes=1) as cluster:
        max_age, kv_window, window = asyncio.run(_scenario(cluster.urls))
    assert abs(max_age - 4.5) < 1e-3
    assert kv_window <= max_age
    assert abs(window - 60.0) < 1e-3
