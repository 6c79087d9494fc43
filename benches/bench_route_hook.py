"""What the REST route hook costs per request: run it in two checkouts and compare.

In process, the GET /stats/ handler chain of one app (numpy engine, metrics off, auth off),
called directly on one event loop, median of 9 x 20,000 calls. Run it alternately in a checkout
of the commit before a change and in one after it; the difference is the change's cost per
request, without the HTTP server's noise (issue 14: 6fc115d, before the hook, vs today's code).

    git worktree add /tmp/old 6fc115d && cd /tmp/old && \
        PYTHONPATH=$PWD ~/repo/.venv/bin/python ~/repo/benches/bench_route_hook.py before
    PYTHONPATH=$PWD .venv/bin/python benches/bench_route_hook.py after
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

from appliance.app import create_app
from appliance.config import build_config

CALLS = 20_000


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "now"
    settings = {"engine": {"backend": "numpy"}}
    try:  # a checkout from before [metrics] existed has no such section
        config = build_config({**settings, "metrics": {"enabled": False}})
    except Exception:
        config = build_config(settings)
    app = create_app(config, name="bench_route_hook")
    app.ctx.store.ingest("S", np.linspace(1.0, 2.0, 10_000))
    if hasattr(app.ctx, "readiness"):
        app.ctx.readiness.mark_ready()
    else:  # before appliance.readiness
        app.ctx.ready = True
    handler = next(r.handler for r in app.router.routes if r.name.endswith(".stats"))
    request = SimpleNamespace(
        app=app, stream=None, query_string="symbol=S&exponent=3", headers={}, ctx=SimpleNamespace()
    )

    async def run() -> float:
        times = []
        for _ in range(9):
            started = time.perf_counter()
            for _ in range(CALLS):
                await handler(request)
            times.append((time.perf_counter() - started) / CALLS * 1e6)
        return statistics.median(times)

    print(f"{label}: {asyncio.run(run()):.2f} us per GET /stats/ handler chain")


if __name__ == "__main__":
    main()
