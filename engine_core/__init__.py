"""What every engine and the storage format share: the engine contract, the paged layout, and
the versioned summary row with the reference arithmetic that computes it.

Why a package of its own: `fallback` (numpy) and `gpu_kernels` (CuPy) are implementations of
this contract, and the warm tier stores summary rows on disk; each depends on this package,
none on another engine. Like the engines, it knows nothing about HTTP, sockets or config files.

- `engine_core.contract`: `Engine`, `Series`, `WindowStats`, `RetentionPolicy`.
- `engine_core.layout`: `Geometry`, `PagedLevel`, `identity_rows`.
- `engine_core.summary`: the row (`SUMMARY_ROW_VERSION`, `COUNT` .. `MAX`, `ROW_WIDTH`,
  `IDENTITY_ROW`) and `summarize_blocks`, `merge_groups`, `combine`.
- `engine_core.bars`: OHLC bars (`bar_starts` cuts them on time runs, `bar_summaries` is the
  reference arithmetic behind `Engine.bars`).
"""

from engine_core.contract import Engine, RetentionPolicy, Series, WindowStats
from engine_core.layout import Geometry, PagedLevel, identity_rows
from engine_core.summary import (
    COUNT,
    IDENTITY_ROW,
    M2,
    MAX,
    MEAN,
    MIN,
    REF,
    ROW_WIDTH,
    SUMMARY_ROW_VERSION,
    combine,
    merge_groups,
    summarize_blocks,
)

__all__ = [
    "COUNT",
    "IDENTITY_ROW",
    "M2",
    "MAX",
    "MEAN",
    "MIN",
    "REF",
    "ROW_WIDTH",
    "SUMMARY_ROW_VERSION",
    "Engine",
    "Geometry",
    "PagedLevel",
    "RetentionPolicy",
    "Series",
    "WindowStats",
    "combine",
    "identity_rows",
    "merge_groups",
    "summarize_blocks",
]
