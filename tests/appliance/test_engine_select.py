"""Engine selection: cpu and auto give the numpy engine; gpu without a GPU engine is an error."""

from __future__ import annotations

import pytest

import gpu_kernels
from appliance.engine import EngineUnavailableError, select_engine

NO_GPU_ENGINE = not hasattr(gpu_kernels, "CupyEngine")


def test_cpu_selects_the_numpy_engine() -> None:
    assert select_engine("cpu").engine.name == "numpy"


@pytest.mark.skipif(not NO_GPU_ENGINE, reason="this build has a GPU engine")
def test_auto_falls_back_to_numpy_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    choice = select_engine("auto")
    assert choice.engine.name == "numpy"
    assert "issue 4" in choice.reason
    assert any(r.message == "engine selected" for r in caplog.records)


@pytest.mark.skipif(not NO_GPU_ENGINE, reason="this build has a GPU engine")
def test_gpu_without_gpu_engine_is_a_typed_error() -> None:
    with pytest.raises(
        EngineUnavailableError,
        match=r"GPU engine not available: gpu_kernels has no engine in this build \(issue 4\)",
    ):
        select_engine("gpu")


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(EngineUnavailableError, match=r"engine\.backend"):
        select_engine("tpu")


def test_gpu_engine_that_fails_to_start_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> object:
        raise RuntimeError("no CUDA device")

    monkeypatch.setattr(gpu_kernels, "CupyEngine", broken, raising=False)
    with pytest.raises(EngineUnavailableError, match="no CUDA device"):
        select_engine("gpu")
    assert select_engine("auto").engine.name == "numpy"
