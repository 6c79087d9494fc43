"""The appliance's binary ingest transports, built from `[transport.*]` over one store.

Why a class between the CLI and the transports: the CLI needs one `bind()` that either binds
every endpoint or raises one error type naming the endpoint (exit status 2), the app needs
`start()` / `stop()` for its lifecycle hooks and `snapshot()` for GET /ingest, and neither should
know which transports exist. Every transport gets a sink of its own (`appliance.ingest.make_sink`,
named for the audit trail), all with the validation and store call of POST /add_batch/.

Order matters: the shared-memory transport creates rings through control requests, so its ops
are registered on the ZeroMQ control socket before that socket starts answering.

Security (docs/security.md, "Binary transports"): with `[auth] mode = "token"` the control
socket admits only requests carrying a token with the `write` role (`ControlGate`), rings
belong to their opener, and `snapshot(show_ring_ids=False)` hides ring ids from non-admins.
With CURVE configured the ROUTER, PULL and control sockets admit only listed client keys. Key
and token files are read in `bind()`, so an unusable one stops the start with exit status 2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from appliance.audit import Audit, NullAudit
from appliance.auth import Tokens, TokensFileError
from appliance.config import AppConfig, RdmaConfig, ShmConfig
from appliance.ingest import make_sink
from appliance.store import Store
from transport.control import REQUIRED_ROLE, ControlGate, ControlHandler
from transport.curve import CurveConfigError, CurveServer
from transport.errors import TransportStartError
from transport.ingest import Sink
from transport.ownership import symbol_check
from transport.wire import MAX_SYMBOL_BYTES, frame_bytes
from transport.zmq.server import ZmqIngest

log = logging.getLogger(__name__)

RDMA_NO_CONTROL = (
    "RDMA queue pairs are negotiated over the ZeroMQ control socket, and transport.zmq.enabled "
    "is false or control_endpoint is empty"
)
DEFAULT_STOP_TIMEOUT_S = 5.0
COALESCE_ROOM_BYTES = 1 << 20  # beyond one full frame: room for a publisher's coalesced frames


class _Polling(Protocol):
    """What this class needs of a transport that only polls (shared memory)."""

    def control_handlers(self) -> dict[str, ControlHandler]: ...
    def start(self) -> None: ...
    def stop(self, timeout_s: float) -> Any: ...
    def snapshot(self, show_ring_ids: bool = True) -> dict[str, Any]: ...


def max_message_bytes(config: AppConfig) -> int:
    """The largest message part a ZeroMQ data socket accepts: the configured value, or one
    frame of `store.max_batch_size` values with the longest symbol and a timestamp column
    (a version-2 frame, 16 bytes a value), plus room to coalesce."""
    configured = config.transport.zmq.max_message_bytes
    if configured:
        return configured
    full_frame = frame_bytes(MAX_SYMBOL_BYTES, config.store.max_batch_size, timestamps=True)
    return full_frame + COALESCE_ROOM_BYTES


class Transports:
    """Every enabled transport of one appliance; `bind()`, `start()`, `stop()`, `snapshot()`.

    `tokens`: the appliance's tokens when `[auth] mode = "token"` (read from `auth.tokens_file`
    at `bind()` when not given); `audit`: where applied frames (per transport session),
    refused control requests and CURVE handshakes are recorded.
    """

    def __init__(
        self,
        config: AppConfig,
        store: Store,
        *,
        tokens: Tokens | None = None,
        audit: Audit | None = None,
    ) -> None:
        self.auth = config.auth
        self.tokens = tokens
        self.audit: Audit = audit if audit is not None else NullAudit()
        self.config = config.transport
        # One sink per transport: the same store and checks, and the audit trail's name for it.
        max_batch = config.store.max_batch_size
        sink = make_sink(store, max_batch, audit, "zmq")
        zmq_config = self.config.zmq
        self.zmq: ZmqIngest | None = None
        if zmq_config.enabled:
            self.zmq = ZmqIngest(
                sink,
                router_endpoint=zmq_config.router_endpoint,
                pull_endpoint=zmq_config.pull_endpoint,
                control_endpoint=zmq_config.control_endpoint,
                sub_connect=zmq_config.sub_connect,
                rcvhwm=zmq_config.rcvhwm,
                batch_messages=zmq_config.batch_messages,
                max_message_bytes=max_message_bytes(config),
            )
        self.shm: _Polling | None = None
        if self.config.shm_active:
            self.shm = self._make_shm(make_sink(store, max_batch, audit, "shm"))
        self.rdma: _Polling | None = None
        self.rdma_reason = ""  # why RDMA is enabled but not running
        self._sink = make_sink(store, max_batch, audit, "rdma")  # opened in bind()
        self._started = False

    def _make_shm(self, sink: Sink) -> _Polling:
        # Imported here: only an appliance with shared memory enabled needs it.
        from transport.shm.server import ShmIngest

        shm = self.config.shm
        # idle_reclaim_s is the shared-memory transport's own: an RDMA ring's publisher is
        # watched through its queue pair instead.
        return ShmIngest(sink, idle_reclaim_s=shm.idle_reclaim_s, **_ring_options(shm))

    def _open_rdma(self) -> None:
        """Open the RDMA device when enabled; without one, say why once (or refuse to start)."""
        wanted = self.config.rdma.enabled
        if wanted is False:
            return
        # Imported here: pyverbs is loaded only by an appliance that asks for RDMA.
        from transport.rdma.server import RdmaIngest
        from transport.rdma.verbs import RdmaUnavailable

        rdma = self.config.rdma
        try:
            if not self.config.rdma_control:
                raise RdmaUnavailable(RDMA_NO_CONTROL)
            ingest = RdmaIngest(
                self._sink, device=rdma.device, port=rdma.port, gid_index=rdma.gid_index,
                max_total_bytes=rdma.max_total_bytes, **_ring_options(rdma),
            )  # fmt: skip
            ingest.open()
        except RdmaUnavailable as exc:
            self.rdma_reason = str(exc)
            if wanted == "required":
                raise TransportStartError(
                    f'transport.rdma.enabled = "required": {exc} (set it to false, or true to '
                    "start without it)"
                ) from None
            log.warning("RDMA transport off: %s; the other transports keep working", exc)
            return
        self.rdma = ingest

    def bind(self) -> None:
        """Bind every endpoint; raises TransportStartError (one line, naming the endpoint)."""
        self._open_rdma()
        if self.config.shm.enabled and not self.config.shm_active:
            log.warning(
                "shared-memory transport off: rings are created over the ZeroMQ control "
                "socket, and transport.zmq.enabled is false or control_endpoint is empty"
            )
        if self.zmq is not None:
            self._secure_zmq(self.zmq)
            for ringed in (self.shm, self.rdma):
                if ringed is not None:
                    self.zmq.add_control_handlers(ringed.control_handlers())
            self.zmq.bind()

    def _load_tokens(self) -> Tokens | None:
        """The tokens when auth is on (None when off); TransportStartError if unreadable."""
        if self.auth.mode != "token":
            return None
        if self.tokens is None:
            try:
                self.tokens = Tokens.from_file(self.auth.tokens_file)
            except TokensFileError as exc:
                raise TransportStartError(str(exc)) from None
        return self.tokens

    def _secure_zmq(self, zmq_ingest: ZmqIngest) -> None:
        """The control socket's gate and, when configured, CURVE (before `bind()`)."""
        tokens = self._load_tokens()
        authenticate = tokens.authenticate if tokens is not None else None
        zmq_ingest.gate = ControlGate(authenticate, self.audit)
        zmq = self.config.zmq
        if not zmq.curve_secret_key_file:
            if tokens is not None:
                log.warning(
                    "auth.mode is token but ZeroMQ CURVE is off: the ROUTER and PULL sockets "
                    "accept frames from anyone who can connect (set transport.zmq."
                    "curve_secret_key_file and curve_clients_file)"
                )
            return
        try:
            curve = CurveServer.from_files(zmq.curve_secret_key_file, zmq.curve_clients_file)
        except CurveConfigError as exc:
            raise TransportStartError(str(exc)) from None
        if tokens is not None:
            check_client_names(curve, tokens)
            # A client's frames are held to its token's symbol patterns, like a ring's.
            principals = tokens.by_name()
            checks = {
                name: check
                for name in curve.clients.values()
                if (check := symbol_check(principals.get(name))) is not None
            }
            zmq_ingest.symbol_checks = checks or None
        zmq_ingest.curve = curve

    def start(self, resume: Mapping[int, int] | None = None) -> None:
        """Start polling (after `bind()`); ZeroMQ first, then shared memory.

        `resume`: publisher id -> highest sequence already in the log (after a replay), so the
        acknowledged socket treats a resent, already-logged frame as a duplicate.
        """
        if self._started:
            return
        self._started = True
        if self.rdma is not None:  # its poller answers the rdma.* control ops
            self.rdma.start()
        if self.zmq is not None:
            if resume:
                self.zmq.resume_publishers(resume)
            self.zmq.start()
        if self.shm is not None:
            self.shm.start()
        running = [name for name in ("zmq", "shm", "rdma") if getattr(self, name) is not None]
        log.info("ingest transports started", extra={"transports": running})

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Stop every transport, each waiting at most `timeout_s`. Safe before `start()`.

        ZeroMQ stops first: once its control socket is closed no `shm.open` can race the
        shared-memory transport's stop, which then applies what the rings still hold.
        """
        if self.zmq is not None:
            self.zmq.stop(timeout_s)
        for ringed in (self.shm, self.rdma):
            if ringed is not None:
                ringed.stop(timeout_s)
        self._started = False

    def snapshot(self, show_ring_ids: bool = True) -> dict[str, Any]:
        """Counters per enabled transport, for GET /ingest. `show_ring_ids`: only for admins
        (with auth off, everyone): otherwise rings are listed without publisher ids or names."""
        out: dict[str, Any] = {}
        if self.zmq is not None:
            out["zmq"] = self.zmq.snapshot()
        if self.shm is not None:
            out["shm"] = self.shm.snapshot(show_ring_ids)
        if self.rdma is not None:
            out["rdma"] = self.rdma.snapshot(show_ring_ids)
        elif self.config.rdma.enabled is not False:
            out["rdma"] = {"status": "unavailable", "reason": self.rdma_reason}
        return out


_RING_OPTIONS = ("slots", "slot_bytes", "max_slots", "max_slot_bytes", "max_rings", "spin_us",
                 "backoff_max_us", "max_rings_per_token")  # fmt: skip


def check_client_names(curve: CurveServer, tokens: Tokens) -> None:
    """With auth on, a CURVE client stands for a token: each name must be a write token."""
    by_name = tokens.by_name()
    for name in curve.clients.values():
        principal = by_name.get(name)
        if principal is None or not principal.has_role(REQUIRED_ROLE):
            raise TransportStartError(
                f"transport.zmq.curve_clients_file: client {name!r} is not a token with the "
                f"{REQUIRED_ROLE} role in auth.tokens_file"
            )


def _ring_options(section: ShmConfig | RdmaConfig) -> dict[str, int]:
    """The ring sizes and limits and the poller's timing, which both ring transports take."""
    return {name: getattr(section, name) for name in _RING_OPTIONS}
