"""A 3-node NATS JetStream cluster and appliance nodes as real processes on loopback.

The NATS side is `appliance.cluster.local.NatsCluster` (nats-server from the venv); each
appliance is `python -m appliance serve` (tests/integration/server_harness.Server) configured
through APP_* variables: cluster on, durability off (the replicated log is JetStream's).
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

from tests.integration.server_harness import Server

PARTITIONS = 8
LEASE_S = 1.5
CHECKPOINT_S = 2.0


def node_env(node_id: str, urls: list[str], **extra: str) -> dict[str, str]:
    env = {
        "APP_CLUSTER__ENABLED": "true",
        "APP_CLUSTER__NODE_ID": node_id,
        "APP_CLUSTER__NATS_URLS": json.dumps(urls),
        "APP_CLUSTER__PARTITIONS": str(PARTITIONS),
        "APP_CLUSTER__REPLICAS": "3",
        "APP_CLUSTER__LEASE_S": str(LEASE_S),
        "APP_CLUSTER__CHECKPOINT_INTERVAL_S": str(CHECKPOINT_S),
        "APP_CLUSTER__REQUEST_TIMEOUT_S": "1.2",  # below LEASE_S (config requires it)
        "APP_DURABILITY__ENABLED": "false",
        "APP_STORE__MAX_SYMBOLS": "1000",
        "APP_STORE__STARTING_CAPACITY": "1024",
        "APP_TRANSPORT__SHM__ENABLED": "false",
        "APP_ENGINE__BACKEND": "numpy",
        "APP_SERVER__WAIT_FOR_READY_S": "0",
        "APP_LOG__LEVEL": "info",
    }
    env.update(extra)
    return env


def start_node(base: Path, node_id: str, urls: list[str], **extra: str) -> Server:
    return Server(base / node_id, node_env(node_id, urls, **extra))


def partition_probe_symbols(partitions: int = PARTITIONS) -> list[str]:
    """One symbol per partition (crc32 % partitions), for probing that all are served."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < partitions:
        name = f"probe{i}"
        found.setdefault(zlib.crc32(name.encode()) % partitions, name)
        i += 1
    return [found[p] for p in range(partitions)]


def all_served(servers: list[Server]) -> bool:
    """Every node answers a query on every partition without 503 (unknown_symbol is fine)."""
    queries = [{"symbol": s, "exponent": 1} for s in partition_probe_symbols()]
    body = json.dumps({"queries": queries}).encode()
    for server in servers:
        try:
            response = server.request(
                "POST", "/stats/batch", body, {"Content-Type": "application/json"}, timeout_s=10
            )
        except OSError:
            return False
        if response.status != 200:
            return False
        if any(r.get("code") == "partition_unavailable" for r in response.json["results"]):
            return False
    return True


def wait_stable(servers: list[Server], timeout_s: float = 60.0) -> float:
    """Wait until every node serves every partition, twice in a row one lease apart (the
    rebalance after the last join has settled); returns the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout_s
    streak = 0
    while time.monotonic() < deadline:
        if all_served(servers):
            streak += 1
            if streak >= 2:
                return time.monotonic() - started
            time.sleep(LEASE_S)
            continue
        streak = 0
        time.sleep(0.1)
    logs = "\n".join(s.stdout()[-3000:] for s in servers)
    raise TimeoutError(f"cluster not stable after {timeout_s}s:\n{logs}")


def post(server: Server, symbol: str, values: list[float], key: str | None = None) -> Any:
    body = json.dumps({"symbol": symbol, "values": values}).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return server.request("POST", "/add_batch/", body, headers, timeout_s=15)
