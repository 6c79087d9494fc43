"""The CuPy engine: GPU series behind the same `Engine` contract as the numpy engine."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine_core.bars import Bars
from engine_core.contract import Engine, RetentionPolicy, Series, WindowStats
from engine_core.layout import Geometry
from engine_core.rolling import ROLLING_COLUMNS, Rolling, rolling_count
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

    def rolling(self, values: np.ndarray, window: int, step: int) -> Rolling:
        """Rolling statistics on the device: one upload of the values, three launches
        (`rolling_tiles`, `rolling_carries`, `rolling_outputs` in segment_tree.cu, which says
        how they split the blocked algorithm of engine_core/rolling.py), one download of a
        (4, outputs) table into page-locked host memory.

        Device memory for n values and o outputs: the values (8n bytes), in-tile prefix and
        suffix summaries (64n), the tiles' carries (96 bytes per tile of `rolling_tile(window)`
        values) and the table (32o): about 72n + 32o bytes, 1.0 GB for n = o = 1e7. All of it
        is scratch of this call (nothing else changes, so a failed allocation leaves no state
        behind); the pool reuses it for the next request.
        """
        n = int(values.shape[0])
        outputs = rolling_count(n, window, step)
        if outputs == 0:
            return Rolling(*(np.empty(0) for _ in ROLLING_COLUMNS))
        with self.lock:
            device = self.device
            on_device = device.new_values(n)
            device.upload(on_device, np.ascontiguousarray(values, dtype=np.float64))
            out = launch_rolling(device, on_device, n, window, step)
            # Into page-locked memory (DMA speed: the table is 32 bytes per output, 307 MB
            # for 9.6e6 outputs), column-major so each statistic is a contiguous row that
            # is returned as it is, with no host copy after the transfer.
            table = device.new_pinned_values(4 * outputs)
            device.download_into(out, table)
        return Rolling(*table.reshape(4, outputs))


def launch_rolling(device: Device, on_device: Any, n: int, window: int, step: int) -> Any:
    """Issue the three rolling kernels over the `n` values at `on_device` (at least `window`
    of them); the device array of the (4, outputs) table (the columns min, max, avg, var),
    flat. Separate from `CupyEngine.rolling` so that benches/bench_rolling.py can time the
    kernels without the host transfers. Call with the engine's lock held."""
    outputs = rolling_count(n, window, step)
    tile = rolling_tile(window)
    per_block = -(-window // tile)
    blocks = -(-n // window)
    tiles = blocks * per_block
    pre = device.new_values(4 * n)
    suf = device.new_values(4 * n)
    carries = device.new_values(12 * tiles)
    out = device.new_values(4 * outputs)
    device.launch("rolling_tiles", tiles, on_device, pre, suf, n, window, tile, tiles)
    device.launch("rolling_carries", blocks, on_device, pre, carries, n, window, tile, blocks)
    device.launch(
        "rolling_outputs", outputs, on_device, pre, suf, carries, out, window, tile, step, outputs
    )
    return out


def rolling_tile(window: int) -> int:
    """Values per tile of the rolling kernels: the power of two nearest sqrt(window), within
    [1, 1024], so that `rolling_tiles` (a thread walks its tile twice) and `rolling_carries`
    (a thread walks the window / tile tiles of its block twice) stay short sequential loops
    (window 4e5: tiles of 512, 782 per block)."""
    root = max(1.0, window**0.5)
    return min(1024, 1 << round(np.log2(root)))
