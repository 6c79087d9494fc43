"""A stand-in for the CuPy calls `gpu_kernels.device.CupyDevice` makes, so that its own Python
(staging through pinned buffers in pieces, device offsets, argument conversion, streams) runs
against the CPU build of the kernels on a machine without a GPU.

It checks what CuPy would need and a GPU would not forgive: every allocation, fill and launch
inside `with stream:` (the engine's one-stream rule), kernel arguments as a grid tuple, a block
tuple and an argument tuple of device arrays and np.int64 scalars, memcpyAsync kinds and the
engine's stream handle. It is no evidence about CUDA itself; the `gpu`-marked tests are.
"""

from __future__ import annotations

import ctypes
import types
from typing import Any

import numpy as np

HOST_TO_DEVICE = 1


class FakeCupy:
    """`module` and `cupyx` go into sys.modules as `cupy` and `cupyx`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        self.streams_entered = 0
        self.stream_handle = 0x5EED
        self.copies: list[tuple[int, int, int]] = []  # (device address, bytes, kind)
        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            getDeviceProperties=lambda index: {"name": b"Fake GPU (numpy)"},
            memcpyAsync=self._memcpy_async,
            memcpyHostToDevice=HOST_TO_DEVICE,
        )
        device = types.SimpleNamespace(use=lambda: None)
        self.module = types.SimpleNamespace(
            cuda=types.SimpleNamespace(
                runtime=runtime, Device=lambda index: device, Stream=self._stream
            ),
            RawModule=self._raw_module,
            empty=self._empty,
            asarray=lambda host: self._on_stream(_Array(np.array(host))),
        )
        self.cupyx = types.SimpleNamespace(empty_pinned=lambda n, dtype: np.empty(n, dtype=dtype))

    def _on_stream(self, value: Any) -> Any:
        assert self.streams_entered > 0, "device work outside the engine's stream"
        return value

    def _empty(self, shape: Any, dtype: Any) -> _Array:
        self._on_stream(None)
        return _Array(
            np.full(shape, np.nan) if np.dtype(dtype) == np.float64 else np.zeros(shape, dtype)
        )

    def _stream(self, non_blocking: bool = False) -> _Stream:
        assert non_blocking, "the engine's stream must not wait for the legacy default stream"
        return _Stream(self)

    def _raw_module(self, code: str, options: tuple[str, ...]) -> Any:
        assert isinstance(options, tuple) and "--fmad=false" in options
        return types.SimpleNamespace(get_function=lambda name: _Kernel(self, name))

    def _memcpy_async(self, dst: int, src: int, size: int, kind: int, stream: int) -> None:
        assert kind == HOST_TO_DEVICE and stream == self.stream_handle
        self.copies.append((dst, size, kind))
        ctypes.memmove(dst, src, size)


class _Stream:
    def __init__(self, fake: FakeCupy) -> None:
        self._fake = fake
        self.ptr = fake.stream_handle

    def __enter__(self) -> _Stream:
        self._fake.streams_entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._fake.streams_entered -= 1

    def record(self) -> Any:
        return types.SimpleNamespace(synchronize=lambda: None)

    def synchronize(self) -> None:
        pass


class _Array:
    """A device array: numpy underneath, `data.ptr` its address, `get` the copy back."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host
        self.data = types.SimpleNamespace(ptr=host.ctypes.data)
        self.nbytes = host.nbytes
        self.shape = host.shape

    def __getitem__(self, key: Any) -> _Array:
        return _Array(self.host[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.host[key] = value.host if isinstance(value, _Array) else value

    def get(self, stream: Any = None, out: np.ndarray | None = None) -> np.ndarray:
        assert stream is not None, "copies back must run on the engine's stream"
        if out is None:
            return self.host.copy()
        # CuPy's rule: `out` must match in shape and be contiguous
        assert out.shape == self.host.shape and out.flags.c_contiguous
        out[...] = self.host
        return out


class _Kernel:
    def __init__(self, fake: FakeCupy, name: str) -> None:
        self._fake = fake
        self._name = name

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        self._fake._on_stream(None)
        assert isinstance(grid, tuple) and isinstance(block, tuple) and isinstance(args, tuple)
        converted = []
        for arg in args:
            if isinstance(arg, _Array):
                converted.append(ctypes.c_void_p(arg.data.ptr))
            else:
                assert isinstance(arg, np.int64), f"{self._name}: {type(arg)} is not np.int64"
                converted.append(ctypes.c_longlong(int(arg)))
        launch = getattr(self._fake.library, f"launch_{self._name}")
        launch(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *converted)
