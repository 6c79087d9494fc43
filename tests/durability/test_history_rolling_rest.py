"""GET /history/rolling through the Sanic app's handler, in process: answers on the numpy
engine and the GPU engine (on the CPU build of its kernels), refusals, readiness, OpenAPI."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from openapi_spec_validator import validate

from appliance.app import create_app
from appliance.config import AppConfig, HistoryConfig, ServerConfig
from appliance.errors import ERROR_CODES
from appliance.openapi import build_openapi
from appliance.readiness import Readiness
from engine_core.rolling import rolling_reference
from tests.durability.test_history_bars_rest import kernels  # noqa: F401 (a fixture)
from tests.durability.test_history_rest import _get
from tests.durability.warm_helpers import Feeder, warm_tier

MAX_POSITIONS, MAX_VALUES = 200, 300


@pytest.fixture(params=["numpy", "gpu-emulated"])
def app_and_values(request, tmp_path: Path):
    engine = None
    if request.param == "gpu-emulated":
        from tests.engine.conftest import TINY, emulated_engine

        engine = emulated_engine(request.getfixturevalue("kernels"), TINY, 5)
    history = HistoryConfig(max_rolling_positions=MAX_POSITIONS, max_rolling_values=MAX_VALUES)
    config = AppConfig(server=ServerConfig(wait_for_ready_s=0), history=history)
    app = create_app(config, engine, name=f"test_{uuid.uuid4().hex[:12]}")
    app.ctx.readiness.mark_ready()
    with warm_tier(tmp_path / "warm", segment_values=64) as warm:
        feed = Feeder(warm)
        rng = np.random.default_rng(29)
        for _ in range(40):
            feed.send("EUR/USD", 1e9 + rng.uniform(0, 1e-3, int(rng.integers(1, 20))))
        warm.drain()
        app.ctx.warm = warm
        yield app, feed.all_values("EUR/USD")


def test_rolling_answer_matches_the_reference(app_and_values) -> None:
    app, x = app_and_values
    n = x.shape[0]
    assert n > max(3 * 64, MAX_VALUES)  # sealed and memory values in range; over the limit
    status, body = _get(
        app, "history/rolling", symbol="EUR/USD", window="20", start=str(n - 290), step="3"
    )
    assert status == 200, body
    assert (body["symbol"], body["window"], body["start"], body["end"], body["step"]) == (
        "EUR/USD",
        20,
        n - 290,
        n,
        3,
    )
    want = rolling_reference(x[n - 290 :], 20, 3)
    assert body["positions"] == list(range(n - 290 + 19, n, 3))
    assert body["min"] == want.min.tolist() and body["max"] == want.max.tolist()
    np.testing.assert_allclose(body["avg"], want.avg, rtol=1e-9)
    np.testing.assert_allclose(body["var"], want.var, rtol=1e-9)


def test_rolling_refusals(app_and_values) -> None:
    app, x = app_and_values
    n = x.shape[0]
    ok = {"symbol": "EUR/USD", "window": "10", "start": "0", "end": "150"}

    def error(**params: str) -> tuple[int, str]:
        status, body = _get(app, "history/rolling", **{**ok, **params})
        return status, body["code"]

    assert _get(app, "history/rolling", **ok)[0] == 200
    assert error(window="0") == (400, "invalid_window")
    assert error(window="") == (400, "invalid_window")
    assert error(step="-2") == (400, "invalid_window")
    assert error(start="a") == (400, "invalid_range")
    assert error(start="150") == (400, "invalid_range")
    assert error(end=str(n + 1)) == (400, "invalid_range")
    assert error(window="151") == (400, "invalid_range")
    assert error(symbol="") == (400, "invalid_symbol")
    assert error(symbol="NOPE") == (404, "unknown_symbol")
    assert error(window="1", end="201") == (413, "batch_too_large")  # 201 positions > 200
    assert error(step="500", end=str(n)) == (413, "batch_too_large")  # > 300 values
    status, body = _get(app, "history/rolling", window="1")
    assert (status, body["code"]) == (400, "missing_parameter")
    app.ctx.warm = None
    assert error() == (404, "history_disabled")


def test_rolling_waits_for_ready(app_and_values) -> None:
    app, _ = app_and_values
    app.ctx.readiness = Readiness(0)
    app.ctx.readiness.mark_replaying()
    status, body = _get(app, "history/rolling", symbol="EUR/USD", window="1")
    assert (status, body["code"]) == (503, "not_ready")


def test_openapi_documents_history_rolling() -> None:
    document = build_openapi(AppConfig())
    validate(document)
    operation = document["paths"]["/history/rolling"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {
        "symbol", "window", "start", "end", "step",
    }  # fmt: skip
    for code in ("invalid_window", "invalid_range", "unknown_symbol", "batch_too_large",
                 "history_disabled", "missing_parameter"):  # fmt: skip
        content = operation["responses"][str(ERROR_CODES[code].status)]["content"]
        assert code in content["application/json"]["examples"]
    schema = document["components"]["schemas"]["HistoryRollingResponse"]
    assert schema["required"] == [
        "symbol", "window", "start", "end", "step", "positions", "min", "max", "avg", "var",
    ]  # fmt: skip
