"""One appliance's part in the cluster: membership, partition leases, the partition log.

Everything here runs on the Sanic event loop (nats-py is asyncio). The moving parts:

- Membership: KV `hft_nodes` (ttl = lease_s) key `<node_id>`, put every lease_s / 3; the live
  members are the bucket's keys. A clean stop deletes the key so the others rebalance at once.
- Ownership: KV `hft_owners` (ttl = lease_s) key `p<N>` = owner. The owner renews it with
  update(last=revision) every tick; an absent key (expired, deleted) is taken with create().
  The desired owner is the rendezvous winner over the live members (appliance.cluster.
  partitions): a node releases what it owns but is not the desired owner of (checkpoint, stop
  applying, delete the key) and takes what it desires and nobody holds.
- Takeover = drop any stale local symbols of the partition (and the sequence they stood for),
  restore the object store's checkpoint `p<N>`, replay the stream HFT_P<N> from the
  checkpoint's sequence + 1 to its last sequence (refused if the stream was purged past it:
  ReplayGapError), append a no-op fence marker expecting that last sequence, subscribe
  `hft.req.p.<N>`, THEN serve. Until then the partition answers 503 partition_unavailable.
  Restore and replay ignore store.max_symbols: they rebuild acknowledged data.
- The write path (`ingest`): under the partition's lock, publish with Nats-Msg-Id (a retry is a
  duplicate) and Nats-Expected-Last-Sequence = the last sequence applied here (fencing: a deposed
  owner's publish fails), await JetStream's ack (the batch is replicated), apply to the Store,
  return. A publish that fails or times out leaves the stream's state unknown here, so the
  partition stops serving and re-syncs by replay before it serves again.
- nats-server checks the expected last sequence BEFORE the message id (checked on 2.15: a
  stale expected sequence with a duplicate id is error 10071, not a duplicate ack), so a
  deposed owner can never be told "duplicate, fine" for a batch; the serving owner, whose
  applied sequence is the stream's last, gets the duplicate ack for a retried id and then
  answers without applying it again (it was applied when first logged, or by the replay).
- An owner only reads and writes while its lease is surely its own (`owned_serving`, and a
  publish timeout capped by the lease left): after `lease_s` without a successful renew it
  stops serving (another node may take the key once it expires). A write cancelled mid-publish
  steps down like a failed one.
- Checkpoints: every checkpoint_interval_s (and on a clean release of a serving partition) the
  partition's symbols (values + time marks) at applied sequence S are copied under the lock
  and uploaded outside it to object `p<N>` of `hft_checkpoints` (description "seq=S"); never
  over a stored checkpoint with a higher S, never with no lease left.
- Status: each owner puts {"applied_seq", "owner", "symbols"} into KV `hft_status` every tick.

Failover bound for a kill -9: the key expires within lease_s of the dead owner's last renew
(JetStream's max_age), the desired node notices at its next tick (lease_s / 3), then restores
and replays at most checkpoint_interval_s of batches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import numpy as np
from nats.js import api
from nats.js import errors as js_errors

from appliance.cluster.messages import (
    BatchMessage,
    PartitionCheckpoint,
    SymbolState,
    decode_batch,
    decode_checkpoint,
    encode,
)
from appliance.cluster.partitions import (
    assignment,
    partition_key,
    partition_of,
    request_subject,
    stream_name,
    stream_subject,
)
from appliance.config import ClusterConfig
from appliance.errors import ApiError
from appliance.store import Store, SymbolLimitError, UnknownSymbolError
from appliance.timestamps import OutOfOrderError, resolve

log = logging.getLogger(__name__)

NODES_BUCKET = "hft_nodes"
OWNERS_BUCKET = "hft_owners"
STATUS_BUCKET = "hft_status"
CHECKPOINT_BUCKET = "hft_checkpoints"
WRONG_LAST_SEQUENCE = (10071, 10164)  # JSStreamWrongLastSequence(Constant)Err
REPLAY_FETCH = 1024
RESTORE_CHUNK = 1 << 20
SETUP_TIMEOUT_S = 30.0
MIN_PUBLISH_S = 0.05  # less lease than this left: refuse the write rather than risk it
FENCE_ATTEMPTS = 3  # replay + fence marker rounds before a takeover gives up (retried next tick)


class ReplayGapError(Exception):
    """The stream no longer holds the messages after the restored checkpoint (purged): serving
    would silently lose acknowledged batches, so the takeover fails loudly instead."""


class ConfigMismatchError(Exception):
    """An existing bucket or stream has settings that differ from [cluster] and could not be
    updated (the CLI exits 2)."""


def unavailable(partition: int, why: str = "is moving to another node") -> ApiError:
    """503 partition_unavailable with Retry-After (the error table's row)."""
    return ApiError(
        "partition_unavailable",
        f"partition {partition} {why}; retry",
        headers={"Retry-After": "1"},
    )


@dataclass
class Partition:
    """This node's view of one partition. Written on the event loop only."""

    number: int
    owned: bool = False  # we hold the key in hft_owners (revision below)
    serving: bool = False  # restored + replayed: reads and writes are answered here
    revision: int = 0
    applied_seq: int = 0  # the last stream sequence applied to the store
    lease_deadline: float = 0.0  # monotonic time our lease surely lasts until
    last_checkpoint: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # publish + apply, checkpoints
    task: asyncio.Task | None = None  # the takeover / release / resync in flight
    subscription: Any = None
    stream_last_seq: int = 0  # from the last status tick (lag metric)
    # (monotonic time, stream sequence) of this node's checkpoints not yet purged behind
    checkpoints: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    purged_seq: int = 0  # messages up to this sequence were purged by this node


class ClusterNode:
    """The cluster side of one appliance: see the module docstring."""

    def __init__(
        self,
        config: ClusterConfig,
        store: Store,
        handle_request: Callable[[bytes], Any] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.node_id = config.node_id
        # The owner side of `hft.req.p.<N>`: bytes -> awaitable bytes (the router sets it).
        self.handle_request = handle_request
        self.parts = [Partition(p) for p in range(config.partitions)]
        self.members: list[str] = []
        self.desired: dict[int, str | None] = {}
        self.nc: Any = None
        self.js: Any = None
        self._nodes: Any = None
        self._owners: Any = None
        self._status: Any = None
        self._objects: Any = None
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self.started_ns = time.time_ns()
        self.failovers = 0  # partitions taken over (restore + replay)
        self.replay_gaps = 0  # takeovers refused: the stream was purged past the checkpoint
        self.forwarded: dict[str, int] = {}  # op -> requests forwarded to another node
        self._replies: set[asyncio.Task] = set()  # forwarded requests being answered
        self.joined = asyncio.Event()  # every partition this node desires is serving here

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def tick_s(self) -> float:
        return self.config.lease_s / 3

    @property
    def connected(self) -> bool:
        """False while the NATS connection is down (reconnecting) or closed: /ready says so."""
        return self.nc is not None and bool(self.nc.is_connected)

    async def start(self) -> None:
        """Connect, make sure the buckets and streams exist, join, start the ownership loop."""
        cfg = self.config
        # Reconnects never give up once joined, so the first connect is bounded here: an
        # unreachable cluster at start is an error to report, not a wait forever.
        self.nc = await asyncio.wait_for(
            nats.connect(
                servers=list(cfg.nats_urls),
                name=f"hft-appliance-{self.node_id}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                connect_timeout=cfg.request_timeout_s,
            ),
            timeout=max(5.0, 3 * cfg.request_timeout_s),
        )
        self.js = self.nc.jetstream(timeout=cfg.request_timeout_s)
        # A JetStream cluster that has just started (or lost a node) may answer its API late
        # while it forms the raft groups of new streams: retry the setup up to a bound.
        deadline = time.monotonic() + max(SETUP_TIMEOUT_S, 4 * cfg.request_timeout_s)
        while True:
            try:
                await self._setup()
                break
            except (TimeoutError, nats.errors.Error) as exc:
                if time.monotonic() >= deadline:
                    raise
                log.info("cluster setup not answered yet; retrying",
                         extra={"reason": repr(exc)})  # fmt: skip
                await asyncio.sleep(0.5)
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        log.info(
            "cluster node started",
            extra={"node_id": self.node_id, "partitions": cfg.partitions, "urls": cfg.nats_urls},
        )

    async def _setup(self) -> None:
        """The buckets, the object store and every partition's stream (each made by the first
        node that misses it; identical configs make a concurrent create a no-op), then join."""
        cfg = self.config
        self._nodes = await self._bucket(NODES_BUCKET, cfg.lease_s)
        self._owners = await self._bucket(OWNERS_BUCKET, cfg.lease_s)
        self._status = await self._bucket(STATUS_BUCKET, cfg.lease_s * 3)
        try:
            self._objects = await self.js.object_store(CHECKPOINT_BUCKET)
            info = await self.js.stream_info(f"OBJ_{CHECKPOINT_BUCKET}")
            await self._reconcile(info.config, num_replicas=cfg.replicas)
        except js_errors.NotFoundError:
            self._objects = await self.js.create_object_store(
                CHECKPOINT_BUCKET, config=api.ObjectStoreConfig(replicas=cfg.replicas)
            )
        for p in range(cfg.partitions):
            await self._ensure_stream(p)
        await self._join()

    async def _bucket(self, name: str, ttl_s: float) -> Any:
        try:
            kv = await self.js.key_value(name)
        except js_errors.NotFoundError:
            return await self.js.create_key_value(
                bucket=name, ttl=ttl_s, history=1, replicas=self.config.replicas
            )
        # An existing bucket keeps the ttl it was made with: a raised lease_s on a bucket
        # with the old ttl would let keys expire between renews.
        status = await kv.status()
        await self._reconcile(
            status.stream_info.config,
            max_age=ttl_s,
            duplicate_window=min(120.0, ttl_s),  # as nats-py makes it; must stay <= max_age
            num_replicas=self.config.replicas,
        )
        return kv

    async def _reconcile(self, current: api.StreamConfig, **want: Any) -> None:
        """Make an existing stream's settings match [cluster] (update it), or refuse to start
        (ConfigMismatchError: the CLI exits 2) when NATS will not change them."""
        differs = {
            key: (getattr(current, key), value)
            for key, value in want.items()
            if not _same_setting(getattr(current, key), value)
        }
        if not differs:
            return
        log.warning("existing stream differs from [cluster]; updating it",
                    extra={"stream": current.name, "differs": repr(differs)})  # fmt: skip
        try:
            await self.js.update_stream(dataclasses.replace(current, **want))
        except js_errors.APIError as exc:
            raise ConfigMismatchError(
                f"stream {current.name} has {differs} (existing, wanted) and cannot be "
                f"updated: {exc.description}"
            ) from None

    async def _ensure_stream(self, p: int) -> None:
        config = api.StreamConfig(
            name=stream_name(p),
            subjects=[stream_subject(p)],
            num_replicas=self.config.replicas,
            storage=api.StorageType.FILE,
            duplicate_window=self.config.duplicate_window_s,
        )
        try:
            info = await self.js.stream_info(stream_name(p))
        except js_errors.NotFoundError:
            with contextlib.suppress(js_errors.BadRequestError):  # another node created it
                await self.js.add_stream(config)
            return
        await self._reconcile(
            info.config,
            duplicate_window=self.config.duplicate_window_s,
            num_replicas=self.config.replicas,
        )

    async def stop(self) -> None:
        """Clean leave: release every owned partition (checkpoint first), leave, close."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for part in self.parts:
            if part.task is not None and not part.task.done():
                part.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await part.task
        if self.nc is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(
                    *(self._release(part) for part in self.parts if part.owned),
                    return_exceptions=True,
                ),
                timeout=max(5.0, self.config.request_timeout_s * 2),
            )
        with contextlib.suppress(Exception):
            await self._nodes.delete(self.node_id)
        with contextlib.suppress(Exception):
            await self.nc.drain()
        log.info("cluster node stopped", extra={"node_id": self.node_id})

    # -- the ownership loop ----------------------------------------------------------------

    async def _join(self) -> None:
        body = json.dumps({"node_id": self.node_id, "started_ns": self.started_ns}).encode()
        await self._nodes.put(self.node_id, body)

    async def _run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS unreachable for a while: keep trying
                log.warning("cluster tick failed", extra={"reason": repr(exc)})
            await asyncio.sleep(max(0.0, self.tick_s - (time.monotonic() - started)))

    async def tick(self) -> None:
        """One round: heartbeat, renew leases, rebalance, status, checkpoints."""
        try:
            await self._join()
        except Exception as exc:  # the renewals below must run (or lapse serving) regardless
            log.warning("cluster heartbeat failed", extra={"reason": repr(exc)})
            await self._renew_all()
            raise
        await self._renew_all()
        try:
            members = sorted(set(await self._nodes.keys()) | {self.node_id})
        except js_errors.NoKeysError:
            members = [self.node_id]
        self.members = members
        self.desired = assignment(self.config.partitions, members)
        now = time.monotonic()
        for part in self.parts:
            busy = part.task is not None and not part.task.done()
            if busy:
                continue
            want = self.desired[part.number] == self.node_id
            if part.owned and not want:
                part.task = self._spawn(self._release(part))
            elif not part.owned and want:
                try:
                    taken = await self._try_take(part)
                except Exception as exc:  # one partition's failure must not stop the tick
                    log.warning("partition take failed", extra={"partition": part.number,
                                                                 "reason": repr(exc)})  # fmt: skip
                    continue
                if taken:
                    part.task = self._spawn(self._take_over(part))
            elif (
                part.owned
                and part.serving
                and (now - part.last_checkpoint >= self.config.checkpoint_interval_s)
            ):
                part.task = self._spawn(self._checkpoint(part))
        await self._put_status()
        mine = [p for p, owner in self.desired.items() if owner == self.node_id]
        if all(self.parts[p].serving for p in mine):
            self.joined.set()

    def _spawn(self, coro: Any) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(coro)

    async def _renew_all(self) -> None:
        owned = [part for part in self.parts if part.owned]
        results = await asyncio.gather(*(self._renew(p) for p in owned), return_exceptions=True)
        for part, result in zip(owned, results, strict=True):
            if isinstance(result, js_errors.KeyWrongLastSequenceError | js_errors.NotFoundError):
                log.warning("partition lease lost", extra={"partition": part.number})
                self._drop(part)
            elif time.monotonic() >= part.lease_deadline and part.serving:
                # NATS slow or unreachable: keep the key, but stop serving once the lease may
                # have expired (another node may hold the partition by then).
                log.warning("partition lease not renewed", extra={"partition": part.number})
                part.serving = False
                self._unsubscribe(part)

    async def _renew(self, part: Partition) -> None:
        asked = time.monotonic()
        # Bounded below one tick: a renew hanging request_timeout_s must not hold up the
        # tick that would notice the lease running out.
        part.revision = await asyncio.wait_for(
            self._owners.update(
                partition_key(part.number), self.node_id.encode(), last=part.revision
            ),
            timeout=self.tick_s * 0.9,
        )
        part.lease_deadline = asked + self.config.lease_s
        if part.owned and not part.serving and (part.task is None or part.task.done()):
            # Owned but not serving (a failed publish, a lease that ran late): re-sync.
            part.task = self._spawn(self._resync(part))

    async def _try_take(self, part: Partition) -> bool:
        asked = time.monotonic()
        try:
            part.revision = await self._owners.create(
                partition_key(part.number), self.node_id.encode()
            )
        except (js_errors.KeyWrongLastSequenceError, js_errors.BadRequestError):
            return False  # held by another node (its lease has not expired)
        part.owned = True
        part.lease_deadline = asked + self.config.lease_s
        return True

    # -- takeover, release, resync ---------------------------------------------------------

    def _partition_symbols(self, p: int) -> list[str]:
        n = self.config.partitions
        return [s for s in self.store.symbols() if partition_of(s, n) == p]

    def _drop_local(self, part: Partition) -> None:
        """Forget the local copy AND the sequence it stood for: a later checkpoint must never
        claim an old applied_seq for an emptied (or half-restored) partition."""
        part.applied_seq = 0
        part.checkpoints.clear()
        part.purged_seq = 0
        for symbol in self._partition_symbols(part.number):
            with contextlib.suppress(UnknownSymbolError):
                self.store.delete(symbol)

    async def _take_over(self, part: Partition) -> None:
        started = time.monotonic()
        try:
            async with part.lock:
                self._drop_local(part)
                part.applied_seq = await self._restore(part.number)
                await self._replay_and_fence(part)
                await self._subscribe(part)
                part.serving = True
                part.last_checkpoint = time.monotonic()
        except asyncio.CancelledError:
            raise
        except ReplayGapError as exc:
            self.replay_gaps += 1
            log.error("partition takeover refused: stream purged past the checkpoint",
                      extra={"partition": part.number, "reason": str(exc)})  # fmt: skip
            await self._give_up(part)
            return
        except Exception as exc:
            log.warning(
                "partition takeover failed; retrying",
                extra={"partition": part.number, "reason": repr(exc)},
            )
            await self._give_up(part)
            return
        self.failovers += 1
        log.info(
            "partition taken over",
            extra={
                "partition": part.number,
                "applied_seq": part.applied_seq,
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def _resync(self, part: Partition) -> None:
        """Catch up from the last applied sequence (after a publish whose fate is unknown)."""
        try:
            async with part.lock:
                await self._replay_and_fence(part)
                await self._subscribe(part)
                part.serving = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("partition resync failed", extra={"partition": part.number,
                                                          "reason": repr(exc)})  # fmt: skip

    async def _release(self, part: Partition) -> None:
        """Hand a partition over cleanly: stop serving, checkpoint, delete the key, forget.

        Only a serving partition's state is checkpointed: a takeover or re-sync in flight
        (cancelled by stop) holds an empty or partial copy that must never become the
        checkpoint the next owner restores."""
        was_serving = part.serving
        part.serving = False
        self._unsubscribe(part)
        snap = None
        async with part.lock:
            if was_serving:
                with contextlib.suppress(Exception):
                    snap = await self._take_snapshot(part)
        if snap is not None:
            with contextlib.suppress(Exception):
                await self._put_checkpoint(part, *snap)
        async with part.lock:
            with contextlib.suppress(Exception):
                await self._owners.delete(partition_key(part.number), last=part.revision)
            part.owned = False
            self._drop_local(part)
        log.info("partition released", extra={"partition": part.number})

    async def _give_up(self, part: Partition) -> None:
        part.serving = False
        self._unsubscribe(part)
        with contextlib.suppress(Exception):
            await self._owners.delete(partition_key(part.number), last=part.revision)
        part.owned = False
        async with part.lock:
            self._drop_local(part)

    def _drop(self, part: Partition) -> None:
        """The lease is someone else's now: stop at once; forget the local copy under the lock
        (a write in flight finishes first, so it cannot re-create a dropped symbol)."""
        part.serving = False
        part.owned = False
        self._unsubscribe(part)
        if part.task is not None and not part.task.done():
            part.task.cancel()
        part.task = self._spawn(self._forget(part))

    async def _forget(self, part: Partition) -> None:
        async with part.lock:
            if not part.owned:  # not re-taken meanwhile
                self._drop_local(part)

    def step_down(self, part: Partition) -> None:
        """A publish failed or was fenced: stop serving; the next tick re-syncs (replay) if
        the lease is still ours, else the lease is lost and `_drop` forgets the partition."""
        part.serving = False
        self._unsubscribe(part)

    async def _subscribe(self, part: Partition) -> None:
        if part.subscription is None and self.handle_request is not None:
            handler = self.handle_request

            async def respond(msg: Any) -> None:
                with contextlib.suppress(Exception):  # the asker gave up or NATS went away
                    await msg.respond(await handler(msg.data))

            async def reply(msg: Any) -> None:
                # nats-py runs one subscription's callbacks one after another: a task per
                # request, so a read is not queued behind a write awaiting its JetStream ack
                # (writes still go one at a time through the partition's lock).
                if msg.reply:
                    task = asyncio.get_running_loop().create_task(respond(msg))
                    self._replies.add(task)
                    task.add_done_callback(self._replies.discard)

            part.subscription = await self.nc.subscribe(request_subject(part.number), cb=reply)

    def _unsubscribe(self, part: Partition) -> None:
        subscription, part.subscription = part.subscription, None
        if subscription is not None:
            asyncio.get_running_loop().create_task(_quietly(subscription.unsubscribe()))

    # -- checkpoints -----------------------------------------------------------------------

    async def _restore(self, p: int) -> int:
        """Load checkpoint p<N> into the store; returns its stream sequence (0: none)."""
        try:
            result = await self._objects.get(partition_key(p))
        except js_errors.NotFoundError:
            return 0
        if not result.data:
            return 0
        checkpoint = decode_checkpoint(result.data)
        for state in checkpoint.symbols:
            values = np.frombuffer(state.values, dtype="<f8").astype(np.float64)
            if values.shape[0] == 0:
                continue
            # Acknowledged state: never refused for store.max_symbols (the limit is enforced
            # when a write admits a NEW symbol, `precheck`), or the next checkpoint and purge
            # would make the loss permanent.
            for start in range(0, values.shape[0], RESTORE_CHUNK):
                chunk = np.ascontiguousarray(values[start : start + RESTORE_CHUNK])
                self.store.ingest(state.symbol, chunk, enforce_limit=False)
            index = np.frombuffer(state.mark_index, dtype="<i8").astype(np.int64)
            ns = np.frombuffer(state.mark_ns, dtype="<i8").astype(np.int64)
            if index.shape[0]:
                self.store.restore_time_marks(state.symbol, index, ns)
        return checkpoint.seq

    def _snapshot(self, part: Partition, seq: int) -> bytes:
        states = []
        for symbol in self._partition_symbols(part.number):
            try:
                values = self.store.snapshot_values(symbol)
                index, ns = self.store.time_marks(symbol)
            except UnknownSymbolError:
                continue
            states.append(
                SymbolState(
                    symbol=symbol,
                    values=np.ascontiguousarray(values, dtype="<f8").tobytes(),
                    mark_index=np.ascontiguousarray(index, dtype="<i8").tobytes(),
                    mark_ns=np.ascontiguousarray(ns, dtype="<i8").tobytes(),
                )
            )
        return encode(PartitionCheckpoint(seq=seq, symbols=states))

    async def _take_snapshot(self, part: Partition) -> tuple[int, bytes] | None:
        """Caller holds part.lock: no batch is applied between the copy and its seq. Only
        the copy happens under the lock; the upload (`_put_checkpoint`) does not."""
        if part.applied_seq == 0:
            return None
        seq = part.applied_seq
        return seq, await asyncio.to_thread(self._snapshot, part, seq)

    async def _put_checkpoint(self, part: Partition, seq: int, data: bytes) -> bool:
        """Upload a checkpoint taken at `seq`, unless it would replace a newer one (a deposed
        owner racing the new owner) or our lease may end before the upload does. The object's
        description carries its seq so the check needs no download. Returns True if written."""
        key = partition_key(part.number)
        remaining = part.lease_deadline - time.monotonic()
        if remaining <= MIN_PUBLISH_S:
            log.warning("checkpoint skipped: lease ending", extra={"partition": part.number})
            return False
        try:
            info = await asyncio.wait_for(self._objects.get_info(key), timeout=remaining)
            current = checkpoint_seq_of(info)
        except js_errors.NotFoundError:
            current = 0
        if current > seq:
            log.warning("checkpoint refused: the stored one is newer",
                        extra={"partition": part.number, "stored_seq": current,
                               "seq": seq})  # fmt: skip
            return False
        remaining = part.lease_deadline - time.monotonic()
        if remaining <= MIN_PUBLISH_S:
            log.warning("checkpoint skipped: lease ending", extra={"partition": part.number})
            return False
        meta = api.ObjectMeta(name=key, description=f"seq={seq}")
        await asyncio.wait_for(self._objects.put(key, data, meta=meta), timeout=remaining)
        part.last_checkpoint = now = time.monotonic()
        part.checkpoints.append((now, seq))
        await self._purge_covered(part, now)
        return True

    async def _purge_covered(self, part: Partition, now: float) -> None:
        """Purge the stream up to the newest of this node's checkpoints written more than a
        duplicate window ago, so a partition's stream holds about one window plus one
        checkpoint interval of batches instead of growing forever.

        Why that checkpoint and not the one just written: (1) every later checkpoint, which
        is what a takeover restores (the object holds the newest), covers at least as much, so
        nothing a restore replays is purged, even if the newest put failed half-way; (2)
        JetStream deduplicates by the message ids it still holds within the window (it
        rebuilds them from stored messages after a restart), so purging only messages older
        than the window keeps every retry inside it a duplicate. A failed purge is retried
        with the next checkpoint."""
        cutoff = now - self.config.duplicate_window_s
        covered = 0
        while part.checkpoints and part.checkpoints[0][0] <= cutoff:
            covered = part.checkpoints.popleft()[1]
        if covered <= part.purged_seq:
            return
        try:
            # `seq`: purge every message below it, i.e. up to and including `covered`
            await self.js.purge_stream(stream_name(part.number), seq=covered + 1)
        except Exception as exc:  # NATS unreachable, leader election: next checkpoint retries
            part.checkpoints.appendleft((cutoff, covered))
            log.warning("stream purge failed", extra={"partition": part.number,
                                                      "reason": repr(exc)})  # fmt: skip
            return
        part.purged_seq = covered

    async def _checkpoint(self, part: Partition) -> None:
        try:
            snap = None
            async with part.lock:
                if part.serving:
                    snap = await self._take_snapshot(part)
            if snap is not None:
                await self._put_checkpoint(part, *snap)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("checkpoint failed", extra={"partition": part.number,
                                                    "reason": repr(exc)})  # fmt: skip

    # -- the partition log -----------------------------------------------------------------

    async def _replay(self, part: Partition) -> None:
        """Apply the stream from applied_seq + 1 to its last sequence (caller holds the lock)."""
        info = await self.js.stream_info(stream_name(part.number))
        last = info.state.last_seq
        part.stream_last_seq = last
        if last <= part.applied_seq:
            return
        if info.state.first_seq > part.applied_seq + 1:
            # Messages applied_seq+1 .. first_seq-1 are gone (purged): replaying the rest
            # would serve a partition without acknowledged batches.
            raise ReplayGapError(
                f"partition {part.number}: stream starts at {info.state.first_seq}, "
                f"checkpoint covers up to {part.applied_seq}"
            )
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=part.applied_seq + 1,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await self.js.pull_subscribe(
            stream_subject(part.number), durable=None, stream=stream_name(part.number),
            config=config,
        )  # fmt: skip
        try:
            while part.applied_seq < last:
                msgs = await sub.fetch(
                    batch=min(REPLAY_FETCH, last - part.applied_seq),
                    timeout=self.config.request_timeout_s,
                )
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    if seq <= part.applied_seq:
                        continue
                    self._apply(decode_batch(msg.data))
                    part.applied_seq = seq
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _replay_and_fence(self, part: Partition) -> None:
        """Replay, then append a no-op marker expecting the last sequence replayed (caller
        holds the lock). A deposed owner's publish still in flight (its client timed out,
        the server had not yet appended it) expects an older last sequence, so once the
        marker is in, it is refused; if it got in first, the marker is refused and we
        replay it too."""
        for _ in range(FENCE_ATTEMPTS):
            await self._replay(part)
            headers = {"Nats-Expected-Last-Sequence": str(part.applied_seq)}
            try:
                ack = await self.js.publish(
                    stream_subject(part.number), encode(BatchMessage(symbol="", fence=True)),
                    timeout=self.config.request_timeout_s, headers=headers,
                )  # fmt: skip
            except js_errors.APIError as exc:
                if exc.err_code in WRONG_LAST_SEQUENCE:
                    continue  # someone appended after our replay: catch up and fence again
                raise
            if ack.seq == part.applied_seq + 1:
                part.applied_seq = ack.seq
                part.stream_last_seq = ack.seq
                return
        raise RuntimeError(f"partition {part.number}: stream kept moving; not fenced")

    def _apply(self, message: BatchMessage) -> int:
        """Apply one logged message; a time-order refusal is deterministic (the same store
        state gave it when it was first applied), so it is skipped the same way on replay.
        The symbol limit is not applied here: `precheck` enforced it before the batch was
        logged, and a logged batch is acknowledged data (other partitions share the store,
        so the count at replay time differs from the count at write time)."""
        if message.fence:
            return 0
        if message.delete:
            with contextlib.suppress(UnknownSymbolError):
                self.store.delete(message.symbol)
            return 0
        try:
            return self.store.ingest(
                message.symbol,
                message.value_array(),
                timestamps=message.timestamp_array(),
                received_ns=message.received_ns,
                enforce_limit=False,
            )
        except OutOfOrderError:
            return 0

    def owned_serving(self, p: int) -> bool:
        """Serving here AND the lease surely still ours: a node whose renewals stall (NATS
        slow or gone) stops answering reads at the lease's end, not at the next tick."""
        part = self.parts[p]
        return part.serving and time.monotonic() < part.lease_deadline

    def partition_of(self, symbol: str) -> int:
        return partition_of(symbol, self.config.partitions)

    def precheck(
        self, symbol: str, values: np.ndarray, timestamps: np.ndarray | None, received_ns: int
    ) -> None:
        """Refuse before logging what the store would refuse (symbol limit, time order), so the
        log holds only batches that apply."""
        store = self.store
        if symbol not in store:
            if len(store) >= store.max_symbols:
                raise SymbolLimitError.at(len(store), store.max_symbols)
            newest = None
        else:
            try:
                newest = store.newest_timestamp(symbol)
            except UnknownSymbolError:
                newest = None
        if timestamps is not None:
            resolve(timestamps, received_ns, newest, store.clamp_out_of_order)

    async def log_and_apply(
        self, message: BatchMessage, msg_id: str, values: np.ndarray | None = None
    ) -> int:
        """The owner's write: publish (fenced, deduplicated), await the ack, apply. Returns the
        values added. Raises ApiError partition_unavailable, or the store's refusals."""
        p = self.partition_of(message.symbol)
        part = self.parts[p]
        if not part.serving:
            raise unavailable(p)
        async with part.lock:
            # The publish must end (acked or given up) while the lease is surely ours; the
            # new owner's fence marker refuses whatever of ours the server appends later.
            timeout = min(self.config.request_timeout_s, part.lease_deadline - time.monotonic())
            if not part.serving or timeout <= MIN_PUBLISH_S:
                raise unavailable(p)
            if not message.delete:
                array = values if values is not None else message.value_array()
                self.precheck(message.symbol, array, message.timestamp_array(),
                              message.received_ns)  # fmt: skip
            headers = {
                "Nats-Msg-Id": msg_id,
                "Nats-Expected-Last-Sequence": str(part.applied_seq),
            }
            try:
                ack = await self.js.publish(
                    stream_subject(p), encode(message), timeout=timeout, headers=headers,
                )  # fmt: skip
            except nats.errors.MaxPayloadError:
                # Our message, not the partition, is at fault (the router refuses these before
                # publishing; this is the backstop): nothing was sent, keep serving.
                raise ApiError(
                    "batch_too_large", "the batch is larger than the cluster's NATS max_payload"
                ) from None
            except js_errors.APIError as exc:
                self.step_down(part)
                if exc.err_code in WRONG_LAST_SEQUENCE:
                    raise unavailable(p, "has a newer owner or is re-syncing") from None
                raise unavailable(p, f"could not be written ({exc.description})") from None
            except (TimeoutError, nats.errors.Error) as exc:
                self.step_down(part)
                raise unavailable(p, f"could not be written ({type(exc).__name__})") from None
            except BaseException:  # cancelled (client gone, sink timeout): the fate is unknown
                self.step_down(part)
                raise
            if ack.duplicate:
                # Already logged under this id (a retry): applied once, by us or by the replay.
                return 0 if message.delete else len(message.values) // 8
            if ack.seq != part.applied_seq + 1:
                self.step_down(part)  # a gap we did not apply: catch up by replay first
                raise unavailable(p, "is re-syncing")
            part.applied_seq = ack.seq
            return self._apply(message)

    # -- status ----------------------------------------------------------------------------

    async def _put_status(self) -> None:
        owned = [part for part in self.parts if part.owned and part.serving]

        async def put(part: Partition) -> None:
            with contextlib.suppress(Exception):
                info = await self.js.stream_info(stream_name(part.number))
                part.stream_last_seq = info.state.last_seq
            body = {
                "applied_seq": part.applied_seq,
                "owner": self.node_id,
                "symbols": len(self._partition_symbols(part.number)),
            }
            await self._status.put(partition_key(part.number), json.dumps(body).encode())

        await asyncio.gather(*(put(part) for part in owned), return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        """For metrics and logs: what this node owns and how far behind each stream it is."""
        return {
            "node_id": self.node_id,
            "members": list(self.members),
            "owned": [p.number for p in self.parts if p.owned and p.serving],
            "lag": {
                p.number: max(0, p.stream_last_seq - p.applied_seq) for p in self.parts if p.owned
            },
            "failovers": self.failovers,
            "replay_gaps": self.replay_gaps,
            "forwarded": dict(self.forwarded),
        }


def _same_setting(current: Any, wanted: Any) -> bool:
    """Durations come back from NATS as float seconds converted from ns."""
    if isinstance(wanted, float) or isinstance(current, float):
        return current is not None and abs(float(current) - float(wanted)) < 1e-3
    return current == wanted


def checkpoint_seq_of(info: Any) -> int:
    """The seq a checkpoint object's description records ("seq=<n>"); 0 when absent (an
    object written before descriptions carried it: not known to be newer)."""
    description = getattr(info, "description", None) or ""
    if description.startswith("seq="):
        with contextlib.suppress(ValueError):
            return int(description[4:])
    return 0


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro
