"""The live statistics hub's policies on a real store: which events a tick sends, what they
hold (checked against numpy), how a client's bounded queue drops, and the `seconds` format."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import StreamConfig
from appliance.errors import ApiError
from appliance.live import LiveHub, StreamClient, Window, parse_symbols, sse
from appliance.store import Store
from appliance.validation import parse_seconds, validate_symbol
from engine_core import RetentionPolicy
from fallback import NumpyEngine


def make_store() -> Store:
    return Store(NumpyEngine(), retention=RetentionPolicy(), max_symbols=100,
                 starting_capacity=1024)  # fmt: skip


def events(client: StreamClient) -> list[tuple[str, dict]]:
    chunk, _ = client.take()
    out = []
    for block in chunk.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def run(coro_fn):
    return asyncio.run(coro_fn())


def test_a_tick_sends_one_event_per_changed_symbol_with_numpy_numbers() -> None:
    async def scenario() -> None:
        store = make_store()
        hub = LiveHub(store, StreamConfig(max_rate_hz=1000))
        rng = np.random.default_rng(3)
        sent = {"A": rng.random(50) * 10, "B": rng.random(7)}
        store.ingest("A", sent["A"])
        client = hub.register(("A", "B", "C"), Window(1))
        assert [(n, d["symbol"]) for n, d in events(client)] == [("stats", "A")]
        for _ in range(30):  # many batches between two ticks coalesce into one event each
            more = rng.random(3)
            store.ingest("A", more)
            sent["A"] = np.concatenate([sent["A"], more])
        store.ingest("B", sent["B"])
        hub.tick()
        got = {d["symbol"]: d for _, d in events(client)}
        assert set(got) == {"A", "B"}
        assert got["A"]["version"] == 31 and got["B"]["version"] == 1
        for symbol, data in got.items():
            window = sent[symbol][-10:]
            assert data["count"] == window.size and data["exponent"] == 1
            assert data["min"] == window.min() and data["max"] == window.max()
            assert data["last"] == window[-1]
            assert data["avg"] == pytest.approx(window.mean(), rel=1e-12)
            assert data["var"] == pytest.approx(window.var(), rel=1e-9, abs=1e-15)
            assert data["timestamp"] == store.newest_timestamp(symbol)
        hub.tick()  # nothing changed: nothing sent
        assert events(client) == []
        hub.close()

    run(scenario)


def test_a_time_window_event_counts_values_by_timestamp() -> None:
    async def scenario() -> None:
        store = make_store()
        ts = np.array([1_000, 2_000, 3_000, 4_000], dtype=np.int64) * 10**9
        store.ingest("T", np.array([4.0, 3.0, 2.0, 1.0]), timestamps=ts)
        hub = LiveHub(store, StreamConfig())
        client = hub.register(("T",), Window(-parse_seconds("2000")))
        ((_, data),) = events(client)
        assert data["window_ns"] == 2000 * 10**9 and "exponent" not in data
        assert data["count"] == 3 and data["max"] == 3.0 and data["min"] == 1.0
        hub.close()

    run(scenario)


@given(limit=st.integers(1, 20), pushed=st.integers(0, 60))
def test_a_client_queue_drops_past_its_limit_and_ends_with_one_final_event(
    limit: int, pushed: int
) -> None:
    async def scenario() -> None:
        client = StreamClient(("A",), Window(1), limit)
        for i in range(pushed):
            client.push(sse("stats", json.dumps({"i": i}).encode()))
        chunk, done = client.take()
        if pushed <= limit:
            assert not done and not client.dropped
            assert chunk.count(b"event: stats") == pushed
        else:  # the events pending at the drop are discarded: only the final event is left
            assert done and client.dropped
            assert chunk.startswith(b"event: dropped") and b"event: stats" not in chunk
        assert not client.wake.is_set()

    run(scenario)


def test_max_clients_is_429_and_a_closed_hub_refuses_new_streams() -> None:
    async def scenario() -> None:
        hub = LiveHub(make_store(), StreamConfig(max_clients=2))
        first = hub.register(("A",), Window(1))
        hub.register(("A",), Window(1))
        with pytest.raises(ApiError) as refused:
            hub.register(("A",), Window(1))
        assert refused.value.code == "rate_limited" and refused.value.status == 429
        hub.unregister(first)
        hub.register(("A",), Window(1))
        hub.close()
        chunk, done = next(iter(hub.clients)).take()
        assert done and chunk.startswith(b"event: end")
        with pytest.raises(ApiError) as stopping:
            hub.register(("A",), Window(1))
        assert stopping.value.code == "not_ready"

    run(scenario)


@pytest.mark.parametrize(
    ("raw", "code"),
    [(None, "missing_parameter"), ("", "missing_parameter"), ("A,,B", "invalid_symbol"),
     ("A,\x01", "invalid_symbol"), (",".join("S" * 3 + str(i) for i in range(5)),
                                     "invalid_symbol")],
)  # fmt: skip
def test_symbols_parameter_errors(raw: str | None, code: str) -> None:
    with pytest.raises(ApiError) as error:
        parse_symbols(raw, validate_symbol, limit=4)
    assert error.value.code == code


def test_symbols_parameter_keeps_order_and_drops_repeats() -> None:
    assert parse_symbols("B,A,B", validate_symbol, limit=2) == ("B", "A")


@given(ns=st.integers(1, 2**63 - 1))
def test_parse_seconds_round_trips_every_ns(ns: int) -> None:
    whole, fraction = divmod(ns, 10**9)
    assert parse_seconds(f"{whole}.{fraction:09d}") == ns
    if fraction == 0:
        assert parse_seconds(str(whole)) == ns


@given(text=st.text(max_size=30))
def test_parse_seconds_accepts_only_plain_positive_decimals(text: str) -> None:
    try:
        ns = parse_seconds(text)
    except ApiError as error:
        assert error.code == "invalid_window"
        return
    assert text.isascii() and "e" not in text.lower() and not text.startswith(("-", "+"))
    assert ns == int(Decimal(text) * 10**9) and 1 <= ns <= 2**63 - 1


def test_a_symbol_deleted_and_created_again_between_two_ticks_gets_its_new_state() -> None:
    """Its batch count starts again at 0: reaching the old count before the next tick must
    not read as 'unchanged' (the stream would keep showing the deleted series)."""

    async def scenario() -> None:
        store = make_store()
        hub = LiveHub(store, StreamConfig(max_rate_hz=1000))
        store.ingest("A", np.array([1.0, 2.0]))
        client = hub.register(("A",), Window(1))
        assert [d["avg"] for _, d in events(client)] == [1.5]
        store.delete("A")
        store.ingest("A", np.array([100.0]))  # version 1 again, as before the delete
        hub.tick()
        assert [(d["avg"], d["version"]) for _, d in events(client)] == [(100.0, 1)]
        hub.close()

    run(scenario)


def test_a_stream_whose_first_read_fails_takes_no_slot(monkeypatch) -> None:
    async def scenario() -> None:
        store = make_store()
        hub = LiveHub(store, StreamConfig(max_rate_hz=1000, max_clients=1))
        store.ingest("A", np.array([1.0]))

        def broken(*args: object) -> None:
            raise RuntimeError("engine fault")

        monkeypatch.setattr(store, "stats", broken)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                hub.register(("A",), Window(1))
        monkeypatch.undo()
        assert not hub.clients
        client = hub.register(("A",), Window(1))  # the one slot is still free
        assert [d["last"] for _, d in events(client)] == [1.0]
        hub.close()

    run(scenario)
