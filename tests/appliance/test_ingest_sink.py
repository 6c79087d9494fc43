"""make_sink: the transports' way into a real store, with REST's validation and nack reasons.

A refused batch must leave the store exactly as it was: no symbol created, no value appended.
"""

from __future__ import annotations

import numpy as np
import pytest

from appliance.ingest import make_sink
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine
from transport.ingest import FrameProcessor, Rejected
from transport.wire import Reason, decode_message, encode_data


def make_store(max_symbols: int = 3) -> Store:
    return Store(
        NumpyEngine(), retention=RetentionPolicy(), max_symbols=max_symbols, starting_capacity=64
    )


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def rejected(sink, symbol: str, values: np.ndarray) -> Reason:
    with pytest.raises(Rejected) as info:
        sink(symbol, values)
    assert str(info.value)  # a message a person can act on
    return info.value.reason


def test_a_valid_batch_is_appended() -> None:
    store = make_store()
    sink = make_sink(store, max_batch_size=10)
    sink("EUR/USD", arr(1.0, 2.0, 3.0))
    sink("EUR/USD", arr(4.0))
    sink("日本円-USD", arr(0.0))
    assert store.symbols() == ["EUR/USD", "日本円-USD"]
    assert store.length("EUR/USD") == 4
    stats = store.stats("EUR/USD", 1)
    assert (stats.min, stats.max, stats.last, stats.avg) == (1.0, 4.0, 4.0, 2.5)


def test_a_read_only_view_from_a_decoded_frame_is_appended() -> None:
    store = make_store()
    sink = make_sink(store, max_batch_size=10)
    (frame,) = decode_message(encode_data(1, 1, "S", arr(1.5, 2.5)))
    assert not frame.values.flags.writeable
    sink(frame.symbol, frame.values)
    assert store.stats("S", 1).avg == 2.0


def test_negative_zero_is_stored_as_zero() -> None:
    store = make_store()
    sink = make_sink(store, max_batch_size=10)
    (frame,) = decode_message(encode_data(1, 1, "S", arr(-0.0, 2.0)))
    sink(frame.symbol, frame.values)
    stats = store.stats("S", 1)
    assert stats.min == 0.0 and not np.signbit(stats.min)
    sink("Z", arr(-0.0))
    last = store.stats("Z", 1)
    assert not np.signbit(last.min) and not np.signbit(last.last) and not np.signbit(last.max)


BAD_BATCHES = [
    ("S", arr(1.0, -1.0), Reason.INVALID_VALUE),
    ("S", arr(-1e-300), Reason.INVALID_VALUE),
    ("S", arr(np.nan), Reason.INVALID_VALUE),
    ("S", arr(1.0, np.inf), Reason.INVALID_VALUE),
    ("S", arr(-np.inf), Reason.INVALID_VALUE),
    ("S", arr(), Reason.EMPTY_BATCH),
    ("S", arr(*range(11)), Reason.BATCH_TOO_LARGE),
    ("S", np.array([1, 2], dtype=np.int64), Reason.INVALID_VALUE),
    ("S", np.ones((2, 2)), Reason.INVALID_VALUE),
    ("", arr(1.0), Reason.INVALID_SYMBOL),
    ("A\x00B", arr(1.0), Reason.INVALID_SYMBOL),
    ("tab\t", arr(1.0), Reason.INVALID_SYMBOL),
    ("del\x7f", arr(1.0), Reason.INVALID_SYMBOL),
    ("c1\x85", arr(1.0), Reason.INVALID_SYMBOL),
    ("x" * 65, arr(1.0), Reason.INVALID_SYMBOL),
    ("é" * 33, arr(1.0), Reason.INVALID_SYMBOL),
]


@pytest.mark.parametrize(("symbol", "values", "reason"), BAD_BATCHES)
def test_a_bad_batch_for_a_new_symbol_creates_nothing(
    symbol: str, values: np.ndarray, reason: Reason
) -> None:
    store = make_store()
    sink = make_sink(store, max_batch_size=10)
    assert rejected(sink, symbol, values) is reason
    assert store.symbols() == []
    assert symbol not in store


@pytest.mark.parametrize(
    ("symbol", "values", "reason"), [b for b in BAD_BATCHES if b[0] == "S"]
)  # fmt: skip
def test_a_bad_batch_for_an_existing_symbol_appends_nothing(
    symbol: str, values: np.ndarray, reason: Reason
) -> None:
    store = make_store()
    sink = make_sink(store, max_batch_size=10)
    sink("S", arr(5.0, 6.0))
    before = store.stats("S", 1)
    assert rejected(sink, symbol, values) is reason
    assert store.length("S") == 2
    assert store.stats("S", 1) == before


def test_the_symbol_limit_is_symbol_limit_and_creates_nothing() -> None:
    store = make_store(max_symbols=2)
    sink = make_sink(store, max_batch_size=10)
    sink("A", arr(1.0))
    sink("B", arr(1.0))
    assert rejected(sink, "C", arr(1.0)) is Reason.SYMBOL_LIMIT
    assert store.symbols() == ["A", "B"]
    sink("A", arr(3.0))  # existing symbols still take batches
    assert store.length("A") == 2


def test_batch_size_limit_is_inclusive() -> None:
    store = make_store()
    sink = make_sink(store, max_batch_size=3)
    sink("S", arr(1.0, 2.0, 3.0))
    assert rejected(sink, "S", arr(1.0, 2.0, 3.0, 4.0)) is Reason.BATCH_TOO_LARGE
    assert store.length("S") == 3


def test_an_engine_failure_is_not_turned_into_a_content_rejection() -> None:
    # Anything but ApiError/SymbolLimitError escapes: the processor nacks it INTERNAL (retryable).
    class Broken(Store):
        def ingest(self, symbol: str, values: np.ndarray, *origin: int) -> int:
            raise RuntimeError("engine down")

    sink = make_sink(Broken(NumpyEngine(), retention=RetentionPolicy(), max_symbols=2,
                            starting_capacity=64), max_batch_size=10)  # fmt: skip
    with pytest.raises(RuntimeError):
        sink("S", arr(1.0))
    processor = FrameProcessor(sink, "test", strict_order=True)
    (outcome,) = processor.process_message(encode_data(1, 1, "S", arr(1.0), first=True))
    assert (outcome.reason, outcome.applied) == (Reason.INTERNAL, 0)


def test_frames_through_the_processor_reach_the_store_all_or_nothing() -> None:
    store = make_store()
    processor = FrameProcessor(make_sink(store, max_batch_size=10), "test", strict_order=True)
    message = (
        encode_data(1, 1, "S", arr(1.0, 2.0), first=True)
        + encode_data(1, 2, "S", arr(3.0, -1.0))  # refused whole
        + encode_data(1, 3, "bad\x01", arr(9.0))
        + encode_data(1, 4, "S", arr(4.0))
    )
    outcomes = processor.process_message(message)
    assert [o.reason for o in outcomes] == [
        Reason.NONE, Reason.INVALID_VALUE, Reason.INVALID_SYMBOL, Reason.NONE,
    ]  # fmt: skip
    assert [o.applied for o in outcomes] == [1, 2, 3, 4]
    assert store.symbols() == ["S"]
    assert store.length("S") == 3
    assert store.stats("S", 1).last == 4.0


# --- the batch path and the one-reduction value check ------------------------------------------

SPECIALS = [0.0, -0.0, 1.5, -1.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1e308]


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("n", [1, 9, 1000])
def test_fast_check_answers_exactly_as_check_values(special: float, n: int) -> None:
    from appliance.errors import ApiError
    from appliance.ingest import fast_check
    from appliance.validation import check_values

    for at in (0, n // 2, n - 1):
        values = np.full(n, 2.0)
        values[at] = special

        def outcome(check, values=values):
            try:
                out = check(values)
            except ApiError as exc:
                return ("error", exc.code, exc.message)
            return ("ok", out.tobytes(), np.signbit(out).any())

        assert outcome(fast_check) == outcome(check_values)


def test_submit_batch_without_a_log_applies_in_order_and_stops_a_publisher_at_a_fault() -> None:
    store = make_store(max_symbols=2)
    sink = make_sink(store, max_batch_size=10)
    original = store.ingest

    def faulty(symbol, values, *origin):
        if float(values[0]) == 66.0:
            raise RuntimeError("engine fault")
        return original(symbol, values, *origin)

    store.ingest = faulty  # type: ignore[method-assign]
    items = [
        ("A", sink.prepare("A", arr(1.0)), 1, 1, None),
        ("A", sink.prepare("A", arr(66.0)), 1, 2, None),
        ("A", sink.prepare("A", arr(3.0)), 1, 3, None),
        ("B", sink.prepare("B", arr(4.0)), 2, 1, None),
        ("C", sink.prepare("C", arr(5.0)), 2, 2, None),
    ]
    answers: list = []
    sink.submit_batch(items, answers.append)
    assert answers == [
        [Reason.NONE, Reason.INTERNAL, Reason.INTERNAL, Reason.NONE, Reason.SYMBOL_LIMIT]
    ]
    assert store.length("A") == 1 and store.length("B") == 1
    with pytest.raises(Rejected) as info:
        sink.prepare("A", arr(1.0, -2.0))
    assert info.value.reason is Reason.INVALID_VALUE


def test_rest_and_the_wire_refuse_with_one_table() -> None:
    """One table (appliance.errors) gives REST's status and the transports' nack reason."""
    from appliance.durability.writer import StorageUnavailableError
    from appliance.errors import ERROR_CODES, ApiError
    from appliance.ingest import as_api_error, reason_for
    from appliance.store import SymbolLimitError

    refusals = {
        ApiError("invalid_symbol", "m"): (400, Reason.INVALID_SYMBOL),
        ApiError("invalid_value", "m"): (400, Reason.INVALID_VALUE),
        ApiError("empty_batch", "m"): (400, Reason.EMPTY_BATCH),
        ApiError("batch_too_large", "m"): (413, Reason.BATCH_TOO_LARGE),
        SymbolLimitError.at(10, 10): (409, Reason.SYMBOL_LIMIT),
        StorageUnavailableError("disk full"): (503, Reason.UNAVAILABLE),
    }
    for exc, (status, reason) in refusals.items():
        error = as_api_error(exc)
        assert error is not None and (error.status, reason_for(exc)) == (status, reason), exc
        assert ERROR_CODES[error.code].wire_reason is reason
    assert as_api_error(RuntimeError("boom")) is None
    assert reason_for(RuntimeError("boom")) is Reason.INTERNAL
    assert "existing symbols still accept batches" in str(as_api_error(SymbolLimitError("x")))
