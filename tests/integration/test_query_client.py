"""QueryClient against a real `hft-appliance serve`: every method checked against numpy.

The server runs with durability on and a small hot tier (150 values), so `history` spans values
the hot tier evicted and the warm tier sealed, while `stats` covers the hot values only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_harness import REPO_ROOT, Server, running_server

from transport import query_client as qc
from transport.query_client import QueryClient, Stats

MAX_SYMBOLS = 6
MAX_BATCH = 1_000
MAX_QUERIES = 40
ENV = {
    "APP_DURABILITY__WARM_SEGMENT_VALUES": "100",
    "APP_STORE__MAX_DATA_RETENTION": "150",  # the hot tier evicts most of the history
    "APP_STORE__CLEANUP_KEEP_COUNT": "100",
    "APP_STORE__MAX_SYMBOLS": str(MAX_SYMBOLS),
    "APP_STORE__MAX_BATCH_SIZE": str(MAX_BATCH),
    "APP_SERVER__MAX_STATS_QUERIES": str(MAX_QUERIES),
}
SYMBOL = "EUR/USD"
UNICODE = "日本円-USD"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QueryClient, dict]]:
    """A server holding SYMBOL (740 values in 20 batches, mostly evicted) and UNICODE (5)."""
    rng = np.random.default_rng(14)
    batches = [np.round(rng.uniform(1e9, 1e9 + 1, 37), 3) for _ in range(20)]
    with (
        running_server(tmp_path_factory.mktemp("query-client"), ENV) as server,
        QueryClient(f"http://127.0.0.1:{server.port}") as client,
    ):
        client.wait_ready(timeout_s=10)
        for batch in batches:
            assert client.add_batch(SYMBOL, batch) == 37
        assert client.add_batch(UNICODE, [1, 2.5, 0.0, 4, 3]) == 5
        yield client, {SYMBOL: np.concatenate(batches), UNICODE: np.array([1, 2.5, 0, 4, 3.0])}


def hot_values(client: QueryClient, series: dict, symbol: str) -> np.ndarray:
    (row,) = [row for row in client.symbols() if row.symbol == symbol]
    return series[symbol][-row.hot :]


def assert_stats(got: Stats, window: np.ndarray) -> None:
    assert (got.min, got.max, got.last) == (window.min(), window.max(), window[-1])
    assert got.avg == pytest.approx(window.mean(), rel=1e-9)
    assert got.var == pytest.approx(window.var(), rel=1e-9, abs=1e-12)


def test_stats_match_numpy_over_every_window(loaded: tuple[QueryClient, dict]) -> None:
    client, series = loaded
    for symbol in (SYMBOL, UNICODE):
        hot = hot_values(client, series, symbol)
        for exponent in range(1, 9):
            assert_stats(client.stats(symbol, exponent), hot[-(10**exponent) :])


def test_symbols_report_hot_and_total_counts(loaded: tuple[QueryClient, dict]) -> None:
    client, _ = loaded
    rows = {row.symbol: row for row in client.symbols()}
    assert rows[SYMBOL].total == 740 and 100 <= rows[SYMBOL].hot <= 150
    assert rows[UNICODE] == qc.SymbolInfo(UNICODE, 5, 5)


def test_stats_batch_mixes_answers_and_typed_errors(loaded: tuple[QueryClient, dict]) -> None:
    client, series = loaded
    hot = hot_values(client, series, SYMBOL)
    queries = [(SYMBOL, 1), ("NEVER-ADDED", 1), (SYMBOL, 9), ("", 1), (UNICODE, 2), (SYMBOL, 2)]
    items = client.stats_batch(queries)
    assert_stats(items[0], hot[-10:])  # type: ignore[arg-type]
    assert_stats(items[5], hot[-100:])  # type: ignore[arg-type]
    assert items[4] == client.stats(UNICODE, 2)
    expected = {1: qc.UnknownSymbolError, 2: qc.InvalidExponentError, 3: qc.InvalidSymbolError}
    for row, cls in expected.items():
        error = items[row]
        assert type(error) is cls, error
        assert isinstance(error, qc.ApplianceError)
        assert error.message and error.status in (400, 404)
    arrays = client.stats_batch_arrays(queries)
    assert arrays.ok.tolist() == [True, False, False, False, True, True]
    assert arrays.codes.tolist() == [
        "",
        "unknown_symbol",
        "invalid_exponent",
        "invalid_symbol",
        "",
        "",
    ]
    assert np.isnan(arrays.avg[1:4]).all()
    np.testing.assert_array_equal(arrays.last[[0, 4, 5]], [hot[-1], 3.0, hot[-1]])
    assert arrays.var[5] == items[5].var  # type: ignore[union-attr]


def test_history_spans_evicted_values_by_index_and_time(loaded: tuple[QueryClient, dict]) -> None:
    client, series = loaded
    everything = series[SYMBOL]
    whole = client.history(SYMBOL)
    assert (whole.count, whole.first, whole.last) == (740, everything[0], everything[-1])
    assert (whole.first_index, whole.last_index) == (0, 739)
    part = client.history(SYMBOL, 10, 700)
    window = everything[10:700]
    assert (part.count, part.min, part.max) == (690, window.min(), window.max())
    assert part.avg == pytest.approx(window.mean(), rel=1e-9)
    assert part.var == pytest.approx(window.var(), rel=1e-9)
    # By time: the batches received from the one holding value 370 onwards.
    batch_start = client.history(SYMBOL, 370, 371).first_ns
    by_time = client.history(SYMBOL, start=batch_start, by="time")
    # 370 when every batch has its own receive time (batches received in one ns start earlier).
    assert by_time.first_index <= 370 and by_time.first_index % 37 == 0
    assert by_time.last_index == 739
    assert by_time.count == 740 - by_time.first_index
    with pytest.raises(qc.EmptyRangeError):
        client.history(SYMBOL, 800, 900)
    with pytest.raises(qc.InvalidRangeError):
        client.history(SYMBOL, 5, 5)
    with pytest.raises(qc.UnknownSymbolError):
        client.history("NEVER-ADDED")


def test_refusals_raise_typed_errors_with_their_code(loaded: tuple[QueryClient, dict]) -> None:
    client, _ = loaded
    cases = [
        (lambda: client.stats("NEVER-ADDED", 1), qc.UnknownSymbolError, 404),
        (lambda: client.stats(SYMBOL, 9), qc.InvalidExponentError, 400),
        (lambda: client.stats(SYMBOL, 0), qc.InvalidExponentError, 400),
        (lambda: client.stats("x" * 65, 1), qc.InvalidSymbolError, 400),
        (lambda: client.add_batch(SYMBOL, []), qc.EmptyBatchError, 400),
        (lambda: client.add_batch(SYMBOL, [1.0, -2.0]), qc.InvalidValueError, 400),
        (lambda: client.add_batch(SYMBOL, [float("nan")]), qc.InvalidValueError, 400),
        (lambda: client.add_batch(SYMBOL, np.ones(MAX_BATCH + 1)), qc.BatchTooLargeError, 413),
        (lambda: client.stats_batch([(SYMBOL, 1)] * (MAX_QUERIES + 1)), qc.BatchTooLargeError, 413),
    ]
    for call, cls, status in cases:
        with pytest.raises(cls) as info:
            call()
        assert info.value.status == status and info.value.message
        assert qc.ERROR_CLASSES[info.value.code] is cls
    assert client.stats(SYMBOL, 1) is not None  # the connection survived every refusal


def test_a_new_symbol_beyond_the_limit_is_a_symbol_limit_error(
    loaded: tuple[QueryClient, dict],
) -> None:
    client, _ = loaded
    for n in range(MAX_SYMBOLS - len(client.symbols())):
        client.add_batch(f"FILL-{n}", [1.0])
    with pytest.raises(qc.SymbolLimitError) as info:
        client.add_batch("ONE-TOO-MANY", [1.0])
    assert (info.value.code, info.value.status) == ("symbol_limit", 409)
    assert client.add_batch(SYMBOL, [1e9]) == 1  # existing symbols keep working


def test_probes_on_a_ready_server(loaded: tuple[QueryClient, dict]) -> None:
    client, _ = loaded
    assert client.ready() and client.ready().body == {"status": "ready"}
    assert client.health().ok and client.health().body == {"status": "ok"}
    assert client.live().ok and client.live().body == {"status": "ok"}
    assert client.wait_ready(timeout_s=1).status == 200


def test_probes_while_the_log_replays(tmp_path: Path) -> None:
    """Against a real start with a log to replay: live() is true at once, health() false with
    the phase until the replay ends, and a write sent meanwhile waits and succeeds."""
    from tests.durability.test_crash_recovery import write_long_log

    write_long_log(tmp_path / "data", 100_000)
    server = Server(tmp_path)
    try:
        client = QueryClient(f"http://127.0.0.1:{server.port}", timeout_s=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                health = client.health()
                break
            except qc.TransportError:
                assert time.monotonic() < deadline, server.stderr()
                time.sleep(0.005)
        assert client.live().ok
        if not health.ok:  # the replay may end before the first probe on a fast machine
            assert health.status == 503 and health.body["code"] == "not_ready"
            assert health.body["status"] in ("starting", "replaying")
        assert client.add_batch("R", [5.0]) == 1  # waits for the replay, then succeeds
        assert client.health().ok
        assert client.stats("R", 1).last == 5.0
        client.close()
    finally:
        assert server.stop() == 0


def test_a_stopped_server_is_a_transport_error(tmp_path: Path) -> None:
    with running_server(tmp_path, {"APP_DURABILITY__ENABLED": "false"}) as server:
        client = QueryClient(f"http://127.0.0.1:{server.port}", timeout_s=2)
        assert client.add_batch("A", [1.0, 2.0]) == 2
        assert client.stats("A", 1).max == 2.0
        with pytest.raises(qc.HistoryDisabledError):
            client.history("A")
        assert [row.total for row in client.symbols()] == [None]
        assert server.stop() == 0
    with client, pytest.raises(qc.TransportError, match="Connection refused") as info:
        client.stats("A", 1)
    assert isinstance(info.value, ConnectionError) and info.value.status is None


def test_the_readme_example_runs(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's "Reading from Python" block, on a symbol of its own, prints what it says."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Reading from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    symbol = f"EUR/USD-{uuid.uuid4().hex[:8]}"
    code = code.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{server.port}")
    exec(compile(code.replace('"EUR/USD"', repr(symbol)), "README.md", "exec"), {})
    assert capsys.readouterr().out == "unknown_symbol 404\n"
    with QueryClient(f"http://127.0.0.1:{server.port}") as client:
        got = client.stats(symbol, 1)
        assert (got.min, got.max, got.last, got.avg) == (1.0849, 1.0851, 1.0849, 1.085)
        assert client.history(symbol, start=1).count == 2
