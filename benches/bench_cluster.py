"""Cluster benchmark: the cluster path against the single-node path, measured in the same run.

On a 2-vCPU box a cluster cannot show scale (3 NATS servers, 3 appliance nodes and the client
share two cores), so this measures what it can, each figure next to its same-run yardstick:

- POST /add_batch/ latency (sequential, one keep-alive connection) and the values/s that gives,
  for 1-value and 1,000-value batches: a node of a 3-node cluster (JetStream R=3) for a symbol it
  owns and for one another node owns (forwarded), against a single-node appliance with its
  write-ahead log (durability on, sync "interval": the default) and without it;
- GET /stats/ (exponent 3) on the owner (local) and on another node (forwarded over NATS
  request/reply), against the single node;
- failover: kill -9 a node, then time until every partition it owned answers again through a
  surviving node (GET /stats/ 200, polled every 20 ms), with the configured lease;
- a raw JetStream yardstick (nats-py, no appliance): sequential publish + ack latency and
  pipelined publishes/s, stream replicas R=1 and R=3, file storage, 100 B and 8 KB payloads.

    /work/main/.venv/bin/python benches/bench_cluster.py                  # ~3 minutes
    /work/main/.venv/bin/python benches/bench_cluster.py --quick          # smoke, ~1 minute
    ... --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.cluster.local import (  # noqa: E402
    ApplianceNodeSpec,
    NatsCluster,
    ports_in_use,
    spawn_appliance,
    stop_processes,
    wait_healthy,
)
from appliance.cluster.partitions import desired_owner  # noqa: E402

PARTITIONS = 16
LEASE_S = 3.0
NODES = ("node1", "node2", "node3")


# -- processes ---------------------------------------------------------------------------------


def free_block(width: int) -> int:
    rng = random.Random()
    for _ in range(500):
        first = rng.randrange(20_000, 32_000)  # below the ephemeral range
        if not ports_in_use(list(range(first, first + width))):
            return first
    raise RuntimeError("no free block of ports")


def start_single(base: Path, durable: bool) -> tuple[subprocess.Popen[bytes], int]:
    """A single-node appliance (no cluster), REST on a free port, ZeroMQ on free ports."""
    port = free_block(4)
    work = base / ("single-wal" if durable else "single-nowal")
    work.mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "APP_SERVER__PORT": str(port),
        "APP_DURABILITY__ENABLED": "true" if durable else "false",
        "APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": f"tcp://127.0.0.1:{port + 1}",
        "APP_TRANSPORT__ZMQ__PULL_ENDPOINT": f"tcp://127.0.0.1:{port + 2}",
        "APP_TRANSPORT__ZMQ__CONTROL_ENDPOINT": f"tcp://127.0.0.1:{port + 3}",
        "APP_TRANSPORT__SHM__ENABLED": "false",
        "APP_STORE__MAX_SYMBOLS": "1000",
        "APP_STORE__STARTING_CAPACITY": "65536",
        "APP_LOG__FILE": "",
    }
    with open(work / "node.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve"],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    why = wait_healthy(port, proc, 120)
    if why:
        raise RuntimeError(f"single node ({'wal' if durable else 'no wal'}): {why}")
    return proc, port


def start_cluster_nodes(
    base: Path, urls: list[str]
) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, int]]:
    rest, zmq = free_block(3), free_block(23)
    procs, ports = {}, {}
    os.environ["APP_CLUSTER__PARTITIONS"] = str(PARTITIONS)
    os.environ["APP_CLUSTER__LEASE_S"] = str(LEASE_S)
    for k, node in enumerate(NODES, start=1):
        spec = ApplianceNodeSpec(node, rest + k - 1, zmq + 10 * (k - 1), str(base / node))
        proc = spawn_appliance(spec, urls, replicas=3, detach=False)
        why = wait_healthy(spec.port, proc, 120)
        if why:
            raise RuntimeError(f"{node}: {why}: {Path(spec.log_file).read_text()[-2000:]}")
        procs[node], ports[node] = proc, spec.port
    return procs, ports


# -- HTTP ----------------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP connection (what a feed handler or a dashboard holds)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


def owner_of(symbol: str) -> str:
    owner = desired_owner(zlib.crc32(symbol.encode()) % PARTITIONS, NODES)
    assert owner is not None
    return owner


def symbol_owned_by(node: str, prefix: str) -> str:
    for i in range(10_000):
        name = f"{prefix}{i}"
        if owner_of(name) == node:
            return name
    raise RuntimeError("no symbol found")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_posts(port: int, symbol: str, values: int, count: int) -> dict[str, float]:
    body = json.dumps(
        {"symbol": symbol, "values": [100.0 + (i % 97) * 0.01 for i in range(values)]}
    ).encode()
    client = Client(port)
    lat = []
    try:
        for _ in range(5):  # warm: the symbol exists, the connection is open
            status, text = client.request("POST", "/add_batch/", body)
            assert status == 200, text
        for _ in range(count):
            t0 = time.perf_counter()
            status, text = client.request("POST", "/add_batch/", body)
            lat.append(time.perf_counter() - t0)
            assert status == 200, text
    finally:
        client.close()
    total = sum(lat)
    return {
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * pct(lat, 0.99),
        "values_per_s": values * count / total,
        "requests": count,
    }


def timed_stats(port: int, symbol: str, count: int) -> dict[str, float]:
    client = Client(port)
    lat = []
    try:
        for _ in range(5):
            status, text = client.request("GET", f"/stats/?symbol={symbol}&exponent=3")
            assert status == 200, text
        for _ in range(count):
            t0 = time.perf_counter()
            status, text = client.request("GET", f"/stats/?symbol={symbol}&exponent=3")
            lat.append(time.perf_counter() - t0)
            assert status == 200, text
    finally:
        client.close()
    return {
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * pct(lat, 0.99),
        "requests_per_s": count / sum(lat),
    }


# -- failover ------------------------------------------------------------------------------------


def failover(
    procs: dict[str, subprocess.Popen[bytes]], ports: dict[str, int], victim: str
) -> dict[str, Any]:
    """kill -9 `victim`; seconds until each partition it owned answers through a survivor."""
    survivor = next(n for n in NODES if n != victim)
    probes = {}
    for p in range(PARTITIONS):
        if desired_owner(p, NODES) != victim:
            continue
        for i in range(100_000):
            name = f"fo{i}"
            if zlib.crc32(name.encode()) % PARTITIONS == p:
                probes[p] = name
                break
    client = Client(ports[survivor])
    for name in probes.values():  # each probe symbol has data before the kill
        status, text = client.request(
            "POST", "/add_batch/", json.dumps({"symbol": name, "values": [1.0, 2.0]}).encode()
        )
        assert status == 200, text
    t_kill = time.monotonic()
    procs[victim].send_signal(signal.SIGKILL)
    procs[victim].wait()
    back: dict[int, float] = {}
    codes: dict[str, int] = {}
    deadline = t_kill + 120
    while len(back) < len(probes) and time.monotonic() < deadline:
        for p, name in probes.items():
            if p in back:
                continue
            try:
                status, text = client.request("GET", f"/stats/?symbol={name}&exponent=1")
            except OSError:
                client.close()
                client = Client(ports[survivor])
                continue
            if status == 200:
                stats = json.loads(text)
                assert stats["last"] == 2.0, stats  # the acked batch survived the kill
                back[p] = time.monotonic() - t_kill
            else:
                code = json.loads(text).get("code", str(status))
                codes[code] = codes.get(code, 0) + 1
        time.sleep(0.02)
    client.close()
    return {
        "victim": victim,
        "partitions_moved": len(probes),
        "all_back_s": max(back.values()) if len(back) == len(probes) else None,
        "first_back_s": min(back.values()) if back else None,
        "answers_while_moving": codes,
        "lease_s": LEASE_S,
    }


# -- raw JetStream -------------------------------------------------------------------------------


async def jetstream_yardstick(urls: list[str], count: int) -> list[dict[str, Any]]:
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(servers=urls)
    js = nc.jetstream(timeout=10)
    rows = []
    try:
        for replicas in (1, 3):
            for size in (100, 8192):
                name = f"BENCH_R{replicas}_{size}"
                await js.add_stream(
                    StreamConfig(
                        name=name,
                        subjects=[f"bench.{name}"],
                        num_replicas=replicas,
                        storage=StorageType.FILE,
                    )
                )
                payload = os.urandom(size)
                subject = f"bench.{name}"
                for _ in range(20):
                    await js.publish(subject, payload)
                lat = []
                for _ in range(count):
                    t0 = time.perf_counter()
                    await js.publish(subject, payload)
                    lat.append(time.perf_counter() - t0)
                # Pipelined: 64 publishes in flight at a time, each awaiting its own ack.
                t0 = time.perf_counter()
                sent = 0
                while sent < 4 * count:
                    await asyncio.gather(*(js.publish(subject, payload) for _ in range(64)))
                    sent += 64
                pipelined = sent / (time.perf_counter() - t0)
                rows.append(
                    {
                        "replicas": replicas,
                        "payload_bytes": size,
                        "p50_ms": 1e3 * statistics.median(lat),
                        "p99_ms": 1e3 * pct(lat, 0.99),
                        "sequential_msgs_per_s": count / sum(lat),
                        "pipelined_msgs_per_s": pipelined,
                        "pipelined_mb_per_s": pipelined * size / 1e6,
                    }
                )
                await js.delete_stream(name)
    finally:
        await nc.close()
    return rows


async def stored_bytes(urls: list[str], written: dict[str, int]) -> dict[int, float]:
    """Stored bytes per message of the partition streams, by batch size (values per message).

    Only partitions whose every written symbol used one batch size count, so each figure is
    JetStream's file-store record of one batch: payload + subject + headers + record overhead.
    """
    import nats

    sizes_by_partition: dict[int, set[int]] = {}
    for symbol, size in written.items():
        sizes_by_partition.setdefault(zlib.crc32(symbol.encode()) % PARTITIONS, set()).add(size)
    nc = await nats.connect(servers=urls)
    found: dict[int, list[float]] = {}
    try:
        js = nc.jetstream(timeout=10)
        for p, sizes in sizes_by_partition.items():
            if len(sizes) != 1:
                continue
            info = await js.stream_info(f"HFT_P{p}")
            if info.state.messages:
                found.setdefault(sizes.pop(), []).append(info.state.bytes / info.state.messages)
    finally:
        await nc.close()
    return {size: statistics.mean(v) for size, v in found.items()}


# -- report --------------------------------------------------------------------------------------


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return "\n".join(out.splitlines()[:12])
    except OSError:
        return platform.processor()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Cluster benchmark (benches/bench_cluster.py)",
        "",
        f"UTC {result['utc']}; command `{result['command']}`; nats-server {result['nats']}.",
        "3 nats-server (JetStream, file storage, R=3 streams), 3 appliance nodes "
        f"(partitions {PARTITIONS}, lease {LEASE_S} s), the single-node yardsticks and the client:",
        "all on this machine's 2 vCPUs. Latencies: one keep-alive connection, sequential requests.",
        "",
        "```",
        result["machine"],
        "```",
        "",
        "## POST /add_batch/",
        "",
        "| values/batch | path | p50 ms | p99 ms | values/s | ratio to single (WAL) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for size, rows in result["add_batch"].items():
        base = rows["single node, WAL (interval)"]["values_per_s"]
        for path, row in rows.items():
            lines.append(
                f"| {size} | {path} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                f"{row['values_per_s']:,.0f} | {row['values_per_s'] / base:.2f} |"
            )
    lines += [
        "",
        "## GET /stats/ (exponent 3)",
        "",
        "| path | p50 ms | p99 ms | requests/s | ratio to single |",
        "|---|---:|---:|---:|---:|",
    ]
    base = result["stats"]["single node"]["requests_per_s"]
    for path, row in result["stats"].items():
        lines.append(
            f"| {path} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['requests_per_s']:,.0f} | {row['requests_per_s'] / base:.2f} |"
        )
    lines += ["", "JetStream file-store bytes per stored batch (stream bytes / messages):"]
    for size, per in result["stream_bytes_per_message"].items():
        lines.append(
            f"{size} value(s) per batch: {per:.0f} B per message, {per / size:.2f} B/value"
        )
    fo = result["failover"]
    lines += [
        "",
        "## Failover (kill -9 of an appliance node)",
        "",
        f"{fo['partitions_moved']} partitions moved from {fo['victim']}; first answered again "
        f"after {fo['first_back_s']:.2f} s, all after {fo['all_back_s']:.2f} s (lease "
        f"{fo['lease_s']} s). Answers while moving: {fo['answers_while_moving']}.",
        "",
        "## Raw JetStream publish + ack (nats-py, no appliance)",
        "",
        "| R | payload B | p50 ms | p99 ms | sequential msg/s | pipelined msg/s (64 in flight) "
        "| pipelined MB/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["jetstream"]:
        lines.append(
            f"| {row['replicas']} | {row['payload_bytes']} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['sequential_msgs_per_s']:,.0f} | "
            f"{row['pipelined_msgs_per_s']:,.0f} | {row['pipelined_mb_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run(quick: bool) -> dict[str, Any]:
    n_post = 100 if quick else 400
    n_stats = 200 if quick else 1000
    n_js = 200 if quick else 1000
    result: dict[str, Any] = {"utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
                              "machine": machine()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = Path(tmp)
        cluster = NatsCluster(base / "nats", nodes=3)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        singles: list[subprocess.Popen[bytes]] = []
        try:
            cluster.start()
            cluster.wait_ready()
            result["nats"] = subprocess.run(
                [cluster.binary, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
            procs, ports = start_cluster_nodes(base, cluster.urls)
            time.sleep(2 * LEASE_S)  # the rebalance after the last join settles
            wal, wal_port = start_single(base, durable=True)
            nowal, nowal_port = start_single(base, durable=False)
            singles = [wal, nowal]
            result["add_batch"] = {}
            for size in (1, 1000):
                tag = f"b{size}"
                local = symbol_owned_by("node1", tag)  # node1 owns it: logged, applied there
                forwarded = symbol_owned_by("node2", tag + "f")  # node1 relays it to node2
                result["add_batch"][size] = {
                    "single node, WAL (interval)": timed_posts(wal_port, tag, size, n_post),
                    "single node, no WAL": timed_posts(nowal_port, tag, size, n_post),
                    "cluster, owner (local)": timed_posts(ports["node1"], local, size, n_post),
                    "cluster, forwarded": timed_posts(ports["node1"], forwarded, size, n_post),
                }
            written = {
                symbol_owned_by(node, f"b{size}" + suffix): size
                for size in (1, 1000)
                for node, suffix in (("node1", ""), ("node2", "f"))
            }
            result["stream_bytes_per_message"] = asyncio.run(stored_bytes(cluster.urls, written))
            result["stats"] = {
                "single node": timed_stats(wal_port, "b1000", n_stats),
                "cluster, owner (local)": timed_stats(
                    ports["node1"], symbol_owned_by("node1", "b1000"), n_stats
                ),
                "cluster, forwarded": timed_stats(
                    ports["node1"], symbol_owned_by("node2", "b1000f"), n_stats
                ),
            }
            result["jetstream"] = asyncio.run(jetstream_yardstick(cluster.urls, n_js))
            result["failover"] = failover(procs, ports, "node3")
        finally:
            stop_processes([*procs.values(), *singles])
            cluster.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    result = run(args.quick)
    result["command"] = " ".join(["benches/bench_cluster.py", *sys.argv[1:]])
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
