"""The warm tier in a real server: history spans evicted values and survives a restart/kill -9."""

from __future__ import annotations

import signal
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from appliance.durability.warm import symbol_key
from tests.integration.server_harness import Server, running_server

ENV = {
    "APP_DURABILITY__WARM_SEGMENT_VALUES": "100",
    "APP_DURABILITY__SYNC": "always",
    "APP_STORE__MAX_DATA_RETENTION": "150",  # the hot tier evicts most of the history
    "APP_STORE__CLEANUP_KEEP_COUNT": "100",
}


def _history(server: Server, **params: str) -> dict:
    response = server.request("GET", "/history/stats?" + urlencode(params))
    assert response.status == 200, response
    return response.json


def test_history_across_evictions_restart_and_kill(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    batches = [np.round(rng.uniform(100, 200, 37), 6) for _ in range(20)]  # 740 values
    everything = np.concatenate(batches)
    with running_server(tmp_path, ENV) as server:
        for batch in batches:
            assert server.post_batch("EUR/USD", batch.tolist()).status == 200
        (row,) = server.request("GET", "/symbols").json["symbols"]
        assert row["symbol"] == "EUR/USD" and row["total"] == 740 and row["hot"] <= 150
        body = _history(server, symbol="EUR/USD", start="10", end="700")
        assert body["count"] == 690 and body["first"] == everything[10]
        assert body["var"] == pytest.approx(everything[10:700].var(), rel=1e-9)
        assert server.stop() == 0
    segments = sorted((tmp_path / "data" / "warm" / symbol_key("EUR/USD")).glob("*.seg"))
    assert len(segments) == 7
    with running_server(tmp_path, ENV) as server:
        body = _history(server, symbol="EUR/USD")
        assert (body["count"], body["last"]) == (740, everything[-1])  # the tail came from the log
        assert server.post_batch("EUR/USD", [1.0, 2.0]).status == 200
        server.stop(signal.SIGKILL)
    with running_server(tmp_path, ENV) as server:
        body = _history(server, symbol="EUR/USD", start="735")
        assert body["count"] == 7 and body["last"] == 2.0
        assert body["avg"] == pytest.approx(np.append(everything[735:], [1.0, 2.0]).mean())
