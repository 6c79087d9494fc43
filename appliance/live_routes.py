"""GET /stream (Server-Sent Events of live statistics) and the live page (GET / and GET /ui).

Why here and not in app.py: the stream is the one route that answers with a body it sends over
time, so it has its own loop (events, heartbeats, the final event) and its own lifecycle hooks
(the hub starts with the server and ends every stream when it stops); app.py calls
`add_live_routes` once and builds `LiveHub` once.

The page is one static HTML file (`appliance/ui/live.html`, package data) with inline JS and
CSS: no build step, nothing fetched from elsewhere. It is served without a token (it holds no
data); the data it shows comes from GET /symbols and GET /stream, which it calls with the token
the user pastes into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse

from appliance.access import principal_of
from appliance.live import (
    LiveHub,
    StreamClient,
    Window,
    max_symbols_per_stream,
    parse_symbols,
)
from appliance.validation import (
    invalid_exponent,
    invalid_window,
    parse_query_string,
    parse_seconds,
    parse_stats_query,
    validate_symbol,
)

SSE_TYPE = "text/event-stream; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
# Sent at once, so a client knows the stream is open before the first event.
_OPENING = b": live statistics (event: stats; ends with event: end or dropped)\n\n"
_HEARTBEAT = b": heartbeat\n\n"
# The kernel send buffer of a stream's socket (Linux doubles it): about a thousand events.
STREAM_SNDBUF_BYTES = 128 * 1024

RouteDecorator = Callable[[str], Callable[[Any], Any]]


def build_hub(app: Sanic) -> LiveHub:
    config = app.ctx.config
    zmq = config.transport.zmq
    endpoint = zmq.stats_pub_endpoint if zmq.enabled else ""
    return LiveHub(app.ctx.store, config.stream, endpoint, zmq.rcvhwm)


def parse_window(params: dict[str, str]) -> Window:
    """`exponent` (1..8, GET /stats/'s rules) or `seconds` (`parse_seconds`), not both."""
    seconds = params.get("seconds")
    if seconds is not None:
        if "exponent" in params:
            raise invalid_window("give `exponent` or `seconds`, not both (a window is one)")
        return Window(-parse_seconds(seconds))
    if "exponent" not in params:
        raise invalid_exponent("(missing)")
    return Window(parse_stats_query({"symbol": "", **params}).exponent)


@cache
def page() -> bytes:
    """The live page's HTML (read once)."""
    return resources.files("appliance").joinpath("ui", "live.html").read_bytes()


def add_live_routes(app: Sanic, stream_route: RouteDecorator, page_route: RouteDecorator) -> None:
    """GET /stream through `stream_route` (a data route, `read` role), GET / and /ui through
    `page_route` (no token), and the hub's start/stop hooks."""

    @stream_route("/stream")
    async def stream(request: Request) -> HTTPResponse | None:
        params = parse_query_string(request.query_string)
        limit = max_symbols_per_stream(request.app.ctx.config.stream)
        symbols = parse_symbols(params.get("symbols"), validate_symbol, limit)
        window = parse_window(params)
        principal = principal_of(request)
        if principal is not None:
            for symbol in symbols:
                request.app.ctx.access.check_symbol(principal, symbol, "GET /stream")
        if request.method == "HEAD":  # the stream's status and headers, no stream
            return HTTPResponse(content_type=SSE_TYPE, headers={"Cache-Control": "no-cache"})
        hub: LiveHub = request.app.ctx.live
        client = hub.register(symbols, window)
        try:
            await _serve_stream(request, client)
        finally:
            hub.unregister(client)
        return None  # the response was sent by the handler itself

    @page_route("/")
    async def index(request: Request) -> HTTPResponse:
        return HTTPResponse(page(), content_type=HTML_TYPE, headers={"Cache-Control": "no-cache"})

    @page_route("/ui")
    async def ui(request: Request) -> HTTPResponse:
        return HTTPResponse(page(), content_type=HTML_TYPE, headers={"Cache-Control": "no-cache"})

    @app.after_server_start
    async def start_live(app: Sanic) -> None:
        app.ctx.live.start()

    @app.before_server_stop
    async def stop_live(app: Sanic) -> None:
        app.ctx.live.close()


def bound_send_buffer(transport: Any) -> None:
    """A fixed kernel send buffer for the stream's socket (`STREAM_SNDBUF_BYTES`).

    Linux grows a socket's send buffer up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default)
    for a peer that does not read; with a fixed one, a stalled client holds little kernel
    memory and its queue (stream.queue_events) starts filling, and so it is dropped, soon.
    """
    sock = transport.get_extra_info("socket") if hasattr(transport, "get_extra_info") else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)


def heartbeat_s(request: Request) -> float:
    """`stream.heartbeat_s`, but often enough that Sanic's response timeout (reset by every
    write) never cuts an idle stream."""
    configured = request.app.ctx.config.stream.heartbeat_s
    return min(configured, float(request.app.config.RESPONSE_TIMEOUT) / 2)


async def _serve_stream(request: Request, client: StreamClient) -> None:
    response = await request.respond(
        content_type=SSE_TYPE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    transport = request.transport
    client.abort = getattr(transport, "abort", None)
    bound_send_buffer(transport)
    beat = heartbeat_s(request)
    try:
        await response.send(_OPENING)
        while True:
            if not client.wake.is_set():
                try:
                    await asyncio.wait_for(client.wake.wait(), beat)
                except TimeoutError:
                    await response.send(_HEARTBEAT)
                    continue
            chunk, done = client.take()
            if chunk:
                await response.send(chunk)
            if done:
                break
        # A stream the server ended closes its connection (no keep-alive to hold a drain).
        stream = getattr(request, "stream", None)
        if stream is not None and hasattr(stream, "keep_alive"):
            stream.keep_alive = False
        await response.eof()
    finally:
        client.closed = True
