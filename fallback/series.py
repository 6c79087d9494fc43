"""The numpy segment-tree series: a paged, B-ary summary pyramid over raw float64 values.

Layout (all positions are absolute: the i-th value ever appended has index i forever):

    level 0   raw values, in pages of `chunk` values (8 MiB by default)
    level 1   one summary row per block of `block` values
    level i   one summary row per `fanout` rows of level i-1

Each level is a dict of fixed-size pages keyed by page number. Growth allocates a new page and
never copies the series; retention retires whole pages from the front, O(dropped pages), moves
`head` inside the first page, and leaves the freeing of retired pages to the next appends (a
bounded amount each). Summaries exist only from block level up, so memory is 8 bytes per value
plus 48/block bytes (+1/fanout of that per level above): about 8.19 B at the default geometry,
8.24 B measured at 1e8 values with part-filled pages.

An append is all or nothing: every page it needs is allocated first, a failure while writing is
rolled back (`_roll_back`), and retention, which cannot fail, runs last.

Invariants the code relies on:
- Summary pages start as IDENTITY rows, so a group of children may be merged whole even where
  it runs past the newest value.
- Summaries cover whole blocks only. The newest partial block (fewer than `block` values) has
  no summary yet, its row stays IDENTITY, and a window reads those values raw. An append that
  completes no block therefore only copies values (a 1-value tick costs a few microseconds,
  not a summary and a merge per level); an append that completes blocks summarizes exactly
  those and merges their ancestors. Every partial node above level 1 is current for the whole
  blocks under it, so a window is: raw values at its old edge, sibling runs up to the last
  whole block, raw values of the partial block at its new end.
- A node that contains `head` (the oldest retained value) may summarise dropped values. Queries
  never read such a node (they round the window start *up* at every level), and appends only
  rewrite nodes at the tail, whose children all lie in pages that are still allocated.
- Sibling groups never cross a page: every page holds a multiple of `fanout` rows.
"""

from __future__ import annotations

import numpy as np

from engine_core.contract import RetentionPolicy, WindowStats
from engine_core.layout import Geometry, PagedLevel, identity_rows
from engine_core.summary import IDENTITY_ROW, ROW_WIDTH, combine, merge_groups, summarize_blocks

_NO_ROWS = np.empty((0, ROW_WIDTH))
_FREE_BYTES_PER_APPEND = 8 << 20


class SegmentTreeSeries:
    """A bounded series with O(log N) window statistics; see the module docstring for layout."""

    def __init__(
        self,
        retention: RetentionPolicy,
        starting_capacity: int = 0,
        geometry: Geometry | None = None,
    ) -> None:
        self.retention = retention
        self.geometry = geometry or Geometry()
        g = self.geometry
        # Value pages are allocated uninitialised: only written slots are ever read.
        self._values = PagedLevel(1, g.chunk, np.empty)
        self._levels = [self._values]
        for span in g.summary_spans(retention.max_values):
            self._levels.append(PagedLevel(span, g.rows_per_page(span), identity_rows))
        # Pages dropped by retention, freed at most _FREE_BYTES_PER_APPEND per append: freeing
        # tens of 8 MiB pages at once (munmap of resident memory) would make the cleanup append
        # many times slower than the others. Bounded: a cleanup retires at most
        # max_values / chunk value pages and their summaries, all freed within ~50 appends.
        self._retired: list[np.ndarray] = []
        self._head = 0  # absolute index of the oldest retained value
        self._end = 0  # absolute index one past the newest value
        # starting_capacity is a hint: pre-create the value pages it asks for (np.empty maps
        # them lazily, so untouched pages cost address space, not memory).
        hint = min(max(starting_capacity, 0), retention.max_values)
        for number in range(-(-hint // g.chunk)):
            self._values.page(number)

    def __len__(self) -> int:
        return self._end - self._head

    @property
    def nbytes(self) -> int:
        retired = sum(page.nbytes for page in self._retired)
        return retired + sum(level.nbytes for level in self._levels)

    # -- append ---------------------------------------------------------------------------

    def append(self, values: np.ndarray) -> int:
        """All or nothing: pages are allocated before anything changes, and a failure while
        writing (MemoryError in a temporary) restores the summaries before re-raising, so a
        series never holds part of a batch or summaries that disagree with its values."""
        incoming = values.shape[0]
        if incoming == 0:
            return 0
        values, evicted = self.retention.plan_append(len(self), values)
        kept_new = values.shape[0]
        start = self._end
        segments = self._chunk_segments(start, start + kept_new)
        for lo, hi in segments:
            self._reserve_pages(lo, hi)
        try:
            for lo, hi in segments:
                self._write(lo, values[lo - start : hi - start])
        except BaseException:
            self._roll_back(segments)
            raise
        self._end = start + kept_new
        # Retention runs last: it only moves `head` and retires pages, which cannot fail.
        # Pages retired by earlier appends are freed first, before this one retires more: a
        # sliding window (keep close to max) evicts on every append, and its retired pages
        # would otherwise pile up; a cleanup's own pages are freed by the appends after it.
        self._free_some_retired_pages()
        if evicted:
            self._drop_oldest(evicted)
        return evicted

    def _chunk_segments(self, start: int, stop: int) -> list[tuple[int, int]]:
        """[start, stop) split at chunk boundaries: each piece lies in one page of every level."""
        chunk = self.geometry.chunk
        segments = []
        while start < stop:
            end = min(stop, start - start % chunk + chunk)
            segments.append((start, end))
            start = end
        return segments

    def _reserve_pages(self, start: int, stop: int) -> None:
        """Allocate every page that writing [start, stop) will touch (one per level)."""
        for level in self._levels:
            level.page(start // level.span // level.rows_per_page)

    def _free_some_retired_pages(self) -> None:
        freed = 0
        while self._retired and freed < _FREE_BYTES_PER_APPEND:
            freed += self._retired.pop().nbytes

    def _drop_oldest(self, count: int) -> None:
        self._head += count
        for level in self._levels:
            level.drop_pages_before(self._head // level.span, self._retired)

    def _write(self, start: int, segment: np.ndarray) -> None:
        """Write one chunk segment at absolute `start`; summarize the blocks it completes."""
        g = self.geometry
        stop = start + segment.shape[0]
        page = self._values.pages[start // g.chunk]
        page[start % g.chunk : start % g.chunk + segment.shape[0]] = segment
        first, full_end = start // g.block, stop // g.block
        if full_end > first:
            self._summarize(first, full_end)
            self._propagate(first, full_end)

    def _summarize(self, first: int, full_end: int) -> None:
        """Level 1: summarize whole blocks [first, full_end) from the raw values (the first may
        hold values of earlier appends). Blocks never cross a value page (chunk >= block)."""
        g = self.geometry
        page = self._values.pages[first * g.block // g.chunk]
        chunk_base = first * g.block - first * g.block % g.chunk
        blocks = self._levels[1]
        block_page = blocks.pages[first // blocks.rows_per_page]
        page_base = first - first % blocks.rows_per_page
        raw = page[first * g.block - chunk_base : full_end * g.block - chunk_base]
        summarize_blocks(
            raw.reshape(-1, g.block), block_page[first - page_base : full_end - page_base]
        )

    def _propagate(self, lo: int, hi: int) -> None:
        """Levels 2..L: recompute the ancestors of level-1 rows [lo, hi), one vectorised merge
        per level. Children [lo*F, hi*F) lie in one page of the level below (see invariants)."""
        fanout = self.geometry.fanout
        for child, parent in zip(self._levels[1:], self._levels[2:], strict=False):
            lo, hi = lo // fanout, -(-hi // fanout)
            children = child.pages[lo * fanout // child.rows_per_page]
            child_base = (lo * fanout) - (lo * fanout) % child.rows_per_page
            groups = children[lo * fanout - child_base : hi * fanout - child_base]
            parent_page = parent.pages[lo // parent.rows_per_page]
            parent_base = lo - lo % parent.rows_per_page
            merge_groups(
                groups.reshape(hi - lo, fanout, ROW_WIDTH),
                parent_page[lo - parent_base : hi - parent_base],
            )

    def _roll_back(self, segments: list[tuple[int, int]]) -> None:
        """Undo a partly written append: every block it could have completed becomes IDENTITY
        again (before the append, a block at or past the old end was partial, so unsummarized)
        and the touched ancestors are recomputed. Raw values past the old end need no undo:
        nothing reads them."""
        g = self.geometry
        blocks = self._levels[1]
        for start, stop in segments:
            first, full_end = start // g.block, stop // g.block
            if full_end > first:
                number, offset = divmod(first, blocks.rows_per_page)
                blocks.pages[number][offset : offset + full_end - first] = IDENTITY_ROW
                self._propagate(first, full_end)

    # -- query ----------------------------------------------------------------------------

    def stats(self, window: int) -> WindowStats:
        size = len(self)
        if size == 0:
            raise ValueError("series is empty")
        if window < 1:
            raise ValueError("window must be >= 1")
        count = min(window, size)
        raw, rows = self._window_parts(self._end - count)
        n, mean, m2, lo, hi = combine(raw, rows)
        last_index = self._end - 1
        last = float(
            self._values.pages[last_index // self.geometry.chunk][last_index % self.geometry.chunk]
        )
        return WindowStats(count=n, min=lo, max=hi, last=last, avg=mean, var=m2 / n)

    def tail(self, count: int) -> np.ndarray:
        """A copy of the newest min(count, len) values: one slice copy per value page."""
        if count < 0:
            raise ValueError("count must be >= 0")
        runs = self._values.runs(self._end - min(count, len(self)), self._end)
        return np.concatenate(runs) if runs else np.empty(0)

    def tail_views(self, count: int) -> list[np.ndarray]:
        """The newest min(count, len) values as read-only views of the value pages, oldest
        first: a snapshot without a copy (hot-tier checkpoints of 1e8 values, issue 5).

        Stable while the series keeps changing: no position below `_end` is ever written
        again (appends write past it, a roll-back leaves raw values alone, retention drops
        whole pages and never reuses one), so the views keep their values, and their pages
        alive, through later appends and evictions. Not in the `Series` protocol: callers
        fall back to `tail`. tests/engine/test_conformance.py guards the invariant.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        views = self._values.runs(self._end - min(count, len(self)), self._end)
        for view in views:
            view.flags.writeable = False
        return views

    def _window_parts(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Split [start, end) into raw values (its old edge and the newest partial block) and
        the fewest whole nodes between them.

        At each level take the siblings from the window start up to the parent boundary, then
        step up a level, up to the last whole block (partial nodes above it are current).
        """
        g = self.geometry
        end = self._end
        full_end = end - end % g.block  # summaries cover values before this index
        raw_end = min(-(-start // g.block) * g.block, end)
        if raw_end >= full_end:  # no whole block inside the window: all raw
            return self._raw(start, end), _NO_ROWS
        pieces: list[np.ndarray] = []
        index = raw_end // g.block
        top = len(self._levels) - 1
        for depth in range(1, top + 1):
            level = self._levels[depth]
            nodes = -(-full_end // level.span)
            if depth == top:
                pieces.extend(level.runs(index, nodes))
                break
            boundary = min(-(-index // g.fanout) * g.fanout, nodes)
            if boundary > index:
                pieces.append(level.run(index, boundary))
            if boundary == nodes:
                break
            index = boundary // g.fanout
        rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else _NO_ROWS
        if full_end == end:
            return self._raw(start, raw_end), rows
        if raw_end == start:
            return self._raw(full_end, end), rows
        return np.concatenate((self._raw(start, raw_end), self._raw(full_end, end))), rows

    def _raw(self, lo: int, hi: int) -> np.ndarray:
        """Raw values [lo, hi), a view unless they cross a value page (at most two blocks)."""
        chunk = self.geometry.chunk
        pages = self._values.pages
        if lo == hi or (hi - 1) // chunk == lo // chunk:
            offset = lo % chunk
            return pages[lo // chunk][offset : offset + hi - lo]
        split = hi - hi % chunk
        return np.concatenate((self._raw(lo, split), self._raw(split, hi)))
