"""The CuPy segment-tree engine (SPEC sections 1 and 7): `CupyEngine` and its `GpuSeries`.

Importing this package never imports CuPy; constructing `CupyEngine()` does, and raises
`GpuUnavailableError` saying what is missing (CuPy, a driver, a device).
"""

from gpu_kernels.device import CupyDevice, Device, GpuUnavailableError
from gpu_kernels.engine import CupyEngine
from gpu_kernels.series import GpuSeries

__all__ = ["CupyDevice", "CupyEngine", "Device", "GpuSeries", "GpuUnavailableError"]
