"""RDMA ingest through a real appliance process: `hft-appliance serve` with
transport.rdma.enabled = "required" on the lab's server device, publishers on the other device,
results read back over REST and compared with numpy, as a user would run it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.integration.server_harness import REPO_ROOT, Server, running_server, subprocess_env
from tests.rdma.lab import Lab
from tests.waiting import wait_until
from transport.publishers import connect

pytestmark = pytest.mark.rdma


@pytest.fixture
def server(lab: Lab, tmp_path: Path) -> Iterator[Server]:
    env = {
        "APP_TRANSPORT__RDMA__ENABLED": "required",
        "APP_TRANSPORT__RDMA__DEVICE": lab.server_device,
        "APP_TRANSPORT__RDMA__GID_INDEX": str(lab.gid_index),
        "APP_TRANSPORT__RDMA__SLOTS": "16",
        "APP_TRANSPORT__RDMA__SLOT_BYTES": "1024",
        "APP_TRANSPORT__SHM__ENABLED": "false",
        # The lab's guest runs on an emulated CPU (qemu TCG), where numba's first compile of
        # the `cpu` engine's kernels takes minutes; these tests are about the transport, and
        # the engines are tested against each other on the host.
        "APP_ENGINE__BACKEND": "numpy",
    }
    with running_server(tmp_path / "appliance", env) as running:
        yield running


def rdma_publisher(lab: Lab, server: Server, **options: object):
    return connect("rdma", control_endpoint=server.control_endpoint, device=lab.client_device,
                   gid_index=lab.gid_index, **options)  # fmt: skip


def assert_stats_match(server: Server, symbol: str, values: np.ndarray) -> None:
    for exponent in (1, 2, 3):
        window = values[-(10**exponent) :]
        got = server.stats(symbol, exponent).json
        assert (got["min"], got["max"], got["last"]) == (window.min(), window.max(), window[-1])
        assert got["avg"] == pytest.approx(window.mean(), rel=1e-12)
        assert got["var"] == pytest.approx(window.var(), rel=1e-9)


def test_thousands_of_frames_reach_the_store_and_rest_agrees_with_numpy(
    lab: Lab, server: Server
) -> None:
    rng = np.random.default_rng(11)
    sent = []
    with rdma_publisher(lab, server) as pub:
        for _ in range(3000):
            values = 100 + rng.random(int(rng.integers(1, 60)))
            pub.publish("RDMA/USD", values)
            sent.append(values)
    values = np.concatenate(sent)
    assert_stats_match(server, "RDMA/USD", values)
    counters = server.ingest_counters()["rdma"]
    assert counters["totals"]["values_applied"] == values.size
    assert counters["totals"]["frames_applied"] >= 3000
    ring = next(iter(counters["rings"].values()))
    assert ring["consumer_position"] > 100 * ring["slots"]  # many wraparounds


PUBLISH_FOREVER = textwrap.dedent(
    """
    import sys
    from transport.publishers import connect
    control, device, gid_index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with connect("rdma", control_endpoint=control, device=device, gid_index=gid_index) as pub:
        value = 0.0
        while True:
            value += 1.0
            pub.publish("DOOMED", [value])
    """
)


def test_a_publisher_killed_mid_stream_stops_nothing_else(lab: Lab, server: Server) -> None:
    doomed = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_FOREVER, server.control_endpoint, lab.client_device,
         str(lab.gid_index)],
        env=subprocess_env(), cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        wait_until(
            lambda: server.stats("DOOMED", 1).status == 200, "the doomed publisher", timeout_s=60
        )
    finally:
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait()
    values = np.arange(1.0, 2001.0)
    with rdma_publisher(lab, server) as survivor:
        for start in range(0, values.size, 100):
            survivor.publish("SURVIVOR", values[start : start + 100])
    assert server.request("GET", "/health").status == 200
    assert_stats_match(server, "SURVIVOR", values)
    # What the killed publisher got in is whole and in order: 1, 2, 3, ... with no hole.
    doomed_last = server.stats("DOOMED", 1).json["last"]
    doomed_window = server.stats("DOOMED", 3).json
    assert doomed_window["max"] == doomed_last
    assert doomed_window["min"] == max(1.0, doomed_last - 999)


def test_the_publish_command_speaks_rdma(lab: Lab, server: Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "publish", "--transport", "rdma",
         "--control-endpoint", server.control_endpoint, "--rdma-device", lab.client_device,
         "--gid-index", str(lab.gid_index), "CLI/RDMA", "3.5", "1.25", "2.0"],
        env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = server.stats("CLI/RDMA", 1).json
    assert (got["min"], got["max"], got["last"]) == (1.25, 3.5, 2.0)
    # A one-shot publisher releases its ring.
    assert server.ingest_counters()["rdma"]["rings_open"] == 0
