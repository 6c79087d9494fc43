"""glibc heap settings for the server process (`[server] heap_mmap_threshold_bytes`,
`heap_trim_threshold_bytes`), applied once at start, before the engine allocates anything.

Why: a 10k-query POST /stats/batch reads a 330 KB body and writes a 1.25 MB answer. glibc serves
blocks above its mmap threshold with a fresh `mmap`, and returns the freed top of its heap once
that outgrows its trim threshold. Its dynamic thresholds (raised to the largest block freed so
far) do not save such a request: the body, the answer and the server's copy of it are freed
together, the free top outgrows the threshold and is returned, and the next request faults its
~440 pages in again, about 1.2 ms of a 6 ms request on the build machine (benches/RESULTS.md,
issue 13). A 4 MiB mmap threshold keeps request-sized buffers in the heap and a 64 MiB trim
threshold keeps the freed top mapped, so the next request reuses them warm (0 faults). The
engine's 8 MiB pages stay above the threshold: they are still mmapped and returned to the
system whole. The cost is up to `heap_trim_threshold_bytes` of freed heap kept by the process.

Setting either value with `mallopt` turns off glibc's dynamic threshold; 0 leaves a setting
as glibc has it. Not glibc (musl, macOS): nothing is changed and the reason is returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_heap(mmap_threshold_bytes: int, trim_threshold_bytes: int) -> str:
    """Apply the non-zero settings with glibc's `mallopt`; return what was done, for the log."""
    wanted = [
        (name, parameter, value)
        for name, parameter, value in (
            ("mmap_threshold", _M_MMAP_THRESHOLD, mmap_threshold_bytes),
            ("trim_threshold", _M_TRIM_THRESHOLD, trim_threshold_bytes),
        )
        if value
    ]
    if not wanted:
        return "glibc defaults kept (both settings are 0)"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as exc:
        return f"not changed: no glibc mallopt in this process ({exc})"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = []
    for name, parameter, value in wanted:
        ok = mallopt(parameter, value) == 1  # mallopt returns 1 on success
        done.append(f"{name}={value}" if ok else f"{name} refused ({value})")
    return ", ".join(done)
