"""Live statistics: one ticker pushes each changed symbol's statistics to SSE clients and a PUB
socket (GET /stream, `transport.zmq.stats_pub_endpoint`).

Why a ticker that polls versions instead of a callback from ingest: ingest (REST, ZeroMQ, shared
memory, RDMA, log replay) pays nothing for live clients, no call, no lock, no queue. Every
1/`stream.max_rate_hz` s the ticker reads `Store.version(symbol)` (one attribute read, no lock)
of each watched symbol and compares it with what it last sent; a symbol that changed gets one
event, computed once per (symbol, window) for every client that shares that window (the store
caches it as well). Batches that arrive between two ticks coalesce: the newest state wins, and
no symbol gets more than `max_rate_hz` events per second on any stream.

Why bounded client queues that drop: the ticker runs on the server's event loop and must never
wait for a client. Each client's events wait in a deque of at most `stream.queue_events`; a
client that falls that far behind loses its pending events and gets a final `event: dropped`,
after which its stream ends (its connection is aborted if it does not even read that within
`DROP_GRACE_S`). On shutdown every stream gets a final `event: end` (with the same cut-off), so
a graceful stop is not held for `server.graceful_shutdown_s` by clients that would otherwise
listen forever.

The hub is owned by the application (`app.ctx.live`); the ticker task runs only while there are
clients or a PUB socket. Everything here runs on the event loop thread, except `bind_pub` (the
CLI, before the loop starts) and `close_pub` (after it stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from appliance.config import StreamConfig
from appliance.errors import ApiError
from appliance.store import Store, UnknownSymbolError
from transport.errors import TransportStartError

log = logging.getLogger(__name__)

# Most symbols one GET /stream may watch (400 above it).
MAX_STREAM_SYMBOLS = 256
# A dropped client that does not read its final event within this many seconds is cut off.
DROP_GRACE_S = 5.0

_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Window:
    """A stream's window: `key` is the store's (an exponent 1..8, or minus a length in ns)."""

    key: int

    @property
    def label(self) -> dict[str, int]:
        """The window's field(s) of an event: `exponent`, or `window_ns` for a time window."""
        return {"exponent": self.key} if self.key > 0 else {"window_ns": -self.key}


def sse(event: str, data: bytes) -> bytes:
    """One Server-Sent Event (the JSON `data` is one line: msgspec never writes newlines)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def final_event(event: str, reason: str) -> bytes:
    return sse(event, _ENCODER.encode({"reason": reason}))


class StreamClient:
    """One GET /stream: its symbols and window, what it was last sent, and its event queue.

    `push` never waits: past `limit` queued events the client is dropped (its pending events
    are replaced by one final `dropped` event). `take` hands the stream handler everything
    pending at once, and whether the stream must end after it.
    """

    __slots__ = ("abort", "closed", "dropped", "events", "final", "limit", "sent", "symbols",
                 "wake", "window")  # fmt: skip

    def __init__(self, symbols: tuple[str, ...], window: Window, limit: int) -> None:
        self.symbols = symbols
        self.window = window
        self.limit = limit
        self.sent: dict[str, tuple[int, int]] = {}  # symbol -> state key of its last event
        self.events: deque[bytes] = deque()
        self.final: bytes | None = None
        self.dropped = False
        self.wake = asyncio.Event()
        # Set by the stream handler: cuts the connection of a dropped client that does not read.
        self.abort: Callable[[], None] | None = None
        self.closed = False  # set by the stream handler once the stream is over

    def push(self, event: bytes) -> None:
        if self.final is not None:
            return
        if len(self.events) >= self.limit:
            self.events.clear()
            self.dropped = True
            reason = f"the client fell {self.limit} events behind (stream.queue_events)"
            self.finish(final_event("dropped", reason))
            # The handler may be stuck writing to a client that stopped reading: cut it off
            # if the final event has not gone out by then.
            asyncio.get_running_loop().call_later(DROP_GRACE_S, self.cut_off)
            return
        self.events.append(event)
        self.wake.set()

    def cut_off(self) -> None:
        """Abort the connection unless the stream is over (its final event went out)."""
        if not self.closed and self.abort is not None:
            log.info("live stream cut off: the client did not read its final event")
            self.abort()

    def finish(self, event: bytes) -> None:
        """End the stream after what is queued, with `event` last (the first call wins)."""
        if self.final is None:
            self.final = event
            self.wake.set()

    def take(self) -> tuple[bytes, bool]:
        """(every pending event, whether the stream ends after them); clears the wake flag."""
        chunk = b"".join(self.events)
        self.events.clear()
        done = self.final is not None
        if done:
            chunk += self.final or b""
        self.wake.clear()
        return chunk, done


class LiveHub:
    """The SSE clients, the stats PUB socket and the ticker that feeds both."""

    def __init__(
        self, store: Store, config: StreamConfig, pub_endpoint: str = "", pub_hwm: int = 10_000
    ) -> None:
        self.store = store
        self.config = config
        self.interval_s = 1.0 / config.max_rate_hz
        self.pub_endpoint = pub_endpoint
        self.pub_hwm = pub_hwm
        self.clients: set[StreamClient] = set()
        self.closed = False
        self.events_sent = 0  # SSE events queued, all clients (for tests and metrics)
        self.pub_sent = 0  # PUB messages sent
        self.dropped = 0  # clients dropped for falling behind
        self._pub_window = Window(config.pub_exponent)
        self._pub_versions: dict[str, tuple[int, int]] = {}
        self._context: zmq.Context | None = None
        self._pub: zmq.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    # --- the PUB socket: bound by the CLI (a bad endpoint exits 2), closed on stop ---------

    def bind_pub(self) -> None:
        """Bind the PUB socket when `transport.zmq.stats_pub_endpoint` is set."""
        if not self.pub_endpoint or self._pub is not None:
            return
        context = zmq.Context()
        sock = context.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, self.pub_hwm)  # a slow subscriber drops here
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.pub_endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            context.term()
            raise TransportStartError(
                f"transport.zmq.stats_pub_endpoint: cannot bind {self.pub_endpoint!r}: {exc}"
            ) from None
        self._context, self._pub = context, sock

    @property
    def pub_bound(self) -> str:
        """The endpoint the PUB socket is bound to ("" when off): a `:0` port resolved."""
        if self._pub is None:
            return ""
        return self._pub.getsockopt_string(zmq.LAST_ENDPOINT)

    def close_pub(self) -> None:
        sock, context = self._pub, self._context
        self._pub = self._context = None
        if sock is not None:
            sock.close(0)
        if context is not None:
            context.term()

    # --- lifecycle (event loop) -----------------------------------------------------------

    def start(self) -> None:
        """After the server started: tick for the PUB socket even without SSE clients."""
        if self._pub is not None:
            self._ensure_ticker()

    def close(self) -> None:
        """Shutdown: every stream ends with `event: end`, the ticker and PUB socket stop."""
        self.closed = True
        loop = asyncio.get_running_loop()
        for client in list(self.clients):
            client.finish(final_event("end", "the appliance is stopping"))
            # A client that does not read would hold the stop for graceful_shutdown_s.
            loop.call_later(DROP_GRACE_S, client.cut_off)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.close_pub()

    # --- clients --------------------------------------------------------------------------

    def register(self, symbols: tuple[str, ...], window: Window) -> StreamClient:
        """A new client (429 `rate_limited` past `stream.max_clients`), with an initial event
        per symbol that already has values."""
        if self.closed:
            raise ApiError("not_ready", "the appliance is stopping: no new streams")
        if len(self.clients) >= self.config.max_clients:
            raise ApiError(
                "rate_limited",
                f"{len(self.clients)} streams are open; at most {self.config.max_clients} "
                "(stream.max_clients): retry later",
                headers={"Retry-After": "1"},
            )
        client = StreamClient(symbols, window, self.config.queue_events)
        self._feed(client, {})  # before it counts: a failing first read leaks no slot
        self.clients.add(client)
        self._ensure_ticker()
        return client

    def unregister(self, client: StreamClient) -> None:
        self.clients.discard(client)

    # --- the ticker -----------------------------------------------------------------------

    def _ensure_ticker(self) -> None:
        if self.closed or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.clients or self._pub is not None:
            await asyncio.sleep(self.interval_s)
            try:
                self.tick()
            except Exception:  # never let one bad tick end live statistics for everyone
                log.exception("live statistics tick failed")

    def tick(self) -> None:
        """One round: an event for every watched symbol whose version moved."""
        computed: dict[tuple[str, int], bytes | None] = {}
        for client in list(self.clients):
            if client.final is None:
                self._feed(client, computed)
        if self._pub is not None:
            self._publish(computed)

    def _feed(self, client: StreamClient, computed: dict[tuple[str, int], bytes | None]) -> None:
        sent = client.sent
        for symbol in client.symbols:
            version = self._version(symbol)
            if version is None:
                sent.pop(symbol, None)  # deleted (or never seen): its next series starts fresh
                continue
            if sent.get(symbol) == version:
                continue
            body = self._body(symbol, client.window, version[1], computed)
            if body is None:
                continue
            sent[symbol] = version
            client.push(sse("stats", body))
            self.events_sent += 1
            if client.final is not None:
                self.dropped += client.dropped
                return

    def _publish(self, computed: dict[tuple[str, int], bytes | None]) -> None:
        sock = self._pub
        assert sock is not None
        versions = self._pub_versions
        for symbol in self.store.symbols():
            version = self._version(symbol)
            if version is None or versions.get(symbol) == version:
                continue
            body = self._body(symbol, self._pub_window, version[1], computed)
            if body is None:
                continue
            versions[symbol] = version
            with contextlib.suppress(zmq.Again):  # PUB drops at the HWM; never blocks
                sock.send_multipart([symbol.encode("utf-8"), body], flags=zmq.NOBLOCK)
                self.pub_sent += 1
        if len(versions) > len(self.store):  # forget deleted symbols
            for gone in [s for s in versions if s not in self.store]:
                del versions[gone]

    def _version(self, symbol: str) -> tuple[int, int] | None:
        """The symbol's state key (`Store.state_key`: a batch count alone repeats when a
        deleted symbol is created again and reaches the same count between two ticks)."""
        try:
            return self.store.state_key(symbol)
        except UnknownSymbolError:
            return None

    def _body(
        self,
        symbol: str,
        window: Window,
        version: int,
        computed: dict[tuple[str, int], bytes | None],
    ) -> bytes | None:
        """The event's JSON, once per (symbol, window) per tick; None if the symbol is gone."""
        slot = (symbol, window.key)
        if slot in computed:
            return computed[slot]
        body = computed[slot] = event_body(self.store, symbol, window, version)
        return body


def event_body(store: Store, symbol: str, window: Window, version: int) -> bytes | None:
    """`{"symbol", window, "count", "min", "max", "last", "avg", "var", "timestamp",
    "version"}` as JSON; None for a symbol deleted meanwhile. `version` is the one read before
    the statistics: they describe that state or a newer one (a newer one gets its own event)."""
    try:
        if window.key > 0:
            result = store.stats(symbol, window.key)
        else:
            result = store.stats_seconds(symbol, -window.key)
        newest = store.newest_timestamp(symbol)
    except UnknownSymbolError:
        return None
    payload: dict[str, Any] = {"symbol": symbol, **window.label, "count": result.count,
                               "min": result.min, "max": result.max, "last": result.last,
                               "avg": result.avg, "var": result.var, "timestamp": newest,
                               "version": version}  # fmt: skip
    return _ENCODER.encode(payload)


def parse_symbols(raw: str | None, validate: Callable[[str], str], limit: int) -> tuple[str, ...]:
    """`symbols=A,B`: 1..`limit` distinct symbols, each a valid symbol (a symbol with a comma
    cannot be streamed). 400 `missing_parameter` / `invalid_symbol`.

    `limit` is `max_symbols_per_stream`: one tick can queue an event per symbol, so a stream
    may not watch more symbols than its queue holds (it would be dropped at once)."""
    if raw is None or raw == "":
        raise ApiError("missing_parameter", "query parameter `symbols` is required (A,B,...)")
    names = _unique(raw.split(","))
    if len(names) > limit:
        raise ApiError(
            "invalid_symbol",
            f"{len(names)} symbols requested; one stream watches at most {limit} (the smaller "
            f"of {MAX_STREAM_SYMBOLS} and stream.queue_events)",
        )
    for name in names:
        validate(name)
    return tuple(names)


def max_symbols_per_stream(config: StreamConfig) -> int:
    return min(MAX_STREAM_SYMBOLS, config.queue_events)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
