"""Engine parametrization for the conformance suite.

Every test here takes `make_series` and runs once per engine: the numpy engine at its default
geometry, the numpy engine at tiny geometries (so a few hundred values cross blocks, pages and
several pyramid levels), and the CuPy engine, which is skipped with the reason when no GPU or
no engine is available. A new engine joins by adding a parameter here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fallback import Geometry, NumpyEngine, RetentionPolicy, Series

SeriesFactory = Callable[..., Series]

_NUMPY_GEOMETRIES = {
    "numpy-default": Geometry(),
    "numpy-b4f4c64": Geometry(block=4, fanout=4, chunk=64),
    "numpy-b8f2c64": Geometry(block=8, fanout=2, chunk=64),
    "numpy-b4f8c32": Geometry(block=4, fanout=8, chunk=32),  # chunk is not block * fanout**j
}


def _gpu_engine():
    """The CuPy engine, or pytest.skip with the precise reason it cannot run here."""
    try:
        import cupy
    except ImportError:
        pytest.skip("gpu: CuPy is not installed (pip install .[gpu])")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA raises several driver/runtime error types
        pytest.skip(f"gpu: no usable CUDA device ({exc})")
    import gpu_kernels

    engine_class = getattr(gpu_kernels, "CupyEngine", None)
    if engine_class is None:
        pytest.skip("gpu: gpu_kernels has no engine in this build (issue 4)")
    return engine_class()


@pytest.fixture(
    params=[
        *_NUMPY_GEOMETRIES,
        pytest.param("cupy", marks=pytest.mark.gpu),
    ]
)
def engine(request):
    if request.param == "cupy":
        return _gpu_engine()
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
