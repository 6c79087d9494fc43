"""Many concurrent writers (threads, separate connections) on one symbol and on many symbols.

Batches are constant-valued and all of the same length L = 10, so the series is a sequence of
whole batches exactly when no batch is torn: then the last 10 values (exponent 1) always come
from a single batch and have min == max, which readers polling during the writes check.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from server_harness import Server

BATCH = 10


def _write_batches(server: Server, symbol: str, batch_values: list[float]) -> None:
    for value in batch_values:
        response = server.post_batch(symbol, [value] * BATCH)
        assert response.status == 200, response.body


def test_concurrent_writers_on_one_symbol_never_tear_a_batch(server: Server) -> None:
    symbol = f"ONE-{uuid.uuid4().hex[:8]}"
    writers, per_writer = 8, 25
    plan = [[float(w * 1000 + i + 1) for i in range(per_writer)] for w in range(writers)]
    stop = threading.Event()
    torn: list[dict] = []

    def poll() -> None:
        while not stop.is_set():
            response = server.stats(symbol, 1)
            if response.status == 200 and response.json["min"] != response.json["max"]:
                torn.append(response.json)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(lambda values: _write_batches(server, symbol, values), plan))
    finally:
        stop.set()
        poller.join()
    assert torn == []
    everything = np.repeat(np.array(plan, dtype=np.float64).ravel(), BATCH)
    final = server.stats(symbol, 8).json
    assert final["min"] == everything.min()
    assert final["max"] == everything.max()
    assert final["avg"] == pytest.approx(everything.mean(), rel=1e-9)
    assert final["var"] == pytest.approx(everything.var(), rel=1e-9)
    assert final["last"] in {float(v) for v in everything}
    last10 = server.stats(symbol, 1).json
    assert last10["min"] == last10["max"] == final["last"]


def test_concurrent_writers_on_many_symbols_match_numpy(server: Server) -> None:
    symbols = [f"MANY-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    rng = np.random.default_rng(11)
    series = {s: rng.uniform(1.0, 500.0, size=(20, 50)).round(4) for s in symbols}

    def write(symbol: str) -> None:
        for batch in series[symbol]:
            assert server.post_batch(symbol, batch.tolist()).status == 200

    with ThreadPoolExecutor(len(symbols)) as pool:
        list(pool.map(write, symbols))
    for symbol, batches in series.items():
        values = batches.ravel()
        for exponent in (1, 2, 3):
            window = values[-min(10**exponent, values.size) :]
            body = server.stats(symbol, exponent).json
            assert body["min"] == window.min()
            assert body["max"] == window.max()
            assert body["last"] == window[-1]
            assert body["avg"] == pytest.approx(window.mean(), rel=1e-9)
            assert body["var"] == pytest.approx(window.var(), rel=1e-9)
