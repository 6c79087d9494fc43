"""PublisherSequences: the highest logged sequence per publisher, REST batches ignored."""

from __future__ import annotations

import numpy as np

from appliance.durability.records import BatchRecord
from appliance.durability.sequences import PublisherSequences


def rec(lsn: int, publisher_id: int, sequence: int) -> BatchRecord:
    return BatchRecord(lsn, "S", lsn, 0, publisher_id, sequence, np.array([1.0]))


def test_highest_sequence_per_publisher() -> None:
    sequences = PublisherSequences()
    for record in (rec(1, 7, 1), rec(2, 0, 0), rec(3, 7, 2), rec(4, 9, 40), rec(5, 7, 2)):
        sequences.on_record(record)
    snapshot = sequences.snapshot()
    assert snapshot == {7: 2, 9: 40}
    sequences.on_record(rec(6, 9, 41))
    assert snapshot == {7: 2, 9: 40}  # a copy
    assert sequences.highest[9] == 41
