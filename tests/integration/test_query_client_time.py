"""QueryClient's timestamps and time windows against a real `hft-appliance serve` (numpy-checked):
`add_batch(..., timestamps=)`, `stats(symbol, seconds=)`, `Seconds` queries in a batch."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import numpy as np
import pytest
from server_harness import running_server

from transport import query_client as qc
from transport.query_client import QueryClient, Seconds, Stats

BASE = 1_764_892_800_000_000_000
S = 1_000_000_000


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryClient]:
    with (
        running_server(tmp_path_factory.mktemp("query-client-time"), {}) as server,
        QueryClient(f"http://127.0.0.1:{server.port}") as query_client,
    ):
        query_client.wait_ready(timeout_s=10)
        yield query_client


def assert_window(got: Stats, window: np.ndarray) -> None:
    assert (got.min, got.max, got.last) == (window.min(), window.max(), window[-1])
    assert got.avg == pytest.approx(window.mean(), rel=1e-9)
    assert got.var == pytest.approx(window.var(), rel=1e-9, abs=1e-12)
    assert got.count == window.size


def test_timestamps_and_time_windows(client: QueryClient) -> None:
    values = np.arange(1.0, 41.0)
    times = BASE + np.arange(40, dtype=np.int64) * (S // 10)  # 10 ticks a second
    assert client.add_batch("QC-T", values, timestamps=times) == 40
    for seconds, count in ((1, 11), (0.5, 6), (Decimal("0.25"), 3), ("0.1", 2),
                           (timedelta(milliseconds=1500), 16), (100, 40)):  # fmt: skip
        got = client.stats("QC-T", seconds=seconds)
        assert_window(got, values[-count:])
        assert got.seconds == pytest.approx(float(Decimal(qc._seconds_text(seconds))))
    plain = client.stats("QC-T", 1)
    assert (plain.count, plain.seconds) == (None, None)
    assert (plain.min, plain.max, plain.last) == (31.0, 40.0, 40.0)


def test_out_of_order_and_bad_timestamps_raise_typed_errors(client: QueryClient) -> None:
    assert client.add_batch("QC-O", [1.0, 2.0], timestamps=[BASE, BASE + S]) == 2
    with pytest.raises(qc.OutOfOrderError) as raised:
        client.add_batch("QC-O", [3.0], timestamps=[BASE])
    assert raised.value.status == 400
    with pytest.raises(qc.InvalidTimestampsError):
        client.add_batch("QC-O", [3.0, 4.0], timestamps=[BASE + 2 * S])
    with pytest.raises(TypeError):
        client.add_batch("QC-O", [3.0], timestamps=[1.5])
    assert client.stats("QC-O", seconds=10).count == 2  # nothing was applied
    datetimes = np.array(["2030-01-01T00:00:00", "2030-01-01T00:00:01"], dtype="datetime64[s]")
    assert client.add_batch("QC-O", [5.0, 6.0], timestamps=datetimes) == 2
    assert client.stats("QC-O", seconds=1).count == 2


def test_window_arguments(client: QueryClient) -> None:
    client.add_batch("QC-W", [1.0])
    with pytest.raises(TypeError):
        client.stats("QC-W")
    with pytest.raises(TypeError):
        client.stats("QC-W", 1, seconds=1)
    with pytest.raises(TypeError):
        client.stats("QC-W", seconds=True)
    for bad in (0, -1, "1e3", "abc", Decimal("1E-10"), float("nan")):
        with pytest.raises(qc.InvalidWindowError):
            client.stats("QC-W", seconds=bad)
    assert client.stats("QC-W", seconds=1e-9).count == 1  # "0.000000001", not "1e-09"


def test_batch_with_seconds_queries(client: QueryClient) -> None:
    values = np.arange(1.0, 21.0)
    times = BASE + np.arange(20, dtype=np.int64) * (S // 4)
    client.add_batch("QC-B", values, timestamps=times)
    queries = [("QC-B", Seconds(1)), ("QC-B", 1), ("QC-B", Seconds(".5")), ("QC-B", Seconds(0)),
               ("QC-B", Seconds("1e3")), ("QC-NONE", Seconds(1)), ("QC-B", Seconds("007.")),
               ("QC-B", Seconds(1e-9))]  # fmt: skip
    got = client.stats_batch(queries)
    assert isinstance(got[0], Stats) and got[0] == client.stats("QC-B", seconds=1)
    assert_window(got[0], values[-5:])
    assert isinstance(got[1], Stats) and got[1].count is None
    assert isinstance(got[2], Stats) and got[2].count == 3
    assert isinstance(got[3], qc.InvalidWindowError)
    assert isinstance(got[4], qc.InvalidWindowError)
    assert isinstance(got[5], qc.UnknownSymbolError)
    assert isinstance(got[6], Stats) and got[6].count == 20 and got[6].seconds == 7
    assert isinstance(got[7], Stats) and got[7].count == 1
    arrays = client.stats_batch_arrays(queries)
    assert arrays.count is not None
    assert arrays.count.tolist() == [5, -1, 3, -1, -1, -1, 20, 1]
    assert arrays.ok.tolist() == [True, True, True, False, False, False, True, True]
