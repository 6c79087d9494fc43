"""The one ingest path behind every transport: validate exactly as REST does, then append.

Why here and not in `transport/`: transports know nothing of the store (data flows
transport -> store -> engine). They are handed the sink built here, which applies the same
`validate_symbol` and `check_values` that POST /add_batch/ uses and the same `Store.ingest`,
and translates the appliance's errors into the wire's nack reasons.

With durability on, the sink is given the log's `DurableWriter` (or the app's adapter to it) in
place of the store: its `ingest` has the same contract but returns only once the batch is logged
(fsynced under `always`) and applied, so a transport acks only what survives a crash. A full
disk becomes the retryable nack UNAVAILABLE. Under `interval` and `never` that `ingest` (the
shared-memory and RDMA pollers' call, through `__call__`) is an inline commit on the poller's
thread (`DurableWriter.commit`), with no hand-off to the log's writer thread.

Batches (`StoreSink.submit_batch`, used by the ZeroMQ loop): the frames of one poll batch go to
the log's writer as one group (`DurableWriter.submit_group`: one write, one apply per frame)
and the transport is told when that commit completes, without a blocked thread per frame.
Without the log the batch is applied at once, in order. Either way, once a frame of a publisher
fails retryably, its later frames in the batch are not applied (the transport nacks them GAP).

Audit (appliance.audit): each applied frame is reported with `audit.transport_write` (one deque
append; the audit log folds them per session per second), after the store or the log's commit
accepted it, so the trail never lists a frame that was refused. A sink serves one transport,
whose name the records carry; with `NullAudit` the sink skips the calls altogether.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

from appliance.audit import Audit, NullAudit
from appliance.durability.writer import StorageUnavailableError
from appliance.errors import ERROR_CODES, ApiError
from appliance.store import SymbolLimitError
from appliance.timestamps import OutOfOrderError, check_timestamps
from appliance.validation import check_values, validate_symbol
from transport.ingest import Item, Rejected
from transport.wire import RETRYABLE, Reason

log = logging.getLogger(__name__)

# The bit pattern of +inf: a float64 whose unsigned 64-bit view is below it is finite and >= 0
# with its sign bit clear (so not -0.0, which check_values normalizes).
_INF_BITS = np.uint64(0x7FF0000000000000)
_FEW_VALUES = 8
_REFUSALS = (ApiError, SymbolLimitError, StorageUnavailableError, OutOfOrderError)


class Ingestor(Protocol):
    """`Store` or `DurableWriter`: appends a validated batch whole, or raises."""

    def __contains__(self, symbol: object) -> bool: ...

    def ingest(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
    ) -> int: ...


def fast_check(values: np.ndarray) -> np.ndarray:
    """`check_values` with one integer reduction on the common path (every value finite,
    >= 0 and not -0.0): the largest unsigned view of the bits is below +inf's. Anything else
    (and small batches, where Python compares win) takes `check_values` itself, so the
    answers and the error messages are exactly REST's."""
    if (
        values.ndim == 1
        and values.dtype == np.float64
        and values.shape[0] > _FEW_VALUES
        and values.view(np.uint64).max() < _INF_BITS
    ):
        return values
    return check_values(values)


def as_api_error(exc: BaseException) -> ApiError | None:
    """The API's error for a refusal by validation, the store or the log's writer; None for
    anything else (a fault). REST renders it; the transports nack with its table wire reason."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SymbolLimitError):
        return ApiError("symbol_limit", f"{exc}; existing symbols still accept batches")
    if isinstance(exc, StorageUnavailableError):
        return ApiError("storage_unavailable", str(exc))
    if isinstance(exc, OutOfOrderError):
        return ApiError("out_of_order", f"{exc}; nothing of the batch was applied")
    return None


def reason_for(exc: BaseException) -> Reason:
    """The wire's reason for an exception from validation, the store or the log's writer: the
    error table's (appliance.errors), INTERNAL for a fault."""
    if isinstance(exc, Rejected):
        return exc.reason
    error = as_api_error(exc)
    if error is None:
        return Reason.INTERNAL
    return ERROR_CODES[error.code].wire_reason or Reason.INVALID_VALUE


class StoreSink:
    """The transports' sink: `sink(symbol, values, publisher_id, sequence, timestamps)` appends
    all of the batch or raises `Rejected`; `prepare` + `submit_batch` do the same for a poll
    batch."""

    def __init__(
        self, store: Ingestor, max_batch_size: int, audit: Audit | None = None,
        transport: str = "",
    ) -> None:  # fmt: skip
        self.store = store
        self.max_batch_size = max_batch_size
        self.transport = transport
        # None when there is no audit log: the hot path then tests one attribute.
        self.audit = None if audit is None or isinstance(audit, NullAudit) else audit

    def __call__(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
    ) -> None:
        values = self.prepare(symbol, values, timestamps)
        try:
            self.store.ingest(symbol, values, publisher_id, sequence, timestamps)
        except _REFUSALS as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            raise Rejected(reason_for(exc), message) from None
        if self.audit is not None:
            self.audit.transport_write(
                self.transport, publisher_id, None, symbol, values.shape[0], sequence
            )

    def prepare(
        self, symbol: str, values: np.ndarray, timestamps: np.ndarray | None = None
    ) -> np.ndarray:
        """Validate like REST: the values to append, or `Rejected` (nothing applied).
        `timestamps` (a decoded frame's column: int64, one per value) are checked to be
        >= 0; their order is the store's (or the log writer's) to check."""
        # Hot path: one reduction over the values, one dict lookup.
        try:
            if values.shape[0] > self.max_batch_size:
                raise ApiError(
                    "batch_too_large",
                    f"frame has {values.shape[0]} values; store.max_batch_size is "
                    f"{self.max_batch_size}",
                )
            if symbol not in self.store:
                validate_symbol(symbol)  # every stored symbol was validated when created
            checked = fast_check(values)
        except ApiError as exc:
            raise Rejected(reason_for(exc), exc.message) from None
        if timestamps is not None:
            try:
                check_timestamps(timestamps, values.shape[0])
            except ValueError as exc:
                raise Rejected(Reason.INVALID_TIMESTAMP, str(exc)) from None
        return checked

    def submit_batch(self, items: list[Item], done: Callable[[list[Reason]], None]) -> None:
        """Apply prepared items in order; `done` gets one Reason per item (NONE: applied),
        from the log's writer thread once its commit covers them, or before this returns."""
        if self.audit is not None:
            done = self._audited(items, done)
        submit_group = getattr(self.store, "submit_group", None)
        if submit_group is not None:
            submit_group(items, lambda results: done(_reasons(results)))
            return
        done(self._apply_now(items))

    def _audited(
        self, items: list[Item], done: Callable[[list[Reason]], None]
    ) -> Callable[[list[Reason]], None]:
        """`done`, after reporting the applied items to the audit log: folded per (publisher,
        symbol) here, one queue entry per batch, when the log takes that (`AuditLog`)."""
        audit, transport = self.audit, self.transport
        assert audit is not None
        sessions_call = getattr(audit, "transport_sessions", None)

        def report(reasons: list[Reason]) -> None:
            if sessions_call is not None:
                sessions_call(transport, fold_sessions(items, reasons))
            else:
                for (symbol, values, publisher_id, sequence, _), reason in zip(
                    items, reasons, strict=True
                ):
                    if reason is Reason.NONE:
                        audit.transport_write(
                            transport, publisher_id, None, symbol, values.shape[0], sequence
                        )
            done(reasons)

        return report

    def _apply_now(self, items: list[Item]) -> list[Reason]:
        reasons: list[Reason] = []
        broken: set[int] = set()  # publishers with a retryable failure in this batch
        for symbol, values, publisher_id, sequence, timestamps in items:
            if publisher_id in broken:
                reasons.append(Reason.INTERNAL)
                continue
            try:
                self.store.ingest(symbol, values, publisher_id, sequence, timestamps)
            except Exception as exc:
                reason = reason_for(exc)
                if reason is Reason.INTERNAL:
                    log.error("ingest failed; frame not applied", exc_info=True)
                if reason in RETRYABLE:
                    broken.add(publisher_id)
                reasons.append(reason)
                continue
            reasons.append(Reason.NONE)
        return reasons


def fold_sessions(items: list[Item], reasons: list[Reason]) -> dict[tuple[int, str], list[int]]:
    """The applied items per (publisher_id, symbol): [frames, values, first seq, last seq]."""
    sessions: dict[tuple[int, str], list[int]] = {}
    applied = Reason.NONE
    last_id, last_symbol, entry = -1, "", [0, 0, 0, 0]
    for (symbol, values, publisher_id, sequence, _), reason in zip(items, reasons, strict=True):
        if reason is not applied:
            continue
        if publisher_id != last_id or symbol != last_symbol:  # a batch is mostly one session
            last_id, last_symbol = publisher_id, symbol
            entry = sessions.setdefault((publisher_id, symbol), [0, 0, sequence, sequence])
        entry[0] += 1
        entry[1] += len(values)
        entry[3] = sequence
    return sessions


def _reasons(results: list[BaseException | None]) -> list[Reason]:
    out = [Reason.NONE if exc is None else reason_for(exc) for exc in results]
    for exc in results:
        if exc is not None and reason_for(exc) is Reason.INTERNAL:
            log.error("ingest failed; frame not applied", exc_info=exc)
            break  # one line per batch: the processor counts every frame
    return out


def make_sink(
    store: Ingestor, max_batch_size: int, audit: Audit | None = None, transport: str = ""
) -> StoreSink:
    """The sink for one transport (see `StoreSink`); the log (when `store` is the
    `DurableWriter`) records each batch's identity, `audit` each applied frame. A target
    with `for_transport` (cluster mode's ingest) gets the transport's name: its message ids
    are namespaced by it."""
    named = getattr(store, "for_transport", None)
    if transport and named is not None:
        store = named(transport)
    return StoreSink(store, max_batch_size, audit, transport)
