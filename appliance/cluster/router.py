"""The REST handlers' cluster path: answer here when this node serves the partition, else ask
its owner over NATS request/reply and relay the owner's status and JSON body unchanged.

Both sides share one function per operation (`_local`), so a forwarded request is answered by
exactly the code that answers a local one: the relay adds nothing but a 503
`partition_unavailable` when no owner answers (no responders: nobody serves the partition now;
a timeout: the owner is dead or stuck) within `cluster.request_timeout_s`.

History (GET /history/*) is not routed: history needs the warm tier, which needs the local
write-ahead log, which cluster mode refuses; every node answers `history_disabled`, the same
answer the owner would give.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import nats
import numpy as np

from appliance.cluster.messages import BatchMessage, Reply, Request, decode_reply, decode_request
from appliance.cluster.messages import encode as encode_msgpack
from appliance.cluster.node import ClusterNode, unavailable
from appliance.cluster.partitions import request_subject
from appliance.errors import ERROR_CODES, ApiError
from appliance.ingest import as_api_error
from appliance.stats_batch import answer, stats_body, time_stats_body, unknown_symbol
from appliance.store import SymbolLimitError, UnknownSymbolError
from appliance.timestamps import OutOfOrderError

_json = msgspec.json.Encoder().encode
log = logging.getLogger(__name__)

# Room for the NATS headers of a partition-stream publish (Nats-Msg-Id, which carries the
# message id, and Nats-Expected-Last-Sequence), counted against max_payload with the payload.
HEADER_ALLOWANCE_BYTES = 256


class _Results(msgspec.Struct):
    results: list[msgspec.Raw]


class _ErrorBody(msgspec.Struct):
    error: str = ""
    code: str = "internal_error"


class _Symbols(msgspec.Struct):
    symbols: list[dict[str, Any]]


_results_decoder = msgspec.json.Decoder(_Results)
_symbols_decoder = msgspec.json.Decoder(_Symbols)
_error_decoder = msgspec.json.Decoder(_ErrorBody)

Answer = tuple[int, bytes]  # HTTP status, JSON body


def error_answer(error: ApiError) -> Answer:
    return error.status, _json(error.to_body())


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        "batch_too_large",
        f"the cluster message would be {size} bytes, above NATS max_payload ({limit} bytes); "
        "send fewer values (or queries)",
    )


def _code(body: bytes) -> str:
    try:
        return _error_decoder.decode(body).code
    except msgspec.DecodeError:
        return ""


def as_error(status: int, body: bytes) -> ApiError:
    """An owner's error answer as the ApiError it was (for the transports' nack reasons)."""
    try:
        parsed = _error_decoder.decode(body)
    except msgspec.DecodeError:
        parsed = _ErrorBody("owner answered an unreadable error", "internal_error")
    code = parsed.code if parsed.code in ERROR_CODES else "internal_error"
    return ApiError(code, parsed.error)


class ClusterRouter:
    """Routes each operation to the partition's owner (see the module docstring)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.store = node.store
        self.timeout_s = node.config.request_timeout_s
        node.handle_request = self.handle

    # -- the owner side --------------------------------------------------------------------

    async def handle(self, data: bytes) -> bytes:
        """`hft.req.p.<N>`'s handler: run the request here, reply status + body. Never raises:
        a malformed request is 400, an unexpected fault 500 internal_error (logged), and an
        answer larger than NATS max_payload 413 batch_too_large (the asker splits a
        stats_batch group on it), so the asker never waits out its timeout for nothing."""
        try:
            request = decode_request(data)
        except msgspec.DecodeError:
            status, body = error_answer(ApiError("bad_request", "unreadable cluster request"))
        else:
            try:
                status, body = await self._local_safe(request)
            except Exception:
                log.exception("cluster request failed", extra={"op": request.op})
                status, body = error_answer(
                    ApiError("internal_error", "the partition's owner failed to answer")
                )
        reply = encode_msgpack(Reply(status=status, body=body))
        if len(reply) > self.max_payload():
            status, body = error_answer(
                ApiError("batch_too_large", "the answer is larger than the cluster's max_payload")
            )
            reply = encode_msgpack(Reply(status=status, body=body))
        return reply

    def max_payload(self) -> int:
        """The largest NATS message in bytes (the server's `max_payload`, learnt on connect)."""
        return int(self.node.nc.max_payload)

    async def _local_safe(self, request: Request) -> Answer:
        try:
            self._validate(request)
            return await self._local(request)
        except ApiError as exc:
            return error_answer(exc)
        except (SymbolLimitError, OutOfOrderError) as exc:
            error = as_api_error(exc)
            assert error is not None
            return error_answer(error)

    def _validate(self, request: Request) -> None:
        """The owner trusts no request: the partition must exist and every symbol in it must
        hash to it (else a confused or hostile sender could write a symbol into the wrong
        partition's stream, where no reader would ever look). Raises 400 bad_request."""
        p = request.partition
        if not 0 <= p < self.node.config.partitions:
            raise ApiError("bad_request", f"no partition {p} in this cluster")
        symbols: list[str] = []
        if request.op in ("stats", "delete"):
            symbols.append(request.symbol)
        elif request.op == "add_batch":
            if request.batch is None:
                raise ApiError("bad_request", "add_batch without a batch")
            symbols.append(request.batch.symbol)
        elif request.op == "stats_batch":
            symbols.extend(query[0] for query in request.queries)
        for symbol in symbols:
            if self.node.partition_of(symbol) != p:
                raise ApiError("bad_request", f"symbol {symbol!r} is not in partition {p}")

    async def _local(self, request: Request) -> Answer:
        p = request.partition
        if not self.node.owned_serving(p):
            raise unavailable(p)
        op = request.op
        store = self.store
        if op == "stats":
            try:
                if request.key > 0:
                    return 200, _json(stats_body(store.stats(request.symbol, request.key)))
                window_ns = -request.key
                result = store.stats_seconds(request.symbol, window_ns)
                return 200, _json(time_stats_body(result, window_ns))
            except UnknownSymbolError:
                raise unknown_symbol(request.symbol) from None
        if op == "stats_batch":
            return 200, answer(store, [tuple(q) for q in request.queries])
        if op == "add_batch":
            assert request.batch is not None  # _validate
            added = await self.node.log_and_apply(request.batch, request.msg_id)
            body = {"status": "ok", "symbol": request.batch.symbol, "added": added}
            return 200, _json(body)
        if op == "symbols":
            rows = [
                {"symbol": name, "hot": store.length(name), "total": None}
                for name in self.node._partition_symbols(p)
                if name in store
            ]
            return 200, _json({"symbols": rows})
        if op == "delete":
            if request.symbol not in store:
                raise unknown_symbol(request.symbol)
            dropped = store.length(request.symbol)
            message = BatchMessage(symbol=request.symbol, delete=True)
            await self.node.log_and_apply(message, request.msg_id)
            body = {
                "status": "deleted",
                "symbol": request.symbol,
                "hot_values_dropped": dropped,
                "history": "none: cluster mode keeps no warm tier, so nothing of it is kept",
            }
            return 200, _json(body)
        raise ApiError("bad_request", f"unknown cluster operation {op!r}")

    # -- the caller side -------------------------------------------------------------------

    async def call(self, request: Request) -> Answer:
        """Answer here if this node serves the partition, else forward to its owner."""
        p = request.partition
        if self.node.owned_serving(p):
            return await self._local_safe(request)
        data = encode_msgpack(request)
        if len(data) > self.max_payload():
            return error_answer(too_large(len(data), self.max_payload()))
        forwarded = self.node.forwarded
        forwarded[request.op] = forwarded.get(request.op, 0) + 1
        try:
            msg = await self.node.nc.request(request_subject(p), data, timeout=self.timeout_s)
        except nats.errors.NoRespondersError:
            return error_answer(unavailable(p))
        except (TimeoutError, nats.errors.TimeoutError):
            return error_answer(unavailable(p, "did not answer in cluster.request_timeout_s"))
        except nats.errors.Error as exc:
            return error_answer(unavailable(p, f"is unreachable ({type(exc).__name__})"))
        try:
            reply = decode_reply(msg.data)
        except msgspec.DecodeError:
            return error_answer(unavailable(p, "answered unreadably"))
        if not 200 <= reply.status <= 599:
            return error_answer(unavailable(p, "answered unreadably"))
        return reply.status, reply.body

    async def add_batch(
        self,
        symbol: str,
        values: np.ndarray,
        timestamps: np.ndarray | None,
        msg_id: str,
        received_ns: int,
    ) -> Answer:
        p = self.node.partition_of(symbol)
        message = BatchMessage.of(symbol, values, timestamps, received_ns)
        request = Request(op="add_batch", partition=p, msg_id=msg_id, batch=message)
        # Decided here, on the forwarded form (the larger), whichever node owns the partition:
        # the same batch gets the same answer at every node, and it is never published.
        size = len(encode_msgpack(request)) + HEADER_ALLOWANCE_BYTES + len(msg_id)
        if size > self.max_payload():
            return error_answer(too_large(size, self.max_payload()))
        if self.node.owned_serving(p):
            try:
                added = await self.node.log_and_apply(message, msg_id, values)
            except ApiError as exc:
                return error_answer(exc)
            except (SymbolLimitError, OutOfOrderError) as exc:
                error = as_api_error(exc)
                assert error is not None
                return error_answer(error)
            return 200, _json({"status": "ok", "symbol": symbol, "added": added})
        return await self.call(request)

    async def stats(self, symbol: str, key: int) -> Answer:
        """key: the exponent (1..8) or -window_ns for a time window."""
        p = self.node.partition_of(symbol)
        return await self.call(Request(op="stats", partition=p, symbol=symbol, key=key))

    async def delete(self, symbol: str, msg_id: str) -> Answer:
        p = self.node.partition_of(symbol)
        return await self.call(Request(op="delete", partition=p, symbol=symbol, msg_id=msg_id))

    async def stats_batch(self, items: Sequence[Any]) -> bytes:
        """POST /stats/batch: one request per partition, gathered back in request order; a
        partition that cannot answer makes its items 503 partition_unavailable error bodies."""
        results: list[bytes | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            if type(item) is tuple:
                groups.setdefault(self.node.partition_of(item[0]), []).append(index)
            else:
                results[index] = _json(item.to_body())

        async def one(p: int, indexes: list[int]) -> None:
            queries = [items[i] for i in indexes]
            status, body = await self.call(Request(op="stats_batch", partition=p, queries=queries))
            if status == 413 and len(indexes) > 1 and _code(body) == "batch_too_large":
                # The group's answer (or request) does not fit in one NATS message: halves.
                half = len(indexes) // 2
                await asyncio.gather(one(p, indexes[:half]), one(p, indexes[half:]))
                return
            if status == 200:
                try:
                    answers = _results_decoder.decode(body).results
                    if len(answers) != len(indexes):
                        raise ValueError("wrong number of results")
                except (msgspec.DecodeError, ValueError):
                    body = error_answer(unavailable(p, "answered unreadably"))[1]
                else:
                    for index, raw in zip(indexes, answers, strict=True):
                        results[index] = bytes(raw)
                    return
            for index in indexes:
                results[index] = body

        await asyncio.gather(*(one(p, indexes) for p, indexes in groups.items()))
        return b'{"results":[' + b",".join(r or b"null" for r in results) + b"]}"

    async def symbols(self) -> tuple[int, list[dict[str, Any]] | bytes]:
        """GET /symbols cluster-wide: every partition's rows, or the first error answer (no
        partial list while a partition moves)."""
        answers = await asyncio.gather(
            *(
                self.call(Request(op="symbols", partition=p))
                for p in range(self.node.config.partitions)
            )
        )
        rows: list[dict[str, Any]] = []
        for p, (status, body) in enumerate(answers):
            if status != 200:
                return status, body
            try:
                rows.extend(_symbols_decoder.decode(body).symbols)
            except msgspec.DecodeError:
                return error_answer(unavailable(p, "answered unreadably"))
        rows.sort(key=lambda row: row["symbol"])
        return 200, rows
