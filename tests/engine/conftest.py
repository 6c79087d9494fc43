"""Engine parametrization for the conformance suite.

Every test here takes `make_series` and runs once per engine: the numpy engine at its default
geometry, the numpy engine at tiny geometries, the compiled (numba) engine at the same
geometries (so a few hundred values cross blocks, pages and
several pyramid levels), the CuPy engine's code on the CPU build of its kernels (the
"gpu-emulated" parameters: every line of gpu_kernels except the CuPy calls, see
emulated_device.py), the same with the real `CupyDevice` over a numpy stand-in for CuPy
("gpu-fakecupy", fake_cupy.py), the hybrid engine (compiled host series with a mirror on the
emulated device, "hybrid-*": one routes every batch to the device), and the CuPy engine on a
real GPU, which is skipped with the reason when there is none. A new engine joins by adding a
parameter here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from engine_core import Geometry, RetentionPolicy, Series
from fallback import NumpyEngine
from tests.gpu_probe import no_gpu_reason

SeriesFactory = Callable[..., Series]

TINY = Geometry(block=4, fanout=4, chunk=64)
# (geometry, coalesce_values): the small buffers make appends take both the coalescing and
# the direct-upload paths; 5 is not a multiple of the block.
_EMULATED = {
    "gpu-emulated-default": (Geometry(), 4096),
    "gpu-emulated-b4f4c64": (TINY, 5),
    "gpu-emulated-b8f2c64": (Geometry(block=8, fanout=2, chunk=64), 100),  # buffer > chunk
    "gpu-emulated-b4f8c32": (Geometry(block=4, fanout=8, chunk=32), 1),  # every append syncs
}

# The same engine on a real GPU: default and tiny geometry (many pages, levels, directories).
_REAL_GPU = {"cupy-default": (Geometry(), 4096), "cupy-b4f4c64": (TINY, 5)}
# The hybrid engine over the real GPU (every batch to the device: the mirrors are what it adds).
_REAL_GPU_HYBRID = {"hybrid-cupy-b4f4c64": (TINY, 5, 1)}

_NUMPY_GEOMETRIES = {
    "numpy-default": Geometry(),
    "numpy-b4f4c64": TINY,
    "numpy-b8f2c64": Geometry(block=8, fanout=2, chunk=64),
    "numpy-b4f8c32": Geometry(block=4, fanout=8, chunk=32),  # chunk is not block * fanout**j
}


# (geometry, coalesce_values, batch_min_queries): the default routes the suite's small batches
# to the host; the tiny one sends every batch (even of one query) to the device mirrors.
_HYBRID = {
    "hybrid-default": (Geometry(), 4096, None),
    "hybrid-b4f4c64": (TINY, 5, 1),
}

_COMPILED_GEOMETRIES = {
    name.replace("numpy", "cpu"): geometry for name, geometry in _NUMPY_GEOMETRIES.items()
}


def real_gpu_engine(geometry: Geometry, coalesce_values: int):
    """The CuPy engine on this machine's GPU, or pytest.skip with the reason it cannot start."""
    reason = no_gpu_reason()
    if reason is not None:
        pytest.skip(f"gpu: {reason}")
    from gpu_kernels import CupyEngine

    return CupyEngine(geometry, coalesce_values=coalesce_values)


@pytest.fixture(scope="session")
def emulated_device_library(tmp_path_factory):
    """The CPU build of the GPU kernels, compiled once per test session (and xdist worker)."""
    from tests.engine.emulated_device import CompilerMissing, build_library

    try:
        return build_library(tmp_path_factory.mktemp("kernels"))
    except CompilerMissing as exc:
        if os.environ.get("HFT_REQUIRE_GPU_EMULATION") == "1":  # CI: never skip into green
            pytest.fail(f"gpu-emulated: {exc}")
        pytest.skip(f"gpu-emulated: {exc}")


def emulated_engine(library, geometry: Geometry, coalesce_values: int):
    from gpu_kernels import CupyEngine
    from tests.engine.emulated_device import EmulatedDevice

    return CupyEngine(geometry, EmulatedDevice(library), coalesce_values)


def hybrid_engine(
    library,
    geometry: Geometry,
    coalesce_values: int,
    batch_min_queries=None,
    history_min_values=None,
):
    """The hybrid engine over the compiled engine and the emulated device. The history
    threshold defaults to the batch one given (1: every bars/rolling call on the device too),
    else to the engine's default."""
    from fallback.compiled import CompiledEngine
    from gpu_kernels.hybrid import (
        DEFAULT_BATCH_MIN_QUERIES,
        DEFAULT_HISTORY_MIN_VALUES,
        HybridEngine,
    )

    device = emulated_engine(library, geometry, coalesce_values)
    minimum = DEFAULT_BATCH_MIN_QUERIES if batch_min_queries is None else batch_min_queries
    if history_min_values is None:
        history_min_values = (
            DEFAULT_HISTORY_MIN_VALUES if batch_min_queries is None else batch_min_queries
        )
    return HybridEngine(
        CompiledEngine(geometry=geometry),
        device,
        minimum,
        history_min_values=history_min_values,
    )


def fake_cupy_engine(library, geometry: Geometry, staging_values: int, **device_options):
    """(CupyEngine on a real CupyDevice whose CuPy is tests/engine/fake_cupy.py, the fake).
    CuPy is only imported while the device is built (it keeps the module it got)."""
    import sys

    from gpu_kernels import CupyDevice, CupyEngine
    from tests.engine.fake_cupy import FakeCupy

    fake = FakeCupy(library)
    saved = {name: sys.modules.get(name) for name in ("cupy", "cupyx")}
    sys.modules.update(cupy=fake.module, cupyx=fake.cupyx)
    try:
        device_options.setdefault("staging_buffers", 2)
        device = CupyDevice(staging_values=staging_values, **device_options)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return CupyEngine(geometry, device, 5), fake


@pytest.fixture(
    params=[
        *_NUMPY_GEOMETRIES,
        *_COMPILED_GEOMETRIES,
        *_EMULATED,
        "gpu-fakecupy-b4f4c64",  # CupyDevice's own code too, with 7-value staging buffers
        *_HYBRID,
        *(pytest.param(name, marks=pytest.mark.gpu) for name in _REAL_GPU),
        *(pytest.param(name, marks=pytest.mark.gpu) for name in _REAL_GPU_HYBRID),
    ]
)
def engine(request):
    if request.param in _REAL_GPU:
        return real_gpu_engine(*_REAL_GPU[request.param])
    if request.param in _REAL_GPU_HYBRID:
        from fallback.compiled import CompiledEngine
        from gpu_kernels.hybrid import HybridEngine

        geometry, coalesce_values, batch_min_queries = _REAL_GPU_HYBRID[request.param]
        device = real_gpu_engine(geometry, coalesce_values)
        return HybridEngine(
            CompiledEngine(geometry=geometry),
            device,
            batch_min_queries,
            history_min_values=batch_min_queries,
        )
    if request.param in _EMULATED:
        library = request.getfixturevalue("emulated_device_library")
        return emulated_engine(library, *_EMULATED[request.param])
    if request.param in _HYBRID:
        library = request.getfixturevalue("emulated_device_library")
        return hybrid_engine(library, *_HYBRID[request.param])
    if request.param == "gpu-fakecupy-b4f4c64":
        library = request.getfixturevalue("emulated_device_library")
        return fake_cupy_engine(library, TINY, staging_values=7)[0]
    if request.param in _COMPILED_GEOMETRIES:
        from fallback.compiled import CompiledEngine

        return CompiledEngine(geometry=_COMPILED_GEOMETRIES[request.param])
    return NumpyEngine(geometry=_NUMPY_GEOMETRIES[request.param])


@pytest.fixture
def make_series(engine) -> SeriesFactory:
    def make(max_values: int = 150_000_000, keep: int = 100_000_000, capacity: int = 0):
        return engine.new_series(RetentionPolicy(max_values, keep), capacity)

    # A batch this long spans several of the engine's storage pages (the unit its appends are
    # split at); tiny test geometries get a small one so the suite stays fast.
    geometry = getattr(engine, "geometry", None)
    make.multi_page_batch = int(2.5 * geometry.chunk) if geometry else 2_500_000
    return make


@pytest.fixture(
    params=[
        "numpy",
        "cpu",
        "gpu-emulated",
        "gpu-fakecupy",
        pytest.param("cupy", marks=pytest.mark.gpu),
    ]
)
def history_engine(request):
    """An engine of each kind for history analytics (`Engine.bars`, `Engine.rolling`), which
    take plain arrays rather than series: the numpy reference, the compiled engine, the GPU
    engine on the CPU build of its kernels, on the fake CuPy, and on a real GPU."""
    if request.param == "numpy":
        return NumpyEngine()
    if request.param == "cpu":
        from fallback.compiled import CompiledEngine

        return CompiledEngine()
    if request.param == "cupy":
        return real_gpu_engine(TINY, 5)
    library = request.getfixturevalue("emulated_device_library")
    if request.param == "gpu-emulated":
        return emulated_engine(library, TINY, 5)
    return fake_cupy_engine(library, TINY, staging_values=7)[0]
