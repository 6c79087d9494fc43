"""The loopback NATS cluster launcher (appliance/cluster/local.py) against real nats-server.

Three nodes, a JetStream stream with replicas=3: a publish is acked and reads back; with one
node killed (SIGKILL) publishing still works (2 of 3 is a quorum); the node restarted with the
same store dir rejoins and its replica catches up to the stream's last sequence.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError

from appliance.cluster.local import NatsCluster, NatsLauncherError, ports_in_use

REPO_ROOT = Path(__file__).resolve().parents[2]


STREAM = "T_LAUNCHER"
SUBJECT = "t.launcher"


async def _publish(urls: list[str], payloads: list[bytes], retry_s: float = 20.0) -> list[int]:
    """Publish each payload with a message id, retrying until acked, as a cluster client must.

    Right after a node is killed the streams it led have no leader for a moment (an election:
    "no responders" / timeout). A retry with the same Nats-Msg-Id is a duplicate within the
    stream's duplicate window, never a second append, so the sequences below must be contiguous.
    """
    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=20)
    try:
        js = nc.jetstream(timeout=2)
        seqs = []
        for p in payloads:
            deadline = time.monotonic() + retry_s
            while True:
                try:
                    ack = await js.publish(
                        SUBJECT, p, stream=STREAM, headers={"Nats-Msg-Id": p.hex()}
                    )
                    break
                except (NoRespondersError, nats.errors.TimeoutError, NoStreamResponseError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            seqs.append(ack.seq)
        return seqs
    finally:
        await nc.close()


async def _create_and_roundtrip(urls: list[str]) -> tuple[list[int], bytes, int]:
    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.add_stream(
            StreamConfig(name=STREAM, subjects=[SUBJECT], num_replicas=3, storage=StorageType.FILE)
        )
    finally:
        await nc.close()
    # A new R3 stream answers once its leader is elected and its subject's interest has reached
    # every server: until then a publish may meet "no responders" (seen in CI), so retry it.
    seqs = await _publish(urls, [f"m{i}".encode() for i in range(5)])
    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        msg = await nc.jetstream(timeout=10).get_msg(STREAM, 3)
        return seqs, msg.data or b"", len(info.cluster.replicas or []) + 1
    finally:
        await nc.close()


async def _stream_state(urls: list[str]) -> tuple[int, list[tuple[str, bool, int]]]:
    """(last sequence, [(replica name, current, lag)]) as the stream leader reports them."""
    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        info = await nc.jetstream(timeout=10).stream_info(STREAM)
        replicas = [(r.name, bool(r.current), r.lag or 0) for r in info.cluster.replicas or []]
        replicas.append((info.cluster.leader or "", True, 0))
        return info.state.last_seq, replicas
    finally:
        await nc.close()


def test_three_nodes_replicated_stream_survives_a_killed_node(tmp_path: Path) -> None:
    with NatsCluster(tmp_path, nodes=3) as cluster:
        assert [s.name for s in cluster.specs] == ["n1", "n2", "n3"]
        assert len(set(cluster.urls)) == 3
        seqs, third, copies = asyncio.run(_create_and_roundtrip(cluster.urls))
        assert seqs == [1, 2, 3, 4, 5]
        assert third == b"m2"
        assert copies == 3, "leader + 2 followers"

        cluster.kill(1)
        assert not cluster.is_running(1)
        live = [u for i, u in enumerate(cluster.urls) if i != 1]
        more = asyncio.run(_publish(live, [f"k{i}".encode() for i in range(20)]))
        assert more == list(range(6, 26)), "2 of 3 replicas are a quorum: acks continue"

        cluster.restart(1)
        assert cluster.is_running(1)
        # The restarted replica catches up from the leader; poll (no bare sleep) until current.
        deadline_s = 30.0
        t0 = time.monotonic()
        while True:
            last, replicas = asyncio.run(_stream_state(cluster.urls))
            n2 = [r for r in replicas if r[0] == "n2"]
            if n2 and n2[0][1] and n2[0][2] == 0:
                break
            assert time.monotonic() - t0 < deadline_s, f"n2 never caught up: {replicas}"
            time.sleep(0.1)
        assert last == 25
        # And the restarted node serves clients itself.
        assert asyncio.run(_publish([cluster.urls[1]], [b"after"])) == [26]
    assert not any(cluster.is_running(i) for i in range(3)), "stop() leaves no process"


def test_single_node_needs_no_routes(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, nodes=1)
    assert "--routes" not in cluster._argv(0)
    assert "--jetstream" in cluster._argv(0)
    with cluster:
        assert cluster.is_running(0)


def test_bad_node_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nodes must be 1\.\.9"):
        NatsCluster(tmp_path, nodes=0)


def test_a_node_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, nodes=1)
    cluster._argv = lambda i: [cluster.binary, "--no-such-flag"]  # type: ignore[method-assign]
    with pytest.raises(NatsLauncherError, match="exited"), cluster:
        pass


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The launcher as `./dev.sh cluster` runs it: a process that exits, leaving the servers."""
    return subprocess.run(
        [sys.executable, "-m", "appliance.cluster.local", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )


def test_up_status_down_command_line(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    up = _cli("up", "--nodes", "3", "--dir", state)
    assert up.returncode == 0, up.stderr
    try:
        (line,) = [x for x in up.stdout.splitlines() if x.startswith("NATS: ")]
        urls = line.removeprefix("NATS: ").split(",")
        assert len(urls) == 3 and all(u.startswith("nats://127.0.0.1:") for u in urls)
        again = _cli("up", "--dir", state)
        assert again.returncode == 1 and "already up" in again.stderr
        status = _cli("status", "--dir", state)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count(" up ") == 3
        assert asyncio.run(_ping(urls)) is True
    finally:
        down = _cli("down", "--dir", state)
    assert down.returncode == 0 and "3 nats-server" in down.stdout
    after = _cli("status", "--dir", state)
    assert after.returncode == 1, "state file removed by down"


async def _ping(urls: list[str]) -> bool:
    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        await nc.flush(timeout=2)
        return nc.is_connected
    finally:
        await nc.close()


def _free_block(width: int) -> int:
    """A first port p with p .. p + width - 1 all free on loopback (random, rechecked)."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20_000, 32_000)  # below the ephemeral range (32768+)
        if not ports_in_use(list(range(first, first + width))):
            return first
    raise AssertionError("no free block of ports")


def _http(method: str, url: str, body: dict[str, object] | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_demo_up_starts_appliance_nodes_that_answer_for_each_other(tmp_path: Path) -> None:
    """The README's demo: `up --appliances 2`, a batch to node1, its statistics from node2."""
    state = str(tmp_path / "demo")
    rest, zmq = _free_block(2), _free_block(13)
    up = _cli(
        "up", "--appliances", "2", "--first-port", str(rest), "--zmq-first-port", str(zmq),
        "--dir", state, "--timeout-s", "60",
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert f"node2: http://127.0.0.1:{rest + 1}" in up.stdout
        values = [1.5, 2.5, 3.5, 4.5]
        for i in range(6):  # six symbols: partitions owned by both nodes
            status, body = _http(
                "POST", f"http://127.0.0.1:{rest}/add_batch/", {"symbol": f"D{i}", "values": values}
            )
            assert status == 200, body
        for i in range(6):
            status, stats = _http(
                "GET", f"http://127.0.0.1:{rest + 1}/stats/?symbol=D{i}&exponent=1"
            )
            assert status == 200, stats
            assert stats == {"min": 1.5, "max": 4.5, "last": 4.5, "avg": 3.0, "var": 1.25}
        status_out = _cli("status", "--dir", state)
        assert status_out.returncode == 0, status_out.stdout
        assert status_out.stdout.count("/health 200") == 2
    finally:
        down = _cli("down", "--dir", state)
    assert down.returncode == 0
    assert "stopped 2 appliance node(s) and 3 nats-server" in down.stdout
    assert ports_in_use([rest, rest + 1]) == [], "the nodes are gone"
