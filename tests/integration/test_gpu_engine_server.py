"""The GPU engine's code behind the real server: REST and batch queries over a real socket,
and the write-ahead log replayed into it after a restart (CPU build of the kernels); on the
plain CuPy engine and on the hybrid engine (batches on device mirrors, the rest on the host)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from server_harness import REPO_ROOT, Server

SERVE = [sys.executable, str(REPO_ROOT / "tests/integration/serve_emulated_gpu.py")]


@pytest.fixture(params=["cupy", "hybrid"])
def gpu_server(request, tmp_path: Path):
    if shutil.which("g++") is None:
        pytest.skip("gpu-emulated: g++ not found (apt install g++)")
    command = SERVE + (["--hybrid"] if request.param == "hybrid" else [])
    server = Server(tmp_path, command=command)
    server.engine_name = request.param
    server.serve_command = command
    try:
        server.wait_ready(timeout_s=60)
        yield server
    finally:
        server.stop()


def batch_stats(server: Server, queries: list[tuple[str, int]]) -> list[dict]:
    body = json.dumps({"queries": [{"symbol": s, "exponent": k} for s, k in queries]}).encode()
    response = server.request("POST", "/stats/batch", body, {"Content-Type": "application/json"})
    assert response.status == 200, response.body
    return response.json["results"]


def assert_matches(answer: dict, values: np.ndarray) -> None:
    assert answer["min"] == values.min() and answer["max"] == values.max()
    assert answer["last"] == values[-1]
    assert answer["avg"] == pytest.approx(values.mean(), rel=1e-12)
    assert answer["var"] == pytest.approx(values.var(), rel=1e-9, abs=1e-12)


def test_rest_and_batch_queries_on_the_gpu_engine_survive_a_restart(gpu_server: Server):
    rng = np.random.default_rng(9)
    sent = {"EUR/USD": [], "AAPL": []}
    for i in range(30):
        for symbol in sent:
            values = np.round(rng.uniform(1, 200, 1 + 37 * i % 300), 6)
            assert gpu_server.post_batch(symbol, values.tolist()).status == 200
            sent[symbol].append(values)
    series = {symbol: np.concatenate(parts) for symbol, parts in sent.items()}
    queries = [(symbol, k) for symbol in series for k in (1, 2, 3, 4)]

    def check(server: Server) -> None:
        for (symbol, k), answer in zip(queries, batch_stats(server, queries), strict=True):
            assert_matches(answer, series[symbol][-(10**k) :])
            single = server.stats(symbol, k)
            assert single.status == 200 and single.json == answer

    # the start line names the engine
    assert f'"engine": "{gpu_server.engine_name}"' in gpu_server.stdout()
    check(gpu_server)
    assert batch_stats(gpu_server, [("NOPE", 1)])[0]["code"] == "unknown_symbol"
    gpu_server.stop()
    # same data directory: WAL replay
    restarted = Server(gpu_server.cwd, command=gpu_server.serve_command)
    try:
        restarted.wait_ready(timeout_s=60)
        check(restarted)
    finally:
        restarted.stop()
