"""POST /stats/batch in process: the store's stats_many, the body decoder, the per-item answers
(checked against GET /stats/'s own handler), the route's whole-body errors, and the config key."""

from __future__ import annotations

import json
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any, ClassVar
from urllib.parse import urlencode

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.app import create_app
from appliance.config import AppConfig, ConfigError, build_config
from appliance.errors import ERROR_CODES, ApiError
from appliance.openapi import build_openapi
from appliance.stats_batch import StatsBatchDecoder, answer
from appliance.store import Store
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine
from tests.engine.reference import assert_stats_match

JSON_CT = {"content-type": "application/json"}


def make_store(max_symbols: int = 100, engine=None) -> Store:
    return Store(
        engine or NumpyEngine(geometry=Geometry(block=4, fanout=4, chunk=64)),
        retention=RetentionPolicy(),
        max_symbols=max_symbols,
        starting_capacity=64,
    )


def body(*queries: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"queries": list(queries), **extra}).encode()


# --- Store.stats_many ----------------------------------------------------------------------------


def test_stats_many_matches_numpy_in_order_with_repeats_and_unknown_symbols() -> None:
    store = make_store()
    rng = np.random.default_rng(1)
    models = {}
    for symbol, n in (("A", 5), ("B", 300), ("C", 2000)):
        values = rng.uniform(100, 200, n)
        for part in np.array_split(values, 3):
            if part.size:
                store.ingest(symbol, part)
        models[symbol] = values
    queries = [("C", 8), ("A", 1), ("NOPE", 3), ("B", 2), ("C", 8), ("A", 3), ("B", 1), ("C", 3)]
    answers = store.stats_many(queries)
    assert len(answers) == len(queries)
    for (symbol, exponent), got in zip(queries, answers, strict=True):
        if symbol == "NOPE":
            assert got is None
        else:
            assert_stats_match(got, models[symbol], 10**exponent)
    assert answers[0] is answers[4]  # a repeated query is computed once
    assert store.stats_many([]) == []
    assert store.stats_many([("NOPE", 1)]) == [None]


class _CountingEngine(NumpyEngine):
    """Records every stats_many / stats_table call as its (series, window) pairs, to see what
    the store asks the engine."""

    calls: ClassVar[list[list[tuple[Any, int]]]] = []

    def stats_many(self, requests):
        type(self).calls.append(list(requests))
        return super().stats_many(requests)

    def stats_table(self, series, which, windows):
        pairs = zip(which.tolist(), windows.tolist(), strict=True)
        type(self).calls.append([(series[i], w) for i, w in pairs])
        return super().stats_table(series, which, windows)


def test_one_engine_call_per_batch_for_the_distinct_misses_and_the_cache_is_shared() -> None:
    _CountingEngine.calls = []
    store = make_store(engine=_CountingEngine())
    store.ingest("A", np.arange(1.0, 101.0))
    store.ingest("B", np.arange(1.0, 11.0))
    cached = store.stats("A", 1)  # GET /stats/ fills the cache the batch reads
    answers = store.stats_many([("A", 1), ("A", 2), ("B", 1), ("A", 2), ("B", 1), ("Z", 1)])
    assert answers[0] is cached
    assert len(_CountingEngine.calls) == 1
    assert [window for _, window in _CountingEngine.calls[0]] == [100, 10]  # A/2 and B/1, once
    assert store.stats("A", 2) is answers[1]  # and the batch's answers serve GET /stats/
    store.stats_many([("A", 1), ("A", 2), ("B", 1)])
    assert len(_CountingEngine.calls) == 1  # all cached: no engine call at all
    store.ingest("A", np.array([1000.0]))  # an append invalidates A only
    after = store.stats_many([("A", 1), ("B", 1)])
    assert after[0].last == 1000.0 and after[1] is answers[2]
    assert [window for _, window in _CountingEngine.calls[1]] == [10]


class _FailingStatsEngine(NumpyEngine):
    def stats_many(self, requests):
        raise MemoryError("device out of memory")

    def stats_table(self, series, which, windows):
        raise MemoryError("device out of memory")


def test_an_engine_failure_releases_every_lock() -> None:
    store = make_store(engine=_FailingStatsEngine())
    store.ingest("A", np.ones(3))
    store.ingest("B", np.ones(3))
    with pytest.raises(MemoryError):
        store.stats_many([("B", 1), ("A", 1)])
    store.ingest("A", np.ones(1))  # would block forever on a leaked lock
    store.ingest("B", np.ones(1))
    assert store.length("A") == store.length("B") == 4


def test_an_append_between_the_cache_read_and_the_lock_re_answers_the_whole_symbol() -> None:
    """A/1 is cached (state 1), A/2 is not; an append lands before the batch takes A's lock:
    both answers must then come from state 2, never A/1 from state 1 beside A/2 from state 2."""
    store = make_store()
    store.ingest("A", np.arange(1.0, 11.0))
    store.ingest("B", np.arange(1.0, 11.0))
    old_a1 = store.stats("A", 1)
    original = store._compute_locked

    def append_first(*args):
        store.ingest("A", np.array([100.0]))
        return original(*args)

    store._compute_locked = append_first
    answers = store.stats_many([("A", 1), ("B", 1), ("A", 2), ("A", 1)])
    assert old_a1.last == 10.0
    assert [a.last for a in answers] == [100.0, 10.0, 100.0, 100.0]
    assert answers[0].count == 10 and answers[2].count == 11
    assert answers[0] is answers[3] is store.stats("A", 1)


def test_a_batch_sees_one_state_of_each_symbol_while_writers_append() -> None:
    """Writers append runs of one rising value; a batch reading one symbol at two moments would
    see two different `last` values across its windows. Two readers name the symbols in
    opposite orders while both symbols are written: no deadlock, no torn answer."""
    store = make_store(engine=NumpyEngine())
    store.ingest("A", np.zeros(1))
    store.ingest("B", np.zeros(1))
    stop = threading.Event()
    failures: list[str] = []

    def write(symbol: str) -> None:
        value = 0.0
        while not stop.is_set():
            value += 1.0
            store.ingest(symbol, np.full(7, value))

    def read(symbols: tuple[str, str]) -> None:
        queries = [(s, k) for s in symbols for k in range(1, 9)]
        while not stop.is_set():
            answers = store.stats_many(queries)
            for i, symbol in enumerate(symbols):
                own = answers[8 * i : 8 * i + 8]
                if len({a.last for a in own}) != 1 or any(a.max != a.last for a in own):
                    failures.append(f"{symbol}: {own}")
                length = own[-1].count  # 10^8 covers the series: its length at that state
                if [a.count for a in own] != [min(10**k, length) for k in range(1, 9)]:
                    failures.append(f"{symbol} counts: {[a.count for a in own]}")

    threads = [
        threading.Thread(target=write, args=("A",)),
        threading.Thread(target=write, args=("B",)),
        threading.Thread(target=read, args=(("A", "B"),)),
        threading.Thread(target=read, args=(("B", "A"),)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "deadlock"
    assert not failures, failures[:3]
    assert store.length("A") > 100 and store.length("B") > 100


# --- the decoder: whole-body errors and per-item errors -----------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"queries": [{"symbol": "A", "exponent": NaN}]}', "invalid_json"),
        (b'{"queries": [{"symbol": "A", "exponent": 1e400}]}', "invalid_json"),
        (b'{"queries": []} trailing', "invalid_json"),
        (b"[]", "invalid_body"),
        (b"null", "invalid_body"),
        (b"{}", "invalid_body"),
        (b'{"queries": null}', "invalid_body"),
        (b'{"queries": {"symbol": "A", "exponent": 1}}', "invalid_body"),
        (b'{"queries": [1]}', "invalid_body"),
        (b'{"queries": [{"symbol": "A", "exponent": 1}, "A"]}', "invalid_body"),
        (b'{"queries": [[]]}', "invalid_body"),
        (b'{"queries": [{"symbol": ["A"], "exponent": 1}]}', "invalid_body"),
        (b'{"queries": [{"symbol": "A", "exponent": {"k": 1}}]}', "invalid_body"),
    ],
)
def test_a_body_that_is_not_a_batch_is_one_error(raw: bytes, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        StatsBatchDecoder(10).decode(raw)
    assert caught.value.code == code
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("item", "code", "in_message"),
    [
        ({"exponent": 1}, "missing_parameter", "symbol"),
        ({"symbol": "A"}, "invalid_exponent", "required"),
        ({"symbol": "A", "exponent": 0}, "invalid_exponent", "exponent 0 "),
        ({"symbol": "A", "exponent": 9}, "invalid_exponent", "exponent 9 "),
        ({"symbol": "A", "exponent": -1}, "invalid_exponent", "exponent -1 "),
        ({"symbol": "A", "exponent": 10**30}, "invalid_exponent", "..."),
        ({"symbol": "A", "exponent": 1.0}, "invalid_exponent", "exponent 1.0 "),
        ({"symbol": "A", "exponent": 1.5}, "invalid_exponent", "exponent 1.5 "),
        ({"symbol": "A", "exponent": True}, "invalid_exponent", "exponent true "),
        ({"symbol": "A", "exponent": False}, "invalid_exponent", "exponent false "),
        ({"symbol": "A", "exponent": None}, "invalid_exponent", "exponent null "),
        ({"symbol": "A", "exponent": "1"}, "invalid_exponent", "not a string"),
        ({"symbol": 5, "exponent": 1}, "invalid_symbol", "a number"),
        ({"symbol": None, "exponent": 1}, "invalid_symbol", "null"),
        ({"symbol": True, "exponent": 1}, "invalid_symbol", "a boolean"),
        ({"symbol": 5, "exponent": 9}, "invalid_exponent", "exponent 9 "),  # GET's order
    ],
)
def test_an_item_that_cannot_be_a_query_is_its_own_error(item, code, in_message) -> None:
    (got,) = StatsBatchDecoder(10).decode(body(item))
    assert isinstance(got, ApiError)
    assert got.code == code
    assert in_message in got.message


def test_good_items_become_queries_and_extra_fields_are_ignored() -> None:
    decoded = StatsBatchDecoder(10).decode(
        body(
            {"symbol": "EUR/USD", "exponent": 8, "note": [1, {"x": 2}]},
            {"symbol": "日本円", "exponent": 1},
            id=7,
        )
    )
    assert decoded == [("EUR/USD", 8), ("日本円", 1)]
    assert StatsBatchDecoder(10).decode(body()) == []


@pytest.mark.parametrize("limit", [1, 3, 100])
def test_the_maximum_is_exact_whatever_the_items_hold(limit: int) -> None:
    decoder = StatsBatchDecoder(limit)
    shapes = [
        {},
        {"symbol": "A", "exponent": 1},
        {"symbol": "{[{,}]}" * 8, "exponent": 1},  # braces and commas inside strings
        {"symbol": "A", "exponent": 1, "x": [{"a": {}}, [{}], "{"]},  # nested unknown fields
    ]
    for shape in shapes:
        assert len(decoder.decode(body(*[shape] * limit))) == limit
        compact = json.dumps({"queries": [shape] * (limit + 1)}, separators=(",", ":")).encode()
        for raw in (body(*[shape] * (limit + 1)), compact):
            with pytest.raises(ApiError) as caught:
                decoder.decode(raw)
            assert (caught.value.code, caught.value.status) == ("batch_too_large", 413)
            assert f"{limit + 1} queries" in caught.value.message


class _NoTypedDecode:
    def decode(self, body: bytes):
        raise AssertionError("the items were decoded")


def test_too_many_items_is_413_before_any_item_is_looked_at() -> None:
    decoder = StatsBatchDecoder(10_000)
    decoder._decoder = _NoTypedDecode()  # the typed decode would build 1M objects
    many = b'{"queries": [' + b"{}," * 1_000_000 + b"{}]}"  # 3 MB of empty items
    with pytest.raises(ApiError) as caught:
        decoder.decode(many)
    assert caught.value.code == "batch_too_large"
    assert "1000001 queries" in caught.value.message


# --- per-item answers agree with GET /stats/ ------------------------------------------------


def new_app(config: AppConfig | None = None, *, ready: bool = True):
    """An app as the server leaves it once started (`ready=False`: still starting)."""
    app = create_app(config or AppConfig(), name=f"test_{uuid.uuid4().hex[:12]}")
    if ready:
        app.ctx.readiness.mark_ready()
    return app


def _handler(app, path: str):
    return next(r.handler for r in app.router.routes if r.path.strip("/") == path)


def call(app, path: str, **request: Any) -> tuple[int, Any]:
    """Run a route's handler; an ApiError is rendered as the app's error handler would.

    These handlers never await, so the coroutine is stepped once instead of given a loop.
    """
    fields = {"app": app, "stream": None, "headers": JSON_CT, "body": b"", "query_string": ""}
    coroutine = _handler(app, path)(SimpleNamespace(**{**fields, **request}))
    try:
        coroutine.send(None)
    except StopIteration as done:
        response = done.value
    except ApiError as exc:
        return exc.status, exc.to_body()
    else:
        coroutine.close()
        raise AssertionError("the handler awaited something")
    return response.status, json.loads(response.body)


def get_stats(app, symbol: str, exponent: str) -> tuple[int, Any]:
    return call(app, "stats", query_string=urlencode({"symbol": symbol, "exponent": exponent}))


@pytest.fixture(scope="module")
def app_with_data():
    app = new_app()
    rng = np.random.default_rng(5)
    for symbol, n in (("AAPL", 10), ("EUR/USD", 1234), ("BRK.B", 5000), ("日本円-USD", 1)):
        app.ctx.store.ingest(symbol, rng.uniform(1, 500, n))
    return app


SYMBOLS = ["AAPL", "EUR/USD", "BRK.B", "日本円-USD", "MSFT", "", "x" * 65, "A\nB", "a\x85"]
json_scalars = st.one_of(
    st.integers(-3, 12),
    st.integers(-(10**30), 10**30),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
)
items = st.fixed_dictionaries(
    {},
    optional={
        "symbol": st.one_of(st.sampled_from(SYMBOLS), st.text(max_size=70), json_scalars),
        "exponent": st.one_of(st.integers(0, 9), json_scalars),
    },
)


@settings(max_examples=150, deadline=None)
@given(queries=st.lists(items, max_size=40))
def test_every_result_is_what_get_stats_answers_for_that_query(app_with_data, queries) -> None:
    status, answer_body = call(app_with_data, "stats/batch", body=body(*queries))
    assert status == 200
    results = answer_body["results"]
    assert len(results) == len(queries)
    for query, result in zip(queries, results, strict=True):
        code, message = expected_result(app_with_data, query)
        if message is None:  # a JSON-only case: its wording is tested above
            assert set(result) == {"error", "code"} and result["error"], query
            assert result["code"] == code, query
        else:
            assert result == message, query


def expected_result(app, query: dict[str, Any]) -> tuple[str | None, Any]:
    """(code, body): GET /stats/'s answer where the query can be written as a query string;
    only the code where JSON typing decides (body None)."""
    symbol, exponent = query.get("symbol"), query.get("exponent")
    if "symbol" not in query:
        return "missing_parameter", None
    exponent_ok = type(exponent) is int and 1 <= exponent <= 8
    if isinstance(symbol, str) and exponent_ok:
        return None, get_stats(app, symbol, str(exponent))[1]  # success or unknown/invalid
    if isinstance(symbol, str) and type(exponent) is int and -1 <= exponent <= 99:
        got = get_stats(app, symbol, str(exponent))[1]
        assert got["code"] == "invalid_exponent"  # GET's verdict on 0, 9, -1, 12 ...
        # The same words; GET quotes the text it got, the batch shows the JSON number.
        return None, {
            "error": got["error"].replace(f"'{exponent}'", str(exponent)),
            "code": got["code"],
        }
    if not exponent_ok:
        return "invalid_exponent", None
    return "invalid_symbol", None  # a symbol that is not a JSON string


def test_a_mixed_batch_matches_numpy_and_get_stats(app_with_data) -> None:
    store = app_with_data.ctx.store
    queries = [("BRK.B", k) for k in range(1, 9)] + [("AAPL", 1), ("MSFT", 1), ("BRK.B", 3)]
    raw = body(*({"symbol": s, "exponent": k} for s, k in queries))
    status, got = call(app_with_data, "stats/batch", body=raw)
    assert status == 200
    values = store.snapshot_values("BRK.B")
    for k, result in zip(range(1, 9), got["results"], strict=False):
        assert set(result) == {"min", "max", "last", "avg", "var"}
        window = values[-(10**k) :]
        assert result["min"] == window.min() and result["max"] == window.max()
        assert result["avg"] == pytest.approx(window.mean(), rel=1e-9)
        assert result["var"] == pytest.approx(window.var(), rel=1e-9)
    assert got["results"][8] == get_stats(app_with_data, "AAPL", "1")[1]
    assert got["results"][9] == get_stats(app_with_data, "MSFT", "1")[1]
    assert got["results"][9]["code"] == "unknown_symbol"
    assert got["results"][10] == got["results"][2]
    assert len(got["results"]) == 11


# --- the route's own rules --------------------------------------------------------------------


def test_whole_body_errors_come_before_the_store_and_change_nothing() -> None:
    app = new_app()
    app.ctx.store.ingest("A", np.ones(3))
    for raw, status, code in (
        (b"[1]", 400, "invalid_body"),
        (b"{", 400, "invalid_json"),
        (body(*[{"symbol": "NEW", "exponent": 1}] * 10_001), 413, "batch_too_large"),
    ):
        got_status, got = call(app, "stats/batch", body=raw)
        assert (got_status, got["code"]) == (status, code)
    assert app.ctx.store.symbols() == ["A"]
    assert app.ctx.store.length("A") == 3


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json; charset=latin-1"])
def test_a_body_that_is_not_json_by_content_type_is_415(content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    status, got = call(new_app(), "stats/batch", body=body(), headers=headers)
    assert (status, got["code"]) == (415, "unsupported_media_type")


def test_the_batch_is_refused_during_the_replay_like_get_stats_when_told_not_to_wait() -> None:
    # wait_for_ready_s = 0: no wait, 503 at once (the waiting itself: tests/appliance/
    # test_readiness.py).
    app = new_app(build_config({"server": {"wait_for_ready_s": 0}}), ready=False)
    app.ctx.store.ingest("A", np.ones(3))
    app.ctx.readiness.mark_replaying()
    assert call(app, "stats/batch", body=body({"symbol": "A", "exponent": 1}))[1]["code"] == (
        "not_ready"
    )
    assert call(app, "stats/batch", body=body())[0] == 503
    assert get_stats(app, "A", "1")[0] == 503
    app.ctx.readiness.mark_ready()
    assert call(app, "stats/batch", body=body({"symbol": "A", "exponent": 1}))[0] == 200
    assert call(app, "stats/batch", body=b"[")[0] == 400


def test_the_maximum_comes_from_the_config_and_the_environment() -> None:
    config = build_config({}, {"APP_SERVER__MAX_STATS_QUERIES": "2"})
    assert config.server.max_stats_queries == 2
    assert AppConfig().server.max_stats_queries == 10_000
    app = new_app(config)
    app.ctx.store.ingest("A", np.ones(3))
    two = [{"symbol": "A", "exponent": 1}] * 2
    assert call(app, "stats/batch", body=body(*two))[0] == 200
    status, got = call(app, "stats/batch", body=body(*two, {}))
    assert (status, got["code"]) == (413, "batch_too_large")
    assert "server.max_stats_queries" in got["error"]
    with pytest.raises(ConfigError, match=r"server\.max_stats_queries"):
        build_config({"server": {"max_stats_queries": 0}})
    request = build_openapi(config)["components"]["schemas"]["StatsBatchRequest"]
    assert request["properties"]["queries"]["maxItems"] == 2


def test_the_openapi_document_lists_the_batch_errors() -> None:
    operation = build_openapi(AppConfig())["paths"]["/stats/batch"]["post"]
    for code in ("invalid_json", "invalid_body", "batch_too_large", "not_ready"):
        content = operation["responses"][str(ERROR_CODES[code].status)]["content"]
        assert code in content["application/json"]["examples"]
    schema = build_openapi(AppConfig())["components"]["schemas"]["StatsBatchResponse"]
    for code in ("unknown_symbol", "invalid_exponent", "invalid_symbol", "missing_parameter"):
        assert code in schema["properties"]["results"]["description"]


def test_answer_repeats_one_body_per_repeated_query() -> None:
    store = make_store()
    store.ingest("A", np.arange(10.0))
    items = StatsBatchDecoder(100).decode(
        body(*[{"symbol": "A", "exponent": 1}, {"symbol": "Q", "exponent": 1}] * 3)
    )
    out = json.loads(answer(store, items))["results"]
    assert out[0] == out[2] == out[4] and out[1] == out[3] == out[5]
    assert out[0]["last"] == 9.0 and out[1]["code"] == "unknown_symbol"
