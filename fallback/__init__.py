"""The numpy segment-tree engine (SPEC sections 3 and 4): `NumpyEngine` and its series,
`SegmentTreeSeries`. The contract, layout and summary row it implements are in `engine_core`.
"""

from fallback.engine import NumpyEngine
from fallback.series import SegmentTreeSeries

__all__ = ["NumpyEngine", "SegmentTreeSeries"]
