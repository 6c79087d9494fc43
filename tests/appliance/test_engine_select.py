"""Engine selection: cpu is the compiled engine, numpy the reference, auto the best that loads;
a named engine that cannot load is an error."""

from __future__ import annotations

import sys
import types

import pytest

import gpu_kernels
from appliance.engine import EngineUnavailableError, select_engine
from tests.gpu_probe import no_gpu_reason

NO_GPU = no_gpu_reason()


def test_cpu_selects_the_compiled_engine_with_its_kernels_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    assert select_engine("cpu").engine.name == "cpu"
    ready = next(r for r in caplog.records if r.message == "compiled kernels ready")
    assert ready.seconds >= 0


def test_numpy_selects_the_reference_engine() -> None:
    assert select_engine("numpy").engine.name == "numpy"


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a usable GPU")
def test_auto_falls_back_to_the_compiled_engine_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    choice = select_engine("auto")
    assert choice.engine.name == "cpu"
    assert NO_GPU in choice.reason
    assert any(r.message == "engine selected" for r in caplog.records)


def test_auto_without_numba_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "fallback.compiled", None)  # as if numba were missing
    with pytest.raises(EngineUnavailableError, match="compiled CPU engine not available"):
        select_engine("cpu")
    choice = select_engine("auto")
    assert choice.engine.name == "numpy"
    assert "compiled CPU engine not available" in choice.reason


@pytest.mark.skipif(NO_GPU is None, reason="this machine has a usable GPU")
def test_gpu_without_a_usable_gpu_is_a_typed_error_that_says_why() -> None:
    with pytest.raises(EngineUnavailableError, match="GPU engine not available: ") as raised:
        select_engine("gpu")
    assert NO_GPU in str(raised.value)


def test_missing_cupy_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(
        EngineUnavailableError, match=r"CuPy is not installed.*pip install '\.\[gpu\]'"
    ):
        select_engine("gpu")
    assert select_engine("auto").engine.name == "cpu"


def test_a_driver_without_devices_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 0)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(EngineUnavailableError, match="the CUDA driver reports no GPU"):
        select_engine("gpu")


def test_a_failing_driver_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver() -> int:
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    runtime = types.SimpleNamespace(getDeviceCount=no_driver)
    monkeypatch.setitem(
        sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    )
    with pytest.raises(
        EngineUnavailableError,
        match="CUDA finds no usable driver or device: cudaErrorInsufficientDriver",
    ):
        select_engine("gpu")


@pytest.mark.gpu
def test_auto_picks_the_gpu_and_logs_the_device(caplog: pytest.LogCaptureFixture) -> None:
    if NO_GPU is not None:
        pytest.skip(f"gpu: {NO_GPU}")
    caplog.set_level("INFO")
    choice = select_engine("auto")
    try:  # [engine] placement's default, hybrid, needs the compiled engine (numba)
        import numba  # noqa: F401

        expected = "hybrid"
    except ImportError:
        expected = "cupy"
    assert choice.engine.name == expected
    record = next(r for r in caplog.records if r.message == "engine selected")
    assert record.device == choice.engine.device_name


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(EngineUnavailableError, match=r"engine\.backend"):
        select_engine("tpu")


def test_gpu_engine_that_fails_to_start_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> object:
        raise RuntimeError("no CUDA device")

    monkeypatch.setattr(gpu_kernels, "CupyEngine", broken, raising=False)
    with pytest.raises(EngineUnavailableError, match="no CUDA device"):
        select_engine("gpu")
    assert select_engine("auto").engine.name == "cpu"
