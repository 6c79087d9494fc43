"""Shared-memory ingest end to end (SPEC section 7): a real server, rings over its control socket.

ShmPublisher asks the server's ZeroMQ control socket for a ring (`shm.open`), maps it and
publishes; what arrived is read back over REST (GET /stats, compared with numpy) and the
transport's counters over GET /ingest. One server per xdist worker serves the module (unique
symbols and publisher ids); the shutdown test gets its own.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_harness import Server, running_server

from tests.waiting import wait_until
from transport.publisher import PublishError, Rejection, new_publisher_id
from transport.shm.publisher import ShmPublisher
from transport.shm.server import DEFAULT_DIRECTORY, NAME_PREFIX
from transport.wire import Reason

pytestmark = pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")

SHM_ENV = {
    "APP_STORE__MAX_SYMBOLS": "100000",
    "APP_STORE__STARTING_CAPACITY": "1024",
    "APP_TRANSPORT__SHM__ENABLED": "true",
    "APP_TRANSPORT__SHM__SLOTS": "64",
    "APP_TRANSPORT__SHM__SLOT_BYTES": "4096",
    "APP_TRANSPORT__SHM__MAX_SLOTS": "1024",
    "APP_TRANSPORT__SHM__MAX_SLOT_BYTES": "65536",
    "APP_TRANSPORT__SHM__MAX_RINGS": "8",
}
TIMEOUT_S = 20.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def ring_files(server: Server) -> list[Path]:
    return sorted(DEFAULT_DIRECTORY.glob(f"{NAME_PREFIX}{server.proc.pid}-*"))


@pytest.fixture(scope="module")
def sserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("shm"), SHM_ENV) as server:
        assert server.control_endpoint
        yield server
    assert ring_files(server) == []  # SIGTERM: every ring unlinked


def publisher(server: Server, **kwargs: Any) -> ShmPublisher:
    return ShmPublisher(server.control_endpoint, timeout_s=TIMEOUT_S, **kwargs)


def assert_stats_equal_numpy(server: Server, symbol: str, values: np.ndarray) -> None:
    for exponent in range(1, int(np.ceil(np.log10(values.size))) + 1):
        window = values[-(10**exponent) :]
        response = server.stats(symbol, exponent)
        assert response.status == 200, response
        body = response.json
        assert (body["min"], body["max"], body["last"]) == (
            window.min(), window.max(), window[-1],
        ), exponent  # fmt: skip
        assert body["avg"] == pytest.approx(window.mean(), rel=1e-9)
        assert body["var"] == pytest.approx(window.var(), rel=1e-9, abs=1e-12)


def shm_counters(server: Server) -> dict[str, Any]:
    return server.ingest_counters()["shm"]


def test_shm_publisher_stats_equal_numpy(sserver: Server) -> None:
    rng = np.random.default_rng(3)
    symbols = {unique("SHM-A"): [], unique("SHM-B"): []}
    # 16 slots of 1 KiB: 5000 batches lap the ring hundreds of times, the larger ones split.
    with publisher(sserver, slots=16, slot_bytes=1024) as pub:
        assert pub.slots == 16 and pub.max_frame_bytes == 1024 - 16
        for i in range(5000):
            symbol = list(symbols)[i % 2]
            values = rng.uniform(10.0, 500.0, 1 + (i * 37) % 250)
            pub.publish(symbol, values)
            symbols[symbol].append(values)
        pub.flush()
        assert pub.frames_sent > 5000 and pub.consumer_position == pub.producer_position
        ring = shm_counters(sserver)["rings"][str(pub.publisher_id)]
        assert ring["frames_applied"] == pub.frames_sent
        assert ring["values_applied"] == pub.values_sent
        assert ring["rejected"] == {}
    for symbol, batches in symbols.items():
        assert_stats_equal_numpy(sserver, symbol, np.concatenate(batches))


def test_rejections_come_back_through_flush(sserver: Server) -> None:
    good, bad_value = unique("SHM-OK"), unique("SHM-NEG")
    with publisher(sserver) as pub:
        pub.publish(good, [1.0, 2.0])
        negative = pub.publish(bad_value, [3.0, -1.0])
        control = pub.publish("BAD\x07SYM", [1.0])
        pub.publish(good, [3.0])
        with pytest.raises(PublishError) as caught:
            pub.flush()
        assert caught.value.rejections == [
            Rejection(negative, bad_value, Reason.INVALID_VALUE),
            Rejection(control, "BAD\x07SYM", Reason.INVALID_SYMBOL),
        ]
    assert_stats_equal_numpy(sserver, good, np.array([1.0, 2.0, 3.0]))
    assert sserver.stats(bad_value, 1).status == 404  # all or nothing: no symbol created


def test_two_publishers_on_two_rings(sserver: Server) -> None:
    names = [unique("SHM-T1"), unique("SHM-T2")]
    data = {name: np.random.default_rng(i).uniform(0.0, 1e3, 20_000) for i, name in
            enumerate(names)}  # fmt: skip
    rings: list[str] = []
    errors: list[BaseException] = []

    def run(symbol: str) -> None:
        try:
            with publisher(sserver, slots=8, slot_bytes=512) as pub:
                rings.append(pub.ring_name)
                for start in range(0, 20_000, 100):
                    pub.publish(symbol, data[symbol][start : start + 100])
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert len(set(rings)) == 2
    for name in names:
        assert_stats_equal_numpy(sserver, name, data[name])


def test_release_closes_the_ring_and_reattach_continues(sserver: Server) -> None:
    symbol, publisher_id = unique("SHM-RE"), new_publisher_id()
    first = publisher(sserver, publisher_id=publisher_id, slots=32)
    first.publish(symbol, [5.0])
    first.flush()
    path = first.ring_path
    first.close(release=False)  # detached, the ring stays for a restarted publisher
    assert path.exists()
    second = publisher(sserver, publisher_id=publisher_id, secret=first.secret)
    assert second.ring_path == path and second.last_sequence == 1
    second.publish(symbol, [7.0])
    second.flush()
    second.close(release=True)
    assert str(publisher_id) not in shm_counters(sserver)["rings"]
    # shm.close hands the ring to the poller, which drains, unmaps and unlinks it next pass.
    wait_until(lambda: not path.exists(), "the ring file to be unlinked")
    assert_stats_equal_numpy(sserver, symbol, np.array([5.0, 7.0]))


def test_open_refusals_are_reported(sserver: Server) -> None:
    with pytest.raises(PublishError, match=r"shm.open refused: slots must be in 2\.\.1024"):
        publisher(sserver, slots=2048)
    with pytest.raises(PublishError, match="multiple of 64"):
        publisher(sserver, slot_bytes=1000)


def test_stop_applies_pending_frames_and_unlinks(tmp_path: Path) -> None:
    symbol = unique("SHM-STOP")
    with running_server(tmp_path / "srv", SHM_ENV) as server:
        pub = publisher(server, slots=64)
        for i in range(50):
            pub.publish(symbol, [float(i)])
        pub.flush()
        assert len(ring_files(server)) == 1
        assert_stats_equal_numpy(server, symbol, np.arange(50.0))
        assert server.stop() == 0
        assert ring_files(server) == []
        with pytest.raises(PublishError, match="closed ring"):
            pub.publish(symbol, [1.0])
        pub.close()
