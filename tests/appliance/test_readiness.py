"""The bounded wait of data requests while the appliance starts (appliance.readiness).

Handlers are run on a real event loop with the app's own route hook; the server-level check
(a real process, a real log to replay, a write sent at once) is in
tests/integration/test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from appliance.app import create_app
from appliance.config import build_config
from appliance.errors import ApiError
from appliance.readiness import Phase, Readiness

JSON_CT = {"content-type": "application/json"}


def new_app(wait_for_ready_s: float):
    config = build_config({"server": {"wait_for_ready_s": wait_for_ready_s}})
    return create_app(config, name=f"test_{uuid.uuid4().hex[:12]}")


def _handler(app, path: str):
    return next(r.handler for r in app.router.routes if r.path.strip("/") == path)


def _request(app, **fields: Any) -> SimpleNamespace:
    return SimpleNamespace(
        **{"app": app, "stream": None, "headers": JSON_CT, "body": b"", "query_string": ""} | fields
    )


async def _answer(app, path: str, **fields: Any) -> tuple[int, dict]:
    try:
        response = await _handler(app, path)(_request(app, **fields))
    except ApiError as exc:  # what the app's error handler renders
        return exc.status, exc.to_body()
    return response.status, json.loads(response.body)


def test_a_write_during_the_replay_waits_and_then_succeeds() -> None:
    app = new_app(30)
    app.ctx.readiness.mark_replaying()

    async def scenario() -> tuple[int, dict]:
        body = json.dumps({"symbol": "A", "values": [1.0, 2.0]}).encode()
        write = asyncio.create_task(_answer(app, "add_batch", body=body))
        stats = asyncio.create_task(_answer(app, "stats", query_string="symbol=A&exponent=1"))
        await asyncio.sleep(0.05)
        assert not write.done() and not stats.done()  # waiting, not refused
        assert len(app.ctx.store) == 0
        app.ctx.readiness.mark_ready()
        written = await asyncio.wait_for(write, 5)
        return written, await asyncio.wait_for(stats, 5)

    written, stats = asyncio.run(scenario())
    assert written == (200, {"status": "ok", "symbol": "A", "added": 2})
    # Woken in arrival order: the write came first, so the query sees its values.
    assert stats == (200, {"min": 1.0, "max": 2.0, "last": 2.0, "avg": 1.5, "var": 0.25})
    np.testing.assert_array_equal(app.ctx.store.snapshot_values("A"), [1.0, 2.0])


def test_the_wait_is_bounded_by_the_setting() -> None:
    app = new_app(0.2)
    app.ctx.readiness.mark_replaying()
    status, body = asyncio.run(_answer(app, "stats", query_string="symbol=A&exponent=1"))
    assert (status, body["code"]) == (503, "not_ready")
    assert "server.wait_for_ready_s" in body["error"]


@pytest.mark.parametrize("end", ["mark_failed", "mark_stopping"])
def test_a_failed_start_or_a_stop_ends_the_wait_at_once(end: str) -> None:
    app = new_app(30)
    app.ctx.readiness.mark_replaying()

    async def scenario() -> tuple[int, dict]:
        waiting = asyncio.create_task(_answer(app, "symbols"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        getattr(app.ctx.readiness, end)()
        return await asyncio.wait_for(waiting, 2)  # long before the 30 s bound

    status, body = asyncio.run(scenario())
    assert (status, body["code"]) == (503, "not_ready")
    # After a failed start or during a stop, a new request does not wait either.
    assert asyncio.run(asyncio.wait_for(_answer(app, "symbols"), 2))[0] == 503


def test_zero_means_no_wait() -> None:
    app = new_app(0)
    status, body = asyncio.run(asyncio.wait_for(_answer(app, "symbols"), 1))
    assert (status, body["code"]) == (503, "not_ready")
    assert "waited" not in body["error"]


def test_probes_never_wait() -> None:
    app = new_app(30)
    app.ctx.readiness.mark_replaying()
    for path in ("live", "health", "ready", "openapi.json", "ingest"):
        status = asyncio.run(asyncio.wait_for(_handler(app, path)(_request(app)), 1)).status
        assert status == (503 if path in ("health", "ready") else 200), path


def test_requests_keep_being_served_while_draining() -> None:
    app = new_app(30)
    app.ctx.readiness.mark_ready()
    app.ctx.store.ingest("A", np.ones(3))
    app.ctx.readiness.mark_stopping()
    status, _ = asyncio.run(_answer(app, "stats", query_string="symbol=A&exponent=1"))
    assert status == 200


def test_waiters_on_different_loops_are_all_woken() -> None:
    # Each asyncio.run is a new loop: the readiness object must not bind to the first one.
    readiness = Readiness(0.05)
    readiness.mark_replaying()
    assert readiness.phase is Phase.REPLAYING
    with pytest.raises(ApiError):
        asyncio.run(readiness.wait_accepting())  # waits 0.05 s on this loop, then refuses
    readiness.wait_for_ready_s = 5

    async def wait_then_mark() -> None:
        waiter = asyncio.create_task(readiness.wait_accepting())
        await asyncio.sleep(0.01)
        readiness.mark_ready()
        await asyncio.wait_for(waiter, 1)

    asyncio.run(wait_then_mark())
    assert readiness.ready and readiness.accepting
