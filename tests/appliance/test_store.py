"""The symbol registry: limits, all-or-nothing batches, cache invalidation, thread safety."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from appliance.store import Store, SymbolLimitError, UnknownSymbolError
from engine_core import RetentionPolicy
from fallback import NumpyEngine


def make_store(max_symbols: int = 10, engine=None, **retention: int) -> Store:
    return Store(
        engine or NumpyEngine(),
        retention=RetentionPolicy(**retention) if retention else RetentionPolicy(),
        max_symbols=max_symbols,
        starting_capacity=1024,
    )


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_ingest_then_stats_matches_numpy() -> None:
    store = make_store()
    values = np.random.default_rng(1).uniform(0, 100, 5000)
    assert store.ingest("S", values) == 5000
    for exponent in range(1, 9):
        window = values[-min(10**exponent, values.size) :]
        result = store.stats("S", exponent)
        assert result.min == window.min()
        assert result.max == window.max()
        assert result.last == window[-1]
        assert result.avg == pytest.approx(window.mean(), rel=1e-9)
        assert result.var == pytest.approx(window.var(), rel=1e-9)


def test_unknown_symbol_raises() -> None:
    with pytest.raises(UnknownSymbolError):
        make_store().stats("nope", 1)


def test_symbol_limit_rejects_new_symbols_only() -> None:
    store = make_store(max_symbols=2)
    store.ingest("A", arr(1))
    store.ingest("B", arr(1))
    with pytest.raises(SymbolLimitError):
        store.ingest("C", arr(1))
    assert store.symbols() == ["A", "B"]
    store.ingest("A", arr(3))
    assert store.stats("A", 1).avg == 2.0


class _FailingEngine:
    """An engine whose series fail on append, to check that nothing half-made is published."""

    name = "failing"

    def new_series(self, retention: RetentionPolicy, starting_capacity: int):
        series = NumpyEngine().new_series(retention, starting_capacity)

        class Failing:
            def append(self, values: np.ndarray) -> int:
                raise MemoryError("no room")

            def __getattr__(self, name: str):
                return getattr(series, name)

        return Failing()


def test_a_failed_first_append_creates_no_symbol() -> None:
    store = make_store(engine=_FailingEngine())
    with pytest.raises(MemoryError):
        store.ingest("S", arr(1))
    assert store.symbols() == []
    with pytest.raises(UnknownSymbolError):
        store.stats("S", 1)


def test_rejected_new_symbol_does_not_count_towards_the_limit() -> None:
    store = make_store(max_symbols=1, engine=_FailingEngine())
    with pytest.raises(MemoryError):
        store.ingest("S", arr(1))
    assert len(store) == 0


def test_cache_is_invalidated_by_every_append() -> None:
    store = make_store()
    store.ingest("S", arr(1, 2))
    first = store.stats("S", 1)
    assert store.stats("S", 1) is first  # served from the cache
    store.ingest("S", arr(10))
    after = store.stats("S", 1)
    assert (after.max, after.last, after.count) == (10.0, 10.0, 3)
    assert store.stats("S", 2) == after  # same window here: 3 values


def test_retention_policy_is_passed_to_the_engine() -> None:
    store = make_store(max_values=10, keep_after_cleanup=4)
    store.ingest("S", np.arange(1, 11, dtype=np.float64))
    store.ingest("S", arr(100))
    assert store.length("S") == 5
    assert store.stats("S", 1).min == 7.0


def test_concurrent_writers_on_one_symbol_never_tear_batches_and_match_numpy() -> None:
    """Constant batches of 10: the last 10 values are always a single batch if none is torn."""
    store = make_store()
    writers, per_writer = 8, 200
    torn: list[object] = []
    done = threading.Event()
    store.ingest("S", np.full(10, 0.5))

    def write(worker: int) -> None:
        for i in range(per_writer):
            store.ingest("S", np.full(10, float(worker * 10_000 + i)))

    def read() -> None:
        while not done.is_set():
            result = store.stats("S", 1)
            if result.min != result.max:
                torn.append(result)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(write, range(writers)))
    finally:
        done.set()
        reader.join()
    assert torn == []
    expected = np.concatenate(
        [np.full(10, 0.5)]
        + [np.full(10, float(w * 10_000 + i)) for w in range(writers) for i in range(per_writer)]
    )
    result = store.stats("S", 8)
    assert result.count == expected.size
    assert result.min == expected.min()
    assert result.max == expected.max()
    assert result.avg == pytest.approx(expected.mean(), rel=1e-9)
    assert result.var == pytest.approx(expected.var(), rel=1e-9)


def test_concurrent_creation_respects_the_limit_exactly() -> None:
    store = make_store(max_symbols=5)
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        try:
            store.ingest(f"S{i % 8}", arr(float(i)))
            outcome = "ok"
        except SymbolLimitError:
            outcome = "limit"
        with lock:
            outcomes.append(outcome)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(64)))
    assert len(store) == 5
    total = sum(store.length(s) for s in store.symbols())
    assert total == outcomes.count("ok")


def test_max_symbols_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_store(max_symbols=0)


def test_stats_many_answers_a_symbol_deleted_between_its_two_passes_as_unknown() -> None:
    """The batch reads the caches without locks, then locks the symbols with a miss: a DELETE
    in between makes that symbol unknown (None), never a KeyError (a 500)."""
    import numpy as np

    from appliance.store import Store
    from engine_core.contract import RetentionPolicy
    from fallback import NumpyEngine

    store = Store(NumpyEngine(), retention=RetentionPolicy(), max_symbols=4, starting_capacity=8)
    store.ingest("A", np.array([1.0, 2.0]))
    store.ingest("B", np.array([3.0]))
    real = store._compute_locked

    def delete_first(queries, wanted, caches):  # type: ignore[no-untyped-def]
        store.delete("A")
        real(queries, wanted, caches)

    store._compute_locked = delete_first  # type: ignore[method-assign]
    answers = store.stats_many([("A", 1), ("B", 1), ("A", 2)])
    assert answers[0] is None and answers[2] is None
    assert answers[1] is not None and answers[1].last == 3.0
