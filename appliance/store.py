"""The symbol registry: one engine series per symbol, serialized writers, consistent readers.

Why the locks: transports append from their own threads while REST reads from the event loop.
Each symbol has one `threading.Lock` held for the whole `append` and for every computation of
`stats`, so concurrent writers never interleave inside a batch and a reader never observes half
of one. A registry lock serializes only the creation of new symbols.

Why one lock order: a batch of queries (`stats_many`) holds the locks of every symbol it names
at once, so that it reads one consistent state of all of them and the engine can answer it in
one call. It takes them in creation order; every other caller holds at most one symbol lock at
a time, so no cycle of waiting threads can form.

Why the cache: dashboards poll the same (symbol, exponent) far more often than ticks arrive.
Each symbol keeps a small dict of computed stats that every append replaces with a fresh empty
dict (under the symbol lock), so a repeated poll costs one lock-free dict lookup and a result is
never served after an append that followed it.

The store never knows about HTTP: it raises `UnknownSymbolError` / `SymbolLimitError`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np

from fallback.interface import Engine, RetentionPolicy, Series, WindowStats


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
    """

    __slots__ = ("cache", "lock", "order", "series")

    def __init__(self, series: Series, order: int) -> None:
        self.series = series
        self.order = order
        self.lock = threading.Lock()
        # Replaced (never mutated in place by writers) on every append; see the module docstring.
        self.cache: dict[int, WindowStats] = {}


class Store:
    """Symbols -> series, bounded by `max_symbols`; thread-safe for any mix of callers."""

    def __init__(
        self,
        engine: Engine,
        *,
        retention: RetentionPolicy,
        max_symbols: int,
        starting_capacity: int,
    ) -> None:
        if max_symbols < 1:
            raise ValueError("max_symbols must be >= 1")
        self.engine = engine
        self.retention = retention
        self.max_symbols = max_symbols
        self.starting_capacity = starting_capacity
        self._entries: dict[str, _Entry] = {}
        self._registry_lock = threading.Lock()

    def ingest(
        self, symbol: str, values: np.ndarray, publisher_id: int = 0, sequence: int = 0
    ) -> int:
        """Append a validated batch (1-D float64, finite, >= 0, non-empty); return its length.

        `publisher_id` / `sequence` say where a transport batch came from; the store keeps no
        origin (the write-ahead log records it), they are accepted so that the store and the
        log's writer are interchangeable behind `appliance.ingest.make_sink`.

        A batch for a new symbol is appended before the symbol is published, so a failure
        (the limit, or the engine raising) leaves no trace: no symbol, no partial batch.
        """
        entry = self._entries.get(symbol)
        if entry is None:
            entry = self._create_with(symbol, values)
            if entry is not None:
                return int(values.shape[0])
            entry = self._entries[symbol]
        with entry.lock:
            try:
                entry.series.append(values)
            finally:
                entry.cache = {}  # even if the engine raised: never serve pre-append results
        return int(values.shape[0])

    def _create_with(self, symbol: str, values: np.ndarray) -> _Entry | None:
        """Create `symbol` holding `values`; None if another thread created it first."""
        with self._registry_lock:
            if symbol in self._entries:
                return None
            if len(self._entries) >= self.max_symbols:
                raise SymbolLimitError.at(len(self._entries), self.max_symbols)
            series = self.engine.new_series(self.retention, self.starting_capacity)
            entry = _Entry(series, len(self._entries))  # symbols are never removed
            entry.series.append(values)
            self._entries[symbol] = entry
            return entry

    def stats(self, symbol: str, exponent: int) -> WindowStats:
        """Statistics over the last min(10**exponent, len) values of `symbol`."""
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

    def stats_many(self, queries: Sequence[tuple[str, int]]) -> list[WindowStats | None]:
        """`stats(symbol, exponent)` for every query, in order; None for an unknown symbol.

        Exponents are validated by the caller, as for `stats`.

        The batch is answered from one consistent state: the locks of every symbol it names
        are held together (in creation order, see the module docstring) while the cached
        answers are read and the missing ones computed, so two queries on one symbol never
        straddle an append. Repeated queries are computed once, and every distinct miss goes
        to the engine in one `stats_many` call (one launch for a GPU engine). Writers to these
        symbols wait for that one call, which covers at most 8 windows per symbol.
        """
        wanted: dict[tuple[str, int], _Entry] = {}
        for query in queries:
            if query not in wanted:
                entry = self._entries.get(query[0])
                if entry is not None:
                    wanted[query] = entry
        answers: dict[tuple[str, int], WindowStats] = {}
        locks = sorted(set(wanted.values()), key=lambda entry: entry.order)
        with ExitStack() as held:
            for entry in locks:
                held.enter_context(entry.lock)
            misses = []
            for query, entry in wanted.items():
                cached = entry.cache.get(query[1])  # under the lock: the current cache
                if cached is None:
                    misses.append((query, entry))
                else:
                    answers[query] = cached
            if misses:
                computed = self.engine.stats_many(
                    [(entry.series, 10**exponent) for (_, exponent), entry in misses]
                )
                for (query, entry), result in zip(misses, computed, strict=True):
                    entry.cache[query[1]] = result
                    answers[query] = result
        return [answers.get(query) for query in queries]

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

    def length(self, symbol: str) -> int:
        """Number of retained values of `symbol`."""
        entry = self._entries.get(symbol)
        if entry is None:
            raise UnknownSymbolError(symbol)
        with entry.lock:
            return len(entry.series)
