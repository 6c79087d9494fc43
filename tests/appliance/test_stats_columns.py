"""The columnar batch path of POST /stats/batch: `Store.stats_columns` against `stats_many`
(same answers, same cache objects, one state per symbol), `StatsBatchDecoder.decode_columns`
against `decode`, and the new encoder against the per-item one it replaced, byte for byte."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.errors import ApiError
from appliance.stats_batch import (
    StatsBatchDecoder,
    _encode,
    answer_columns,
    columns_of,
    stats_body,
    time_stats_body,
    unknown_symbol,
)
from appliance.store import Store, time_key
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine
from fallback.compiled import CompiledEngine

SECOND = 10**9


class _CountingEngine(NumpyEngine):
    """Records the windows of every stats_table call."""

    calls: ClassVar[list[list[int]]] = []

    def stats_table(self, series, which, windows):
        type(self).calls.append(windows.tolist())
        return super().stats_table(series, which, windows)


def make_store(engine=None) -> Store:
    return Store(
        engine or NumpyEngine(geometry=Geometry(block=4, fanout=4, chunk=64)),
        retention=RetentionPolicy(),
        max_symbols=100,
        starting_capacity=64,
    )


def filled_store(engine=None) -> Store:
    """A, B, C with event timestamps one second apart (time windows cover some of them)."""
    store = make_store(engine)
    rng = np.random.default_rng(5)
    for symbol, n in (("A", 5), ("B", 300), ("C", 2000)):
        values = rng.uniform(100, 200, n)
        store.ingest(symbol, values, timestamps=np.arange(n, dtype=np.int64) * SECOND)
    return store


def _per_item_answer(store: Store, items: list) -> bytes:
    """The encoder POST /stats/batch used before the columnar path (2026-12-04), kept here as
    the reference the new one must match byte for byte: one loop over the items."""
    results = iter(store.stats_many([item for item in items if type(item) is tuple]))
    found: dict[int, bytes] = {}
    timed: dict[tuple[int, int], bytes] = {}
    missing: dict[str, bytes] = {}
    parts: list[bytes] = []
    for item in items:
        if type(item) is not tuple:
            parts.append(_encode(item.to_body()))
            continue
        result = next(results)
        if result is None:
            part = missing.get(item[0])
            if part is None:
                part = missing[item[0]] = _encode(unknown_symbol(item[0]).to_body())
        elif item[1] > 0:
            part = found.get(id(result))
            if part is None:
                part = found[id(result)] = _encode(stats_body(result))
        else:
            part = timed.get((id(result), item[1]))
            if part is None:
                part = timed[(id(result), item[1])] = _encode(time_stats_body(result, -item[1]))
        parts.append(part)
    return b'{"results":[' + b",".join(parts) + b"]}"


# --- Store.stats_columns -------------------------------------------------------------------------


@pytest.mark.parametrize("engine", [None, CompiledEngine(Geometry(block=4, fanout=4, chunk=64))])
def test_stats_columns_answers_as_stats_many_with_the_cache_objects(engine) -> None:
    store = filled_store(engine)
    queries = [
        ("C", 8), ("A", 1), ("NOPE", 3), ("B", 2), ("C", 8), ("A", 3), ("B", 1), ("C", 3),
        ("B", time_key(10 * SECOND)), ("C", time_key(1)), ("NOPE", time_key(5)),
        ("B", time_key(10 * SECOND)), ("A", 1), ("A", time_key(10**15)),
    ]  # fmt: skip
    symbols = [s for s, _ in queries]
    keys = np.array([k for _, k in queries], dtype=np.int64)
    got = store.stats_columns(symbols, keys)
    assert len(got.answers) == len(set(queries))  # one answer per distinct query
    per_query = [got.answers[j] for j in got.inverse.tolist()]
    expected = store.stats_many(queries)  # all cached now: the very objects
    for (symbol, key), mine, theirs in zip(queries, per_query, expected, strict=True):
        assert (got.names[got.pair_slots[got.inverse[queries.index((symbol, key))]]]) == symbol
        if symbol == "NOPE":
            assert mine is None and theirs is None
        else:
            assert mine is theirs
            series = store._entries[symbol].series
            window = 10**key if key > 0 else mine.count
            assert mine == series.stats(window)  # the engine's own answer, bit for bit
    assert per_query[1].count == 5 and per_query[8].count == 11  # 10 s: 11 ticks, 1 s apart
    table = got.table()
    assert table.shape == (len(got.answers), 6)
    for row, answer in zip(table, got.answers, strict=True):
        if answer is None:
            assert np.isnan(row).all()
        else:
            assert row.tolist() == [answer.count, answer.min, answer.max, answer.last,
                                    answer.avg, answer.var]  # fmt: skip


def test_stats_columns_of_nothing_and_of_only_unknown_symbols() -> None:
    store = filled_store()
    none = store.stats_columns([], np.empty(0, dtype=np.int64))
    assert none.answers == [] and none.inverse.shape == (0,)
    only = store.stats_columns(["X", "Y", "X"], np.array([1, 1, 1]))
    assert only.answers == [None, None] and only.inverse.tolist() == [0, 1, 0]


def test_one_engine_call_for_the_distinct_misses_and_the_cache_is_shared() -> None:
    _CountingEngine.calls = []
    store = make_store(_CountingEngine())
    store.ingest("A", np.arange(1.0, 101.0))
    store.ingest("B", np.arange(1.0, 11.0))
    cached = store.stats("A", 1)
    got = store.stats_columns(["A", "A", "B", "A", "B", "Z"], np.array([1, 2, 1, 2, 1, 1]))
    assert got.answers[got.inverse[0]] is cached
    assert len(_CountingEngine.calls) == 1 and sorted(_CountingEngine.calls[0]) == [10, 100]
    assert store.stats("A", 2) is got.answers[got.inverse[1]]
    store.stats_columns(["A", "B"], np.array([2, 1]))
    assert len(_CountingEngine.calls) == 1  # all cached: no engine call


def test_an_append_before_the_lock_re_answers_the_whole_symbol() -> None:
    """A/1 cached at state 1, A/2 not; an append lands before the locks: both from state 2."""
    store = make_store()
    store.ingest("A", np.arange(1.0, 11.0))
    store.ingest("B", np.arange(1.0, 11.0))
    old = store.stats("A", 1)
    original = store._compute_locked

    def append_first(*args):
        store.ingest("A", np.array([100.0]))
        return original(*args)

    store._compute_locked = append_first
    got = store.stats_columns(["A", "B", "A", "A"], np.array([1, 1, 2, 1]))
    answers = [got.answers[j] for j in got.inverse.tolist()]
    assert old.last == 10.0
    assert [a.last for a in answers] == [100.0, 10.0, 100.0, 100.0]
    assert answers[0].count == 10 and answers[2].count == 11


def test_a_symbol_deleted_before_the_lock_answers_unknown() -> None:
    store = make_store()
    store.ingest("A", np.arange(1.0, 11.0))
    store.ingest("B", np.arange(1.0, 11.0))
    original = store._compute_locked

    def delete_first(*args):
        store.delete("A")
        return original(*args)

    store._compute_locked = delete_first
    got = store.stats_columns(["A", "B"], np.array([3, 3]))
    assert got.answers[got.inverse[0]] is None
    assert got.answers[got.inverse[1]].count == 10


def test_many_distinct_time_windows_take_the_sorting_dedupe() -> None:
    """More distinct (symbol, key) cells than the dense table allows: np.unique instead."""
    store = filled_store()
    keys = np.array([time_key(k * SECOND + 1) for k in range(1, 3000)] * 2, dtype=np.int64)
    symbols = ["C"] * keys.shape[0]
    got = store.stats_columns(symbols, keys)
    assert len(got.answers) == 2999
    for i in (0, 1500, 2998, 3000, 5997):
        k = i % 2999 + 1
        assert got.answers[got.inverse[i]].count == min(k + 1, 2000)


# --- decoder and encoder: the columnar path against the per-item one ----------------------------

_GOOD = st.builds(
    lambda s, e: {"symbol": s, "exponent": e},
    st.sampled_from(["A", "B", "C", "NOPE", "bad symbol!"]),
    st.integers(1, 8),
)
_BAD = st.sampled_from(
    [
        {"exponent": 1},
        {"symbol": "A"},
        {"symbol": "A", "exponent": 0},
        {"symbol": "A", "exponent": 9},
        {"symbol": "A", "exponent": "1"},
        {"symbol": "A", "exponent": 1.0},
        {"symbol": "A", "exponent": True},
        {"symbol": 5, "exponent": 1},
        {"symbol": None, "exponent": 2},
        {"symbol": "A", "exponent": 10**30},
    ]
)
_TIMED = st.builds(
    lambda s, seconds: {"symbol": s, "seconds": seconds},
    st.sampled_from(["A", "B", "C", "NOPE"]),
    st.sampled_from([1, 0.5, 10, 2.25, 1e-9, 100000, "1", 0, -1]),
)
_BOTH = st.just({"symbol": "B", "exponent": 2, "seconds": 1})
_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_same_columns(a, b) -> None:
    assert a.symbols == b.symbols
    assert a.keys.tolist() == b.keys.tolist()
    assert (a.positions is None) == (b.positions is None)
    if a.positions is not None:
        assert a.positions.tolist() == b.positions.tolist()
    assert [e.to_body() for e in a.errors] == [e.to_body() for e in b.errors]
    assert a.error_positions.tolist() == b.error_positions.tolist()


@_settings
@given(items=st.lists(st.one_of(_GOOD, _GOOD, _BAD, _TIMED, _BOTH), max_size=40))
def test_the_columnar_answer_is_byte_identical_to_the_per_item_one(items: list[dict]) -> None:
    store = filled_store()
    decoder = StatsBatchDecoder(100)
    raw = json.dumps({"queries": items}).encode()
    columns = decoder.decode_columns(raw)
    _assert_same_columns(columns, columns_of(decoder.decode(raw)))
    new = answer_columns(store, columns)
    old = _per_item_answer(store, decoder.decode(raw))
    assert new == old
    assert len(json.loads(new)["results"]) == len(items)


@_settings
@given(items=st.lists(_GOOD, max_size=60), cold=st.booleans())
def test_a_body_of_good_exponent_queries_takes_the_fast_path(items, cold) -> None:
    store = make_store(CompiledEngine(Geometry(block=4, fanout=4, chunk=64)))
    for symbol, n in (("A", 7), ("B", 500), ("C", 90)):
        store.ingest(symbol, np.linspace(1.0, 2.0, n))
    if not cold:
        store.stats_many([("B", k) for k in range(1, 9)])
    decoder = StatsBatchDecoder(100)
    raw = json.dumps({"queries": items}).encode()
    columns = decoder.decode_columns(raw)
    assert columns.positions is None and columns.errors == []
    assert columns.symbols == [item["symbol"] for item in items]
    assert columns.keys.tolist() == [item["exponent"] for item in items]
    assert answer_columns(store, columns) == _per_item_answer(store, decoder.decode(raw))


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[]",
        b'{"queries": [1]}',
        b'{"queries": [{"symbol": ["A"], "exponent": 1}]}',
        b'{"queries": [{"symbol": "A", "exponent": 1e400}]}',
        b'{"queries": [{"symbol": "A", "exponent": 1}]} trailing',
    ],
)
def test_whole_body_errors_are_the_same_on_the_columnar_path(raw: bytes) -> None:
    decoder = StatsBatchDecoder(10)
    with pytest.raises(ApiError) as old:
        decoder.decode(raw)
    with pytest.raises(ApiError) as new:
        decoder.decode_columns(raw)
    assert new.value.to_body() == old.value.to_body()


def test_too_many_queries_is_413_on_the_columnar_path() -> None:
    raw = json.dumps({"queries": [{"symbol": "A", "exponent": 1}] * 11}).encode()
    with pytest.raises(ApiError) as caught:
        StatsBatchDecoder(10).decode_columns(raw)
    assert caught.value.code == "batch_too_large"
