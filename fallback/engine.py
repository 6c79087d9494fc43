"""The numpy engine: the CPU implementation, and the reference the GPU engine is tested against."""

from __future__ import annotations

from dataclasses import dataclass, field

from fallback.interface import RetentionPolicy
from fallback.series import Geometry, SegmentTreeSeries


@dataclass(frozen=True, slots=True)
class NumpyEngine:
    """Creates `SegmentTreeSeries`; `geometry` exists so tests can force tiny pages."""

    geometry: Geometry = field(default_factory=Geometry)
    name: str = "numpy"

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> SegmentTreeSeries:
        return SegmentTreeSeries(retention, starting_capacity, self.geometry)
