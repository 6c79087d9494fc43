"""Which partition a symbol is in, and which live node should own each partition.

Why rendezvous (highest random weight) hashing: every node computes the same owner from the
same member list with no coordination, and when a member leaves only the partitions it owned
move (each to the member with its next-highest weight); when one joins, only the partitions it
now wins move to it. crc32 is used because it is stable across processes and Python versions
(the built-in `hash` of a str is salted per process).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable


def partition_of(symbol: str, partitions: int) -> int:
    """The partition of `symbol`: crc32 of its UTF-8 bytes modulo the partition count."""
    return zlib.crc32(symbol.encode()) % partitions


def weight(node_id: str, partition: int) -> int:
    """The rendezvous weight of `node_id` for `partition`."""
    return zlib.crc32(f"{node_id}/{partition}".encode())


def desired_owner(partition: int, members: Iterable[str]) -> str | None:
    """The member with the highest weight for `partition` (ties by name); None: no members."""
    best: tuple[int, str] | None = None
    for node in members:
        key = (weight(node, partition), node)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def assignment(partitions: int, members: Iterable[str]) -> dict[int, str | None]:
    """partition -> desired owner for every partition."""
    nodes = sorted(set(members))
    return {p: desired_owner(p, nodes) for p in range(partitions)}


def stream_name(partition: int) -> str:
    return f"HFT_P{partition}"


def stream_subject(partition: int) -> str:
    return f"hft.p.{partition}"


def request_subject(partition: int) -> str:
    return f"hft.req.p.{partition}"


def partition_key(partition: int) -> str:
    """The key of `partition` in the `hft_owners`/`hft_status` buckets and the object store."""
    return f"p{partition}"
