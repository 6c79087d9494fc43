"""The Sanic application: routes, error rendering and lifecycle hooks over one `Store`.

Why this shape: handlers are thin (validate -> store -> encode), every failure is rendered by
one error handler as `{"error", "code"}` JSON with the status from `appliance.errors`, and the
app owns all mutable state (`app.ctx.store`, `app.ctx.readiness`, `app.ctx.transports`), so a
test or benchmark can build as many apps as it likes. Every route is added through `_route`, the
one request hook: it says per path whether the route waits for readiness (data routes) or
answers at once (probes, documents), and marks drained keep-alive connections. One process
owns the store: the CLI runs this app with `single_process=True`; several Sanic workers would
each hold a different store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter
from typing import Any
from urllib.parse import unquote

import msgspec
from sanic import Request, Sanic
from sanic.exceptions import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestCancelled,
    SanicException,
)
from sanic.handlers import ErrorHandler
from sanic.response import HTTPResponse

from appliance.access import Access, principal_of, restrict_queries
from appliance.audit import Audit, NullAudit
from appliance.auth import Role, Tokens
from appliance.config import AppConfig
from appliance.durability.sequences import PublisherSequences
from appliance.durability.writer import StorageUnavailableError
from appliance.engine import select_configured_engine
from appliance.errors import ApiError
from appliance.ingest import as_api_error
from appliance.live_routes import add_live_routes, build_hub
from appliance.logging_setup import request_id
from appliance.metrics import install_metrics
from appliance.openapi import build_openapi
from appliance.rate_limit import RateLimits
from appliance.readiness import Readiness
from appliance.stats_batch import (
    StatsBatchDecoder,
    answer,
    answer_columns,
    stats_body,
    time_stats_body,
    unknown_symbol,
)
from appliance.store import Store, SymbolLimitError, UnknownSymbolError
from appliance.timestamps import OutOfOrderError
from appliance.validation import (
    BatchDecoder,
    TimeWindowQuery,
    parse_query_string,
    parse_stats_query,
    validate_symbol,
)
from engine_core.contract import Engine, RetentionPolicy

log = logging.getLogger(__name__)

JSON = "application/json"
DEFAULT_APP_NAME = "hft_appliance"
TRANSPORT_STOP_TIMEOUT_S = 5.0

_ENCODER = msgspec.json.Encoder()  # stateless and thread-safe; not mutable state

# Every GET route also answers HEAD (monitoring probes use it): Sanic runs the GET handler and
# sends only the status line and headers, Content-Length included, never the body.
GET_AND_HEAD = ["GET", "HEAD"]

# The client went away (closed mid-upload, reset the connection): nothing is wrong with the
# server, and any client can cause it at will, so it must never reach the error log.
CLIENT_GONE = (RequestCancelled, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None):
    """Encode with msgspec (fast, shortest round-trip floats) and label it application/json."""
    return HTTPResponse(_ENCODER.encode(payload), status=status, headers=headers, content_type=JSON)


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> HTTPResponse:
    return json_response(error.to_body(), error.status, headers)


def close_if_draining(request: Request | None) -> None:
    """While stopping, answer with `Connection: close` so drained keep-alive clients let go.

    Sanic closes idle connections when shutdown starts, then waits for the others until
    `graceful_shutdown_s`; a keep-alive connection whose in-flight request finishes would hold
    the process until that timeout. One attribute check per request.
    """
    # getattr chain: also called from the error handler with half-built or absent requests,
    # where raising would replace the JSON error with Sanic's plain-text fallback.
    ctx = getattr(getattr(request, "app", None), "ctx", None)
    readiness = getattr(ctx, "readiness", None)
    if readiness is not None and readiness.draining:
        stream = getattr(request, "stream", None)
        if stream is not None and hasattr(stream, "keep_alive"):
            stream.keep_alive = False


class JsonErrorHandler(ErrorHandler):
    """Renders every exception, Sanic's own included, as the API's JSON error body."""

    def response(self, request: Request, exception: BaseException) -> HTTPResponse:
        """Sanic's entry for every exception (unknown paths included, which reach no route):
        the rendered error is counted by code for GET /metrics."""
        response = super().response(request, exception)
        timing = getattr(getattr(getattr(request, "app", None), "ctx", None), "rest_metrics", None)
        if timing is not None:
            timing.count_error(getattr(response, "body", None))
        return response

    def default(self, request: Request, exception: BaseException) -> HTTPResponse:
        close_if_draining(request)
        if isinstance(exception, ApiError):
            return error_response(exception, exception.headers)
        if isinstance(exception, CLIENT_GONE):
            return client_gone_response(request, exception)
        if isinstance(exception, NotFound):
            path = request.path if request else "?"
            return error_response(ApiError("not_found", f"no route for path {path!r}"))
        if isinstance(exception, MethodNotAllowed):
            allowed = sorted(getattr(exception, "allowed_methods", None) or ())
            method = request.method if request else "?"
            path = request.path if request else "?"
            message = f"method {method} is not allowed on {path}"
            if allowed:
                message += f"; allowed: {', '.join(allowed)}"
            headers = {"Allow": ", ".join(allowed)} if allowed else None
            return error_response(ApiError("method_not_allowed", message), headers)
        if isinstance(exception, PayloadTooLarge) and "header" in str(exception).lower():
            # Sanic raises PayloadTooLarge for an oversized request line + headers as well.
            return error_response(
                ApiError("bad_request", "request line and headers are too large", status=431)
            )
        if isinstance(exception, PayloadTooLarge):
            limit = request.app.config.REQUEST_MAX_SIZE if request else "the limit"
            return error_response(
                ApiError(
                    "batch_too_large",
                    f"request body is larger than {limit} bytes (server.max_body_bytes): "
                    "split the batch",
                )
            )
        status = getattr(exception, "status_code", 500)
        if isinstance(exception, SanicException) and 400 <= status < 500:
            return error_response(ApiError("bad_request", str(exception), status=status))
        log.error(
            "unhandled error",
            exc_info=(type(exception), exception, exception.__traceback__),
            extra={
                "path": getattr(request, "path", None),
                "method": getattr(request, "method", None),
            },
        )
        return error_response(ApiError("internal_error", "internal server error (logged)"))


def client_gone_response(request: Request | None, exception: BaseException) -> HTTPResponse:
    """Debug line, no traceback: a disconnecting client is routine, not a server fault.

    The response is rendered only because Sanic expects one; nobody is left to read it.
    """
    log.debug(
        "client disconnected before the response",
        extra={
            "path": getattr(request, "path", None),
            "method": getattr(request, "method", None),
            "reason": type(exception).__name__,
        },
    )
    return error_response(ApiError("bad_request", "the client closed the connection"))


def status_of(exception: BaseException) -> int:
    """The status the error handler gives an exception a route raised (ApiError's `status`,
    Sanic's `status_code`, else 500): the latency histogram's label for it."""
    return int(getattr(exception, "status", None) or getattr(exception, "status_code", 500) or 500)


def check_json_content_type(header: str | None) -> None:
    """415 unless the media type is application/json (a `charset` parameter must be utf-8)."""
    media_type, *params = (header or "").split(";")
    if media_type.strip().lower() != JSON:
        shown = header if header else "none"
        raise ApiError(
            "unsupported_media_type",
            f"Content-Type must be application/json, got {shown!r}",
        )
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise ApiError(
                "unsupported_media_type", f"charset must be utf-8, got {value.strip()!r}"
            )


class RestIngestCounters:
    """Batches and values POST /add_batch/ applied: two integer additions per batch, on the
    event loop only; read by GET /metrics as transport `rest` (GET /ingest lists the binary
    transports only)."""

    __slots__ = ("batches", "values")

    def __init__(self) -> None:
        self.batches = 0
        self.values = 0

    def snapshot(self) -> dict[str, int]:
        return {"messages": self.batches, "frames_applied": self.batches,
                "values_applied": self.values}  # fmt: skip


def build_store(config: AppConfig, engine: Engine) -> Store:
    return Store(
        engine,
        retention=RetentionPolicy(
            max_values=config.store.max_data_retention,
            keep_after_cleanup=config.store.cleanup_keep_count,
        ),
        max_symbols=config.store.max_symbols,
        starting_capacity=config.store.starting_capacity,
        clamp_out_of_order=config.store.out_of_order == "clamp",
    )


def create_app(
    config: AppConfig,
    engine: Engine | None = None,
    *,
    name: str = DEFAULT_APP_NAME,
    tokens: Tokens | None = None,
    audit: Audit | None = None,
) -> Sanic:
    """Build the app. `engine` overrides `[engine] backend` (benchmarks inject a baseline).

    `name` must be unique within a process (Sanic keeps a registry of apps by name). With
    `auth.mode = "token"`, `tokens` (else `auth.tokens_file`, read here: TokensFileError) are
    the known tokens. `audit`: the audit trail (default: none).
    """
    if engine is None:
        engine = select_configured_engine(config.engine).engine
    # env_prefix=None: Sanic's own SANIC_* variables are ignored; APP_* is the one mechanism.
    app = Sanic(name, configure_logging=False, error_handler=JsonErrorHandler(), env_prefix=None)
    app.config.REQUEST_MAX_SIZE = config.max_body_bytes
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = config.server.graceful_shutdown_s
    app.config.ACCESS_LOG = config.log.access_log
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.MOTD = False
    app.ctx.config = config
    app.ctx.engine = engine
    app.ctx.store = build_store(config, engine)
    # starting -> (replaying) -> ready -> stopping; data routes wait for `ready` (bounded by
    # server.wait_for_ready_s), the probes report it (appliance.readiness).
    app.ctx.readiness = Readiness(config.server.wait_for_ready_s)
    # The write-ahead log's writer (appliance.durability.writer.DurableWriter), attached by the
    # CLI after recovery (`attach_durability`); None: batches go straight to the store (tests,
    # benchmarks, `[durability] enabled = false`).
    app.ctx.durable = None
    # Set by the CLI with durability on: the after_server_start hook replays the log (data
    # requests wait meanwhile) and then attaches the writer; a failure is kept in
    # `start_error` (one line) and the server stops.
    app.ctx.recover_on_start = False
    app.ctx.start_error = None
    # Objects with `on_record(record)` (the warm tier) to register with the log's writer; they
    # see every replayed record at recovery, then every new one. Add before attach_durability.
    # The first listener remembers each publisher's highest logged sequence: after a replay it
    # seeds the acknowledged transports, so a frame logged before a crash is not applied twice.
    app.ctx.publisher_sequences = PublisherSequences()
    app.ctx.record_listeners = [app.ctx.publisher_sequences]
    # The binary ingest transports (appliance.transports.Transports), set by the CLI once their
    # endpoints are bound; None in apps built without them (tests, benchmarks): GET /ingest
    # then reports no transports.
    app.ctx.transports = None
    # POST /add_batch/'s own counters (the binary transports keep theirs), for GET /metrics.
    app.ctx.rest_ingest = RestIngestCounters()
    # The warm tier (appliance.durability.warm.WarmTier) behind GET /history/stats and the
    # totals of GET /symbols, set by the CLI with durability on; None: history answers 404
    # `history_disabled` and /symbols reports hot counts only.
    app.ctx.warm = None
    # Who may do what (appliance.access); None with auth.mode = "off": no check at all.
    app.ctx.audit = audit if audit is not None else NullAudit()
    app.ctx.access = None
    # Cluster mode's router (appliance.cluster.router.ClusterRouter), set by the
    # after_server_start hook once the node joined NATS; None: this node answers from its own
    # store (single-node mode, or before the cluster started).
    app.ctx.cluster = None
    app.ctx.cluster_ingest = None  # ClusterIngestSlot: the transports' target in cluster mode
    app.ctx.cluster_ready_task = None
    if config.auth.mode == "token":
        if tokens is None:
            tokens = Tokens.from_file(config.auth.tokens_file)
        limits = RateLimits(
            config.auth.default_max_requests_per_s, config.auth.default_max_values_per_s
        )
        app.ctx.access = Access(tokens, limits, app.ctx.audit)
    _add_routes(app, BatchDecoder(config.store.max_batch_size), build_openapi(config))
    _add_lifecycle(app)
    _add_live(app)
    # GET /metrics (through the route hook: a read token with auth on) and request timing, per
    # [metrics] (appliance.metrics).
    install_metrics(
        app, partial(_route, app, methods=GET_AND_HEAD, waits_for_ready=False, role="read")
    )
    return app


def attach_durability(app: Sanic) -> Any:
    """Recover the store from `[durability] dir` and route every batch through the log.

    Blocking: the after_server_start hook runs it in a thread (`recover_on_start`), so /ready
    answers 503 until the replay ends; tests may call it directly before serving.
    Returns the started `DurableWriter`; the caller closes it after the server stops.
    Raises `appliance.durability.recovery.CorruptLogError` for a log that must be repaired,
    `appliance.durability.warm.WarmTierError` for a damaged warm directory.
    The warm tier (`app.ctx.warm`) is opened first and listens to the log: it sees the
    replay, then every new batch; `close_warm` stops it after the writer is closed.
    """
    from appliance.durability.recovery import open_log
    from appliance.durability.warm import WarmTier

    cipher = getattr(app.ctx, "data_cipher", None)  # encryption at rest (None: off), by the CLI
    if app.ctx.warm is None:
        app.ctx.warm = WarmTier.from_config(app.ctx.config.durability, cipher=cipher)
        app.ctx.record_listeners.append(app.ctx.warm)
    listeners = list(getattr(app.ctx, "record_listeners", ()))
    writer = open_log(
        app.ctx.config.durability,
        app.ctx.store,
        listeners,
        progress=app.ctx.readiness.progress,
        timings=getattr(app.ctx, "wal_timings", None),  # set by install_metrics (None: off)
        cipher=cipher,
    )
    app.ctx.durable = writer
    return writer


async def _recover(app: Sanic) -> bool:
    """Replay the log while the server already answers (probes 503, data requests wait).

    On a log or warm directory that must not be served, keep the one-line reason in
    `app.ctx.start_error` and stop the server the way SIGTERM does; the CLI then exits 2.
    A SIGINT/SIGTERM during the replay is held (Sanic would lose a stop requested while its
    startup hooks run) and honoured as soon as the replay ends: the appliance then stops
    without ever turning ready. Returns whether to go on to ready.
    """
    from appliance.durability.encryption import DataKeyError
    from appliance.durability.recovery import CorruptLogError
    from appliance.durability.warm import WarmTierError

    loop = asyncio.get_running_loop()
    stop_requested = _hold_stop_signals(loop)
    app.ctx.readiness.mark_replaying()
    log.info("replaying the write-ahead log", extra={"dir": app.ctx.config.durability.dir})
    try:
        await asyncio.to_thread(attach_durability, app)
    except (CorruptLogError, WarmTierError, DataKeyError, OSError) as exc:
        if isinstance(exc, OSError):
            where = app.ctx.config.durability.dir
            message = f"cannot open the write-ahead log in {where!r}: {exc}"
        else:
            message = str(exc)
        app.ctx.start_error = message
        app.ctx.readiness.mark_failed()  # waiting requests answer 503 at once
        log.error("cannot recover the write-ahead log", extra={"reason": message})
        stop_requested.append(True)
    else:
        app.ctx.recover_on_start = False
    finally:
        _restore_stop_signals(loop, app)
    if stop_requested:
        # Stop as SIGTERM would, but from the serving loop: a stop requested while the startup
        # hooks still run is absorbed by Sanic, so it is repeated until it takes.
        app.ctx.stop_task = loop.create_task(_stop_soon(app))
        return False
    return True


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _hold_stop_signals(loop: asyncio.AbstractEventLoop) -> list[bool]:
    """Replace the stop handlers with one that only records the request (see `_recover`)."""
    requested: list[bool] = []
    for sig in _STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, requested.append, True)
    return requested


def _restore_stop_signals(loop: asyncio.AbstractEventLoop, app: Sanic) -> None:
    """Sanic's own handlers again (the same graceful stop it installs at start)."""
    for sig in _STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, partial(app.stop, terminate=False))


async def _stop_soon(app: Sanic) -> None:
    for _ in range(100):
        await asyncio.sleep(0.05)
        app.stop(terminate=False)


class LogIngest:
    """The transports' sink target with durability on: the log's writer, once recovery made it.

    Transports are bound before the server starts (a bad endpoint exits 2 at once) but started
    only after recovery, so `ingest` always finds `app.ctx.durable` set.
    """

    def __init__(self, app: Sanic) -> None:
        self._ctx = app.ctx

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._ctx.store

    def ingest(
        self,
        symbol: str,
        values: Any,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: Any = None,
    ) -> int:
        """The ring pollers' call: an inline commit under `interval` / `never` (on this thread,
        no hand-off to the writer thread), the group commit's fsync under `always`."""
        return self._ctx.durable.ingest(symbol, values, publisher_id, sequence, timestamps)

    def submit_group(self, items: Any, done: Any) -> None:
        """A transport's poll batch as one log group (`DurableWriter.submit_group`)."""
        self._ctx.durable.submit_group(items, done)


def close_warm(app: Sanic) -> None:
    """Finish the warm tier's queued seals (after the log's writer is closed: no more records).
    Unsealed values are dropped from memory only; the log keeps them for the next start."""
    if app.ctx.warm is not None:
        app.ctx.warm.close()


async def _ingest(ctx: Any, symbol: str, values: Any, timestamps: Any = None) -> tuple[int, int]:
    """Append a validated batch: straight to the store, or through the write-ahead log.
    Returns (values added, the index of the first in the symbol's whole history; -1 without
    the log, which alone numbers values across evictions). `timestamps` (int64 ns, or None for
    the receive time) are judged for order by the store or the log's writer (OutOfOrderError,
    nothing applied or logged)."""
    durable = ctx.durable
    if durable is None:
        if ctx.recover_on_start:  # never bypass the log while it is being replayed
            raise ctx.readiness.not_ready_error()
        return ctx.store.ingest(symbol, values, timestamps=timestamps), -1
    # Log, then apply, then ack: the writer thread resolves the future only once the record
    # is written (fsynced under `always`) and applied to the store.
    record = await asyncio.wrap_future(durable.submit(symbol, values, timestamps=timestamps))
    return int(record.values.shape[0]), record.first_index


# (request, **path parameters); None: the handler sent its response itself (GET /stream).
Handler = Callable[..., Awaitable[HTTPResponse | None]]


def _route(
    app: Sanic, path: str, methods: list[str], *, waits_for_ready: bool, role: Role | None
) -> Callable[[Handler], Handler]:
    """Add a route through the one request hook every path shares.

    `role`: with `auth.mode = "token"`, the role the route needs (None: none, the probes); the
    hook authenticates, checks the role and spends a request of the token's rate (401 / 403 /
    429), and leaves the principal in `request.ctx.principal` for the handler's symbol checks.
    `waits_for_ready`: a data route (it reads or writes the store) waits while the appliance
    starts, up to `server.wait_for_ready_s`, then answers 503 `not_ready`; probes and documents
    answer at once. Every route marks drained keep-alive connections (`close_if_draining`) and
    tags the lines logged while it is handled with the request's id (`X-Request-ID`, else a
    uuid4): the id stays set after the handler returns or raises, so the error handler's
    "unhandled error" line carries it too; the next request on the connection replaces it.
    Paths answer with and without the trailing slash.
    """

    def register(handler: Handler) -> Handler:
        name = handler.__name__

        async def hooked(request: Request, **params: Any) -> HTTPResponse | None:
            request_id.set(request)  # log lines of this request carry its id
            ctx = request.app.ctx
            timing = ctx.rest_metrics  # None with [metrics] off: no clock read at all
            started = perf_counter() if timing is not None else 0.0
            try:
                if role is not None and ctx.access is not None:
                    request.ctx.principal = ctx.access.authorize(request, role)
                if waits_for_ready and not ctx.readiness.accepting:  # one read once started
                    await ctx.readiness.wait_accepting()
                close_if_draining(request)
                response = await handler(request, **params)
            except Exception as exc:
                if timing is not None:  # counted by code where the error handler renders it
                    timing.observe(name, status_of(exc), perf_counter() - started)
                raise
            if response is None:  # streamed (GET /stream): its length is no request latency
                return None
            if timing is not None:
                timing.observe(name, response.status, perf_counter() - started)
                if response.status >= 400:  # an error body a handler returned (probes' 503)
                    timing.count_error(response.body)
            return response

        app.route(path, methods=methods, strict_slashes=False, name=handler.__name__)(hooked)
        return handler

    return register


def _add_routes(app: Sanic, decoder: BatchDecoder, openapi: dict[str, Any]) -> None:
    store: Store = app.ctx.store
    batch_decoder = StatsBatchDecoder(app.ctx.config.server.max_stats_queries)
    openapi_body = _ENCODER.encode(openapi)
    probe = partial(_route, app, methods=GET_AND_HEAD, waits_for_ready=False, role=None)
    document = partial(_route, app, methods=GET_AND_HEAD, waits_for_ready=False, role="read")
    data_get = partial(_route, app, methods=GET_AND_HEAD, waits_for_ready=True, role="read")
    data_post = partial(_route, app, methods=["POST"], waits_for_ready=True, role="write")
    query_post = partial(_route, app, methods=["POST"], waits_for_ready=True, role="read")
    _add_probes(probe)
    _add_documents(document, openapi_body)

    @data_post("/add_batch")
    async def add_batch(request: Request) -> HTTPResponse:
        # Hot path: one C decode, one array conversion, vectorized checks, one locked append.
        check_json_content_type(request.headers.get("content-type"))
        batch = decoder.decode(request.body)
        ctx = request.app.ctx
        principal = principal_of(request)
        if principal is not None:
            ctx.access.check_symbol(principal, batch.symbol, "POST /add_batch/")
            ctx.access.spend(principal, "POST /add_batch/", int(batch.values.shape[0]))
        if ctx.cluster is not None:
            return await _cluster_add_batch(request, batch)
        try:
            added, first_index = await _ingest(ctx, batch.symbol, batch.values, batch.timestamps)
        except (SymbolLimitError, StorageUnavailableError, OutOfOrderError) as exc:
            raise as_api_error(exc) from None
        counters = ctx.rest_ingest
        counters.batches += 1
        counters.values += added
        ctx.audit.rest_write(principal and principal.name, batch.symbol, added, first_index)
        return json_response({"status": "ok", "symbol": batch.symbol, "added": added})

    @data_get("/stats")
    async def stats(request: Request) -> HTTPResponse:
        # Hot path: a hand-rolled query parse, dict lookups, and the store's per-symbol cache.
        query = parse_stats_query(parse_query_string(request.query_string))
        principal = principal_of(request)
        if principal is not None:
            request.app.ctx.access.check_symbol(principal, query.symbol, "GET /stats/")
        cluster = request.app.ctx.cluster
        if cluster is not None:
            key = query.exponent or -query.window_ns  # type: ignore[union-attr]
            return relay(*await cluster.stats(query.symbol, key))
        try:
            if query.exponent:
                result = store.stats(query.symbol, query.exponent)
            else:
                return _time_window_stats(store, query)
        except UnknownSymbolError:
            # invalid_symbol for a symbol that could not exist (the more useful error), else
            # unknown_symbol: the same function answers a batch item, so the two agree.
            raise unknown_symbol(query.symbol) from None
        return json_response(stats_body(result))

    _add_stats_batch_route(query_post, store, batch_decoder)
    _add_history_routes(data_get, store)
    _add_history_bars_route(data_get, store)
    _add_history_rolling_route(data_get, store)
    admin_delete = partial(_route, app, methods=["DELETE"], waits_for_ready=True, role="admin")

    @admin_delete("/symbols/<symbol:path>")
    async def delete_symbol(request: Request, symbol: str) -> HTTPResponse:
        return await _delete_symbol(request, unquote(symbol))


def _add_stats_batch_route(
    query_post: Callable[[str], Callable[[Handler], Handler]],
    store: Store,
    batch_decoder: StatsBatchDecoder,
) -> None:
    """POST /stats/batch: many queries in one request (in cluster mode, one per partition)."""

    @query_post("/stats/batch")
    async def stats_batch(request: Request) -> HTTPResponse:
        # Whole-body errors (400/413/415) before the store is touched; per-item errors are
        # items of the 200 answer. On the event loop like GET /stats/: 10k queries cost a few
        # ms of decoding and encoding (benches/RESULTS.md).
        check_json_content_type(request.headers.get("content-type"))
        principal = principal_of(request)
        cluster = request.app.ctx.cluster
        if cluster is not None:
            items = batch_decoder.decode(request.body)
            if principal is not None:
                items = restrict_queries(principal, items)
            return HTTPResponse(await cluster.stats_batch(items), content_type=JSON)
        if principal is None or principal.symbols is None:  # no per-symbol restriction
            columns = batch_decoder.decode_columns(request.body)
            return HTTPResponse(answer_columns(store, columns), content_type=JSON)
        items = restrict_queries(principal, batch_decoder.decode(request.body))
        return HTTPResponse(answer(store, items), content_type=JSON)


IDEMPOTENCY_KEY_MAX = 200


def relay(status: int, body: bytes) -> HTTPResponse:
    """A cluster answer (this node's or the owner's status and JSON body) as the response;
    a 503 carries Retry-After like the error table's partition_unavailable."""
    headers = {"Retry-After": "1"} if status == 503 else None
    return HTTPResponse(body, status=status, headers=headers, content_type=JSON)


async def _cluster_add_batch(request: Request, batch: Any) -> HTTPResponse:
    """POST /add_batch/ in cluster mode: logged in the partition's stream (by this node or the
    owner), then applied, then answered. The JetStream message id is the client's
    `Idempotency-Key` namespaced by principal and symbol (a retry of the same key is applied
    once), else a fresh uuid4."""
    from appliance.cluster.messages import rest_msg_id

    ctx = request.app.ctx
    principal = principal_of(request)
    key = request.headers.get("idempotency-key")
    if key:
        if len(key) > IDEMPOTENCY_KEY_MAX:
            raise ApiError(
                "bad_request", f"Idempotency-Key is longer than {IDEMPOTENCY_KEY_MAX} characters"
            )
        # Namespaced per principal and symbol: never equal to a transport frame's id or to
        # another tenant's key (messages.rest_msg_id).
        msg_id = rest_msg_id(principal and principal.name, batch.symbol, key)
    else:
        msg_id = uuid.uuid4().hex  # no ':' in it: cannot equal a namespaced id
    status, body = await ctx.cluster.add_batch(
        batch.symbol, batch.values, batch.timestamps, msg_id, time.time_ns()
    )
    if status == 200:
        added = int(batch.values.shape[0])
        ctx.rest_ingest.batches += 1
        ctx.rest_ingest.values += added
        ctx.audit.rest_write(principal and principal.name, batch.symbol, added, -1)
    return relay(status, body)


def _time_window_stats(store: Store, query: TimeWindowQuery) -> HTTPResponse:
    """GET /stats/?seconds=X: the values whose timestamp is at or after the symbol's newest
    timestamp minus X (`Store.stats_seconds`, O(log marks)); raises UnknownSymbolError."""
    result = store.stats_seconds(query.symbol, query.window_ns)
    return json_response(time_stats_body(result, query.window_ns))


async def _delete_symbol(request: Request, symbol: str) -> HTTPResponse:
    """DELETE /symbols/{symbol}: free the symbol's slot and drop its hot values; its history
    stays in the warm tier (GET /history/stats) until `durability.retain_days`, and a later
    batch for it starts a new hot series whose indexes continue that history."""
    validate_symbol(symbol)
    ctx = request.app.ctx
    principal = principal_of(request)
    if principal is not None:
        ctx.access.check_symbol(principal, symbol, "DELETE /symbols/")
    if ctx.cluster is not None:  # logged in the partition's stream by its owner
        status, body = await ctx.cluster.delete(symbol, uuid.uuid4().hex)
        if status == 200:
            who = principal.name if principal is not None else "(auth off)"
            ctx.audit.admin(who, "delete_symbol", {"symbol": symbol})
        return relay(status, body)
    try:
        if ctx.durable is not None:  # durable first (a tombstone), off the event loop
            dropped, tombstone = await asyncio.to_thread(ctx.durable.delete_symbol, symbol)
            history = (
                f"kept: its {tombstone.total} values stay in the warm tier (GET /history/stats) "
                "until durability.retain_days; a new batch continues at index "
                f"{tombstone.total}"
            )
        else:
            dropped = ctx.store.delete(symbol)
            history = "none: durability is disabled, so nothing of it is kept"
    except UnknownSymbolError:
        raise unknown_symbol(symbol) from None
    except OSError as exc:  # the tombstone could not be written: nothing was deleted
        raise ApiError(
            "storage_unavailable", f"cannot record the deletion of {symbol!r}: {exc}"
        ) from None
    who = principal.name if principal is not None else "(auth off)"
    ctx.audit.admin(who, "delete_symbol", {"symbol": symbol, "hot_values_dropped": dropped})
    log.info("symbol deleted", extra={"symbol": symbol, "by": who, "values": dropped})
    return json_response(
        {"status": "deleted", "symbol": symbol, "hot_values_dropped": dropped, "history": history}
    )


def _add_documents(
    document: Callable[[str], Callable[[Handler], Handler]], openapi_body: bytes
) -> None:
    """GET /ingest (the transports' counters) and GET /openapi.json: a `read` token with auth
    on, answered at once (no wait for the start)."""

    @document("/ingest")
    async def ingest(request: Request) -> HTTPResponse:
        transports = request.app.ctx.transports
        if transports is None:
            return json_response({"transports": {}})
        # Ring ids (publisher ids) help take over a ring: admins only, with auth on.
        principal = principal_of(request)
        admin = principal is None or principal.has_role("admin")
        return json_response({"transports": transports.snapshot(show_ring_ids=admin)})

    @document("/openapi.json")
    async def openapi_json(request: Request) -> HTTPResponse:
        return HTTPResponse(openapi_body, content_type=JSON)


def _add_probes(probe: Callable[[str], Callable[[Handler], Handler]]) -> None:
    """Liveness (`/live`: the process serves HTTP) and readiness (`/health`, `/ready`).

    `/health` keeps the original service's contract, "running and ready to accept traffic":
    200 only once reads and writes are accepted, 503 with the phase and the replay's progress
    before (and while stopping). `/ready` says the same with its own bodies.
    """

    @probe("/live")
    async def live(request: Request) -> HTTPResponse:
        return json_response({"status": "ok"})

    @probe("/health")
    async def health(request: Request) -> HTTPResponse:
        readiness = request.app.ctx.readiness
        if not readiness.ready:
            return json_response(readiness.health_body(), 503)
        return json_response({"status": "ok"})

    @probe("/ready")
    async def ready(request: Request) -> HTTPResponse:
        readiness = request.app.ctx.readiness
        if not readiness.ready:
            return error_response(readiness.not_ready_error())
        cluster = request.app.ctx.cluster
        if cluster is not None and not cluster.node.connected:
            # Cut off from NATS this node can neither write nor forward (its reads stop at its
            # leases' end): the balancer should send traffic to the others meanwhile.
            return error_response(
                ApiError("not_ready", "the node is disconnected from NATS (reconnecting)")
            )
        return json_response({"status": "ready"})


def _add_history_routes(data_get: Callable[[str], Callable[[Handler], Handler]], store: Store):
    """GET /history/stats (the warm tier, issue 5) and GET /symbols (both tiers' counts).

    Both wait for readiness like every data route: while the log is replayed the tiers are
    still being rebuilt and would answer with part of the history.
    """

    @data_get("/history/stats")
    async def history_stats(request: Request) -> HTTPResponse:
        params, symbol = _history_request(request, "GET /history/stats")
        warm = request.app.ctx.warm
        from appliance.durability.history import HistoryError, run_query

        try:
            # Off the event loop: an edge segment may need decompressing (a few ms).
            result = await asyncio.to_thread(
                run_query,
                warm,
                symbol,
                params.get("by") or "index",
                params.get("start"),
                params.get("end"),
            )
        except HistoryError as exc:
            raise ApiError(exc.code, exc.message) from None
        return json_response({"symbol": symbol, **result.to_dict()})

    @data_get("/symbols")
    async def symbols(request: Request) -> HTTPResponse:
        warm = request.app.ctx.warm
        totals = warm.symbols() if warm is not None else {}
        principal = principal_of(request)
        cluster = request.app.ctx.cluster
        if cluster is not None:  # every partition's rows, from each owner
            status, found = await cluster.symbols()
            if status != 200:
                return relay(status, found)  # type: ignore[arg-type]
            allowed = [
                row
                for row in found  # type: ignore[union-attr]
                if principal is None or principal.may_access(row["symbol"])
            ]
            return json_response({"symbols": allowed})
        rows = []
        for name in sorted(set(store.symbols()) | set(totals)):
            if principal is not None and not principal.may_access(name):
                continue  # a token sees only the symbols its patterns cover
            hot = store.length(name) if name in store else 0
            total = totals[name].total if name in totals else None
            if warm is not None:
                total = max(total or 0, hot)  # a symbol the warm tier has not seen yet
            rows.append({"symbol": name, "hot": hot, "total": total})
        return json_response({"symbols": rows})


def _history_request(request: Request, route: str) -> tuple[dict[str, str], str]:
    """(query parameters, symbol) of a GET /history/* request, after the checks every history
    route makes in the same order: `symbol` present and valid, the token allowed to read it,
    the warm tier on."""
    params = parse_query_string(request.query_string)
    symbol = params.get("symbol")
    if symbol is None:
        raise ApiError("missing_parameter", "the symbol query parameter is required")
    validate_symbol(symbol)
    principal = principal_of(request)
    if principal is not None:
        request.app.ctx.access.check_symbol(principal, symbol, route)
    if request.app.ctx.warm is None:
        raise ApiError(
            "history_disabled",
            "history needs the warm tier: set [durability] enabled = true and restart",
        )
    return params, symbol


def _add_history_bars_route(
    data_get: Callable[[str], Callable[[Handler], Handler]], store: Store
) -> None:
    """GET /history/bars: OHLC bars over the warm tier, summarized by the store's engine (on
    the GPU when that is the engine in use; appliance.durability.history_bars)."""

    @data_get("/history/bars")
    async def history_bars(request: Request) -> HTTPResponse:
        params, symbol = _history_request(request, "GET /history/bars")
        ctx = request.app.ctx
        from appliance.durability.history import HistoryError
        from appliance.durability.history_bars import run_bars_query

        try:
            # Off the event loop: segments may need decompressing and the bars summing.
            result = await asyncio.to_thread(
                run_bars_query,
                ctx.warm,
                store.engine,
                symbol,
                params.get("interval"),
                params.get("start"),
                params.get("end"),
                ctx.config.history.max_bars,
            )
        except HistoryError as exc:
            raise ApiError(exc.code, exc.message) from None
        return json_response(result.to_dict())


def _add_history_rolling_route(
    data_get: Callable[[str], Callable[[Handler], Handler]], store: Store
) -> None:
    """GET /history/rolling: rolling min/max/avg/var over the warm tier's index space, computed
    by the store's engine in one call (appliance.durability.history_rolling)."""

    @data_get("/history/rolling")
    async def history_rolling(request: Request) -> HTTPResponse:
        params, symbol = _history_request(request, "GET /history/rolling")
        ctx = request.app.ctx
        from appliance.durability.history import HistoryError
        from appliance.durability.history_rolling import run_rolling_query

        history = ctx.config.history

        def answer() -> bytes:
            result = run_rolling_query(
                ctx.warm,
                store.engine,
                symbol,
                params.get("window"),
                params.get("start"),
                params.get("end"),
                params.get("step"),
                max_positions=history.max_rolling_positions,
                max_values=history.max_rolling_values,
            )
            return _ENCODER.encode(result.to_dict())

        try:
            # Off the event loop, the encoding included: segments are decompressed, up to
            # history.max_rolling_values values scanned, and a million positions are ~80 MB
            # of JSON (about 0.6 s to encode on the 2-vCPU build machine, benches/results/
            # history-rolling-rest-2026-12-05.md), during which other requests keep being
            # served (the thread gives the GIL up every few ms).
            body = await asyncio.to_thread(answer)
        except HistoryError as exc:
            raise ApiError(exc.code, exc.message) from None
        return HTTPResponse(body, content_type=JSON)


def _add_live(app: Sanic) -> None:
    """Live statistics (appliance.live): the hub (`app.ctx.live`), GET /stream (a data route,
    `read` role), the live page at GET / and GET /ui (no token: it holds no data)."""
    app.ctx.live = build_hub(app)
    add_live_routes(
        app,
        partial(_route, app, methods=GET_AND_HEAD, waits_for_ready=True, role="read"),
        partial(_route, app, methods=GET_AND_HEAD, waits_for_ready=False, role=None),
    )


def _add_lifecycle(app: Sanic) -> None:
    @app.after_server_start
    async def mark_ready(app: Sanic) -> None:
        if app.ctx.recover_on_start and not await _recover(app):
            return
        if app.ctx.config.cluster.enabled and not await _start_cluster(app):
            return
        # Transports start before `ready`: a client that waits for /ready can publish at once.
        if app.ctx.transports is not None:
            app.ctx.transports.start(resume=app.ctx.publisher_sequences.snapshot())
        if app.ctx.cluster is not None:
            # Ready once the node joined and every partition it should own is restored and
            # replayed (other nodes may first have to release theirs): a background wait.
            app.ctx.cluster_ready_task = asyncio.get_running_loop().create_task(
                _ready_when_joined(app)
            )
            return
        app.ctx.readiness.mark_ready()  # wakes the requests that waited for the replay
        log.info("appliance ready", extra={"symbols": len(app.ctx.store)})

    @app.before_server_stop
    async def mark_draining(app: Sanic) -> None:
        app.ctx.readiness.mark_stopping()
        log.info("appliance stopping: draining in-flight requests")
        if app.ctx.transports is not None:
            # Ingest stops first (bounded wait, off the loop so REST keeps draining meanwhile).
            await asyncio.to_thread(app.ctx.transports.stop, TRANSPORT_STOP_TIMEOUT_S)
        if app.ctx.cluster is not None:
            # After the transports (their in-flight frames still reach the owners), before the
            # store goes: release every partition with a checkpoint, leave, close NATS.
            router, app.ctx.cluster = app.ctx.cluster, None
            ready_task, app.ctx.cluster_ready_task = app.ctx.cluster_ready_task, None
            if ready_task is not None:
                ready_task.cancel()
            await router.node.stop()

    @app.after_server_stop
    async def stopped(app: Sanic) -> None:
        log.info("appliance stopped", extra={"symbols": len(app.ctx.store)})


async def _start_cluster(app: Sanic) -> bool:
    """Join the cluster (connect to NATS, make the buckets and streams, start the ownership
    loop) and route requests through it; the transports then ingest through the owners. A
    cluster that cannot be reached stops the server like a corrupt log: one line, exit 2."""
    from appliance.cluster.node import ClusterNode
    from appliance.cluster.router import ClusterRouter
    from appliance.cluster.sink import ClusterIngest

    ctx = app.ctx
    node = ClusterNode(ctx.config.cluster, ctx.store)
    router = ClusterRouter(node)
    try:
        await node.start()
    except Exception as exc:
        ctx.start_error = (
            f"cannot join the cluster at {list(ctx.config.cluster.nats_urls)}: {exc!r}"
        )
        ctx.readiness.mark_failed()
        log.error("cannot join the cluster", extra={"reason": ctx.start_error})
        with contextlib.suppress(Exception):
            await node.stop()
        ctx.stop_task = asyncio.get_running_loop().create_task(_stop_soon(app))
        return False
    ctx.cluster = router
    if ctx.cluster_ingest is not None:  # the transports' sink target (set by the CLI)
        ctx.cluster_ingest.attach(ClusterIngest(router, asyncio.get_running_loop()))
    return True


async def _ready_when_joined(app: Sanic) -> None:
    router = app.ctx.cluster
    if router is None:
        return
    await router.node.joined.wait()
    if app.ctx.readiness.accepting or app.ctx.readiness.draining:
        return
    app.ctx.readiness.mark_ready()
    log.info("appliance ready (cluster)", extra={"node_id": router.node.node_id,
                                                 "symbols": len(app.ctx.store)})  # fmt: skip


class ClusterIngestSlot:
    """The transports' sink target in cluster mode, bound before the cluster exists (the
    transports bind before the server starts): refuses with partition_unavailable until the
    after_server_start hook attaches the real `ClusterIngest`. `for_transport` gives each
    transport's sink its own view, so its frames' message ids carry the transport's name."""

    def __init__(
        self, store: Store, transport: str = "zmq", shared: dict[str, Any] | None = None
    ) -> None:
        self._store = store
        self._transport = transport
        # The attached ClusterIngest under "", and one per transport name made from it.
        self._shared: dict[str, Any] = shared if shared is not None else {}

    def attach(self, target: Any) -> None:
        self._shared.clear()
        self._shared[""] = target

    def for_transport(self, transport: str) -> ClusterIngestSlot:
        return ClusterIngestSlot(self._store, transport, self._shared)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._store

    def _current(self) -> Any:
        target = self._shared.get(self._transport)
        if target is None:
            base = self._shared.get("")
            if base is None:
                raise ApiError(
                    "partition_unavailable", "the node has not joined the cluster yet; retry"
                )
            target = self._shared[self._transport] = base.for_transport(self._transport)
        return target

    def ingest(self, symbol: str, values: Any, publisher_id: int = 0, sequence: int = 0,
               timestamps: Any = None) -> int:  # fmt: skip
        return self._current().ingest(symbol, values, publisher_id, sequence, timestamps)

    def submit_group(self, items: Any, done: Any) -> None:
        self._current().submit_group(items, done)
