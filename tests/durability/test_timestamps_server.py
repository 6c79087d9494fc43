"""Event timestamps in a real server across kill -9 and a clean restart: the log's timestamped
records replay into the same time marks, so GET /history/stats?by=time answers the same.

The timestamped batches are written into the log before the first start (the server then
replays them exactly as if a publisher had sent them), since this branch's REST route does not
take timestamps yet; the batches posted afterwards have receive times.
"""

from __future__ import annotations

import signal
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from appliance.durability import wal
from appliance.durability.records import BatchRecord
from tests.integration.server_harness import Server, running_server

ENV = {
    "APP_DURABILITY__WARM_SEGMENT_VALUES": "100",  # sealed segments from timestamped records
    "APP_DURABILITY__SYNC": "always",
    "APP_DURABILITY__CHECKPOINT_INTERVAL_S": "0",  # a checkpoint only at a clean stop
    "APP_STORE__MAX_DATA_RETENTION": "150",
    "APP_STORE__CLEANUP_KEEP_COUNT": "100",
    "APP_TRANSPORT__ZMQ__ENABLED": "false",
}
T0 = 1_700_000_000_000_000_000
SYMBOL = "EV"


def write_event_log(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Ten 30-value records with event times in runs of three (one record without times,
    received behind the newest: its values take the newest time); all values and times."""
    rng = np.random.default_rng(8)
    records, values, times = [], [], []
    newest = T0
    for i in range(10):
        batch = np.round(rng.uniform(100, 200, 30), 6)
        if i == 4:
            stamps, logged = np.full(30, newest, np.int64), None
        else:
            stamps = T0 + (i * 30 + np.arange(30, dtype=np.int64)) // 3 * 1_000
            newest = int(stamps[-1])
            logged = stamps
        records.append(BatchRecord(i + 1, SYMBOL, 30 * i, T0 - 5, 0, 0, batch, logged))
        values.append(batch)
        times.append(stamps)
    wal.wal_dir(data).mkdir(parents=True)
    (wal.wal_dir(data) / wal.segment_name(1)).write_bytes(b"".join(map(wal.encode, records)))
    return np.concatenate(values), np.concatenate(times)


def history(server: Server, **params: str) -> dict:
    response = server.request("GET", "/history/stats?" + urlencode(params))
    assert response.status == 200, response
    return response.json


RANGES = [(T0, T0 + 1), (T0 + 5_000, T0 + 41_000), (T0 + 60_000, T0 + 99_000), (T0 - 1, None)]


def answers(server: Server) -> list[dict]:
    out = []
    for start, end in RANGES:
        params = {"symbol": SYMBOL, "by": "time", "start": str(start)}
        if end is not None:
            params["end"] = str(end)
        out.append(history(server, **params))
    return out


def same(got: list[dict], want: list[dict]) -> bool:
    """Equal answers; the mean and variance to the last bits only (the sealed/unsealed split,
    so the order of combining, may differ after a restart)."""
    exact = [{k: v for k, v in a.items() if k not in ("avg", "var")} for a in got]
    if exact != [{k: v for k, v in a.items() if k not in ("avg", "var")} for a in want]:
        return False
    return all(
        a[k] == pytest.approx(b[k], rel=1e-12) for a, b in zip(got, want, strict=True)
        for k in ("avg", "var")
    )  # fmt: skip


def test_event_times_survive_kill9_and_a_clean_restart(tmp_path: Path) -> None:
    values, times = write_event_log(tmp_path / "data")
    with running_server(tmp_path, ENV) as server:
        for start, end in RANGES[:3]:
            chosen = (times >= start) & (times < end)
            body = history(server, symbol=SYMBOL, by="time", start=str(start), end=str(end))
            x = values[chosen]
            assert body["count"] == x.shape[0] and (body["min"], body["max"]) == (x.min(), x.max())
            assert (body["first"], body["last"]) == (x[0], x[-1])
            assert body["avg"] == pytest.approx(x.mean(), rel=1e-12)
            picked = times[chosen]
            assert (body["first_ns"], body["last_ns"]) == (int(picked[0]), int(picked[-1]))
        for k in range(3):  # receive times: now, long after the event times
            assert server.post_batch(SYMBOL, [1.0 + k, 2.0 + k]).status == 200
        before = answers(server)
        assert before[-1]["count"] == values.shape[0] + 6
        assert before[-1]["last_ns"] > T0 + 10**15
        server.stop(signal.SIGKILL)
    with running_server(tmp_path, ENV) as server:
        assert same(answers(server), before)
        assert server.stop() == 0  # writes a checkpoint with the hot tier's marks
    checkpoints = sorted((tmp_path / "data" / "checkpoints").glob("ckpt-*"))
    assert checkpoints and list(checkpoints[-1].glob("t*.npy"))
    with running_server(tmp_path, ENV) as server:
        assert same(answers(server), before)
