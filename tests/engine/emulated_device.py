"""A `gpu_kernels.Device` that runs the engine's CUDA source on the CPU, for machines without a GPU.

`gpu_kernels/segment_tree.cu` is compiled as C++ by g++ with a small header that supplies what
CUDA would (threadIdx and friends, the one intrinsic it uses) and one generated launcher per
kernel that runs the grid's threads in turn. The kernels are one thread per output with no
shared memory, so running threads one after another gives what the GPU gives (up to FMA
contraction, which the GPU build turns off too). Everything else about the GPU engine (paging,
coalescing, retention, directories, batching) is the production code, unchanged.

Memory is host numpy arrays: a "device address" is the array's address. Fresh value pages are
NaN, not garbage, so a kernel that reads a value nobody wrote fails the comparisons loudly.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from engine_core import identity_rows
from gpu_kernels.device import THREADS_PER_BLOCK, kernel_source

_CUDA_ON_CPU = """
#include <cmath>
#include <cstring>
struct EmulatedDim3 { unsigned x, y, z; };
static EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
static inline double __longlong_as_double(long long bits) {
    double out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}
"""

_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')


def _launcher(name: str, params: str) -> str:
    names = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
    return f"""
extern "C" void launch_{name}(unsigned grid, unsigned block, {params}) {{
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) {{
            blockIdx.x = b;
            threadIdx.x = t;
            {name}({names});
        }}
}}
"""


class CompilerMissing(RuntimeError):
    """No C++ compiler: the emulated GPU engine cannot be built here."""


def build_library(directory: Path) -> ctypes.CDLL:
    """Compile the kernels for the CPU (once per source text and directory)."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise CompilerMissing("g++ not found (apt install g++): it builds the kernels for the CPU")
    source = kernel_source()
    kernels = _KERNEL.findall(source)
    text = _CUDA_ON_CPU + source + "".join(_launcher(n, p) for n, p in kernels)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    library = directory / f"segment_tree-{digest}.so"
    if not library.exists():
        cpp = directory / f"segment_tree-{digest}.cpp"
        cpp.write_text(text)
        flags = ["-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
        built = subprocess.run(
            [compiler, *flags, "-o", str(library), str(cpp)], capture_output=True, text=True
        )
        if built.returncode != 0:
            raise RuntimeError(f"g++ failed on segment_tree.cu:\n{built.stderr}")
    return ctypes.CDLL(str(library))


class EmulatedDevice:
    """The `Device` protocol on host memory; counts uploads and launches for the tests."""

    name = "CPU emulation of segment_tree.cu"

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self.launches: Counter[str] = Counter()
        self.uploads = 0
        self.uploaded_values = 0
        self.direct_uploads = 0
        # Tests set this to make the next device allocations fail as CuPy's pool does.
        self.fail_allocations = False

    @classmethod
    def build(cls) -> EmulatedDevice:
        return cls(build_library(Path(tempfile.gettempdir())))

    def _allocating(self) -> None:
        if self.fail_allocations:
            raise MemoryError("emulated device out of memory")

    def new_values(self, count: int) -> np.ndarray:
        self._allocating()
        return np.full(count, np.nan)

    def new_rows(self, rows: int) -> np.ndarray:
        self._allocating()
        return identity_rows(rows)

    def new_pinned_values(self, count: int) -> np.ndarray:
        """Host memory is all the emulation has: plain numpy (NaN, as fresh device pages)."""
        return np.full(count, np.nan)

    def new_int64(self, host: np.ndarray) -> np.ndarray:
        return np.array(host, dtype=np.int64)

    def new_output(self, rows: int) -> np.ndarray:
        return np.full((rows, 5), np.nan)

    def address(self, array: np.ndarray) -> int:
        return array.ctypes.data

    def upload(self, dst: np.ndarray, values: np.ndarray) -> None:
        dst[:] = values
        self.uploads += 1
        self.uploaded_values += values.shape[0]

    def upload_direct(self, dst: np.ndarray, values: np.ndarray) -> None:
        assert values.dtype == np.float64 and values.flags.c_contiguous
        dst[:] = values
        self.direct_uploads += 1
        self.uploaded_values += values.shape[0]

    def synchronize(self) -> None:
        """Nothing to wait for: every call runs to completion."""

    def download(self, src: np.ndarray) -> np.ndarray:
        return src.copy()

    def download_into(self, src: np.ndarray, out: np.ndarray) -> None:
        assert out.flags.c_contiguous and out.size == src.size
        out[...] = src.reshape(out.shape)

    def launch(self, kernel: str, threads: int, *args: Any) -> None:
        if threads <= 0:
            return
        self.launches[kernel] += 1
        converted = [
            ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else ctypes.c_longlong(a)
            for a in args
        ]
        grid = -(-threads // THREADS_PER_BLOCK)
        getattr(self._library, f"launch_{kernel}")(
            ctypes.c_uint(grid), ctypes.c_uint(THREADS_PER_BLOCK), *converted
        )
