"""Engine selection: one place decides which statistics engine backs the store.

Modelled on pyzmq's backend selection: the choice is made once at startup from
`[engine] backend` (overridable like every key, e.g. `APP_ENGINE__BACKEND=numpy` forces the
reference engine), and the rest of the appliance only sees the `engine_core.Engine` protocol.

- `cpu`:   the compiled (numba) segment-tree engine (`fallback.compiled.CompiledEngine`); its
           kernels are compiled, or loaded from numba's cache, here, before the server answers.
- `numpy`: the pure numpy engine (`fallback.NumpyEngine`), the reference implementation.
- `gpu`:   a GPU engine from `gpu_kernels`, placed by `[engine] placement`: `hybrid` (the
           default; `gpu_kernels.hybrid.HybridEngine`, name "hybrid") answers appends and single
           queries on the compiled CPU tree, batches of at least
           `[engine] gpu_batch_min_queries` distinct queries on device mirrors, and bars and
           rolling statistics over at least `gpu_history_min_values` values on the device,
           so it is never slower than `cpu` on a tick or a query; `device` is the
           plain CuPy engine (name "cupy"), everything on the GPU. Hybrid needs the compiled
           engine too: without it (numba missing) the GPU is placed as `device`, logged.
An explicitly named engine that cannot be loaded is a startup error (`EngineUnavailableError`,
exit status 2), never a silent fallback.
- `auto`:  the GPU engine (placed as for `gpu`) when it loads, else the compiled engine, else
           numpy; the choice and the reason are logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine_core.contract import Engine

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "numpy", "gpu")
PLACEMENTS = ("hybrid", "device")


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


@dataclass(frozen=True, slots=True)
class GpuPlacement:
    """`[engine] placement`, `gpu_batch_min_queries` and `gpu_history_min_values`: how a GPU
    engine is put together."""

    placement: str = "hybrid"
    batch_min_queries: int = 512  # config.EngineConfig's default (unmeasured: see there)
    history_min_values: int = 1_000_000  # config.EngineConfig's default (unmeasured)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise EngineUnavailableError(
                f"engine.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}"
            )


def load_gpu_engine(placement: GpuPlacement | None = None, compile_cache_dir: str = "") -> Engine:
    """A GPU engine on the first CUDA device (see `load_placed_gpu_engine`)."""
    return load_placed_gpu_engine(placement or GpuPlacement(), compile_cache_dir)[0]


def load_placed_gpu_engine(
    placement: GpuPlacement, compile_cache_dir: str = ""
) -> tuple[Engine, str]:
    """(a GPU engine on the first CUDA device, how it is placed), or EngineUnavailableError
    saying why there is none: CuPy missing, no usable driver, no device, or the kernels
    failing to compile.

    The hybrid placement also needs the compiled CPU engine; where that cannot load (numba
    missing) the GPU is still used, placed as "device", and the returned text says why (it is
    logged with the choice): a working GPU engine beats falling back to numpy."""
    import gpu_kernels

    try:
        device_engine = gpu_kernels.CupyEngine()
    except Exception as exc:  # GpuUnavailableError, CUDA runtime or NVRTC errors
        raise EngineUnavailableError(f"GPU engine not available: {exc}") from exc
    if placement.placement == "device":
        return device_engine, "engine.placement = 'device'"
    try:
        host = load_cpu_engine(compile_cache_dir)
    except EngineUnavailableError as exc:
        log.warning("hybrid placement unavailable, placing everything on the GPU: %s", exc)
        return device_engine, f"engine.placement = 'hybrid' unavailable, using 'device': {exc}"
    from gpu_kernels.hybrid import HybridEngine

    engine = HybridEngine(
        host,  # type: ignore[arg-type]
        device_engine,
        placement.batch_min_queries,
        history_min_values=placement.history_min_values,
    )
    return engine, "engine.placement = 'hybrid'"


def select_engine(
    backend: str, compile_cache_dir: str = "", placement: GpuPlacement | None = None
) -> EngineChoice:
    """Resolve `[engine] backend` (and, for a GPU, `placement`) to an engine and log it."""
    choice = _select(backend, compile_cache_dir, placement or GpuPlacement())
    extra = {
        "engine": getattr(choice.engine, "name", type(choice.engine).__name__),
        "reason": choice.reason,
    }
    device = getattr(choice.engine, "device_name", None)
    if device is not None:
        extra["device"] = device
    minimum = getattr(choice.engine, "batch_min_queries", None)
    if minimum is not None:
        extra["gpu_batch_min_queries"] = minimum
        extra["gpu_history_min_values"] = choice.engine.history_min_values
    log.info("engine selected", extra=extra)
    return choice


def select_configured_engine(config) -> EngineChoice:  # config: appliance.config.EngineConfig
    """`select_engine` with every key of an `[engine]` section."""
    return select_engine(
        config.backend,
        config.compile_cache_dir,
        GpuPlacement(config.placement, config.gpu_batch_min_queries, config.gpu_history_min_values),
    )


def _select(backend: str, compile_cache_dir: str, placement: GpuPlacement) -> EngineChoice:
    if backend == "cpu":
        return EngineChoice(load_cpu_engine(compile_cache_dir), "engine.backend = 'cpu'")
    if backend == "numpy":
        return EngineChoice(load_numpy_engine(), "engine.backend = 'numpy'")
    if backend == "gpu":
        engine, where = load_placed_gpu_engine(placement, compile_cache_dir)
        return EngineChoice(engine, f"engine.backend = 'gpu', {where}")
    if backend != "auto":
        raise EngineUnavailableError(
            f"engine.backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    try:
        engine, where = load_placed_gpu_engine(placement, compile_cache_dir)
        return EngineChoice(engine, f"engine.backend = 'auto' and a GPU engine loaded, {where}")
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
