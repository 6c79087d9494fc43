"""ZeroMQ (and shared-memory) ingest in cluster mode: each batch goes to its partition's owner.

The transports' sink (appliance.ingest.StoreSink) takes any `Ingestor`; this one hands every
batch to the Sanic event loop, where `ClusterRouter.add_batch` logs it to the partition's
stream (here, or at the owner over request/reply) before it is applied. The transport's ack
therefore follows the owner's JetStream ack, as a REST 200 does.

Threads: transports call `ingest` (blocking, from a poller thread) and `submit_group` (a poll
batch; `done` is called from the event loop when every frame is answered). Work crosses with
`asyncio.run_coroutine_threadsafe`; a blocked `ingest` waits at most the request timeout plus
a margin. The message id of a frame is "<transport>:<publisher id>:<sequence>"
(`messages.transport_msg_id`), so a frame resent after a lost ack (to this node or another) is
a JetStream duplicate, not a second append, and never equals another transport's or a REST
write's id.

Throughput: `submit_group` runs a poll batch's frames one after another, each awaiting its
JetStream ack (and, off the owner, a NATS request/reply) before the next: about one frame per
round trip: 435-1,650 frames/s per node at R=3 on 2 vCPUs (benches/bench_cluster_ingest.py),
far below the single-node transports. Batch values into larger frames for cluster ingest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from appliance.cluster.messages import transport_msg_id
from appliance.cluster.router import ClusterRouter, as_error
from appliance.errors import ApiError

WAIT_MARGIN_S = 2.0


class ClusterIngest:
    """An `Ingestor` whose appends go through the cluster's partition log."""

    def __init__(
        self, router: ClusterRouter, loop: asyncio.AbstractEventLoop, transport: str = "zmq"
    ) -> None:
        self.router = router
        self.loop = loop
        self.transport = transport  # the message ids' namespace
        self.wait_s = router.timeout_s * 2 + WAIT_MARGIN_S

    def __contains__(self, symbol: object) -> bool:
        # Only lets the sink skip re-validating a known symbol: any node's store will do.
        return symbol in self.router.store

    async def _one(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int,
        sequence: int,
        timestamps: np.ndarray | None,
    ) -> int:
        msg_id = transport_msg_id(self.transport, publisher_id, sequence)
        status, body = await self.router.add_batch(
            symbol, values, timestamps, msg_id, time.time_ns()
        )
        if status != 200:
            raise as_error(status, body)
        return int(values.shape[0])

    def ingest(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
    ) -> int:
        future = asyncio.run_coroutine_threadsafe(
            self._one(symbol, values, publisher_id, sequence, timestamps), self.loop
        )
        try:
            return future.result(self.wait_s)
        except TimeoutError:
            future.cancel()
            raise ApiError(
                "partition_unavailable", "the cluster did not answer in time; retry"
            ) from None

    def submit_group(self, items: list[Any], done: Callable[[list[Any]], None]) -> None:
        """Apply a poll batch in order; `done(results)` gets None or the exception per item.
        After a publisher's frame fails, its later frames in the batch are not tried (they
        would land out of order): they get the same error."""

        async def run() -> None:
            results: list[BaseException | None] = []
            broken: dict[int, BaseException] = {}
            for symbol, values, publisher_id, sequence, timestamps in items:
                if publisher_id in broken:
                    results.append(broken[publisher_id])
                    continue
                try:
                    await self._one(symbol, values, publisher_id, sequence, timestamps)
                except Exception as exc:
                    broken[publisher_id] = exc
                    results.append(exc)
                    continue
                results.append(None)
            done(results)

        asyncio.run_coroutine_threadsafe(run(), self.loop)

    def for_transport(self, transport: str) -> ClusterIngest:
        """The same ingest with `transport`'s message-id namespace."""
        return ClusterIngest(self.router, self.loop, transport)
