"""The GPU build of segment_tree.cu: NVRTC compiles it, with the engine's options, for the
architectures the appliance targets. NVRTC needs no GPU, so this runs wherever CuPy and its
NVRTC are installed (pip install '.[gpu]'), and is skipped with the reason elsewhere."""

from __future__ import annotations

import pytest

from gpu_kernels.device import KERNELS, NVRTC_OPTIONS, kernel_source

ARCHITECTURES = ("sm_80", "sm_90")  # A100, H100/H200


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        pytest.skip(f"gpu: CuPy is not installed ({exc}); pip install '.[gpu]'")
    try:
        nvrtc.getVersion()
    except Exception as exc:  # the library is loaded lazily
        pytest.skip(f"gpu: CuPy cannot load NVRTC ({exc})")
    return nvrtc


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_nvrtc_compiles_every_kernel_to_a_cubin(arch):
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(kernel_source(), "segment_tree.cu", (), ())
    try:
        nvrtc.compileProgram(program, (*NVRTC_OPTIONS, f"-arch={arch}"))
    except nvrtc.NVRTCError as exc:
        pytest.fail(f"NVRTC rejected segment_tree.cu: {exc}\n{nvrtc.getProgramLog(program)}")
    cubin = nvrtc.getCUBIN(program)
    for kernel in KERNELS:
        assert kernel.encode() in cubin, f"{kernel} missing from the {arch} cubin"
