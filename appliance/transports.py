"""The appliance's binary ingest transports, built from `[transport.*]` over one store.

Why a class between the CLI and the transports: the CLI needs one `bind()` that either binds
every endpoint or raises one error type naming the endpoint (exit status 2), the app needs
`start()` / `stop()` for its lifecycle hooks and `snapshot()` for GET /ingest, and neither should
know which transports exist. Every transport gets a sink of its own (`appliance.ingest.make_sink`,
named for the audit trail), all with the validation and store call of POST /add_batch/.

Order matters: the shared-memory transport creates rings through control requests, so its ops
are registered on the ZeroMQ control socket before that socket starts answering.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from appliance.audit import Audit
from appliance.config import AppConfig, RdmaConfig, ShmConfig
from appliance.ingest import make_sink
from appliance.store import Store
from transport.control import ControlHandler
from transport.errors import TransportStartError
from transport.ingest import Sink
from transport.zmq.server import ZmqIngest

log = logging.getLogger(__name__)

RDMA_NO_CONTROL = (
    "RDMA queue pairs are negotiated over the ZeroMQ control socket, and transport.zmq.enabled "
    "is false or control_endpoint is empty"
)
DEFAULT_STOP_TIMEOUT_S = 5.0


class _Polling(Protocol):
    """What this class needs of a transport that only polls (shared memory)."""

    def control_handlers(self) -> dict[str, ControlHandler]: ...
    def start(self) -> None: ...
    def stop(self, timeout_s: float) -> Any: ...
    def snapshot(self) -> dict[str, Any]: ...


class Transports:
    """Every enabled transport of one appliance; `bind()`, `start()`, `stop()`, `snapshot()`."""

    def __init__(self, config: AppConfig, store: Store, audit: Audit | None = None) -> None:
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
            for ringed in (self.shm, self.rdma):
                if ringed is not None:
                    self.zmq.add_control_handlers(ringed.control_handlers())
            self.zmq.bind()

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

    def snapshot(self) -> dict[str, Any]:
        """Counters per enabled transport, for GET /ingest."""
        out: dict[str, Any] = {}
        if self.zmq is not None:
            out["zmq"] = self.zmq.snapshot()
        if self.shm is not None:
            out["shm"] = self.shm.snapshot()
        if self.rdma is not None:
            out["rdma"] = self.rdma.snapshot()
        elif self.config.rdma.enabled is not False:
            out["rdma"] = {"status": "unavailable", "reason": self.rdma_reason}
        return out


_RING_OPTIONS = ("slots", "slot_bytes", "max_slots", "max_slot_bytes", "max_rings", "spin_us",
                 "backoff_max_us")  # fmt: skip


def _ring_options(section: ShmConfig | RdmaConfig) -> dict[str, int]:
    """The ring sizes and limits and the poller's timing, which both ring transports take."""
    return {name: getattr(section, name) for name in _RING_OPTIONS}
