"""Engine selection: one place decides which statistics engine backs the store.

Modelled on pyzmq's backend selection: the choice is made once at startup from
`[engine] backend` (overridable like every key, e.g. `APP_ENGINE__BACKEND=numpy` forces the
reference engine), and the rest of the appliance only sees the `engine_core.Engine` protocol.

- `cpu`:   the compiled (numba) segment-tree engine (`fallback.compiled.CompiledEngine`); its
           kernels are compiled, or loaded from numba's cache, here, before the server answers.
- `numpy`: the pure numpy engine (`fallback.NumpyEngine`), the reference implementation.
- `gpu`:   the CuPy engine from `gpu_kernels`.
An explicitly named engine that cannot be loaded is a startup error (`EngineUnavailableError`,
exit status 2), never a silent fallback.
- `auto`:  the GPU engine when it loads, else the compiled engine, else numpy; the choice and
           the reason are logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine_core.contract import Engine

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "numpy", "gpu")


class EngineUnavailableError(RuntimeError):
    """The configured engine cannot be used on this machine or in this build (exit status 2)."""


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """The selected engine and why it was chosen (logged at startup)."""

    engine: Engine
    reason: str


def load_numpy_engine() -> Engine:
    from fallback import NumpyEngine

    return NumpyEngine()


def load_cpu_engine(compile_cache_dir: str = "") -> Engine:
    """The compiled engine with its kernels ready, or EngineUnavailableError saying why not.

    Compiling takes seconds the first time; numba's on-disk cache (`compile_cache_dir`, else
    numba's default places) makes later starts take a fraction of a second. Both are logged.
    """
    log.info(
        "preparing the compiled kernels (the first start compiles them, seconds; "
        "later starts load numba's cache)"
    )
    try:
        from fallback.compiled import CompiledEngine, prepare_kernels

        report = prepare_kernels(compile_cache_dir)
    except Exception as exc:  # numba missing or broken, LLVM failing to compile
        raise EngineUnavailableError(f"compiled CPU engine not available: {exc}") from exc
    extra = {
        "seconds": round(report.seconds, 3),
        "from_cache": report.loaded_from_cache,
        "cache_dir": report.cache_dir,
    }
    if report.cache_dir is None:
        log.warning("compiled kernels are not cached: %s", report.cache_note, extra=extra)
    log.info("compiled kernels ready", extra=extra)
    return CompiledEngine()


def load_gpu_engine() -> Engine:
    """The CuPy engine on the first CUDA device, or EngineUnavailableError saying why not:
    CuPy missing, no usable driver, no device, or the kernels failing to compile."""
    import gpu_kernels

    try:
        return gpu_kernels.CupyEngine()
    except Exception as exc:  # GpuUnavailableError, CUDA runtime or NVRTC errors
        raise EngineUnavailableError(f"GPU engine not available: {exc}") from exc


def select_engine(backend: str, compile_cache_dir: str = "") -> EngineChoice:
    """Resolve `[engine] backend` to an engine instance and log the choice."""
    choice = _select(backend, compile_cache_dir)
    extra = {
        "engine": getattr(choice.engine, "name", type(choice.engine).__name__),
        "reason": choice.reason,
    }
    device = getattr(choice.engine, "device_name", None)
    if device is not None:
        extra["device"] = device
    log.info("engine selected", extra=extra)
    return choice


def _select(backend: str, compile_cache_dir: str) -> EngineChoice:
    if backend == "cpu":
        return EngineChoice(load_cpu_engine(compile_cache_dir), "engine.backend = 'cpu'")
    if backend == "numpy":
        return EngineChoice(load_numpy_engine(), "engine.backend = 'numpy'")
    if backend == "gpu":
        return EngineChoice(load_gpu_engine(), "engine.backend = 'gpu'")
    if backend != "auto":
        raise EngineUnavailableError(
            f"engine.backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    try:
        return EngineChoice(load_gpu_engine(), "engine.backend = 'auto' and a GPU engine loaded")
    except EngineUnavailableError as gpu_exc:
        try:
            engine = load_cpu_engine(compile_cache_dir)
        except EngineUnavailableError as cpu_exc:
            return EngineChoice(
                load_numpy_engine(), f"engine.backend = 'auto'; using numpy: {gpu_exc}; {cpu_exc}"
            )
        return EngineChoice(
            engine, f"engine.backend = 'auto'; using the compiled CPU engine: {gpu_exc}"
        )
