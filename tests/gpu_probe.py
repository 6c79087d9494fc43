"""Whether this machine can run the GPU engine, asked once per test process."""

from __future__ import annotations

from functools import cache


@cache
def no_gpu_reason() -> str | None:
    """Why `CupyEngine()` cannot start here (its own message), or None where it can."""
    import gpu_kernels

    try:
        gpu_kernels.CupyEngine()
    except Exception as exc:
        return str(exc)
    return None
