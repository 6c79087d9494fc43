"""ClusterNode's ownership/checkpoint races (issue 16 review findings 1, 2, 3, 7, 8, 9, 10, 13)
against an in-memory JetStream: each test drives the exact interleaving a real cluster only
hits by chance (a stop during a takeover, a publish cancelled mid-flight, a deposed owner's
late checkpoint), and checks what the next owner would restore."""

from __future__ import annotations

import asyncio
import functools
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from nats.js import errors as js_errors

from appliance.cluster import node as node_mod
from appliance.cluster.messages import BatchMessage, decode_checkpoint, encode
from appliance.cluster.node import ClusterNode, ReplayGapError
from appliance.cluster.partitions import partition_key, partition_of
from appliance.config import ClusterConfig
from appliance.errors import ApiError
from appliance.store import Store
from engine_core import RetentionPolicy
from fallback import NumpyEngine

PARTS = 2


def run_async(fn: Any) -> Any:
    """No asyncio pytest plugin here: each test runs its coroutine on a fresh loop."""

    @functools.wraps(fn)
    def wrapper() -> None:
        asyncio.run(fn())

    return wrapper


class FakeStream:
    def __init__(self) -> None:
        self.msgs: dict[int, bytes] = {}
        self.last = 0
        self.first = 1

    def state(self) -> Any:
        return SimpleNamespace(
            last_seq=self.last, first_seq=self.first if self.msgs else self.last + 1
        )


class FakeJS:
    """Streams HFT_P<N>: publish honours Nats-Expected-Last-Sequence (error 10071)."""

    def __init__(self) -> None:
        self.streams = {p: FakeStream() for p in range(PARTS)}
        self.publish_gate: asyncio.Event | None = None  # set: publishes wait for it

    @staticmethod
    def _p(name: str) -> int:
        return int(name.rsplit("P", 1)[1]) if "P" in name else int(name.rsplit(".", 1)[1])

    async def stream_info(self, name: str) -> Any:
        return SimpleNamespace(state=self.streams[self._p(name)].state())

    async def publish(self, subject: str, data: bytes, timeout: float, headers: dict) -> Any:
        if self.publish_gate is not None:
            await self.publish_gate.wait()
        stream = self.streams[int(subject.rsplit(".", 1)[1])]
        expected = headers.get("Nats-Expected-Last-Sequence")
        if expected is not None and int(expected) != stream.last:
            raise js_errors.APIError(code=400, err_code=10071, description="wrong last sequence")
        stream.last += 1
        stream.msgs[stream.last] = data
        return SimpleNamespace(seq=stream.last, duplicate=False)

    def append(self, p: int, message: BatchMessage) -> int:
        stream = self.streams[p]
        stream.last += 1
        stream.msgs[stream.last] = encode(message)
        return stream.last

    async def pull_subscribe(self, subject: str, durable: Any, stream: str, config: Any) -> Any:
        s = self.streams[self._p(stream)]
        seqs = iter(sorted(q for q in s.msgs if q >= config.opt_start_seq))

        class Sub:
            async def fetch(self, batch: int, timeout: float) -> list[Any]:
                out = []
                for seq in seqs:
                    meta = SimpleNamespace(sequence=SimpleNamespace(stream=seq))
                    out.append(SimpleNamespace(data=s.msgs[seq], metadata=meta))
                    if len(out) >= batch:
                        break
                return out

            async def unsubscribe(self) -> None:
                return None

        return Sub()

    async def purge_stream(self, name: str, seq: int) -> None:
        s = self.streams[self._p(name)]
        for q in [q for q in s.msgs if q < seq]:
            del s.msgs[q]
        s.first = seq


class FakeObjects:
    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str | None]] = {}
        self.get_gate: asyncio.Event | None = None

    async def get(self, key: str) -> Any:
        if self.get_gate is not None:
            await self.get_gate.wait()
        if key not in self.objects:
            raise js_errors.ObjectNotFoundError
        return SimpleNamespace(data=self.objects[key][0])

    async def get_info(self, key: str) -> Any:
        if key not in self.objects:
            raise js_errors.ObjectNotFoundError
        return SimpleNamespace(description=self.objects[key][1])

    async def put(self, key: str, data: bytes, meta: Any = None) -> None:
        self.objects[key] = (data, getattr(meta, "description", None))


class FakeKV:
    def __init__(self) -> None:
        self.revision = 0

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.revision += 1
        return self.revision

    async def create(self, key: str, value: bytes) -> int:
        self.revision += 1
        return self.revision

    async def delete(self, key: str, last: int = 0) -> None:
        return None

    async def put(self, key: str, value: bytes) -> int:
        self.revision += 1
        return self.revision

    async def keys(self) -> list[str]:
        return []


def make_node(max_symbols: int = 100, js: FakeJS | None = None) -> ClusterNode:
    store = Store(
        NumpyEngine(), retention=RetentionPolicy(), max_symbols=max_symbols, starting_capacity=64
    )
    config = ClusterConfig(
        enabled=True, node_id="a", partitions=PARTS, lease_s=3.0, request_timeout_s=2.0
    )
    node = ClusterNode(config, store)
    node.js = js or FakeJS()
    node._objects = FakeObjects()
    node._owners = node._nodes = node._status = FakeKV()
    node.nc = SimpleNamespace()
    return node


def symbols_of(p: int, count: int) -> list[str]:
    found = [f"s{i}" for i in range(10_000) if partition_of(f"s{i}", PARTS) == p]
    return found[:count]


def batch(symbol: str, *values: float) -> BatchMessage:
    return BatchMessage.of(symbol, np.array(values, dtype=np.float64), None, 1)


def own(node: ClusterNode, p: int) -> None:
    part = node.parts[p]
    part.owned = True
    part.lease_deadline = time.monotonic() + node.config.lease_s


async def take(node: ClusterNode, p: int) -> None:
    own(node, p)
    await node._take_over(node.parts[p])
    assert node.parts[p].serving


def stored_checkpoint(node: ClusterNode, p: int) -> Any:
    return decode_checkpoint(node._objects.objects[partition_key(p)][0])


@run_async
async def test_stop_during_takeover_writes_no_empty_checkpoint() -> None:
    """Finding 2: an owner served p at seq 2, released it; on a later takeover stop() lands
    while the checkpoint is being fetched. The old code checkpointed {seq 2, no symbols}."""
    node = make_node()
    sym = symbols_of(0, 1)[0]
    node.js.append(0, batch(sym, 1.0))
    node.js.append(0, batch(sym, 2.0))
    await take(node, 0)
    await node._checkpoint(node.parts[0])
    good = stored_checkpoint(node, 0)
    assert good.symbols and good.seq == node.parts[0].applied_seq

    node._drop(node.parts[0])  # lease lost; later the node is desired again
    await asyncio.sleep(0)
    own(node, 0)
    node._objects.get_gate = asyncio.Event()  # the takeover hangs in objects.get
    task = asyncio.get_running_loop().create_task(node._take_over(node.parts[0]))
    node.parts[0].task = task
    await asyncio.sleep(0.01)
    await node.stop()  # cancels the takeover, then releases what it owns
    after = stored_checkpoint(node, 0)
    assert after.seq == good.seq and [s.symbol for s in after.symbols] == [sym]


@run_async
async def test_takeover_keeps_symbols_above_max_symbols() -> None:
    """Finding 3: acknowledged symbols beyond store.max_symbols survive restore and replay."""
    node = make_node(max_symbols=2)
    names = symbols_of(0, 4)
    for name in names[:3]:
        node.js.append(0, batch(name, 1.0, 2.0))
    await take(node, 0)
    await node._checkpoint(node.parts[0])
    node.js.append(0, batch(names[3], 5.0))  # after the checkpoint: replayed
    fresh = make_node(max_symbols=2, js=node.js)
    fresh._objects = node._objects
    await take(fresh, 0)
    assert sorted(fresh.store.symbols()) == sorted(names)
    # the write path still refuses a NEW symbol over the limit
    with pytest.raises(Exception, match="symbol limit"):
        fresh.precheck("zz-new", np.ones(1), None, 1)


@run_async
async def test_replay_below_first_seq_fails_the_takeover_loudly() -> None:
    """Finding 7: a stream purged past the checkpoint must not be served (silent loss)."""
    node = make_node()
    sym = symbols_of(1, 1)[0]
    for v in range(5):
        node.js.append(1, batch(sym, float(v)))
    await node.js.purge_stream("HFT_P1", seq=4)  # messages 1..3 gone, no checkpoint
    part = node.parts[1]
    own(node, 1)
    with pytest.raises(ReplayGapError):
        await node._replay(part)
    own(node, 1)
    await node._take_over(part)
    assert not part.serving and not part.owned and node.replay_gaps == 1
    assert node.snapshot()["replay_gaps"] == 1


@run_async
async def test_a_deposed_owner_never_overwrites_a_newer_checkpoint() -> None:
    """Finding 7: last-writer-wins put replaced by a seq check against the stored object."""
    old = make_node()
    sym = symbols_of(0, 1)[0]
    old.js.append(0, batch(sym, 1.0))
    await take(old, 0)
    snap = old.parts[0]
    async with snap.lock:
        taken = await old._take_snapshot(snap)
    assert taken is not None
    # meanwhile a new owner took over, appended and checkpointed a newer state
    new = make_node(js=old.js)
    new._objects = old._objects
    await take(new, 0)
    await new.log_and_apply(batch(sym, 2.0), "id-2")
    await new._checkpoint(new.parts[0])
    newer = stored_checkpoint(new, 0).seq
    assert not await old._put_checkpoint(snap, *taken)  # refused
    assert stored_checkpoint(new, 0).seq == newer
    # and a checkpoint with no lease left is not written at all
    snap.lease_deadline = time.monotonic() - 1
    assert not await old._put_checkpoint(snap, newer + 5, taken[1])


@run_async
async def test_reads_stop_when_the_lease_lapses_even_if_the_heartbeat_fails() -> None:
    """Finding 1: owned_serving checks the lease; a failing heartbeat still runs the renew
    path that stops serving."""
    node = make_node()
    await take(node, 0)
    assert node.owned_serving(0)
    node.parts[0].lease_deadline = time.monotonic() - 0.01
    assert not node.owned_serving(0)  # reads refuse at once, no tick needed

    async def broken_put(key: str, value: bytes) -> int:
        raise TimeoutError

    async def broken_update(key: str, value: bytes, last: int) -> int:
        raise TimeoutError

    node._nodes = SimpleNamespace(put=broken_put)
    node._owners = SimpleNamespace(update=broken_update)
    with pytest.raises(TimeoutError):
        await node.tick()
    assert node.parts[0].serving is False


@run_async
async def test_a_hanging_renew_is_bounded_below_one_tick() -> None:
    node = make_node()
    own(node, 0)

    async def hang(key: str, value: bytes, last: int) -> int:
        await asyncio.sleep(60)
        return 0

    node._owners = SimpleNamespace(update=hang)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await node._renew(node.parts[0])
    assert time.monotonic() - started < node.tick_s


@run_async
async def test_a_cancelled_publish_steps_down() -> None:
    """Finding 9: the client going away mid-publish leaves the stream's state unknown."""
    node = make_node()
    await take(node, 0)
    node.js.publish_gate = asyncio.Event()
    sym = symbols_of(0, 1)[0]
    task = asyncio.get_running_loop().create_task(node.log_and_apply(batch(sym, 1.0), "x"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert node.parts[0].serving is False


@run_async
async def test_publish_timeout_is_capped_by_the_lease_left() -> None:
    """Finding 8: never publish with more time than the lease surely has left."""
    node = make_node()
    await take(node, 0)
    seen: list[float] = []
    real = node.js.publish

    async def spy(subject: str, data: bytes, timeout: float, headers: dict) -> Any:
        seen.append(timeout)
        return await real(subject, data, timeout=timeout, headers=headers)

    node.js.publish = spy
    sym = symbols_of(0, 1)[0]
    node.parts[0].lease_deadline = time.monotonic() + 0.5
    await node.log_and_apply(batch(sym, 1.0), "a")
    assert 0 < seen[-1] <= 0.5
    node.parts[0].lease_deadline = time.monotonic() + 0.01
    with pytest.raises(ApiError):
        await node.log_and_apply(batch(sym, 2.0), "b")


@run_async
async def test_takeover_fences_a_deposed_owners_late_publish() -> None:
    """Finding 8: after replay the new owner appends a marker expecting the last sequence, so
    the old owner's publish (expecting the older last) is refused whenever it lands."""
    old = make_node()
    await take(old, 0)
    sym = symbols_of(0, 1)[0]
    await old.log_and_apply(batch(sym, 1.0), "a")
    stale_expected = old.parts[0].applied_seq
    new = make_node(js=old.js)
    new._objects = old._objects
    await take(new, 0)
    with pytest.raises(js_errors.APIError):
        await old.js.publish(
            "hft.p.0", encode(batch(sym, 9.0)), timeout=1.0,
            headers={"Nats-Expected-Last-Sequence": str(stale_expected)},
        )  # fmt: skip
    # the marker is a no-op for the state, and the new owner writes on after it
    await new.log_and_apply(batch(sym, 2.0), "b")
    assert new.store.snapshot_values(sym).tolist() == [1.0, 2.0]


@run_async
async def test_checkpoint_upload_does_not_hold_the_partition_lock() -> None:
    """Finding 10: writes go on while a checkpoint uploads."""
    node = make_node()
    await take(node, 0)
    sym = symbols_of(0, 1)[0]
    await node.log_and_apply(batch(sym, 1.0), "a")
    gate = asyncio.Event()
    real_put = node._objects.put

    async def slow_put(key: str, data: bytes, meta: Any = None) -> None:
        await gate.wait()
        await real_put(key, data, meta=meta)

    node._objects.put = slow_put
    task = asyncio.get_running_loop().create_task(node._checkpoint(node.parts[0]))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(node.log_and_apply(batch(sym, 2.0), "b"), timeout=1.0)
    gate.set()
    await task
    assert stored_checkpoint(node, 0).seq == node.parts[0].applied_seq - 1


def test_checkpoint_seq_of_reads_the_description() -> None:
    assert node_mod.checkpoint_seq_of(SimpleNamespace(description="seq=42")) == 42
    assert node_mod.checkpoint_seq_of(SimpleNamespace(description=None)) == 0
    assert node_mod.checkpoint_seq_of(SimpleNamespace(description="seq=x")) == 0


@run_async
async def test_a_stream_nats_will_not_update_refuses_the_start() -> None:
    """Finding 6: settings that differ and cannot be updated stop the start (the CLI exits 2)."""
    from nats.js import api

    node = make_node()

    async def refuse(config: Any) -> None:
        raise js_errors.APIError(code=500, description="replicas change not supported")

    node.js.update_stream = refuse
    current = api.StreamConfig(name="HFT_P0", duplicate_window=120.0, num_replicas=1)
    await node._reconcile(current, duplicate_window=120.0, num_replicas=1)  # same: no update
    with pytest.raises(node_mod.ConfigMismatchError, match="HFT_P0"):
        await node._reconcile(current, duplicate_window=120.0, num_replicas=3)


def test_ready_is_503_while_nats_is_disconnected() -> None:
    """Finding 1: a node cut off from NATS says so on /ready (the balancer routes around it)."""
    import json as _json
    import uuid

    from appliance.app import create_app
    from appliance.config import build_config

    app = create_app(build_config({}), name=f"test_{uuid.uuid4().hex[:12]}")
    app.ctx.readiness.mark_ready()
    handler = next(r.handler for r in app.router.routes if r.path.strip("/") == "ready")
    request = SimpleNamespace(app=app, stream=None, headers={}, body=b"", query_string="")
    node = make_node()
    app.ctx.cluster = SimpleNamespace(node=node)
    node.nc = SimpleNamespace(is_connected=True)
    assert asyncio.run(handler(request)).status == 200
    node.nc = SimpleNamespace(is_connected=False)
    response = asyncio.run(handler(request))
    assert response.status == 503
    assert _json.loads(response.body)["code"] == "not_ready"
