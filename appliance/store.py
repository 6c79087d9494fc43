"""The symbol registry: one engine series per symbol, serialized writers, consistent readers.

Why the locks: transports append from their own threads while REST reads from the event loop.
Each symbol has one `threading.Lock` held for the whole `append` and for every computation of
`stats`, so concurrent writers never interleave inside a batch and a reader never observes half
of one. A registry lock serializes only the creation of new symbols.

Why the cache: dashboards poll the same (symbol, exponent) far more often than ticks arrive.
Each symbol keeps a small dict of computed stats that every append replaces with a fresh empty
dict (under the symbol lock), so a repeated poll costs one lock-free dict lookup and a result is
never served after an append that followed it. Results are only ever added to the dict of the
state they were computed on (under the lock), so one cache dict holds answers about exactly one
state of its series.

Why one lock order: a batch of queries (`stats_many`, or its columnar twin `stats_columns`
that POST /stats/batch uses) answers each symbol from one state. A symbol whose queries are
all in one cache dict is answered from it, without a lock; the symbols with a miss are locked
together, so that the engine answers all their misses in one `Engine.stats_table` call (one
compiled call on the cpu engine, one launch on a GPU). Those locks are taken in creation
order; every other caller holds at most one symbol lock at a time, so no cycle of waiting
threads can form.

Why timestamps live here too: every value has a time (its event timestamp, or its batch's
receive time; `appliance.timestamps`), kept as marks in a `TimeIndex` beside the series and
updated under the same lock, so a time window (`stats_seconds`) maps to a count window in
O(log marks) and is answered by the same engine call as a count window. Count windows are
cached under their exponent (1..8), time windows under minus their length in ns: one dict.

The store never knows about HTTP: it raises `UnknownSymbolError` / `SymbolLimitError` /
`OutOfOrderError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from appliance.timestamps import Resolved, TimeIndex, resolve
from engine_core.contract import STATS_COLUMNS, Engine, RetentionPolicy, Series, WindowStats


class UnknownSymbolError(KeyError):
    """No values were ever accepted for this symbol."""


class SymbolLimitError(Exception):
    """Accepting the batch would create a symbol beyond `max_symbols`."""

    @classmethod
    def at(cls, existing: int, limit: int) -> SymbolLimitError:
        """The one wording, whoever refuses (the store, or the log's writer before logging)."""
        return cls(
            f"symbol limit reached: {existing} symbols exist and store.max_symbols is {limit}"
        )


class _Entry:
    """One symbol: its series, the lock serializing access to it, and its stats cache.

    `order` is the symbol's creation rank, the order in which `stats_many` takes locks.
    `version` counts applied batches (live streams compare it instead of being told of each
    batch, so ingest pays nothing for them); `clamped` counts values whose timestamp was moved
    forward (`store.out_of_order = "clamp"`).
    """

    __slots__ = ("cache", "clamped", "deleted", "lock", "order", "series", "time", "version")

    def __init__(self, series: Series, order: int) -> None:
        self.series = series
        self.order = order
        self.time = TimeIndex()
        self.version = 0
        self.clamped = 0
        self.lock = threading.Lock()
        # Set under `lock` by `Store.delete`: a writer that found this entry before the delete
        # sees it once it holds the lock and starts over, so no batch lands in a dropped series.
        self.deleted = False
        # Replaced (never mutated in place by writers) on every append; see the module docstring.
        self.cache: dict[int, WindowStats] = {}

    def apply(self, values: np.ndarray, resolved: Resolved) -> None:
        """Append a batch and its timestamps (the caller holds `lock`)."""
        try:
            evicted = self.series.append(values)
        finally:
            self.cache = {}  # even if the engine raised: never serve old results
        times = self.time
        times.append(int(values.shape[0]), resolved)
        if evicted:
            times.evict_to(times.end - len(self.series))
        self.clamped += resolved.clamped
        self.version += 1

    def apply_received(self, values: np.ndarray, received_ns: int) -> None:
        """`apply` for a batch without timestamps (the hot path: no `Resolved` built)."""
        try:
            evicted = self.series.append(values)
        finally:
            self.cache = {}
        times = self.time
        times.stamp(int(values.shape[0]), received_ns)
        if evicted:
            times.evict_to(times.end - len(self.series))
        self.version += 1

    def window_of(self, key: int) -> int:
        """The engine window of a cache key: 10**exponent, or the count of a time window."""
        if key > 0:
            return 10**key
        times = self.time
        newest = times.newest
        assert newest is not None  # a symbol exists only with values
        return times.count_since(newest + key, times.end - len(self.series))


class StatsColumns(NamedTuple):
    """`Store.stats_columns`' answer: d distinct queries, and the map from the n queries.

    `names[pair_slots[j]]`, `pair_keys[j]` is distinct query j and `answers[j]` its result
    (None: unknown symbol); query i's answer is `answers[inverse[i]]`. Why not one result
    per query: the REST encoder encodes each distinct answer once and repeats its bytes.
    """

    names: list[str]
    pair_slots: np.ndarray
    pair_keys: np.ndarray
    answers: list[WindowStats | None]
    inverse: np.ndarray

    def table(self) -> np.ndarray:
        """The answers as a (d, STATS_COLUMNS) float64 table (`Engine.stats_table`'s
        columns); NaN rows for unknown symbols."""
        nan = (np.nan,) * STATS_COLUMNS
        return np.array(
            [
                nan if a is None else (a.count, a.min, a.max, a.last, a.avg, a.var)
                for a in self.answers
            ],
            dtype=np.float64,
        ).reshape(len(self.answers), STATS_COLUMNS)


# Exponent keys 1..8 use themselves as key codes (no np.unique over the keys).
_MAX_EXPONENT_KEY = 8
# The dense dedupe (a flag per slot * K + code) is used while it has at most this many
# cells per query, plus a constant: beyond that (many time windows) np.unique sorts instead.
_DENSE_CELLS_PER_QUERY = 4
_DENSE_CELLS_MIN = 4096


def _distinct_pairs(
    slots: np.ndarray, keys: np.ndarray, symbols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slot and key of each distinct (slot, key) pair, sorted; for each query, the index of
    its pair). Vectorized: a pair is the integer slot * K + key code."""
    n = keys.shape[0]
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    if keys.min() >= 1 and keys.max() <= _MAX_EXPONENT_KEY:  # count windows only
        codes, width, key_of = keys, _MAX_EXPONENT_KEY + 1, None
    else:  # time windows: codes of the distinct keys
        key_of, codes = np.unique(keys, return_inverse=True)
        width = key_of.shape[0]
    combined = slots * width + codes
    cells = symbols * width
    if cells <= _DENSE_CELLS_PER_QUERY * n + _DENSE_CELLS_MIN:
        present = np.zeros(cells, dtype=np.bool_)
        present[combined] = True
        distinct = np.flatnonzero(present)
        rank = np.cumsum(present, dtype=np.int64) - 1
        inverse = rank[combined]
    else:
        distinct, inverse = np.unique(combined, return_inverse=True)
    pair_slots, pair_codes = np.divmod(distinct, width)
    pair_keys = pair_codes if key_of is None else key_of[pair_codes]
    return pair_slots, pair_keys.astype(np.int64, copy=False), inverse.reshape(n)


# The window of each exponent key (index 1..8), looked up rather than computed per miss.
_COUNT_WINDOWS = tuple(10**exponent for exponent in range(_MAX_EXPONENT_KEY + 1))

# The "cache" of a symbol the store does not hold: never written, every lookup misses.
_NO_ANSWERS: dict[int, WindowStats] = {}


class Store:
    """Symbols -> series, bounded by `max_symbols`; thread-safe for any mix of callers."""

    def __init__(
        self,
        engine: Engine,
        *,
        retention: RetentionPolicy,
        max_symbols: int,
        starting_capacity: int,
        clamp_out_of_order: bool = False,
    ) -> None:
        if max_symbols < 1:
            raise ValueError("max_symbols must be >= 1")
        self.engine = engine
        self.retention = retention
        self.max_symbols = max_symbols
        self.starting_capacity = starting_capacity
        # store.out_of_order = "clamp": timestamps that go back are moved forward, not refused.
        self.clamp_out_of_order = clamp_out_of_order
        self._entries: dict[str, _Entry] = {}
        self._registry_lock = threading.Lock()
        self._created = 0  # creation ranks stay unique after deletions (the lock order)

    def ingest(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int = 0,
        sequence: int = 0,
        timestamps: np.ndarray | None = None,
        received_ns: int = 0,
        *,
        enforce_limit: bool = True,
    ) -> int:
        """Append a validated batch (1-D float64, finite, >= 0, non-empty); return its length.

        `enforce_limit=False` lets a NEW symbol past `max_symbols`: only for re-building state
        that was already acknowledged (a cluster takeover's restore and replay), where
        refusing would silently drop acknowledged data. New client writes keep the limit.

        `publisher_id` / `sequence` say where a transport batch came from; the store keeps no
        origin (the write-ahead log records it), they are accepted so that the store and the
        log's writer are interchangeable behind `appliance.ingest.make_sink`. `timestamps`
        (int64 ns, checked by `appliance.timestamps.check_timestamps`) are the values' event
        times; without them every value gets `received_ns` (0: now). Timestamps that go back
        raise OutOfOrderError unless `clamp_out_of_order` (see `appliance.timestamps`).

        A batch for a new symbol is appended before the symbol is published, so a failure
        (the limit, the order, or the engine raising) leaves no trace: no symbol, no partial
        batch.
        """
        if not received_ns:
            received_ns = time.time_ns()
        clamp = self.clamp_out_of_order
        while True:
            entry = self._entries.get(symbol)
            if entry is None:
                created = self._create_with(
                    symbol, values, timestamps, received_ns, enforce_limit=enforce_limit
                )
                if created is not None:
                    return int(values.shape[0])
                continue  # another thread created it first (or deleted it again)
            with entry.lock:
                if entry.deleted:
                    continue  # deleted after the lookup: append to the symbol's next series
                if timestamps is None:
                    entry.apply_received(values, received_ns)
                else:
                    entry.apply(values, resolve(timestamps, received_ns, entry.time.newest, clamp))
            return int(values.shape[0])

    def _create_with(
        self,
        symbol: str,
        values: np.ndarray,
        timestamps: np.ndarray | None,
        received_ns: int,
        *,
        enforce_limit: bool = True,
    ) -> _Entry | None:
        """Create `symbol` holding `values`; None if another thread created it first."""
        with self._registry_lock:
            if symbol in self._entries:
                return None
            if enforce_limit and len(self._entries) >= self.max_symbols:
                raise SymbolLimitError.at(len(self._entries), self.max_symbols)
            resolved = resolve(timestamps, received_ns, None, self.clamp_out_of_order)
            series = self.engine.new_series(self.retention, self.starting_capacity)
            entry = _Entry(series, self._created)
            entry.apply(values, resolved)
            self._entries[symbol] = entry
            self._created += 1
            return entry

    def delete(self, symbol: str) -> int:
        """Drop `symbol` and its series, freeing its slot of `max_symbols`; returns the number
        of values dropped. Raises UnknownSymbolError. The engine's memory goes with the last
        reference to the series (a reader in flight keeps it until it is done)."""
        with self._registry_lock:
            entry = self._entries.pop(symbol, None)
            if entry is None:
                raise UnknownSymbolError(symbol)
            with entry.lock:
                entry.deleted = True
                entry.cache = {}
                return len(entry.series)

    def stats(self, symbol: str, exponent: int) -> WindowStats:
        """Statistics over the last min(10**exponent, len) values of `symbol`.

        `stats_seconds` is its twin for time windows; the two are not folded into one helper
        because a cached count window (a dashboard's poll) costs ~0.12 us and a call more
        would add half of that."""
        entry = self._entries.get(symbol)
        if entry is None:
            raise UnknownSymbolError(symbol)
        cached = entry.cache.get(exponent)  # lock-free: a dict lookup is atomic under the GIL
        if cached is not None:
            return cached
        with entry.lock:
            result = entry.series.stats(10**exponent)
            # Stored under the lock, so it cannot land in a cache created by a later append.
            entry.cache[exponent] = result
        return result

    def stats_seconds(self, symbol: str, window_ns: int) -> WindowStats:
        """Statistics over the held values whose timestamp is at or after (newest timestamp
        - `window_ns`): a time window anchored at the symbol's own newest tick, never the wall
        clock. `window_ns` >= 1; the answer's `count` says how many values it covers."""
        key = time_key(window_ns)
        entry = self._entries.get(symbol)
        if entry is None:
            raise UnknownSymbolError(symbol)
        cached = entry.cache.get(key)  # lock-free: a dict lookup is atomic under the GIL
        if cached is not None:
            return cached
        with entry.lock:
            result = entry.series.stats(entry.window_of(key))
            # Stored under the lock, so it cannot land in a cache created by a later append.
            entry.cache[key] = result
        return result

    def stats_many(self, queries: Sequence[tuple[str, int]]) -> list[WindowStats | None]:
        """`stats(symbol, exponent)` for every query, in order; None for an unknown symbol.

        A query's second item is an exponent (1..8) or, for a time window, `time_key(ns)`.
        Exponents are validated by the caller, as for `stats`. Every answer about one symbol
        comes from one state of its series, so two queries on a symbol never straddle an
        append: all are read from the one cache dict of that state (see the module docstring).
        Repeated queries are computed once, and every distinct miss of the batch goes to the
        engine in one `Engine.stats_table` call; writers to the symbols with a miss wait for
        that one call, which covers at most 8 count windows per symbol.

        Hot path: with every answer cached this costs what as many `stats` calls do, two dict
        lookups per query, and takes no lock.
        """
        caches: dict[str, dict[int, WindowStats]] = {}
        answers: list[WindowStats | None] = []
        wanted: dict[str, set[int]] = {}  # the distinct misses, by symbol
        for symbol, exponent in queries:
            cache = caches.get(symbol)
            if cache is None:
                entry = self._entries.get(symbol)
                # Read once per symbol: every answer taken from it is about one state.
                cache = caches[symbol] = _NO_ANSWERS if entry is None else entry.cache
            answer = cache.get(exponent)
            if answer is None and cache is not _NO_ANSWERS:
                exponents = wanted.get(symbol)
                if exponents is None:
                    wanted[symbol] = {exponent}
                else:
                    exponents.add(exponent)
            answers.append(answer)
        if not wanted:
            return answers
        self._compute_locked(queries, wanted, caches)
        # Every symbol's cache dict in `caches` now holds all its answers, from one state.
        return [caches[symbol].get(exponent) for symbol, exponent in queries]

    def stats_columns(self, symbols: Sequence[str], keys: np.ndarray) -> StatsColumns:
        """`stats_many` for a batch given as columns: `symbols[i]` and `keys[i]` (int64: an
        exponent 1..8 or `time_key(ns)`) are query i. The answer is per DISTINCT query
        (`StatsColumns`), with `inverse` mapping each query to its distinct one.

        Same guarantees as `stats_many` (it shares the locked part): every answer about one
        symbol comes from one state, repeats are computed once, the cache dicts are read and
        filled, locks are taken in creation order, an unknown (or deleted) symbol answers
        None. What differs is the cost: per query only `symbols`' slot lookup, done in C
        (`map` over a dict's `__getitem__`); the dedupe is numpy (slot * K + key code, then a
        dense table or `np.unique`), and Python runs per distinct query only.
        """
        n = len(symbols)
        slot_of = dict.fromkeys(symbols)  # distinct symbols, in first-seen order (C)
        names = list(slot_of)
        for slot, name in enumerate(names):
            slot_of[name] = slot
        slots = np.fromiter(map(slot_of.__getitem__, symbols), dtype=np.int64, count=n)
        keys = np.asarray(keys, dtype=np.int64)
        pair_slots, pair_keys, inverse = _distinct_pairs(slots, keys, len(names))
        pairs = list(
            zip(map(names.__getitem__, pair_slots.tolist()), pair_keys.tolist(), strict=True)
        )
        caches: dict[str, dict[int, WindowStats]] = {}
        for name in names:
            entry = self._entries.get(name)
            # Read once per symbol: every answer taken from it is about one state.
            caches[name] = _NO_ANSWERS if entry is None else entry.cache
        wanted: dict[str, set[int]] = {}
        for name, key in pairs:
            cache = caches[name]
            if cache is not _NO_ANSWERS and key not in cache:
                misses = wanted.get(name)
                if misses is None:
                    wanted[name] = {key}
                else:
                    misses.add(key)
        if wanted:
            self._compute_locked(pairs, wanted, caches)
        answers = [caches[name].get(key) for name, key in pairs]
        return StatsColumns(names, pair_slots, pair_keys, answers, inverse)

    def _compute_locked(
        self,
        queries: Sequence[tuple[str, int]],
        wanted: dict[str, set[int]],
        caches: dict[str, dict[int, WindowStats]],
    ) -> None:
        """Compute the `wanted` answers into their cache dicts, holding all their locks.

        Locks are taken in creation order. Under them each symbol's cache dict is read again:
        if it is still the one in `caches` (the lock-free pass's), its hits stand and only its
        misses are computed into it; if an append replaced it meanwhile, `caches` gets the new
        dict and every query on that symbol is answered again, from the new state. All misses
        go to the engine in one call.
        """
        entries = self._held_entries(wanted, caches)
        moved: set[str] = set()
        held: list[threading.Lock] = []
        try:
            for entry, _ in entries:
                entry.lock.acquire()
                held.append(entry.lock)
            if any(entry.deleted for entry, _ in entries):
                for entry, symbol in entries:
                    if entry.deleted:
                        caches[symbol] = _NO_ANSWERS
                entries = [(entry, symbol) for entry, symbol in entries if not entry.deleted]
            for entry, symbol in entries:
                if entry.cache is not caches[symbol]:  # appended since the lock-free read
                    caches[symbol] = entry.cache
                    moved.add(symbol)
            for symbol, exponent in queries if moved else ():
                if symbol in moved:
                    wanted[symbol].add(exponent)
            todo = [
                (entry, exponent)
                for entry, symbol in entries
                for exponent in wanted[symbol]
                if exponent not in entry.cache
            ]
            if todo:
                self._compute_misses(todo)
        finally:
            for lock in reversed(held):
                lock.release()

    def _compute_misses(self, todo: list[tuple[_Entry, int]]) -> None:
        """One `Engine.stats_table` call for every (entry, key) of `todo` (distinct, locked by
        the caller), each answer stored in its entry's cache dict. Python work here is per
        distinct miss (at most 8 count windows per symbol), never per query."""
        slot_of: dict[int, int] = {}
        series: list[Series] = []
        which: list[int] = []
        windows: list[int] = []
        for entry, key in todo:
            slot = slot_of.get(id(entry))
            if slot is None:
                slot = slot_of[id(entry)] = len(series)
                series.append(entry.series)
            which.append(slot)
            if 0 < key <= _MAX_EXPONENT_KEY:
                windows.append(_COUNT_WINDOWS[key])
            else:  # int64 in every engine; no series holds 2**62 values (the clamp is exact)
                windows.append(min(entry.window_of(key), 1 << 62))
        table = self.engine.stats_table(
            series, np.array(which, dtype=np.int64), np.array(windows, dtype=np.int64)
        )
        for (entry, key), (count, low, high, last, avg, var) in zip(
            todo, table.tolist(), strict=True
        ):
            entry.cache[key] = WindowStats(
                count=int(count), min=low, max=high, last=last, avg=avg, var=var
            )

    def _held_entries(
        self, wanted: dict[str, set[int]], caches: dict[str, dict[int, WindowStats]]
    ) -> list[tuple[_Entry, str]]:
        """The entries of the `wanted` symbols in lock order; a symbol deleted (DELETE
        /symbols) since the lock-free read answers as unknown (its cache: `_NO_ANSWERS`)."""
        entries = []
        for symbol in wanted:
            entry = self._entries.get(symbol)
            if entry is None:
                caches[symbol] = _NO_ANSWERS
            else:
                entries.append((entry, symbol))
        entries.sort(key=lambda e: e[0].order)
        return entries

    def symbols(self) -> list[str]:
        """Known symbols, in creation order."""
        return list(self._entries)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot_values(self, symbol: str) -> np.ndarray:
        """A copy of every retained value of `symbol`, oldest first, taken under its lock so it
        never holds part of a batch (hot-tier checkpoints, issue 5)."""
        entry = self._entries.get(symbol)
        if entry is None:
            raise UnknownSymbolError(symbol)
        with entry.lock:
            return entry.series.tail(len(entry.series))

    def snapshot_parts(self, symbol: str) -> list[np.ndarray]:
        """Like `snapshot_values`, as read-only pieces in order, without a copy where the
        engine can (`tail_views`): holding the lock only for a list of page views."""
        entry = self._entries.get(symbol)
        if entry is None:
            raise UnknownSymbolError(symbol)
        with entry.lock:
            views = getattr(entry.series, "tail_views", None)
            if views is not None:
                return views(len(entry.series))
            return [entry.series.tail(len(entry.series))]

    def newest_timestamp(self, symbol: str) -> int:
        """The newest timestamp of `symbol` (ns since the epoch)."""
        entry = self._entry(symbol)
        newest = entry.time.newest
        assert newest is not None
        return newest

    def version(self, symbol: str) -> int:
        """How many batches `symbol` has taken: changes after every applied batch, without
        locking (a live stream polls it instead of being called on the ingest path)."""
        return self._entry(symbol).version

    def state_key(self, symbol: str) -> tuple[int, int]:
        """(creation rank, batches taken): different for every state a symbol's series has
        been in, across DELETE and re-creation (where `version` starts again at 0)."""
        entry = self._entry(symbol)
        return entry.order, entry.version

    def clamped(self, symbol: str) -> int:
        """Values of `symbol` whose timestamp `store.out_of_order = "clamp"` moved forward."""
        return self._entry(symbol).clamped

    def count_clamped(self, symbol: str, values: int) -> None:
        """Count values the log's writer clamped before logging (it resolves timestamps ahead
        of the store, so the store's own resolution finds nothing to clamp)."""
        self._entry(symbol).clamped += values

    def time_marks(self, symbol: str) -> tuple[np.ndarray, np.ndarray]:
        """(first value of each run relative to the oldest held value, its timestamp): the
        marks a checkpoint saves beside `snapshot_values`; the caller keeps appends out
        between the two calls (the log's commit lock)."""
        entry = self._entry(symbol)
        with entry.lock:
            times = entry.time
            return times.marks(times.end - len(entry.series))

    def restore_time_marks(self, symbol: str, index: np.ndarray, ns: np.ndarray) -> None:
        """Put back a checkpoint's marks after its values were appended (replacing the
        receive-time marks those appends made)."""
        entry = self._entry(symbol)
        with entry.lock:
            entry.time.restore(index, ns, len(entry.series))
            entry.cache = {}

    def _entry(self, symbol: str) -> _Entry:
        entry = self._entries.get(symbol)
        if entry is None:
            raise UnknownSymbolError(symbol)
        return entry

    def length(self, symbol: str) -> int:
        """Number of retained values of `symbol`."""
        entry = self._entries.get(symbol)
        if entry is None:
            raise UnknownSymbolError(symbol)
        with entry.lock:
            return len(entry.series)


def time_key(window_ns: int) -> int:
    """The `stats_many` query key (and cache key) of a time window of `window_ns` ns."""
    if window_ns < 1:
        raise ValueError("a time window is at least 1 ns")
    return -window_ns
