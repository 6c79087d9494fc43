"""Finding 6 (issue 16) against a real nats-server: a node started with a different lease_s or
duplicate_window_s than the existing buckets/streams were made with brings them to its config
(else the owners' keys would expire between renews), instead of binding them as they are."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from appliance.cluster.local import NatsCluster
from appliance.cluster.messages import BatchMessage
from appliance.cluster.node import OWNERS_BUCKET, ClusterNode
from appliance.cluster.partitions import partition_key, stream_name
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


async def _checkpoint_records_its_seq(node: ClusterNode) -> str | None:
    """Against real NATS: the checkpoint object's description carries the seq the stale-upload
    guard compares (finding 7); the guard then refuses an older one."""
    await asyncio.wait_for(node.joined.wait(), timeout=20)
    symbol = "s0"
    p = node.partition_of(symbol)
    message = BatchMessage.of(symbol, np.array([1.0, 2.0]), None, 1)
    await node.log_and_apply(message, "setup-1")
    part = node.parts[p]
    await node._checkpoint(part)
    info = await node._objects.get_info(partition_key(p))
    assert not await node._put_checkpoint(part, part.applied_seq - 1, b"older")
    return info.description


async def _scenario(urls: list[str]) -> tuple[float, float, float, str | None]:
    first = _node(urls, 3.0, 120.0)
    await first.start()
    await first.stop()
    second = _node(urls, 4.5, 60.0)
    await second.start()
    try:
        owners = await second.js.stream_info(f"KV_{OWNERS_BUCKET}")
        stream = await second.js.stream_info(stream_name(1))
        description = await _checkpoint_records_its_seq(second)
        return (
            owners.config.max_age,
            owners.config.duplicate_window,
            stream.config.duplicate_window,
            description,
        )
    finally:
        await second.stop()


def test_existing_buckets_and_streams_follow_a_changed_config(tmp_path: Path) -> None:
    with NatsCluster(tmp_path, nodes=1) as cluster:
        max_age, kv_window, window, description = asyncio.run(_scenario(cluster.urls))
    assert abs(max_age - 4.5) < 1e-3
    assert kv_window <= max_age
    assert abs(window - 60.0) < 1e-3
    assert description is not None and description.startswith("seq=")
    assert int(description[4:]) >= 2  # the batch and the takeover's fence marker
