"""The highest logged sequence of every publisher, so a restart keeps "never applied twice".

Why: a transport with acks remembers, per publisher, how far it has applied (transport.ingest).
That memory dies with the process, but the batches do not: they are in the write-ahead log. A
frame that was logged and applied just before a crash, whose ack never left, is resent by its
publisher after the restart; without this state the restarted appliance would apply it again.
Listening to the log's records (the replay at recovery, then every new one) gives the highest
sequence per publisher id, which seeds the acknowledged transport before it starts.

In strict order the logged sequences of a publisher only grow, and a frame rejected for its
content is never logged, so the seed may be below the publisher's real position; that only
means such a rejected frame, if resent, is judged (and rejected) again: nothing is applied twice.
"""

from __future__ import annotations

from appliance.durability.records import BatchRecord


class PublisherSequences:
    """A log listener: publisher id -> highest sequence of a record in the log."""

    def __init__(self) -> None:
        self.highest: dict[int, int] = {}

    def on_record(self, record: BatchRecord) -> None:
        # Hot path (the log's writer thread): one dict lookup per record.
        publisher_id = record.publisher_id
        if publisher_id and record.sequence > self.highest.get(publisher_id, 0):
            self.highest[publisher_id] = record.sequence

    def snapshot(self) -> dict[int, int]:
        """A copy (the writer thread keeps updating the live dict)."""
        return dict(self.highest)
