"""The paged pyramid layout every engine shares: its shape (`Geometry`) and its pages.

    level 0   raw values, in pages of `chunk` values
    level 1   one summary row (`engine_core.summary`) per block of `block` values
    level i   one summary row per `fanout` rows of level i-1

Positions are absolute (the i-th value ever appended has index i forever); each level is a
dict of fixed-size pages keyed by page number, so growth allocates a page and never copies,
and retention retires whole pages from the front. Summary pages start as IDENTITY rows, and
every page holds a whole number of sibling groups, so siblings never cross a page. The numpy
engine (`fallback.series`, whose module docstring states the full invariants) keeps its pages
in host memory, the GPU engine (`gpu_kernels.series`) in device memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine_core.summary import IDENTITY_ROW, ROW_WIDTH


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class Geometry:
    """Shape of the pyramid. The defaults are tuned by benches/bench_engine.py.

    All three are powers of two with chunk >= block, so a chunk always lies inside one page of
    every level and every page holds a whole number of sibling groups. `chunk` is the unit of
    growth and of retention. 1 Mi values (8 MiB) keeps the cost of freeing one retired page
    (munmap of resident memory, ~40 us here) well under an append; larger pages cross less often
    but each one costs more to free.
    """

    block: int = 256
    fanout: int = 64
    chunk: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("block", "fanout", "chunk"):
            if not _is_power_of_two(getattr(self, name)):
                raise ValueError(f"{name} must be a power of two")
        if self.block < 2 or self.fanout < 2:
            raise ValueError("block and fanout must be >= 2")
        if self.chunk < self.block:
            raise ValueError("chunk must be >= block")

    def summary_spans(self, max_values: int) -> list[int]:
        """Spans (values per node) of levels 1..L: up to the first level whose fanout**2 nodes
        cover `max_values`. The top level then contributes at most fanout**2 rows to a window
        (one vectorised pass), and an append merges one level fewer than a full pyramid."""
        spans = [self.block]
        while spans[-1] * self.fanout * self.fanout < max_values:
            spans.append(spans[-1] * self.fanout)
        return spans

    def rows_per_page(self, span: int) -> int:
        """Rows per page of the level whose nodes cover `span` values: one chunk's worth, and
        never fewer than one sibling group (so siblings never cross a page)."""
        return max(self.chunk // span, self.fanout)


def identity_rows(rows: int) -> np.ndarray:
    """A fresh summary page: every row the summary of no values (see the module docstring)."""
    page = np.empty((rows, ROW_WIDTH))
    page[:] = IDENTITY_ROW
    return page


class PagedLevel:
    """One level of the pyramid: rows addressed by absolute index, stored in fixed-size pages.

    `allocate(rows_per_page)` makes a page: host arrays in the numpy engine, device arrays in the
    GPU engine, which keeps the same paging so both engines share the layout and its invariants.
    """

    __slots__ = ("allocate", "first_page", "pages", "rows_per_page", "span")

    def __init__(self, span: int, rows_per_page: int, allocate: Callable[[int], Any]) -> None:
        self.span = span
        self.rows_per_page = rows_per_page
        self.allocate = allocate
        self.pages: dict[int, Any] = {}
        self.first_page = 0

    def page(self, number: int) -> Any:
        page = self.pages.get(number)
        if page is None:
            page = self.allocate(self.rows_per_page)
            self.pages[number] = page
        return page

    def run(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi), which the caller guarantees lie in one page."""
        number, offset = divmod(lo, self.rows_per_page)
        return self.pages[number][offset : offset + hi - lo]

    def runs(self, lo: int, hi: int) -> list[np.ndarray]:
        """Rows [lo, hi) as one view per page they touch."""
        out = []
        while lo < hi:
            number, offset = divmod(lo, self.rows_per_page)
            take = min(hi - lo, self.rows_per_page - offset)
            out.append(self.pages[number][offset : offset + take])
            lo += take
        return out

    def drop_pages_before(self, index: int, retired: list[Any]) -> None:
        """Move every page that lies wholly before row `index` to `retired`."""
        keep_from = index // self.rows_per_page
        while self.first_page < keep_from:
            page = self.pages.pop(self.first_page, None)
            if page is not None:
                retired.append(page)
            self.first_page += 1

    @property
    def nbytes(self) -> int:
        return sum(page.nbytes for page in self.pages.values())
