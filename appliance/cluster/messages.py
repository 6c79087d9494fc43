"""Wire formats of cluster mode: a partition stream's message and the node-to-node requests.

msgspec MessagePack Structs: compact, typed on decode (a malformed message is a
`msgspec.DecodeError`, never a half-read dict), and values travel as raw float64/int64
little-endian bytes, so a batch is not re-encoded value by value.

A stream message is one accepted batch, or (deviation from the shared design, which lists only
batches) a deletion: `delete = true`, no values. Deletions must be in the log, or a takeover's
replay would bring a deleted symbol back.
"""

from __future__ import annotations

import msgspec
import numpy as np


class BatchMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    """One accepted batch of a partition (or a deletion), as stored in its stream."""

    symbol: str
    values: bytes = b""  # float64 little-endian
    timestamps: bytes | None = None  # int64 little-endian ns, one per value; None: received_ns
    received_ns: int = 0
    delete: bool = False
    # A new owner's no-op marker after its replay (fences a deposed owner's in-flight publish)
    fence: bool = False

    @classmethod
    def of(
        cls, symbol: str, values: np.ndarray, timestamps: np.ndarray | None, received_ns: int
    ) -> BatchMessage:
        return cls(
            symbol=symbol,
            values=np.ascontiguousarray(values, dtype="<f8").tobytes(),
            timestamps=None
            if timestamps is None
            else np.ascontiguousarray(timestamps, dtype="<i8").tobytes(),
            received_ns=received_ns,
        )

    def value_array(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype="<f8").astype(np.float64, copy=True)

    def timestamp_array(self) -> np.ndarray | None:
        if self.timestamps is None:
            return None
        return np.frombuffer(self.timestamps, dtype="<i8").astype(np.int64, copy=True)


class Request(msgspec.Struct, frozen=True, omit_defaults=True):
    """A request to a partition's owner (`hft.req.p.<N>`).

    op: "add_batch" (batch + msg_id), "stats" (symbol + key: exponent 1..8, or -window_ns),
    "stats_batch" (queries), "symbols", "delete" (symbol).
    """

    op: str
    partition: int
    symbol: str = ""
    key: int = 0
    msg_id: str = ""
    batch: BatchMessage | None = None
    queries: list[tuple[str, int]] = []


class Reply(msgspec.Struct, frozen=True):
    """The owner's HTTP status and JSON body, relayed unchanged by the forwarding node."""

    status: int
    body: bytes


class PartitionCheckpoint(msgspec.Struct, frozen=True):
    """A partition's state at stream sequence `seq` (object `p<N>` of `hft_checkpoints`)."""

    seq: int
    symbols: list[SymbolState]


class SymbolState(msgspec.Struct, frozen=True):
    symbol: str
    values: bytes  # float64 LE, the retained values oldest first
    mark_index: bytes  # int64 LE: Store.time_marks
    mark_ns: bytes  # int64 LE


def _field(text: str) -> str:
    """A message-id field that cannot contain the separator: '%' and ':' percent-escaped."""
    return text.replace("%", "%25").replace(":", "%3A")


def rest_msg_id(principal: str | None, symbol: str, key: str) -> str:
    """The JetStream message id (Nats-Msg-Id) of a REST write with an Idempotency-Key.

    Message ids deduplicate within the partition's stream, so each source gets its own
    namespace: a REST key never equals a transport frame's id, and two principals (tenants)
    sending the same key for the same symbol are two writes, not one suppressed as a
    duplicate. The key is last and kept verbatim; the fields before it are escaped, so the
    id names exactly one (principal, symbol, key). principal None: auth off ("-").
    """
    who = "-" if principal is None else _field(principal)
    return f"rest:{who}:{_field(symbol)}:{key}"


def transport_msg_id(transport: str, publisher_id: int, sequence: int) -> str:
    """The message id of a transport frame ("zmq", "shm", "rdma"): a frame resent after a
    lost ack (to this node or another) is a duplicate, not a second append; the transport
    name keeps publisher ids of different transports apart."""
    return f"{_field(transport)}:{publisher_id}:{sequence}"


_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(BatchMessage)
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_checkpoint_decoder = msgspec.msgpack.Decoder(PartitionCheckpoint)

encode = _encoder.encode


def decode_batch(data: bytes) -> BatchMessage:
    return _batch_decoder.decode(data)


def decode_request(data: bytes) -> Request:
    return _request_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)


def decode_checkpoint(data: bytes) -> PartitionCheckpoint:
    return _checkpoint_decoder.decode(data)
