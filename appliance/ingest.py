"""The one ingest path behind every transport: validate exactly as REST does, then append.

Why here and not in `transport/`: transports know nothing of the store (data flows
transport -> store -> engine). They are handed the `Sink` built here, which applies the same
`validate_symbol` and `check_values` that POST /add_batch/ uses and the same `Store.ingest`,
and translates the appliance's errors into the wire's nack reasons.

With durability on, the sink is given the log's `DurableWriter` in place of the store: its
`ingest` has the same contract but returns only once the batch is logged (fsynced under
`always`) and applied, so a transport acks only what survives a crash. A full disk becomes the
retryable nack UNAVAILABLE.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from appliance.durability.writer import StorageUnavailableError
from appliance.errors import ApiError
from appliance.store import SymbolLimitError
from appliance.validation import check_values, validate_symbol
from transport.ingest import Rejected, Sink
from transport.wire import Reason

_REASONS = {
    "invalid_symbol": Reason.INVALID_SYMBOL,
    "invalid_value": Reason.INVALID_VALUE,
    "empty_batch": Reason.EMPTY_BATCH,
    "batch_too_large": Reason.BATCH_TOO_LARGE,
}


class Ingestor(Protocol):
    """`Store` or `DurableWriter`: appends a validated batch whole, or raises."""

    def __contains__(self, symbol: object) -> bool: ...

    def ingest(
        self, symbol: str, values: np.ndarray, publisher_id: int = 0, sequence: int = 0
    ) -> int: ...


def make_sink(store: Ingestor, max_batch_size: int) -> Sink:
    """A callable `(symbol, values, publisher_id, sequence)` that appends all of the batch or
    raises `Rejected`; the log (when `store` is the `DurableWriter`) records the identity."""

    def sink(symbol: str, values: np.ndarray, publisher_id: int = 0, sequence: int = 0) -> None:
        # Hot path: two reductions over the values, dict lookups, one locked append.
        try:
            if values.shape[0] > max_batch_size:
                raise ApiError(
                    "batch_too_large",
                    f"frame has {values.shape[0]} values; store.max_batch_size is {max_batch_size}",
                )
            if symbol not in store:
                validate_symbol(symbol)  # every stored symbol was validated when created
            store.ingest(symbol, check_values(values), publisher_id, sequence)
        except ApiError as exc:
            raise Rejected(_REASONS.get(exc.code, Reason.INVALID_VALUE), exc.message) from None
        except SymbolLimitError as exc:
            raise Rejected(Reason.SYMBOL_LIMIT, str(exc)) from None
        except StorageUnavailableError as exc:
            raise Rejected(Reason.UNAVAILABLE, str(exc)) from None

    return sink
