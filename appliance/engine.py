"""Engine selection: one place decides which statistics engine backs the store.

Modelled on pyzmq's backend selection: the choice is made once at startup from
`[engine] backend` (overridable like every key, e.g. `APP_ENGINE__BACKEND=cpu` forces the numpy
engine), and the rest of the appliance only sees the `engine_core.Engine` protocol.

- `cpu`:  the numpy segment-tree engine (`fallback.NumpyEngine`).
- `gpu`:  the CuPy engine from `gpu_kernels`; if it cannot be loaded this is a startup error
          (`EngineUnavailableError`, exit status 2), never a silent fallback.
- `auto`: the GPU engine when it loads, else the numpy engine; the choice and the reason are logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine_core.contract import Engine

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "gpu")


class EngineUnavailableError(RuntimeError):
    """The configured engine cannot be used on this machine or in this build (exit status 2)."""


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """The selected engine and why it was chosen (logged at startup)."""

    engine: Engine
    reason: str


def load_cpu_engine() -> Engine:
    from fallback import NumpyEngine

    return NumpyEngine()


def load_gpu_engine() -> Engine:
    """The CuPy engine on the first CUDA device, or EngineUnavailableError saying why not:
    CuPy missing, no usable driver, no device, or the kernels failing to compile."""
    import gpu_kernels

    try:
        return gpu_kernels.CupyEngine()
    except Exception as exc:  # GpuUnavailableError, CUDA runtime or NVRTC errors
        raise EngineUnavailableError(f"GPU engine not available: {exc}") from exc


def select_engine(backend: str) -> EngineChoice:
    """Resolve `[engine] backend` to an engine instance and log the choice."""
    choice = _select(backend)
    extra = {
        "engine": getattr(choice.engine, "name", type(choice.engine).__name__),
        "reason": choice.reason,
    }
    device = getattr(choice.engine, "device_name", None)
    if device is not None:
        extra["device"] = device
    log.info("engine selected", extra=extra)
    return choice


def _select(backend: str) -> EngineChoice:
    if backend == "cpu":
        return EngineChoice(load_cpu_engine(), "engine.backend = 'cpu'")
    if backend == "gpu":
        return EngineChoice(load_gpu_engine(), "engine.backend = 'gpu'")
    if backend != "auto":
        raise EngineUnavailableError(
            f"engine.backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    try:
        return EngineChoice(load_gpu_engine(), "engine.backend = 'auto' and a GPU engine loaded")
    except EngineUnavailableError as exc:
        return EngineChoice(load_cpu_engine(), f"engine.backend = 'auto'; using numpy: {exc}")
