"""The app object in-process: routes vs the OpenAPI document, error rendering, content types."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from openapi_spec_validator import validate
from sanic.exceptions import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge

from appliance.app import JsonErrorHandler, check_json_content_type, create_app
from appliance.config import AppConfig, build_config
from appliance.errors import ERROR_CODES, ApiError
from appliance.openapi import build_openapi
from fallback import NumpyEngine


def new_app(config: AppConfig | None = None, **kwargs: Any):
    return create_app(config or AppConfig(), name=f"test_{uuid.uuid4().hex[:12]}", **kwargs)


def test_openapi_document_is_valid() -> None:
    validate(build_openapi(AppConfig()))


def test_every_registered_route_is_documented_with_its_methods() -> None:
    app = new_app()
    paths = build_openapi(AppConfig())["paths"]
    documented = {path.rstrip("/") or "/": {m.upper() for m in ops} for path, ops in paths.items()}
    registered: dict[str, set[str]] = {}
    for route in app.router.routes:
        path = re.sub(r"<(\w+)(:\w+)?>", r"{\1}", "/" + route.path.strip("/"))  # Sanic -> OpenAPI
        registered.setdefault(path, set()).update(route.methods)
    assert registered
    for path, methods in registered.items():
        assert path in documented, path
        assert methods - {"HEAD", "OPTIONS"} <= documented[path], path
    assert set(documented) == set(registered)


def test_stats_avg_and_var_are_documented_as_nullable() -> None:
    properties = build_openapi(AppConfig())["components"]["schemas"]["StatsResponse"]["properties"]
    for name in ("avg", "var"):
        assert properties[name]["type"] == ["number", "null"]
        assert "null" in properties[name]["description"]
    for name in ("min", "max", "last"):
        assert properties[name]["type"] == "number"


def test_every_get_route_also_answers_and_documents_head() -> None:
    app = new_app()
    paths = build_openapi(AppConfig())["paths"]
    for route in app.router.routes:
        if "GET" in route.methods:
            assert "HEAD" in route.methods, route.path
    for path, operations in paths.items():
        assert ("get" in operations) == ("head" in operations), path


def test_every_error_code_appears_in_the_document() -> None:
    text = json.dumps(build_openapi(AppConfig()))
    for code in ERROR_CODES:
        assert f'"{code}"' in text, code


def test_document_states_the_configured_limits() -> None:
    config = build_config({}, {"APP_STORE__MAX_BATCH_SIZE": "1234"})
    body = build_openapi(config)["components"]["schemas"]["AddBatchRequest"]
    assert body["properties"]["values"]["maxItems"] == 1234


def test_app_is_configured_for_production() -> None:
    config = build_config({}, {"APP_SERVER__MAX_BODY_BYTES": "4096"})
    app = new_app(config)
    assert app.config.REQUEST_MAX_SIZE == 4096
    assert app.config.ACCESS_LOG is False
    shutdown_s = app.config.GRACEFUL_SHUTDOWN_TIMEOUT
    assert shutdown_s == config.server.graceful_shutdown_s
    assert app.ctx.readiness.ready is False


def test_an_injected_engine_is_used() -> None:
    engine = NumpyEngine()
    assert new_app(engine=engine).ctx.store.engine is engine


@pytest.mark.parametrize(
    "header",
    ["application/json", "application/json; charset=utf-8", 'APPLICATION/JSON;charset="UTF-8"'],
)
def test_json_content_types_are_accepted(header: str) -> None:
    check_json_content_type(header)


@pytest.mark.parametrize(
    "header",
    [None, "", "text/json", "application/jsonx", "text/plain", "application/json; charset=latin-1"],
)
def test_other_content_types_are_415(header: str | None) -> None:
    with pytest.raises(ApiError) as info:
        check_json_content_type(header)
    assert (info.value.code, info.value.status) == ("unsupported_media_type", 415)


@pytest.mark.parametrize(
    ("exception", "status", "code"),
    [
        (ApiError("empty_batch", "x"), 400, "empty_batch"),
        (NotFound("x"), 404, "not_found"),
        (MethodNotAllowed("x", "PUT", ["GET"]), 405, "method_not_allowed"),
        (PayloadTooLarge("Request body exceeds the size limit"), 413, "batch_too_large"),
        (PayloadTooLarge("Request header exceeds the size limit"), 431, "bad_request"),
        (BadRequest("bad header"), 400, "bad_request"),
        (RuntimeError("boom"), 500, "internal_error"),
    ],
)
def test_error_handler_renders_json(
    exception: BaseException, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = JsonErrorHandler().default(None, exception)  # type: ignore[arg-type]
    assert response.status == status
    assert response.content_type == "application/json"
    body = json.loads(response.body)
    assert body["code"] == code
    assert set(body) == {"error", "code"}
    if code == "internal_error":
        assert "boom" not in body["error"]  # internals are logged, not echoed
        assert any(r.message == "unhandled error" for r in caplog.records)


def test_api_error_status_comes_from_the_table() -> None:
    for code, row in ERROR_CODES.items():
        assert ApiError(code, "m").status == row.status
    with pytest.raises(KeyError):
        ApiError("no_such_code", "m")


def _handler(app, path: str):
    return next(r.handler for r in app.router.routes if r.path.strip("/") == path)


def _probe(app, path: str) -> tuple[int, dict]:
    response = asyncio.run(_handler(app, path)(SimpleNamespace(app=app, stream=None)))
    return response.status, json.loads(response.body)


def test_ready_and_health_are_503_until_startup_completes_and_live_is_200() -> None:
    app = new_app()
    for path in ("ready", "health"):
        status, body = _probe(app, path)
        assert (status, body["code"]) == (503, "not_ready")
    assert _probe(app, "health")[1]["status"] == "starting"
    assert _probe(app, "live") == (200, {"status": "ok"})
    app.ctx.readiness.mark_replaying()
    app.ctx.readiness.progress.segments_total = 7
    app.ctx.readiness.progress.segments_done = 3
    status, body = _probe(app, "health")
    assert (status, body["status"], body["code"]) == (503, "replaying", "not_ready")
    assert (body["progress"]["segments_done"], body["progress"]["segments_total"]) == (3, 7)
    app.ctx.readiness.mark_ready()
    assert _probe(app, "ready") == (200, {"status": "ready"})
    assert _probe(app, "health") == (200, {"status": "ok"})
    app.ctx.readiness.mark_stopping()
    assert _probe(app, "health")[0] == _probe(app, "ready")[0] == 503
    assert _probe(app, "health")[1]["status"] == "stopping"
    assert _probe(app, "live") == (200, {"status": "ok"})


def test_sanic_environment_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANIC_HFT_PROBE", "1")
    assert "HFT_PROBE" not in new_app().config
