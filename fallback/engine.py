"""The numpy engine: the CPU implementation, and the reference the GPU engine is tested against."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_core.contract import Engine, RetentionPolicy
from engine_core.layout import Geometry
from fallback.series import SegmentTreeSeries


@dataclass(frozen=True, slots=True)
class NumpyEngine(Engine):
    """Creates `SegmentTreeSeries`; `geometry` exists so tests can force tiny pages.

    `stats_many` is the protocol's default, one `stats` per query: on the CPU a batch saves
    nothing per query beyond what the store already shares (one lock per symbol, its cache).
    """

    geometry: Geometry = field(default_factory=Geometry)
    name: str = "numpy"

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> SegmentTreeSeries:
        return SegmentTreeSeries(retention, starting_capacity, self.geometry)
