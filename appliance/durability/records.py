"""The unit of durability: one accepted batch, as the log stores it and the tiers consume it.

Every accepted batch, from any path (REST, ZeroMQ, shared memory), becomes one `BatchRecord`
with the absolute series index of its first value (`first_index`: how many values the symbol
had received before it, evicted ones included), so a record can be placed in the full history
of its symbol without reading anything before it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class BatchRecord(NamedTuple):
    """One accepted batch. `values` is read-only float64; `lsn` orders records log-wide."""

    lsn: int  # log sequence number: 1, 2, 3, ... across all segments
    symbol: str
    first_index: int  # absolute index of values[0] in the symbol's series
    received_ns: int  # wall-clock receive time (time.time_ns()) of the batch
    publisher_id: int  # 0 for REST
    sequence: int  # the publisher's sequence number; 0 for REST
    values: np.ndarray
    # int64 event times as resolved at commit (non-decreasing, never before the symbol's
    # previous newest; appliance.timestamps), or None: every value has the time
    # max(received_ns, the symbol's previous newest), which a replay recomputes identically
    timestamps: np.ndarray | None = None
