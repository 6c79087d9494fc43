"""`hft-appliance publish` and `replay` run as a user runs them, against a real server.

Each command is a subprocess (`python -m appliance ...`) talking to a server subprocess over
its ZeroMQ or shared-memory endpoints; what arrived is read back over REST and compared with
numpy.
"""

from __future__ import annotations

import math
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_harness import Server, appliance_command, run_cli, running_server, subprocess_env

from tests.rdma import lab as rdma_lab
from tests.waiting import wait_until
from transport.shm.server import DEFAULT_DIRECTORY

ENV = {
    "APP_STORE__MAX_SYMBOLS": "100000",
    "APP_STORE__STARTING_CAPACITY": "1024",
    "APP_TRANSPORT__SHM__SLOTS": "64",
    "APP_TRANSPORT__SHM__SLOT_BYTES": "4096",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("publish-cli"), ENV) as srv:
        yield srv


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_stats_equal_numpy(server: Server, symbol: str, values: np.ndarray) -> None:
    exponent = max(1, math.ceil(math.log10(values.shape[0])))
    response = server.stats(symbol, exponent)
    assert response.status == 200, response.body
    got = response.json
    assert got["min"] == values.min()
    assert got["max"] == values.max()
    assert got["last"] == values[-1]
    assert got["avg"] == pytest.approx(values.mean(), rel=1e-12)
    assert got["var"] == pytest.approx(values.var(), rel=1e-9, abs=1e-12)


def cli(tmp_path: Path, command: str, *args: str, stdin: str | None = None):
    """`python -m appliance COMMAND ...` with no APP_* variables: endpoints come from the
    arguments or a --config file, as for a user on the same host."""
    return subprocess.run(
        appliance_command(command, *args),
        cwd=tmp_path,
        env=subprocess_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def publish(tmp_path: Path, server: Server, *args: str, stdin: str | None = None):
    return cli(tmp_path, "publish", *args, stdin=stdin)


@pytest.mark.parametrize("transport", ["zmq", "zmq-push", "shm"])
def test_publish_lands_in_the_store(tmp_path: Path, server: Server, transport: str) -> None:
    if transport == "shm" and not DEFAULT_DIRECTORY.is_dir():
        pytest.skip("needs /dev/shm")
    symbol = unique(transport)
    endpoint = server.pull_endpoint if transport == "zmq-push" else server.router_endpoint
    result = publish(
        tmp_path, server, "--transport", transport, "--endpoint", endpoint,
        "--control-endpoint", server.control_endpoint, symbol, "1.5", "2.25", "0", "7",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"published {symbol!r}: 4 values" in result.stdout
    if transport == "zmq-push":  # no acks: wait until the appliance has applied it
        wait_for_symbol(server, symbol)
    assert_stats_equal_numpy(server, symbol, np.array([1.5, 2.25, 0.0, 7.0]))
    if transport == "shm":  # a one-shot command releases its ring
        wait_until(lambda: server.ingest_counters()["shm"]["rings_open"] == 0, "ring release")


def wait_for_symbol(server: Server, symbol: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.stats(symbol, 1).status != 200:
        assert time.monotonic() < deadline, f"{symbol} never arrived"
        time.sleep(0.02)


def test_publish_reads_values_from_stdin(tmp_path: Path, server: Server) -> None:
    symbol = unique("stdin")
    values = np.random.default_rng(1).uniform(1.0, 2.0, 5000)
    text = "\n".join(repr(v) for v in values.tolist())
    endpoint = server.router_endpoint
    result = publish(tmp_path, server, "--endpoint", endpoint, symbol, "-", stdin=text)
    assert result.returncode == 0, result.stderr
    assert_stats_equal_numpy(server, symbol, values)


def test_a_rejected_publish_exits_1_and_changes_nothing(tmp_path: Path, server: Server) -> None:
    symbol = unique("neg")
    result = publish(tmp_path, server, "--endpoint", server.router_endpoint, symbol, "1", "-2")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "invalid_value" in lines[0]
    assert server.stats(symbol, 1).status == 404


def test_publish_without_an_appliance_fails_in_time(tmp_path: Path) -> None:
    dead = f"ipc://{tmp_path}/nobody.sock"
    result = run_cli(tmp_path, "publish", "--endpoint", dead, "--timeout", "1", "X", "1")
    assert result.returncode == 1
    assert "not acknowledged" in result.stderr or "accepted nothing" in result.stderr


def test_publish_over_rdma_without_rdma_here_says_what_is_missing(
    tmp_path: Path, server: Server
) -> None:
    missing = rdma_lab.missing()
    if missing is None:
        pytest.skip("RDMA works here: tests/rdma covers the publish command")
    control = ["--control-endpoint", server.control_endpoint]
    result = run_cli(tmp_path, "publish", "--transport", "rdma", *control, "X", "1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0], result.stderr


def replay(tmp_path: Path, server: Server, csv: Path, *args: str):
    endpoint = server.router_endpoint
    return cli(tmp_path, "replay", "--quiet", "--endpoint", endpoint, str(csv), *args)


def test_replay_long_layout_matches_numpy_per_symbol(tmp_path: Path, server: Server) -> None:
    rng = np.random.default_rng(2)
    symbols = [unique("long") for _ in range(3)]
    rows = [(symbols[i % 3], float(v)) for i, v in enumerate(rng.uniform(10, 20, 30_000))]
    csv = tmp_path / "ticks.csv"
    csv.write_text("symbol,value\n" + "".join(f"{s},{v!r}\n" for s, v in rows))
    result = replay(tmp_path, server, csv, "--batch", "777")
    assert result.returncode == 0, result.stderr
    assert "replayed ticks.csv: 30000 values" in result.stdout
    assert "values/s" in result.stdout
    for symbol in symbols:
        assert_stats_equal_numpy(server, symbol, np.array([v for s, v in rows if s == symbol]))


def test_replay_wide_layout_through_the_config_endpoint(tmp_path: Path, server: Server) -> None:
    a, b = unique("wideA"), unique("wideB")
    csv = tmp_path / "wide.csv"
    csv.write_text(f"{a},{b}\n1,10\n2,\n3,30\n,40\n")
    config = tmp_path / "client.toml"
    config.write_text(f'[transport.zmq]\nrouter_endpoint = "{server.router_endpoint}"\n')
    result = cli(tmp_path, "replay", "--quiet", "--config", str(config), str(csv))
    assert result.returncode == 0, result.stderr
    assert_stats_equal_numpy(server, a, np.array([1.0, 2.0, 3.0]))
    assert_stats_equal_numpy(server, b, np.array([10.0, 30.0, 40.0]))


def test_replay_stops_at_a_malformed_line_and_resumes_from_it(
    tmp_path: Path, server: Server
) -> None:
    """The rows before the bad line are all applied, none after; the message's --start-line
    then replays the rest of the fixed file: every row exactly once."""
    a, b = unique("resumeA"), unique("resumeB")
    rows = [(a if i % 3 else b, float(i)) for i in range(1, 41)]
    lines = [f"{symbol},{value!r}\n" for symbol, value in rows]
    bad = 25  # rows[25] is on line 27 (after the header)
    csv = tmp_path / "bad.csv"
    csv.write_text(
        "symbol,value\n" + "".join(lines[:bad]) + f"{a},oops\n" + "".join(lines[bad + 1 :])
    )
    result = replay(tmp_path, server, csv, "--batch", "4")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("hft-appliance replay: bad.csv:27: value: 'oops' is not a number;")
    assert f"{bad} values from the lines before it applied (last line applied: 26)" in message
    assert "resume with --start-line 27" in message
    for symbol in (a, b):
        assert_stats_equal_numpy(
            server, symbol, np.array([v for s, v in rows[:bad] if s == symbol])
        )
    csv.write_text("symbol,value\n" + "".join(lines))  # the row fixed
    result = replay(tmp_path, server, csv, "--batch", "4", "--start-line", "27")
    assert result.returncode == 0, result.stderr
    assert f"replayed bad.csv: {len(rows) - bad} values" in result.stdout
    for symbol in (a, b):
        assert_stats_equal_numpy(server, symbol, np.array([v for s, v in rows if s == symbol]))


def test_replay_skip_bad_rows_reports_each_and_applies_the_rest(
    tmp_path: Path, server: Server
) -> None:
    a, b = unique("skipA"), unique("skipB")
    csv = tmp_path / "wide.csv"
    csv.write_text(f"{a},{b}\n1,10\n2,x\n3,30\n4,40,99\n5,\n")
    result = replay(tmp_path, server, csv, "--skip-bad-rows")
    assert result.returncode == 0, result.stderr
    assert f"wide.csv:3: {b}: 'x' is not a number (row skipped)" in result.stderr
    assert "wide.csv:5: 3 cells but 2 columns (row skipped)" in result.stderr
    assert "2 bad rows skipped (lines 3, 5)" in result.stdout
    assert_stats_equal_numpy(server, a, np.array([1.0, 3.0, 5.0]))
    assert_stats_equal_numpy(server, b, np.array([10.0, 30.0]))
