"""Cost of authentication on the REST request path (issue 15): `auth.mode` off vs `token`.

In process, the GET /stats/ handler chain (the route hook with its authentication, role and
symbol checks, then the handler) of two apps is called directly on one event loop, in
alternating runs, so the difference is what a bearer token costs per request without the HTTP
server's noise; set it against the server's CPU per GET /stats/ (benches/bench_metrics.py).

    .venv/bin/python benches/bench_auth.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.app import create_app
from appliance.auth import Tokens, new_token, tokens_file_entry
from appliance.config import build_config

CALLS = 20_000


def make_apps(token: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.toml"
        path.write_text(tokens_file_entry("desk", token, "read", ["EUR/*"]))
        tokens = Tokens.from_file(path)
    apps = {}
    for mode in ("off", "token"):
        config = build_config(
            {
                "engine": {"backend": "numpy"},
                "metrics": {"enabled": False},
                "auth": {"mode": mode, "tokens_file": str(path) if mode == "token" else ""},
            }
        )
        app = create_app(config, name=f"bench_auth_{mode}", tokens=tokens)
        app.ctx.store.ingest("EUR/USD", np.linspace(1.0, 2.0, 10_000))
        app.ctx.readiness.mark_ready()
        apps[mode] = app
    return apps


async def per_call_us(app, token: str) -> float:
    handler = next(r.handler for r in app.router.routes if r.name.endswith(".stats"))
    request = SimpleNamespace(
        app=app, stream=None, query_string="symbol=EUR/USD&exponent=3", method="GET",
        path="/stats/", headers={"authorization": f"Bearer {token}"}, ctx=SimpleNamespace(),
    )  # fmt: skip
    times = []
    for _ in range(9):
        started = time.perf_counter()
        for _ in range(CALLS):
            await handler(request)
        times.append((time.perf_counter() - started) / CALLS * 1e6)
    return statistics.median(times)


def main() -> None:
    token = new_token()
    apps = make_apps(token)
    results: dict[str, list[float]] = {"off": [], "token": []}
    for run in range(3):
        for mode in ("off", "token") if run % 2 == 0 else ("token", "off"):
            results[mode].append(asyncio.run(per_call_us(apps[mode], token)))
    off, on = statistics.median(results["off"]), statistics.median(results["token"])
    print(
        f"GET /stats/ handler chain: auth off {off:.2f} us, token {on:.2f} us: +{on - off:.2f} us"
    )
    print({mode: [round(x, 2) for x in values] for mode, values in results.items()})


if __name__ == "__main__":
    main()
