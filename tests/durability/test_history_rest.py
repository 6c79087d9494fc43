"""GET /history/stats and GET /symbols through the Sanic app's handlers, in process."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import numpy as np
import pytest
from openapi_spec_validator import validate

from appliance.app import create_app
from appliance.config import AppConfig, ServerConfig
from appliance.errors import ERROR_CODES, ApiError
from appliance.openapi import build_openapi
from appliance.readiness import Readiness
from tests.durability.warm_helpers import Feeder, warm_tier


def _handler(app, path: str):
    return next(r.handler for r in app.router.routes if r.path.strip("/") == path)


def _get(app, path: str, **params: str) -> tuple[int, dict]:
    request = SimpleNamespace(app=app, stream=None, query_string=urlencode(params))
    try:
        response = asyncio.run(_handler(app, path)(request))
    except ApiError as exc:  # what the app's error handler renders
        assert exc.status == ERROR_CODES[exc.code].status
        return exc.status, exc.to_body()
    return response.status, json.loads(response.body)


@pytest.fixture
def app_with_history(tmp_path: Path):
    # wait_for_ready_s = 0: a request before ready answers 503 at once (the wait itself is
    # tested in tests/appliance/test_readiness.py).
    config = AppConfig(server=ServerConfig(wait_for_ready_s=0))
    app = create_app(config, name=f"test_{uuid.uuid4().hex[:12]}")
    app.ctx.readiness.mark_ready()
    with warm_tier(tmp_path, segment_values=100) as warm:
        feed = Feeder(warm)
        rng = np.random.default_rng(3)
        for i in range(50):
            values = 1e9 + rng.uniform(0, 1e-3, 13)
            feed.send("EUR/USD", values)
            if i >= 40:  # the hot tier holds only the newest batches
                app.ctx.store.ingest("EUR/USD", values)
        app.ctx.store.ingest("HOT/ONLY", np.ones(4))
        warm.drain()
        app.ctx.warm = warm
        yield app, feed


def test_history_stats_by_index_and_time(app_with_history) -> None:
    app, feed = app_with_history
    x = feed.all_values("EUR/USD")
    status, body = _get(app, "history/stats", symbol="EUR/USD", start="95", end="402")
    assert status == 200
    assert body["symbol"] == "EUR/USD"
    assert (body["count"], body["first_index"], body["last_index"]) == (307, 95, 401)
    assert (body["min"], body["max"], body["first"], body["last"]) == (
        x[95:402].min(),
        x[95:402].max(),
        x[95],
        x[401],
    )
    shifted = x[95:402] - x[95]
    assert body["var"] == pytest.approx(shifted.var(), rel=1e-9)
    t = feed.all_times("EUR/USD")
    status, body = _get(
        app, "history/stats", symbol="EUR/USD", by="time", start=str(t[13]), end=str(t[26])
    )
    assert status == 200
    assert (body["count"], body["first_index"], body["first_ns"]) == (13, 13, t[13])
    status, body = _get(app, "history/stats", symbol="EUR/USD")  # the whole history
    assert (status, body["count"], body["last"]) == (200, 650, x[-1])


def test_history_errors(app_with_history) -> None:
    app, _ = app_with_history
    cases = [
        ({}, "missing_parameter"),
        ({"symbol": ""}, "invalid_symbol"),
        ({"symbol": "NOPE"}, "unknown_symbol"),
        ({"symbol": "EUR/USD", "start": "x"}, "invalid_range"),
        ({"symbol": "EUR/USD", "start": "9", "end": "3"}, "invalid_range"),
        ({"symbol": "EUR/USD", "by": "price"}, "invalid_range"),
        ({"symbol": "EUR/USD", "by": "time", "start": "noon"}, "invalid_range"),
        ({"symbol": "EUR/USD", "start": "700"}, "empty_range"),
        ({"symbol": "EUR/USD", "by": "time", "end": "1970-01-01T00:00:00Z"}, "empty_range"),
    ]
    for params, code in cases:
        status, body = _get(app, "history/stats", **params)
        assert (status, body["code"]) == (ERROR_CODES[code].status, code), params
        assert body["error"]


def test_history_without_durability_and_symbols_counts(app_with_history) -> None:
    app, _ = app_with_history
    status, body = _get(app, "symbols")
    assert status == 200
    assert body["symbols"] == [
        {"symbol": "EUR/USD", "hot": 130, "total": 650},
        {"symbol": "HOT/ONLY", "hot": 4, "total": 4},
    ]
    app.ctx.warm = None
    status, body = _get(app, "history/stats", symbol="EUR/USD")
    assert (status, body["code"]) == (404, "history_disabled")
    status, body = _get(app, "symbols")
    assert body["symbols"][0] == {"symbol": "EUR/USD", "hot": 130, "total": None}


def test_openapi_documents_the_history_routes() -> None:
    document = build_openapi(AppConfig())
    validate(document)
    responses = document["paths"]["/history/stats"]["get"]["responses"]
    for code in ("invalid_range", "empty_range", "history_disabled", "unknown_symbol"):
        content = responses[str(ERROR_CODES[code].status)]["content"]["application/json"]
        assert code in content["examples"]
    assert "head" in document["paths"]["/symbols"]


def test_history_and_symbols_are_not_answered_before_ready(app_with_history) -> None:
    app, _ = app_with_history
    app.ctx.readiness = Readiness(0)  # starting, and told not to wait
    app.ctx.readiness.mark_replaying()
    for path, params in (("history/stats", {"symbol": "EUR/USD"}), ("symbols", {})):
        status, body = _get(app, path, **params)
        assert (status, body["code"]) == (503, "not_ready")
    app.ctx.readiness.mark_ready()
    assert _get(app, "symbols")[0] == 200
