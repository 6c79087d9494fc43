"""The CuPy engine: GPU series behind the same `Engine` contract as the numpy engine."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine_core.bars import Bars
from engine_core.contract import Engine, RetentionPolicy, Series, WindowStats
from engine_core.layout import Geometry
from gpu_kernels.device import CupyDevice, Device
from gpu_kernels.series import GpuSeries, stats_table, window_stats


@dataclass(frozen=True, slots=True)
class CupyEngine(Engine):
    """Creates `GpuSeries` on one device; answers a `stats_many` batch in one launch.

    `device` defaults to the first CUDA device (raising `GpuUnavailableError` with the reason
    when there is none); tests pass a device that runs the same kernels on the CPU.
    `coalesce_values` is each series' host buffer for small appends (see gpu_kernels.series).
    """

    geometry: Geometry = field(default_factory=Geometry)
    device: Device = field(default_factory=CupyDevice)
    coalesce_values: int = 4096
    name: str = "cupy"
    # One lock for the device: its stream and staging buffers are shared by every series.
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.coalesce_values < 1:
            raise ValueError("coalesce_values must be >= 1")

    @property
    def device_name(self) -> str:
        return self.device.name

    def new_series(self, retention: RetentionPolicy, starting_capacity: int) -> GpuSeries:
        del starting_capacity  # device memory is committed on allocation: grow as values come
        return GpuSeries(retention, self.geometry, self.device, self.lock, self.coalesce_values)

    def stats_many(self, requests: Sequence[tuple[Series, int]]) -> list[WindowStats]:
        with self.lock:
            return window_stats(self.device, requests)  # type: ignore[arg-type]

    def stats_table(
        self, series: Sequence[Series], which: np.ndarray, windows: np.ndarray
    ) -> np.ndarray:
        """The whole batch in one launch (`gpu_kernels.series.stats_table`)."""
        which = np.ascontiguousarray(which, dtype=np.int64)
        windows = np.ascontiguousarray(windows, dtype=np.int64)
        with self.lock:
            return stats_table(self.device, series, which, windows)  # type: ignore[arg-type]

    def bars(self, values: np.ndarray, offsets: np.ndarray) -> Bars:
        """OHLC bars on the device: one upload of the values and offsets, one launch of the
        `bar_summaries` kernel (a thread per bar), one download of a (bars, 6) table.

        The values come from the warm tier (host memory, mostly decompressed segments), so
        they are copied in for each request; count is the offsets' difference, on the host.
        """
        n_bars = int(offsets.shape[0])
        bounds = np.empty(n_bars + 1, dtype=np.int64)
        bounds[:-1] = offsets
        bounds[-1] = values.shape[0]
        with self.lock:
            device = self.device
            on_device = device.new_values(int(values.shape[0]))
            device.upload(on_device, np.ascontiguousarray(values, dtype=np.float64))
            device_bounds = device.new_int64(bounds)
            out = device.new_values(6 * n_bars)
            device.launch("bar_summaries", n_bars, on_device, device_bounds, out, n_bars)
            table = device.download(out).reshape(n_bars, 6)
        return Bars(
            open=table[:, 0],
            high=table[:, 1],
            low=table[:, 2],
            close=table[:, 3],
            count=np.diff(bounds),
            avg=table[:, 4],
            var=table[:, 5],
        )
