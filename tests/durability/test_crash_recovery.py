"""The write-ahead log against a real server process: kill -9, torn tails, corruption, disk full.

Every server runs `python -m appliance serve` in its own directory (data/ is its own), with
`sync = always`, so an acknowledged batch is on disk before its 200.
"""

from __future__ import annotations

import http.client
import json
import random
import resource
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.durability import wal
from appliance.durability.records import BatchRecord
from tests.integration.server_harness import Server, run_cli
from tests.waiting import wait_until

ALWAYS = {
    "APP_DURABILITY__SYNC": "always",
    "APP_DURABILITY__CHECKPOINT_INTERVAL_S": "0",  # checkpoints only at a clean shutdown
    "APP_TRANSPORT__ZMQ__ENABLED": "false",
    "APP_STORE__STARTING_CAPACITY": "1024",
}


def start(cwd: Path, env: dict[str, str] | None = None) -> Server:
    server = Server(cwd, {**ALWAYS, **(env or {})})
    server.wait_ready()
    return server


def expected_stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"min": a.min(), "max": a.max(), "last": a[-1], "avg": a.mean(), "var": a.var()}


def assert_stats(server: Server, symbol: str, values: list[float]) -> None:
    response = server.stats(symbol, 8)
    assert response.status == 200, response
    got, want = response.json, expected_stats(values)
    assert got["min"] == want["min"] and got["max"] == want["max"] and got["last"] == want["last"]
    assert got["avg"] == pytest.approx(want["avg"], rel=1e-9)
    assert got["var"] == pytest.approx(want["var"], rel=1e-9, abs=1e-9)


def stats_match(server: Server, symbol: str, values: list[float]) -> bool:
    try:
        assert_stats(server, symbol, values)
    except AssertionError:
        return False
    return True


def kill9(server: Server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


@pytest.mark.parametrize("sync", ["always", "interval"])
def test_kill9_during_sustained_ingest_keeps_every_acknowledged_batch(tmp_path, sync) -> None:
    # `interval` acks before the fsync, but a process crash keeps what reached the OS: the
    # window it may lose is a power loss's, not a kill's.
    server = start(tmp_path, {"APP_DURABILITY__SYNC": sync})
    acked: dict[str, list[list[float]]] = {}
    in_flight: dict[str, list[float] | None] = {}
    stop = threading.Event()

    def client(k: int) -> None:
        symbol = f"S{k}"
        rng = random.Random(k)
        acked[symbol] = []
        while not stop.is_set():
            batch = [rng.random() * 100 for _ in range(rng.randint(1, 50))]
            in_flight[symbol] = batch
            try:
                response = server.post_batch(symbol, batch)
            except (OSError, http.client.HTTPException):
                return  # the server died under us: this batch may or may not be durable
            assert response.status == 200, response
            acked[symbol].append(batch)
            in_flight[symbol] = None

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    # Kill once every client has a history (a deadline, not a fixed sleep: CI may be loaded).
    wait_until(lambda: all(len(acked.get(f"S{k}", [])) > 10 for k in range(3)), "acked batches", 60)
    kill9(server)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert all(len(batches) > 10 for batches in acked.values()), acked.keys()

    server = start(tmp_path)
    try:
        for symbol, batches in acked.items():
            values = [v for batch in batches for v in batch]
            pending = in_flight.get(symbol)
            # The one batch in flight per client may have been logged before the kill.
            assert stats_match(server, symbol, values) or (
                pending is not None and stats_match(server, symbol, values + pending)
            ), symbol
    finally:
        assert server.stop() == 0


def publish_until_killed(tmp_path, env, connect, symbol: str, seed: int) -> None:
    """Publish random batches through `connect(server)`, each confirmed by `flush`, while the
    appliance is killed with SIGKILL after 1 s; after a restart every confirmed batch is there
    (and the one in flight may be)."""
    from transport.publisher import PublishError

    server = start(tmp_path, env)
    acked: list[list[float]] = []
    pending: list[float] | None = None
    rng = random.Random(seed)
    publisher = connect(server)
    killer = threading.Timer(1.0, kill9, args=(server,))
    killer.start()
    try:
        while True:
            pending = [rng.random() * 100 for _ in range(rng.randint(1, 50))]
            try:
                publisher.publish(symbol, pending)
                publisher.flush(timeout=5)  # returns once the appliance confirmed the frame
            except PublishError:
                break
            acked.append(pending)
            pending = None
    finally:
        killer.join()
        publisher.close()
    assert len(acked) > 10
    server = start(tmp_path, env)
    try:
        values = [v for batch in acked for v in batch]
        assert stats_match(server, symbol, values) or (
            pending is not None and stats_match(server, symbol, values + pending)
        )
    finally:
        assert server.stop() == 0


def test_kill9_during_zmq_dealer_ingest_keeps_every_acked_frame(tmp_path) -> None:
    from transport.zmq.publisher import ZmqPublisher

    def connect(server):  # flush returns once the appliance acked the frame
        return ZmqPublisher(server.router_endpoint, window=1, timeout_s=1, retry_interval_s=0.5)

    publish_until_killed(tmp_path, {"APP_TRANSPORT__ZMQ__ENABLED": "true"}, connect, "Z", 3)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_kill9_during_shm_ingest_with_the_log_on_keeps_every_applied_frame(tmp_path) -> None:
    # The ring's poller commits inline under `interval` (DurableWriter.commit on its own
    # thread): a frame whose slot the appliance passed (flush returned) is in the log.
    from transport.shm.publisher import ShmPublisher

    env = {
        "APP_DURABILITY__SYNC": "interval",
        "APP_TRANSPORT__ZMQ__ENABLED": "true",  # the control socket that hands out rings
        "APP_TRANSPORT__SHM__ENABLED": "true",
        "APP_TRANSPORT__SHM__SLOTS": "64",
        "APP_TRANSPORT__SHM__SLOT_BYTES": "4096",
    }

    def connect(server):  # flush returns once the appliance applied the frame
        return ShmPublisher(server.control_endpoint, timeout_s=1)

    publish_until_killed(tmp_path, env, connect, "RING", 5)


def _post_batches(server: Server, n: int) -> list[list[float]]:
    batches = [[float(i * 10 + j) for j in range(1, 11)] for i in range(n)]
    for batch in batches:
        assert server.post_batch("A", batch).status == 200
    return batches


def test_torn_tail_at_random_offsets_loses_only_the_torn_record(tmp_path) -> None:
    server = start(tmp_path)
    batches = _post_batches(server, 10)
    kill9(server)
    segment = wal.list_segments(wal.wal_dir(tmp_path / "data"))[-1]
    data = segment.read_bytes()
    record = len(data) // 10
    rng = random.Random(5)
    for cut in sorted({rng.randrange(len(data) - record + 1, len(data)) for _ in range(2)}):
        segment.write_bytes(data[:cut])
        server = start(tmp_path)
        try:
            assert_stats(server, "A", [v for b in batches[:9] for v in b])
            assert segment.stat().st_size == len(data) - record
            assert "torn write-ahead log tail truncated" in server.stdout()
        finally:
            kill9(server)


def test_flipped_byte_mid_log_refuses_to_start_until_fsck_repair(tmp_path) -> None:
    server = start(tmp_path)
    batches = _post_batches(server, 10)
    kill9(server)
    segment = wal.list_segments(wal.wal_dir(tmp_path / "data"))[-1]
    data = bytearray(segment.read_bytes())
    record = len(data) // 10
    data[3 * record + 100] ^= 0x10
    segment.write_bytes(bytes(data))

    result = run_cli(tmp_path, "serve", env=ALWAYS)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "corrupt write-ahead log record in data/wal/" in lines[0]
    assert f"{segment.name} at offset {3 * record}: CRC mismatch" in lines[0]
    assert 'run "hft-appliance fsck --repair"' in lines[0]

    check = run_cli(tmp_path, "fsck")
    assert check.returncode == 1 and f"corrupt at offset {3 * record}" in check.stdout
    repair = run_cli(tmp_path, "fsck", "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert len(list((tmp_path / "data" / "quarantine").iterdir())) == 1

    server = start(tmp_path)
    try:
        assert_stats(server, "A", [v for i, b in enumerate(batches) if i != 3 for v in b])
    finally:
        assert server.stop() == 0


def test_disk_full_answers_503_then_recovers_when_space_returns(tmp_path) -> None:
    server = start(tmp_path)
    try:
        acked = [[float(i) for i in range(1, 2001)]]  # a 16 KB record: bigger than the app log
        assert server.post_batch("A", acked[0]).status == 200
        segment = wal.list_segments(wal.wal_dir(tmp_path / "data"))[-1]
        size = segment.stat().st_size
        assert (tmp_path / "logs" / "app.log").stat().st_size < size
        _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
        # 40 bytes more: no record fits (the smallest is 72), a big one is cut mid-write
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (size + 40, hard))
        for _ in range(3):
            response = server.post_batch("A", [5.0] * 1000)
            assert response.status == 503, response
            assert response.json["code"] == "storage_unavailable"
            response = server.post_batch("NEW", [5.0])
            assert response.status == 503
        assert segment.stat().st_size == size  # the partial write was truncated away
        assert_stats(server, "A", acked[0])  # nothing applied
        assert server.stats("NEW", 1).status == 404
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        acked.append([7.0, 8.0])
        assert server.post_batch("A", acked[1]).status == 200
        assert server.post_batch("NEW", [1.5]).status == 200
    finally:
        kill9(server)
    server = start(tmp_path)
    try:
        assert_stats(server, "A", [v for b in acked for v in b])
        assert_stats(server, "NEW", [1.5])
    finally:
        assert server.stop() == 0


def test_clean_restart_keeps_data_and_the_next_lsn(tmp_path) -> None:
    server = start(tmp_path, {"APP_DURABILITY__SYNC": "interval"})
    batches = _post_batches(server, 5)
    assert server.stop() == 0
    server = start(tmp_path, {"APP_DURABILITY__SYNC": "interval"})
    try:
        extra = [1000.0, 2000.0]
        assert server.post_batch("A", extra).status == 200
        assert_stats(server, "A", [v for b in batches for v in b] + extra)
    finally:
        assert server.stop() == 0
    records = [
        r
        for p in wal.list_segments(wal.wal_dir(tmp_path / "data"))
        for _, r in wal.scan_segment(p).records
    ]
    assert [r.lsn for r in records] == list(range(1, 7))
    assert records[-1].first_index == 50
    assert json.loads(json.dumps(records[-1].values.tolist())) == [1000.0, 2000.0]


def write_long_log(data: Path, n: int) -> None:
    """n one-value records written directly: replaying them takes a while (about 10 us each)."""
    records = (
        wal.encode(BatchRecord(i, "R", i - 1, 0, 0, 0, np.array([float(i % 1000)])))
        for i in range(1, n + 1)
    )
    wal.wal_dir(data).mkdir(parents=True)
    (wal.wal_dir(data) / wal.segment_name(1)).write_bytes(b"".join(records))


def wait_for_replay(server: Server) -> None:
    """Until the server answers /ready with 503 (listening, the replay under way)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            response = server.request("GET", "/ready")
        except OSError:
            time.sleep(0.01)
            continue
        assert response.status == 503, "the replay ended before it could be observed"
        return
    raise AssertionError("the server never answered")


def test_sigterm_during_the_replay_stops_without_turning_ready(tmp_path) -> None:
    write_long_log(tmp_path / "data", 100_000)
    server = Server(tmp_path, ALWAYS)
    wait_for_replay(server)
    # The signal must come while the replay runs, not before the server installed its handlers.
    wait_until(lambda: "replaying the write-ahead log" in server.stdout(), "the replay", 30)
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 15
    assert '"appliance ready"' not in server.stdout()


def test_probes_are_503_and_data_requests_wait_while_the_log_replays(tmp_path) -> None:
    # 100k one-value records: a fraction of a second of replay, long enough to be seen outside.
    n = 100_000
    write_long_log(tmp_path / "data", n)
    server = Server(tmp_path, ALWAYS)
    try:
        wait_for_replay(server)
        health = server.request("GET", "/health")
        assert (health.status, health.json["code"]) == (503, "not_ready")
        assert health.json["status"] in ("starting", "replaying"), health.json
        assert server.request("GET", "/live").json == {"status": "ok"}
        # Sent during the replay: answered after it, with the log's values already in place.
        before_ready = time.monotonic()
        post = server.post_batch("R", [1.0])
        assert post.status == 200, post
        stats = server.stats("R", 8)
        assert stats.status == 200, stats
        assert server.request("GET", "/health").json == {"status": "ok"}
        assert time.monotonic() - before_ready < 30
        expected = [float(i % 1000) for i in range(1, n + 1)] + [1.0]
        assert_stats(server, "R", expected)
    finally:
        assert server.stop() == 0


def test_transport_batches_are_logged_with_publisher_id_and_sequence(tmp_path) -> None:
    from transport.zmq.publisher import ZmqPublisher

    server = start(tmp_path, {"APP_TRANSPORT__ZMQ__ENABLED": "true"})
    try:
        with ZmqPublisher(server.router_endpoint, publisher_id=4242) as publisher:
            publisher.publish("ORIGIN", [1.0, 2.0])
            publisher.publish("ORIGIN", [3.0])
        assert server.post_batch("ORIGIN", [4.0]).status == 200
    finally:
        assert server.stop() == 0
    records = [
        record
        for segment in wal.list_segments(wal.wal_dir(tmp_path / "data"))
        for _offset, record in wal.scan_segment(segment).records
    ]
    assert [(r.publisher_id, r.sequence, r.values.tolist()) for r in records] == [
        (4242, 1, [1.0, 2.0]),
        (4242, 2, [3.0]),
        (0, 0, [4.0]),
    ]


def test_a_frame_logged_before_kill9_is_a_duplicate_when_resent_after_restart(tmp_path) -> None:
    import zmq

    from transport.wire import Kind, Reason, decode_message, encode_data

    def send(dealer: zmq.Socket, sequence: int, value: float, first: bool = False):
        dealer.send(encode_data(555, sequence, "RESENT", np.array([value]), first=first))
        assert dealer.poll(10_000), "no reply"
        (frame,) = decode_message(dealer.recv())
        return frame.kind, frame.reason, frame.applied

    env = {"APP_TRANSPORT__ZMQ__ENABLED": "true"}
    server = start(tmp_path, env)
    context = zmq.Context()
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.connect(server.router_endpoint)
        assert send(dealer, 1, 1.0, first=True) == (Kind.ACK, Reason.NONE, 1)
        assert send(dealer, 2, 2.0) == (Kind.ACK, Reason.NONE, 2)
        dealer.close(linger=0)
        kill9(server)  # as if frame 2's ack had been lost with the process

        server = start(tmp_path, env)
        dealer = context.socket(zmq.DEALER)
        dealer.connect(server.router_endpoint)
        # The publisher resends its unacked frame 2 (no FIRST): the log says it is in, so it is
        # acked as a duplicate (not UNKNOWN_PUBLISHER, not applied again).
        assert send(dealer, 2, 2.0) == (Kind.ACK, Reason.NONE, 2)
        assert server.ingest_counters()["zmq"]["router"]["rejected"] == {"duplicate": 1}
        assert send(dealer, 3, 3.0) == (Kind.ACK, Reason.NONE, 3)
        dealer.close(linger=0)
        assert_stats(server, "RESENT", [1.0, 2.0, 3.0])  # frame 2 applied once
    finally:
        context.destroy(linger=0)  # closes any socket an assertion left open
        assert server.stop() == 0
