"""GET /history/bars through the Sanic app's handler, in process: parameters, refusals, the
engine in use (numpy, or the GPU engine on the CPU build of its kernels), OpenAPI."""

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
from tests.durability.test_history_bars import assert_matches, numpy_bars
from tests.durability.test_history_rest import _get
from tests.durability.warm_helpers import Feeder, warm_tier

MAX_BARS = 30


def _app(tmp_path: Path, engine=None):
    config = AppConfig(
        server=ServerConfig(wait_for_ready_s=0), history=HistoryConfig(max_bars=MAX_BARS)
    )
    app = create_app(config, engine, name=f"test_{uuid.uuid4().hex[:12]}")
    app.ctx.readiness.mark_ready()
    return app


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The CPU build of the GPU kernels (tests/engine/emulated_device.py)."""
    from tests.engine.emulated_device import CompilerMissing, build_library

    try:
        return build_library(tmp_path_factory.mktemp("kernels"))
    except CompilerMissing as exc:
        pytest.skip(f"gpu-emulated: {exc}")


@pytest.fixture(params=["numpy", "gpu-emulated"])
def app_and_feed(request, tmp_path: Path):
    engine = None
    if request.param == "gpu-emulated":
        from tests.engine.conftest import TINY, emulated_engine

        engine = emulated_engine(request.getfixturevalue("kernels"), TINY, 5)
    app = _app(tmp_path, engine)
    with warm_tier(tmp_path / "warm", segment_values=64) as warm:
        feed = Feeder(warm, start_ns=10**18)
        rng = np.random.default_rng(11)
        for _ in range(40):
            feed.send("EUR/USD", 1e9 + rng.uniform(0, 1e-3, int(rng.integers(1, 20))), ns_step=7)
        warm.drain()
        app.ctx.warm = warm
        yield app, feed, engine


def test_bars_answer_matches_numpy(app_and_feed) -> None:
    app, feed, engine = app_and_feed
    x, t = feed.all_values("EUR/USD"), feed.all_times("EUR/USD")
    start, end = int(t[5]), int(t[-3])
    status, body = _get(
        app, "history/bars", symbol="EUR/USD", interval="20ns", start=str(start), end=str(end)
    )
    assert status == 200, body
    assert (body["symbol"], body["interval_ns"], body["start"], body["end"]) == (
        "EUR/USD",
        20,
        start,
        end,
    )
    assert_matches(body, numpy_bars(x, t, start, end, 20))
    if engine is not None:  # the GPU engine summed them: at most one launch per piece read
        view = app.ctx.warm.view("EUR/USD")
        pieces = len(view.sealed) + len(view.memory)
        assert 1 <= engine.device.launches["bar_summaries"] <= pieces


def test_bars_refusals(app_and_feed) -> None:
    app, feed, _ = app_and_feed
    t = feed.all_times("EUR/USD")
    ok = {"symbol": "EUR/USD", "interval": "1s", "start": str(t[0]), "end": str(t[-1] + 1)}

    def error(**params: str) -> tuple[int, str]:
        status, body = _get(app, "history/bars", **{**ok, **params})
        return status, body["code"]

    assert _get(app, "history/bars", **ok)[0] == 200
    assert error(interval="1sec") == (400, "invalid_interval")
    assert error(interval="") == (400, "invalid_interval")
    assert error(start="x") == (400, "invalid_range")
    assert error(start=ok["end"], end=ok["start"]) == (400, "invalid_range")
    assert error(start="", end="") == (400, "invalid_range")
    assert error(symbol="") == (400, "invalid_symbol")
    assert error(symbol="NOPE") == (404, "unknown_symbol")
    assert error(start="0", end="1000") == (404, "empty_range")
    assert error(interval="1ns") == (413, "batch_too_large")  # 40 bars > 30
    status, body = _get(app, "history/bars", interval="1s", start="0", end="1")
    assert (status, body["code"]) == (400, "missing_parameter")
    app.ctx.warm = None
    assert error() == (404, "history_disabled")


def test_bars_wait_for_ready(app_and_feed) -> None:
    app, _, _ = app_and_feed
    app.ctx.readiness = Readiness(0)
    app.ctx.readiness.mark_replaying()
    status, body = _get(app, "history/bars", symbol="EUR/USD", interval="1s", start="0", end="1")
    assert (status, body["code"]) == (503, "not_ready")


def test_openapi_documents_history_bars() -> None:
    document = build_openapi(AppConfig())
    validate(document)
    operation = document["paths"]["/history/bars"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"symbol", "interval", "start", "end"}
    for code in ("invalid_interval", "invalid_range", "empty_range", "batch_too_large"):
        content = operation["responses"][str(ERROR_CODES[code].status)]["content"]
        assert code in content["application/json"]["examples"]
    schema = document["components"]["schemas"]["HistoryBarsResponse"]
    assert set(schema["required"]) == {
        "symbol", "interval_ns", "start", "end", "time", "open", "high", "low", "close",
        "count", "avg", "var",
    }  # fmt: skip
