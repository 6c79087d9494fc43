"""The cluster's edges (issue 16 findings 4, 5, 12), in process against a real nats-server.

Two ClusterNodes ("a", "b") with their own stores share one nats-server whose max_payload is
set small (64 KiB), so "too large for one NATS message" is cheap to reach:

- 4: a batch above max_payload is 413 batch_too_large at the entry node (owner or not),
  nothing is published or applied, and the partition keeps serving; the owner's publish
  backstop (MaxPayloadError) does not step the partition down; a stats_batch group whose
  answer is above max_payload is split, and every item still gets the owner's answer.
- 5: message ids are per source: a REST key equal to a ZeroMQ frame's id is applied, two
  principals' equal keys are two writes, one principal's retry is one.
- 12: the owner answers 400 to a request for a partition out of range or a symbol of another
  partition, 500 internal_error to its own fault (never silence), and the entry node turns a
  malformed owner answer into 503, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from appliance.cluster.local import NatsCluster
from appliance.cluster.messages import (
    BatchMessage,
    Request,
    decode_reply,
    encode,
    rest_msg_id,
    transport_msg_id,
)
from appliance.cluster.node import ClusterNode
from appliance.cluster.router import ClusterRouter
from appliance.cluster.sink import ClusterIngest
from appliance.config import ClusterConfig
from appliance.engine import load_numpy_engine
from appliance.errors import ApiError
from appliance.stats_batch import answer
from appliance.store import Store
from engine_core.contract import RetentionPolicy

PARTITIONS = 4
MAX_PAYLOAD = 64 * 1024


def _store() -> Store:
    return Store(
        load_numpy_engine(),
        retention=RetentionPolicy(max_values=1_000_000, keep_after_cleanup=500_000),
        max_symbols=1000,
        starting_capacity=1024,
    )


class Pair:
    def __init__(self, routers: list[ClusterRouter]) -> None:
        self.routers = routers

    def owner(self, symbol: str) -> ClusterRouter:
        p = self.routers[0].node.partition_of(symbol)
        (router,) = [r for r in self.routers if r.node.owned_serving(p)]
        return router

    def other(self, symbol: str) -> ClusterRouter:
        owner = self.owner(symbol)
        return next(r for r in self.routers if r is not owner)

    def symbol_owned_by(self, router: ClusterRouter, prefix: str = "S") -> str:
        for i in range(1000):
            symbol = f"{prefix}{i}"
            if self.owner(symbol) is router:
                return symbol
        raise AssertionError("no symbol for this node")


@contextlib.asynccontextmanager
async def _started_pair(tmp_path: Path) -> AsyncIterator[Pair]:
    with NatsCluster(tmp_path / "nats", nodes=1, max_payload_bytes=MAX_PAYLOAD) as cluster:
        routers = []
        for node_id in ("a", "b"):
            config = ClusterConfig(
                enabled=True,
                node_id=node_id,
                nats_urls=tuple(cluster.urls),
                partitions=PARTITIONS,
                replicas=1,
                lease_s=1.5,
                request_timeout_s=1.0,
            )
            routers.append(ClusterRouter(ClusterNode(config, _store())))
        try:
            for router in routers:
                await router.node.start()
            deadline = time.monotonic() + 30
            while True:
                served = [sum(r.node.owned_serving(p) for r in routers) for p in range(PARTITIONS)]
                mine = [sum(r.node.owned_serving(p) for p in range(PARTITIONS)) for r in routers]
                if served == [1] * PARTITIONS and min(mine) > 0:
                    break
                assert time.monotonic() < deadline, f"never stable: {served} {mine}"
                await asyncio.sleep(0.1)
            assert routers[0].max_payload() == MAX_PAYLOAD
            yield Pair(routers)
        finally:
            for router in routers:
                await router.node.stop()


Scenario = Callable[[Pair], Awaitable[None]]


@pytest.fixture
def run_pair(tmp_path: Path) -> Callable[[Scenario], None]:
    """Runs a scenario against a started pair of nodes, in one event loop."""

    def run(scenario: Scenario) -> None:
        async def main() -> None:
            async with _started_pair(tmp_path) as pair:
                await scenario(pair)

        asyncio.run(main())

    return run


def _values(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n)


async def _add(router: ClusterRouter, symbol: str, values: np.ndarray, msg_id: str) -> tuple:
    status, body = await router.add_batch(symbol, values, None, msg_id, time.time_ns())
    return status, json.loads(body)


# -- 4: max_payload --------------------------------------------------------------------------


async def _a_batch_above_max_payload_is_413_everywhere_and_the_partition_keeps_serving(
    pair: Pair,
) -> None:
    a, b = pair.routers
    big = _values(MAX_PAYLOAD // 8)  # the values alone fill max_payload
    for entry, owner in ((a, a), (b, a), (b, b), (a, b)):
        symbol = pair.symbol_owned_by(owner, prefix=f"big{entry.node.node_id}")
        status, body = await _add(entry, symbol, big, f"t:{symbol}")
        assert (status, body["code"]) == (413, "batch_too_large"), body
        assert symbol not in owner.store
        p = owner.node.partition_of(symbol)
        assert owner.node.owned_serving(p)
        status, body = await _add(entry, symbol, big[:1000], f"t2:{symbol}")
        assert status == 200 and body["added"] == 1000, body
        assert owner.store.length(symbol) == 1000


async def _max_payload_error_at_publish_does_not_step_the_partition_down(pair: Pair) -> None:
    a, _ = pair.routers
    symbol = pair.symbol_owned_by(a, prefix="backstop")
    p = a.node.partition_of(symbol)
    message = BatchMessage.of(symbol, _values(MAX_PAYLOAD // 8), None, time.time_ns())
    with pytest.raises(ApiError) as caught:
        await a.node.log_and_apply(message, "backstop:1")  # past the router's check
    assert caught.value.code == "batch_too_large"
    assert a.node.owned_serving(p)
    assert symbol not in a.store
    status, _ = await _add(a, symbol, _values(10), "backstop:2")
    assert status == 200


async def _a_stats_batch_answer_above_max_payload_is_split_and_answered(pair: Pair) -> None:
    a, b = pair.routers
    symbols = [pair.symbol_owned_by(a, prefix=f"q{i}_") for i in range(3)]
    for i, symbol in enumerate(symbols):
        assert (await _add(a, symbol, _values(500, seed=i), f"q:{i}"))[0] == 200
    # About 150 bytes an answer: 3000 answers are several times max_payload.
    items = [(symbols[i % 3], 1 + i % 8) for i in range(3000)]
    body = await b.stats_batch(items)  # every item is a's: forwarded, split on 413
    expected = json.loads(answer(a.store, items))["results"]
    got = json.loads(body)["results"]
    assert len(answer(a.store, items)) > 3 * MAX_PAYLOAD
    assert got == expected
    assert b.node.forwarded["stats_batch"] >= 8


# -- 5: message ids per source ----------------------------------------------------------------


async def _a_rest_key_equal_to_a_zmq_id_is_applied(pair: Pair) -> None:
    a, b = pair.routers
    symbol = pair.symbol_owned_by(a, prefix="ids")
    ingest = ClusterIngest(b, asyncio.get_running_loop()).for_transport("zmq")
    assert await ingest._one(symbol, _values(5), 7, 1, None) == 5
    # The old scheme gave both "7:1": the REST write was acked as a duplicate, never applied.
    status, _ = await _add(b, symbol, _values(3), rest_msg_id(None, symbol, "7:1"))
    assert status == 200
    assert a.store.length(symbol) == 8
    # The same frame again (a resend after a lost ack) is still one append; another
    # transport's publisher 7 seq 1 is its own.
    assert await ingest._one(symbol, _values(5), 7, 1, None) == 5
    assert a.store.length(symbol) == 8
    shm = ClusterIngest(a, asyncio.get_running_loop()).for_transport("shm")
    await shm._one(symbol, _values(2), 7, 1, None)
    assert a.store.length(symbol) == 10


async def _two_principals_equal_keys_do_not_collide(pair: Pair) -> None:
    a, b = pair.routers
    symbol = pair.symbol_owned_by(b, prefix="tenant")
    for principal, router in (("alice", a), ("bob", b), (None, a)):
        status, _ = await _add(router, symbol, _values(4), rest_msg_id(principal, symbol, "k1"))
        assert status == 200
    assert b.store.length(symbol) == 12
    status, _ = await _add(a, symbol, _values(4), rest_msg_id("alice", symbol, "k1"))  # retry
    assert status == 200
    assert b.store.length(symbol) == 12


def test_message_ids_name_exactly_one_source() -> None:
    assert rest_msg_id("a:b", "S", "k") != rest_msg_id("a", "b:S", "k")
    assert rest_msg_id("a%3Ab", "S", "k") != rest_msg_id("a:b", "S", "k")
    assert rest_msg_id("alice", "S", "7:1") == "rest:alice:S:7:1"
    assert transport_msg_id("zmq", 7, 1) == "zmq:7:1"
    assert transport_msg_id("zmq", 7, 1) != transport_msg_id("shm", 7, 1)


# -- 12: the owner trusts no request; the asker survives a bad answer ---------------------


async def _handle(router: ClusterRouter, request: Request) -> tuple[int, dict]:
    reply = decode_reply(await router.handle(encode(request)))
    return reply.status, json.loads(reply.body)


async def _the_owner_refuses_requests_for_the_wrong_partition(pair: Pair) -> None:
    a, _ = pair.routers
    symbol = pair.symbol_owned_by(a, prefix="val")
    assert (await _add(a, symbol, _values(3), "val:1"))[0] == 200
    p = a.node.partition_of(symbol)
    wrong = (p + 1) % PARTITIONS
    elsewhere = next(s for s in (f"x{i}" for i in range(100)) if a.node.partition_of(s) != p)
    for request in (
        Request(op="stats", partition=PARTITIONS, symbol=symbol, key=1),
        Request(op="stats", partition=-1, symbol=symbol, key=1),
        Request(op="stats", partition=wrong, symbol=symbol, key=1),
        Request(op="delete", partition=wrong, symbol=symbol, msg_id="d"),
        Request(op="stats_batch", partition=p, queries=[(symbol, 1), (elsewhere, 1)]),
        Request(op="add_batch", partition=wrong, msg_id="w",
                batch=BatchMessage.of(symbol, _values(2), None, 1)),
        Request(op="add_batch", partition=p, msg_id="w"),
    ):  # fmt: skip
        status, body = await _handle(a, request)
        assert (status, body["code"]) == (400, "bad_request"), (request, body)
    assert a.store.length(symbol) == 3
    status, body = await _handle(a, Request(op="stats", partition=p, symbol=symbol, key=1))
    assert status == 200, body
    reply = decode_reply(await a.handle(b"\x00garbage"))
    assert reply.status == 400


async def _an_owner_fault_is_a_500_reply_not_a_timeout(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair.routers
    symbol = pair.symbol_owned_by(a, prefix="fault")
    assert (await _add(a, symbol, _values(3), "fault:1"))[0] == 200

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("engine fault")

    monkeypatch.setattr(a.store, "stats", broken)
    started = time.monotonic()
    status, body = await b.stats(symbol, 1)  # forwarded to a
    assert status == 500 and json.loads(body)["code"] == "internal_error"
    assert time.monotonic() - started < b.timeout_s  # answered, not waited out


BAD_ANSWERS = [
    (200, b"not json"),
    (200, b'{"results":[]}'),  # wrong number of results
    (200, b'{"results":[1,2,3,4,5,6,7,8,9]}'),
    (999, b"{}"),
]


async def _a_malformed_owner_answer_is_503_at_the_entry_node(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair.routers
    symbol = pair.symbol_owned_by(a, prefix="mal")
    assert (await _add(a, symbol, _values(3), "mal:1"))[0] == 200
    for bad in BAD_ANSWERS:

        async def malformed(request: Request, bad: tuple[int, bytes] = bad) -> tuple[int, bytes]:
            return bad

        monkeypatch.setattr(a, "_local_safe", malformed)
        body = json.loads(await b.stats_batch([(symbol, 1), (symbol, 2)]))
        assert [r["code"] for r in body["results"]] == ["partition_unavailable"] * 2, bad
        if bad[0] != 200:
            status, raw = await b.stats(symbol, 1)
            assert status == 503 and msgspec.json.decode(raw)["code"] == "partition_unavailable"
        status, raw = await b.symbols()  # every partition asked, a's among them
        assert status == 503, (bad, raw)
        assert isinstance(raw, bytes) and json.loads(raw)["code"] == "partition_unavailable"


# -- the tests: each scenario against a freshly started pair -------------------------------


def test_a_batch_above_max_payload_is_413_everywhere_and_the_partition_keeps_serving(
    run_pair: Callable[[Scenario], None],
) -> None:
    run_pair(_a_batch_above_max_payload_is_413_everywhere_and_the_partition_keeps_serving)


def test_max_payload_error_at_publish_does_not_step_the_partition_down(
    run_pair: Callable[[Scenario], None],
) -> None:
    run_pair(_max_payload_error_at_publish_does_not_step_the_partition_down)


def test_a_stats_batch_answer_above_max_payload_is_split_and_answered(
    run_pair: Callable[[Scenario], None],
) -> None:
    run_pair(_a_stats_batch_answer_above_max_payload_is_split_and_answered)


def test_message_ids_are_per_source(run_pair: Callable[[Scenario], None]) -> None:
    async def both(pair: Pair) -> None:
        await _a_rest_key_equal_to_a_zmq_id_is_applied(pair)
        await _two_principals_equal_keys_do_not_collide(pair)

    run_pair(both)


def test_the_owner_validates_and_the_entry_survives_bad_answers(
    run_pair: Callable[[Scenario], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def all_of_them(pair: Pair) -> None:
        await _the_owner_refuses_requests_for_the_wrong_partition(pair)
        await _a_malformed_owner_answer_is_503_at_the_entry_node(pair, monkeypatch)
        monkeypatch.undo()
        await _an_owner_fault_is_a_500_reply_not_a_timeout(pair, monkeypatch)

    run_pair(all_of_them)


class _RecordingIngest:
    """Stands in for ClusterIngest: records which transport's view each frame went through."""

    def __init__(self, transport: str = "", seen: list[tuple[str, int]] | None = None) -> None:
        self.transport = transport
        self.seen: list[tuple[str, int]] = [] if seen is None else seen

    def for_transport(self, transport: str) -> _RecordingIngest:
        return _RecordingIngest(transport, self.seen)

    def ingest(self, symbol: str, values: object, publisher_id: int = 0, sequence: int = 0,
               timestamps: object = None) -> int:  # fmt: skip
        self.seen.append((self.transport, publisher_id))
        return 1


def test_each_transports_sink_ingests_under_its_own_name() -> None:
    from appliance.app import ClusterIngestSlot
    from appliance.ingest import make_sink

    slot = ClusterIngestSlot(_store())
    sinks = {name: make_sink(slot, 100, None, name) for name in ("zmq", "shm", "rdma")}
    with pytest.raises(ApiError) as caught:  # not joined yet
        sinks["zmq"].store.ingest("S", np.ones(1), 1, 1)
    assert caught.value.code == "partition_unavailable"
    target = _RecordingIngest()
    slot.attach(target)
    for i, name in enumerate(("shm", "zmq", "rdma")):
        sinks[name].store.ingest("S", np.ones(1), i, 1)
    assert target.seen == [("shm", 0), ("zmq", 1), ("rdma", 2)]
