"""The numpy segment-tree engine (SPEC sections 3 and 4).

Public names: `NumpyEngine` (the engine), `SegmentTreeSeries` and `Geometry` (its series and
their shape), and the engine contract re-exported from `fallback.interface`.
"""

from fallback.engine import NumpyEngine
from fallback.interface import Engine, RetentionPolicy, Series, WindowStats
from fallback.series import Geometry, SegmentTreeSeries

__all__ = [
    "Engine",
    "Geometry",
    "NumpyEngine",
    "RetentionPolicy",
    "SegmentTreeSeries",
    "Series",
    "WindowStats",
]
