"""The only module that touches CuPy: device memory, pinned staging, one stream, the kernels.

Why a seam here: the GPU series (`gpu_kernels.series`) speaks to a `Device`, so the same series
code runs against CUDA here and against the kernels compiled for the CPU in the tests
(`tests/engine/emulated_device.py`), which is how it is tested on machines without a GPU.

Ordering: every copy and launch goes onto one stream per engine, so work is ordered as issued.
CuPy's memory pool is stream-ordered: memory freed while a kernel on that stream may still
read it is reused only by work issued later on the same stream. That is what makes dropping a
page (or replacing a series directory) safe without waiting for the GPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import numpy as np

from engine_core.summary import IDENTITY_ROW, ROW_WIDTH

KERNELS = ("summarize_blocks", "merge_groups", "window_stats", "bar_summaries")
# GET /history/rolling (gpu_kernels/engine.py `CupyEngine.rolling`)
KERNELS += ("rolling_tiles", "rolling_carries", "rolling_outputs")
# --fmad=false: no fused multiply-adds, so products round as they do on the CPU (the engines'
# answers are compared to 1e-12); the kernels are memory-bound, FMA would buy nothing. CuPy
# adds -ftz=true and -arch itself; flush-to-zero affects only float32, and the kernels are
# float64 throughout.
NVRTC_OPTIONS = ("--fmad=false",)
THREADS_PER_BLOCK = 256


def kernel_source() -> str:
    """The CUDA C source shared by the GPU and the CPU-compiled test build."""
    return resources.files("gpu_kernels").joinpath("segment_tree.cu").read_text()


class GpuUnavailableError(RuntimeError):
    """No usable GPU: the message says which part is missing (CuPy, driver, device)."""


class Device(Protocol):
    """What the GPU series needs from a device. Arrays are opaque to callers except for
    `nbytes`; every method is called with the engine's lock held."""

    name: str

    def new_values(self, count: int) -> Any:
        """An uninitialised float64 array of `count` values."""
        ...

    def new_rows(self, rows: int) -> Any:
        """A (rows, 6) float64 array of IDENTITY summary rows."""
        ...

    def new_int64(self, host: np.ndarray) -> Any:
        """A device copy of a 1-D int64 host array (directories, query lists)."""
        ...

    def address(self, array: Any) -> int:
        """The device address of an array's first element."""
        ...

    def upload(self, dst: Any, values: np.ndarray) -> None:
        """Copy host float64 `values` into the device view `dst` (same length); `values` may
        be reused on return."""
        ...

    def new_pinned_values(self, count: int) -> np.ndarray:
        """A host float64 array of `count` values in page-locked memory where the device has
        such memory (plain numpy otherwise): `upload_direct` copies out of it at link speed.
        Raises MemoryError (or the driver's error) when none can be had. The one method
        called without the engine's lock (host appends allocate pages with it): it touches
        no stream, and CuPy's pinned memory pool has its own lock."""
        ...

    def upload_direct(self, dst: Any, values: np.ndarray) -> None:
        """Copy C-contiguous host float64 `values` into `dst` with one asynchronous copy and
        no staging copy. The caller keeps `values` unchanged until its next `synchronize`
        (the copy reads them until it completes). At DMA speed when `values` lie in memory
        from `new_pinned_values`; correct, and no faster than `upload`, from any other."""
        ...

    def download(self, src: Any) -> np.ndarray:
        """A host copy of the device array or view `src` once all work issued before it has
        finished."""
        ...

    def download_into(self, src: Any, out: np.ndarray) -> None:
        """Copy the device array `src` into the C-contiguous host array `out` (same size) once
        all work issued before it has finished: at DMA speed when `out` comes from
        `new_pinned_values`, where `download` lands in fresh pageable memory."""
        ...

    def launch(self, kernel: str, threads: int, *args: Any) -> None:
        """Run `kernel` on `threads` threads; args are device arrays or Python ints (int64)."""
        ...

    def new_output(self, rows: int) -> Any:
        """An uninitialised (rows, 5) float64 array for `window_stats`."""
        ...

    def synchronize(self) -> None:
        """Wait until all work issued so far has finished (benchmarks time with it)."""
        ...


@dataclass
class _StagingBuffer:
    host: np.ndarray  # page-locked
    ready: Any  # cupy.cuda.Event recorded after the copy out of `host` was issued


class CupyDevice:
    """A CUDA device through CuPy, with pinned staging buffers and one dedicated stream.

    Host-to-device copies from pageable memory go through `staging_buffers` page-locked
    buffers of `staging_values` float64 each, used in turn: the host fills one while the
    copies out of the others run, and waits on a buffer's event before refilling it (an async
    copy reads its source until it completes). Why several buffers and several fill threads:
    a single thread copying pageable memory into a pinned buffer moves about 6-8 GB/s, the
    figure the engine reached on the H200 (issue 13); the link moves ~55 GB/s from pinned
    memory. Pieces of at least `parallel_fill_values` values are filled by `fill_threads`
    threads (numpy releases the GIL for a plain copy), so host copies run in parallel with
    each other and with the DMA of the buffers filled before. Whether that reaches the
    25 GB/s goal is unmeasured here (no GPU on the development machine).

    Memory that is already pinned (`new_pinned_values`) needs no staging: `upload_direct`.
    """

    def __init__(
        self,
        *,
        staging_values: int = 1 << 21,
        staging_buffers: int = 4,
        fill_threads: int = 4,
        parallel_fill_values: int = 1 << 18,
    ) -> None:
        if staging_values < 1 or staging_buffers < 1 or fill_threads < 1:
            raise ValueError("staging_values, staging_buffers and fill_threads must be >= 1")
        self._cupy = _import_cupy()
        cupy = self._cupy
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device
            raise GpuUnavailableError(f"CUDA finds no usable driver or device: {exc}") from exc
        if count < 1:
            raise GpuUnavailableError("the CUDA driver reports no GPU")
        # After the driver checks, so that a missing driver or device is what is reported.
        import cupyx  # CuPy's companion package (page-locked host arrays); kept, like cupy

        self._cupyx = cupyx
        self._device = cupy.cuda.Device(0)
        self._device.use()
        props = cupy.cuda.runtime.getDeviceProperties(0)
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        self._stream = cupy.cuda.Stream(non_blocking=True)
        module = cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS)
        self._kernels = {name: module.get_function(name) for name in KERNELS}
        with self._stream:  # everything on the one stream, this copy included
            self._identity = cupy.asarray(IDENTITY_ROW)
        self._staging = [
            _StagingBuffer(_empty_pinned(self._cupyx, staging_values), None)
            for _ in range(staging_buffers)
        ]
        self._next_staging = 0
        self._fill_threads = fill_threads
        self._parallel_fill_values = max(parallel_fill_values, fill_threads)
        # Made on the first large copy (an idle device starts no threads); the device's own.
        self._fill_pool: ThreadPoolExecutor | None = None

    def new_pinned_values(self, count: int) -> np.ndarray:
        return _empty_pinned(self._cupyx, count)

    def upload_direct(self, dst: Any, values: np.ndarray) -> None:
        if values.dtype != np.float64 or not values.flags.c_contiguous:
            raise TypeError("upload_direct takes C-contiguous float64 arrays")
        if values.shape[0] == 0:
            return
        runtime = self._cupy.cuda.runtime
        runtime.memcpyAsync(
            dst.data.ptr,
            values.ctypes.data,
            values.nbytes,
            runtime.memcpyHostToDevice,
            self._stream.ptr,
        )

    def new_values(self, count: int) -> Any:
        with self._stream:
            return self._cupy.empty(count, dtype=np.float64)

    def new_rows(self, rows: int) -> Any:
        with self._stream:
            page = self._cupy.empty((rows, ROW_WIDTH), dtype=np.float64)
            page[...] = self._identity
        return page

    def new_int64(self, host: np.ndarray) -> Any:
        with self._stream:
            out = self._cupy.empty(host.shape[0], dtype=np.int64)
        self._copy_in(out.data.ptr, host)
        return out

    def new_output(self, rows: int) -> Any:
        with self._stream:
            return self._cupy.empty((rows, 5), dtype=np.float64)

    def address(self, array: Any) -> int:
        return int(array.data.ptr)

    def upload(self, dst: Any, values: np.ndarray) -> None:
        self._copy_in(dst.data.ptr, values)  # a view's pointer includes its offset

    def _copy_in(self, address: int, host: np.ndarray) -> None:
        """Stage `host` (float64 values or int64 directories, copied as raw 8-byte words)
        through the pinned buffers, one async copy each."""
        if host.dtype not in (np.float64, np.int64):
            raise TypeError(f"device copies take float64 or int64 arrays, not {host.dtype}")
        runtime = self._cupy.cuda.runtime
        raw = host.view(np.float64)
        done = 0
        while done < raw.shape[0]:
            buffer = self._staging[self._next_staging]
            self._next_staging = (self._next_staging + 1) % len(self._staging)
            if buffer.ready is not None:
                buffer.ready.synchronize()  # the previous copy out of it has finished
            take = min(raw.shape[0] - done, buffer.host.shape[0])
            self._fill(buffer.host[:take], raw[done : done + take])
            runtime.memcpyAsync(
                address + done * 8,
                buffer.host.ctypes.data,
                take * 8,
                runtime.memcpyHostToDevice,
                self._stream.ptr,
            )
            buffer.ready = self._stream.record()
            done += take

    def _fill(self, target: np.ndarray, source: np.ndarray) -> None:
        """`target[:] = source`, split over the fill threads when it is large."""
        count = source.shape[0]
        if count < self._parallel_fill_values or self._fill_threads == 1:
            target[:] = source
            return
        if self._fill_pool is None:
            self._fill_pool = ThreadPoolExecutor(self._fill_threads, "hft-gpu-fill")
        step = -(-count // self._fill_threads)

        def part(lo: int) -> None:
            target[lo : lo + step] = source[lo : lo + step]

        for finished in [self._fill_pool.submit(part, lo) for lo in range(0, count, step)]:
            finished.result()  # every part done (and any error raised) before the copy

    def synchronize(self) -> None:
        self._stream.synchronize()

    def download(self, src: Any) -> np.ndarray:
        return src.get(stream=self._stream)  # copies on the stream, then waits for it

    def download_into(self, src: Any, out: np.ndarray) -> None:
        src.get(stream=self._stream, out=out)  # blocking: waits for the copy

    def launch(self, kernel: str, threads: int, *args: Any) -> None:
        if threads <= 0:
            return
        blocks = -(-threads // THREADS_PER_BLOCK)
        converted = tuple(np.int64(a) if isinstance(a, int) else a for a in args)
        with self._stream:  # a RawKernel launches on the current stream
            self._kernels[kernel]((blocks,), (THREADS_PER_BLOCK,), converted)


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise GpuUnavailableError(
            f"CuPy is not installed ({exc}); install the GPU extra: pip install '.[gpu]'"
        ) from exc
    except OSError as exc:  # CuPy creates its kernel cache directory on import
        raise GpuUnavailableError(
            f"CuPy cannot start ({exc}); set CUPY_CACHE_DIR to a writable directory"
        ) from exc
    return cupy


def _empty_pinned(cupyx: Any, count: int) -> np.ndarray:
    return cupyx.empty_pinned(count, dtype=np.float64)
