"""Deleted symbols (DELETE /symbols/{symbol}): where in the log each deletion falls.

Why a file beside the log instead of a log record: a deletion must survive a restart (the
replay would otherwise rebuild the symbol from its logged batches) and must not change the log's
record format that fsck, archives and other readers rely on. Each entry says "the symbol's
batches up to lsn L are gone from the hot tier" and keeps the symbol's total at that point, so a
later batch for it continues the history's index numbering (the warm tier keeps the history and
would take a restarted numbering for values it already holds). Entries are never pruned: one
line per deleted symbol.

The file is replaced atomically (`fsutil.replace_private`) before the store
drops the symbol, under the log writer's commit lock: what the file says and what the store
holds never disagree about a committed batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from appliance.durability.fsutil import replace_private

FILE_NAME = "deleted-symbols.json"


@dataclass(frozen=True, slots=True)
class Tombstone:
    lsn: int  # the last lsn logged before the deletion: its batches are gone, later ones count
    total: int  # values the symbol had ever accepted then (the next batch's first index)


class _Entry(msgspec.Struct, frozen=True):
    lsn: int
    total: int


def load(data_dir: str | os.PathLike[str]) -> dict[str, Tombstone]:
    """The deletions recorded under `data_dir` (empty if none was ever made)."""
    path = Path(data_dir) / FILE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    entries = msgspec.json.decode(raw, type=dict[str, _Entry])
    return {symbol: Tombstone(e.lsn, e.total) for symbol, e in entries.items()}


def record(data_dir: str | os.PathLike[str], symbol: str, tombstone: Tombstone) -> None:
    """Add (or move forward) `symbol`'s deletion, durably, before the store drops it."""
    directory = Path(data_dir)
    entries = load(directory)
    entries[symbol] = tombstone
    body = msgspec.json.encode(
        {name: _Entry(t.lsn, t.total) for name, t in sorted(entries.items())}
    )
    replace_private(directory / FILE_NAME, body)
