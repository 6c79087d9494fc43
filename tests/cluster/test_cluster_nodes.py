"""Cluster mode end to end: a 3-node NATS JetStream cluster (replicas = 3) and 3 appliance
nodes, all real processes on loopback (issue 16's tests).

- every node answers every symbol exactly as a single-node appliance (an in-process Store on
  the same engine fed the same batches in the same order), over REST and ZeroMQ ingest, and
  still does after every appliance is killed and started again (checkpoints + replay);
- a retried write with the same Idempotency-Key is applied once;
- kill -9 of an appliance under load: every acknowledged batch applied exactly once, its
  partitions served again within the stated bound (measured and printed);
- kill -9 of a NATS node under load: acks keep coming; restarted, its replicas catch up.

Each test builds its own cluster (so xdist may spread them over workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from appliance.cluster.local import NatsCluster
from appliance.cluster.partitions import stream_name
from appliance.engine import load_numpy_engine
from appliance.store import Store
from engine_core.contract import RetentionPolicy
from tests.cluster.cluster_harness import (
    CHECKPOINT_S,
    LEASE_S,
    PARTITIONS,
    all_served,
    post,
    start_node,
    wait_stable,
)
from tests.integration.server_harness import Server, run_cli
from transport.zmq.publisher import ZmqPublisher

NODE_IDS = ("a", "b", "c")
T0_NS = 1_700_000_000_000_000_000
# The stated failover bound (docs/cluster.md): lease expiry + one renew tick + restore and
# replay of at most checkpoint_interval_s of batches; the margin covers the 2-core CI box.
FAILOVER_BOUND_S = LEASE_S + LEASE_S / 3 + 5.0
# How long ingest may stall after a NATS node dies: its raft groups' election timeout (up to
# 9 s in nats-server) plus a request timeout and a takeover, with room for the 2-core box.
STALL_LIMIT_S = 30.0


@contextlib.contextmanager
def running_cluster(base: Path, **extra: str) -> Iterator[tuple[NatsCluster, list[Server]]]:
    nats = NatsCluster(base / "nats", nodes=3)
    servers: list[Server] = []
    try:
        nats.start()
        nats.wait_ready()
        servers.extend(start_node(base, node, nats.urls, **extra) for node in NODE_IDS)
        for server in servers:
            server.wait_ready(60)
        wait_stable(servers)
        yield nats, servers
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
        nats.stop()


def reference_store() -> Store:
    return Store(
        load_numpy_engine(),
        retention=RetentionPolicy(max_values=150_000_000, keep_after_cleanup=100_000_000),
        max_symbols=1000,
        starting_capacity=1024,
    )


def post_timed(server: Server, symbol: str, values: np.ndarray, times: np.ndarray) -> None:
    body = json.dumps(
        {"symbol": symbol, "values": values.tolist(), "timestamps": times.tolist()}
    ).encode()
    response = server.request("POST", "/add_batch/", body, {"Content-Type": "application/json"})
    assert response.status == 200, response


def assert_same(body: dict, expected, where: str) -> None:
    for key in ("min", "max", "last"):
        assert body[key] == getattr(expected, key), (where, key, body)
    for key in ("avg", "var"):
        assert body[key] == pytest.approx(getattr(expected, key), rel=1e-12, abs=1e-300), (
            where,
            key,
        )
    if "count" in body:
        assert body["count"] == expected.count, (where, body)


def compare_everything(
    servers: list[Server], ref: Store, timed: list[str], untimed: list[str]
) -> None:
    """GET /stats/ (every exponent; seconds windows for the timestamped symbols) and one
    POST /stats/batch mixing symbols, on every node."""
    windows_ns = [1_000, 25_000_000, 10**18]
    for server in servers:
        for symbol in timed + untimed:
            for exponent in range(1, 9):
                response = server.stats(symbol, exponent)
                assert response.status == 200, (server.cwd.name, symbol, response)
                assert_same(response.json, ref.stats(symbol, exponent), f"{symbol}/{exponent}")
        for symbol in timed:
            for window in windows_ns:
                query = urlencode({"symbol": symbol, "seconds": f"{window / 1e9:.9f}"})
                response = server.request("GET", f"/stats/?{query}")
                assert response.status == 200, response
                assert_same(response.json, ref.stats_seconds(symbol, window), f"{symbol}/{window}")
        queries = []
        for i, symbol in enumerate(timed + untimed):
            queries.append({"symbol": symbol, "exponent": 1 + i % 8})
        queries.insert(3, {"symbol": "never-seen", "exponent": 2})
        queries.insert(5, {"symbol": timed[0], "exponent": 99})
        queries.append({"symbol": timed[1], "seconds": 0.025})
        body = json.dumps({"queries": queries}).encode()
        response = server.request(
            "POST", "/stats/batch", body, {"Content-Type": "application/json"}
        )
        assert response.status == 200, response
        results = response.json["results"]
        assert len(results) == len(queries)
        for query, result in zip(queries, results, strict=True):
            if query["symbol"] == "never-seen":
                assert result["code"] == "unknown_symbol"
            elif query.get("exponent") == 99:
                assert result["code"] == "invalid_exponent"
            elif "seconds" in query:
                assert_same(result, ref.stats_seconds(query["symbol"], 25_000_000), "batch-s")
            else:
                assert_same(result, ref.stats(query["symbol"], query["exponent"]), "batch")
        listed = server.request("GET", "/symbols").json["symbols"]
        assert {row["symbol"] for row in listed} == set(timed + untimed)
        assert all(row["hot"] == ref.length(row["symbol"]) for row in listed)


def test_every_node_answers_like_one_appliance_and_a_full_restart_keeps_everything(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(16)
    ref = reference_store()
    timed = [f"R{i:02d}" for i in range(24)]
    untimed = [f"Z{i:02d}" for i in range(12)]
    with running_cluster(tmp_path) as (nats, servers):
        for batch in range(4):  # REST to nodes a and b, with explicit timestamps
            for i, symbol in enumerate(timed):
                n = int(rng.integers(20, 120))
                values = rng.uniform(0, 1000, n).round(6)
                times = T0_NS + batch * 10**9 + np.arange(n, dtype=np.int64) * 1_000_003
                post_timed(servers[(i + batch) % 2], symbol, values, times)
                ref.ingest(symbol, values, timestamps=times)
        with ZmqPublisher(servers[2].router_endpoint, timeout_s=30) as publisher:
            for _ in range(4):  # ZeroMQ DEALER (acked) to node c
                for symbol in untimed:
                    values = rng.uniform(0, 50, int(rng.integers(5, 300)))
                    publisher.publish(symbol, values)
                    ref.ingest(symbol, values)
            publisher.flush()
        compare_everything(servers, ref, timed, untimed)

        # A retry with the same Idempotency-Key is one append, even after later writes.
        assert post(servers[0], "IDEM", [1.0, 2.0], key="idem-1").status == 200
        assert post(servers[1], "IDEM", [5.0], key="idem-2").status == 200
        again = post(servers[2], "IDEM", [1.0, 2.0], key="idem-1")
        assert again.status == 200, again
        stats = servers[2].request("GET", "/stats/?symbol=IDEM&seconds=1000000").json
        assert stats["count"] == 3 and stats["last"] == 5.0
        deleted = servers[1].request("DELETE", "/symbols/IDEM")
        assert deleted.status == 200, deleted
        assert servers[0].stats("IDEM", 1).json["code"] == "unknown_symbol"
        check_metrics_and_status(servers, nats.urls, tmp_path)
        time.sleep(CHECKPOINT_S * 1.5)  # some partitions checkpoint; later writes only replay
        extra = rng.uniform(0, 10, 40)
        post_timed(servers[0], timed[0], extra, T0_NS + 10 * 10**9 + np.arange(40) * 1000)
        ref.ingest(timed[0], extra, timestamps=T0_NS + 10 * 10**9 + np.arange(40) * 1000)

        # Every appliance dies at once (kill -9) and starts again: checkpoints + replay.
        for server in servers:
            server.proc.kill()
            server.proc.wait()
        restarted = [start_node(tmp_path, node, nats.urls) for node in NODE_IDS]
        servers[:] = restarted  # the fixture's cleanup stops these
        for server in restarted:
            server.wait_ready(60)
        wait_stable(restarted)
        compare_everything(restarted, ref, timed, untimed)
        assert restarted[0].stats("IDEM", 1).json["code"] == "unknown_symbol"  # stays deleted


def metrics_text(server: Server) -> str:
    """GET /metrics (text, so not `Server.request`, which checks for JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


def check_metrics_and_status(servers: list[Server], urls: list[str], cwd: Path) -> None:
    """GET /metrics: the nodes own every partition once between them, and forwarded reads;
    `hft-appliance cluster status --json`: every partition owned by its desired node, no lag
    (the status is put every renew tick, so it is polled until it settles)."""
    owned = 0
    forwarded = 0.0
    for server in servers:
        text = metrics_text(server)
        for line in text.splitlines():
            if line.startswith("hft_cluster_partitions_owned "):
                owned += int(float(line.split()[1]))
            if line.startswith("hft_cluster_forwarded_requests_total{"):
                forwarded += float(line.split()[1])
        assert "hft_cluster_failovers_total" in text
    assert owned == PARTITIONS
    assert forwarded > 0
    env = {"APP_CLUSTER__NATS_URLS": json.dumps(urls), "APP_CLUSTER__PARTITIONS": str(PARTITIONS)}
    deadline = time.monotonic() + 20
    while True:
        result = run_cli(cwd, "cluster", "status", "--json", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        state = json.loads(result.stdout)
        rows = state["partitions"]
        settled = all(r["owner"] == r["desired"] and r["lag"] == 0 for r in rows)
        if settled:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)
    assert state["members"] == list(NODE_IDS)
    assert sum(r["last_seq"] for r in rows) > 0
    human = run_cli(cwd, "cluster", "status", env=env)
    assert human.returncode == 0 and "members: a, b, c" in human.stdout, human.stdout


class Writer(threading.Thread):
    """Posts numbered batches until stopped; each one is retried (same Idempotency-Key, next
    node) until acknowledged. Records what was acknowledged and when."""

    def __init__(self, servers: list[Server], tag: str, symbols: int = 12) -> None:
        super().__init__(daemon=True)
        self.servers = list(servers)
        self.tag = tag
        self.symbols = symbols
        self.stop_event = threading.Event()
        self.acked: dict[int, tuple[str, list[float]]] = {}
        self.ack_times: list[float] = []
        self.retries = 0
        self.error: BaseException | None = None

    def batch(self, n: int) -> tuple[str, list[float]]:
        return f"{self.tag}{n % self.symbols}", [float(n), float(n) + 0.5, float(n % 7)]

    def run(self) -> None:
        try:
            n = 0
            while not self.stop_event.is_set():
                symbol, values = self.batch(n)
                target = n
                deadline = time.monotonic() + 60
                while True:
                    server = self.servers[target % len(self.servers)]
                    try:
                        response = post(server, symbol, values, key=f"{self.tag}-{n}")
                        if response.status == 200:
                            break
                        # During a move: a clear 503, never stale or partial data.
                        assert response.status == 503, response
                        assert response.json["code"] == "partition_unavailable", response
                        assert response.headers.get("retry-after") == "1", response
                    except OSError:
                        pass
                    self.retries += 1
                    target += 1
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"batch {n} never acknowledged")
                    time.sleep(0.05)
                self.acked[n] = (symbol, values)
                self.ack_times.append(time.monotonic())
                n += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stop_event.set()
        self.join(90)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def assert_exactly_once(servers: list[Server], writer: Writer) -> None:
    """Per symbol: the count and the sum of the values equal the acknowledged batches'."""
    expected: dict[str, list[float]] = {}
    for n in sorted(writer.acked):
        symbol, values = writer.acked[n]
        expected.setdefault(symbol, []).extend(values)
    for server in servers:
        for symbol, values in expected.items():
            query = urlencode({"symbol": symbol, "seconds": "1000000"})
            response = server.request("GET", f"/stats/?{query}")
            assert response.status == 200, response
            body = response.json
            assert body["count"] == len(values), (server.cwd.name, symbol, body, len(values))
            assert body["avg"] * body["count"] == pytest.approx(sum(values), rel=1e-9)
            assert body["last"] == values[-1]


def test_kill_9_an_appliance_under_load(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as (_nats, servers):
        victim = servers[2]
        survivors = servers[:2]
        writer = Writer(servers, "K")
        writer.start()
        time.sleep(2.0)
        before = len(writer.acked)
        victim.proc.kill()
        killed_at = time.monotonic()
        victim.proc.wait()
        writer.servers = survivors  # a client keeps retrying on the nodes that answer
        while not all_served(survivors):
            assert time.monotonic() - killed_at < 60, "partitions never came back"
            time.sleep(0.05)
        failover_s = time.monotonic() - killed_at
        time.sleep(1.5)
        writer.finish()
        print(
            f"\nfailover after kill -9 of an appliance: {failover_s:.2f} s (bound "
            f"{FAILOVER_BOUND_S:.2f} s; lease {LEASE_S} s); batches acked {len(writer.acked)} "
            f"({before} before the kill), retries {writer.retries}"
        )
        assert failover_s < FAILOVER_BOUND_S
        assert len(writer.acked) > before  # ingest went on after the kill
        assert_exactly_once(survivors, writer)


async def _replica_state(url: str, stream: str) -> tuple[int, list[tuple[str, bool, int]]]:
    import nats as nats_client

    nc = await nats_client.connect(servers=[url], connect_timeout=5)
    try:
        info = await nc.jetstream(timeout=5).stream_info(stream)
        peers = [(info.cluster.leader or "", True, 0)]
        peers += [(r.name, bool(r.current), int(r.lag or 0)) for r in info.cluster.replicas or []]
        return info.state.last_seq, peers
    finally:
        await nc.close()


def test_kill_a_nats_node_under_load_and_it_catches_up(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as (nats, servers):
        writer = Writer(servers, "N")
        writer.start()
        time.sleep(1.5)
        nats.kill(0)
        killed_at = time.monotonic()
        # Streams (and the KV buckets) whose raft leader was on n1 elect a new one after
        # nats-server's election timeout (4-9 s): writes to them stall that long, and leases
        # shorter than that expire, so partitions may move; acks must resume after it.
        while sum(1 for t in writer.ack_times if t > killed_at) < 50:
            assert time.monotonic() - killed_at < STALL_LIMIT_S, "acks never resumed"
            assert writer.is_alive(), writer.error
            time.sleep(0.05)
        first_ack = min(t for t in writer.ack_times if t > killed_at)
        acked_after_kill = sum(1 for t in writer.ack_times if t > killed_at)
        nats.restart(0)
        time.sleep(1.5)
        writer.finish()
        print(
            f"\nNATS node n1 killed under load: first ack {first_ack - killed_at:.2f} s after "
            f"the kill, {acked_after_kill} acked before n1 was restarted; "
            f"{len(writer.acked)} in all, {writer.retries} retries"
        )
        assert_exactly_once(servers, writer)
        # The restarted node's replicas catch up: same last sequence, current, no lag.
        deadline = time.monotonic() + 30
        while True:
            behind = []
            for p in range(PARTITIONS):
                last, peers = asyncio.run(_replica_state(nats.urls[0], stream_name(p)))
                by_name = {name: (current, lag) for name, current, lag in peers}
                n1 = by_name.get("n1")
                if n1 is None or not n1[0] or n1[1] != 0:
                    behind.append((p, last, peers))
            if not behind:
                break
            assert time.monotonic() < deadline, behind
            time.sleep(0.5)


def stream_first_sequences(urls: list[str]) -> dict[int, tuple[int, int]]:
    """(first, last) sequence of every partition stream, read with nats-py."""
    import asyncio

    import nats

    async def read() -> dict[int, tuple[int, int]]:
        client = await nats.connect(servers=urls)
        try:
            js = client.jetstream()
            out = {}
            for p in range(PARTITIONS):
                info = await js.stream_info(f"HFT_P{p}")
                out[p] = (info.state.first_seq, info.state.last_seq)
            return out
        finally:
            await client.close()

    return asyncio.run(read())


def test_checkpoints_purge_the_streams_and_a_restart_keeps_everything(tmp_path: Path) -> None:
    """With a 1 s duplicate window and checkpoints every 0.5 s, the owners purge what their
    checkpoints cover (the streams' first sequence moves), and a kill -9 of every appliance
    then loses nothing: each restore starts from a checkpoint at or after the purge."""
    rng = np.random.default_rng(1616)
    ref = reference_store()
    symbols = [f"P{i:02d}" for i in range(16)]
    fast = {"APP_CLUSTER__DUPLICATE_WINDOW_S": "1", "APP_CLUSTER__CHECKPOINT_INTERVAL_S": "0.5"}
    with running_cluster(tmp_path, **fast) as (nats, servers):
        deadline = time.monotonic() + 60
        batch = 0
        while True:
            for i, symbol in enumerate(symbols):
                values = rng.uniform(0, 100, int(rng.integers(1, 50))).round(4)
                response = post(servers[(i + batch) % 3], symbol, values.tolist())
                assert response.status == 200, response
                ref.ingest(symbol, values)
            batch += 1
            time.sleep(0.3)
            sequences = stream_first_sequences(nats.urls)
            purged = [p for p, (first, last) in sequences.items() if first > 1 and last > 0]
            if batch >= 10 and len(purged) >= PARTITIONS // 2:
                break
            assert time.monotonic() < deadline, f"no purge after {batch} rounds: {sequences}"
        for server in servers:  # every appliance dies at once
            server.proc.kill()
            server.proc.wait()
        restarted = [start_node(tmp_path, node, nats.urls, **fast) for node in NODE_IDS]
        servers[:] = restarted
        for server in restarted:
            server.wait_ready(60)
        wait_stable(restarted)
        for server in restarted:
            for symbol in symbols:
                for exponent in (1, 3, 8):
                    response = server.stats(symbol, exponent)
                    assert response.status == 200, (symbol, response)
                    assert_same(response.json, ref.stats(symbol, exponent), f"{symbol}/{exponent}")
