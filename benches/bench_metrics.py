"""Cost of the Prometheus metrics (issue 14): the same appliance with `[metrics] enabled` true and
false, measured interleaved in one run.

What it does: starts two appliances (`hft-appliance serve`, compiled CPU engine, write-ahead log
on as users run it), one with metrics and one with `APP_METRICS__ENABLED=false` (no route, no
middleware, no log timings), each pinned to the server core; then for several rounds, in
alternating order (on/off, then off/on), runs on each:

- `GET /stats/?symbol=S&exponent=3` with wrk (64 connections): the cheapest REST request, where
  a fixed per-request cost weighs most;
- `POST /add_batch/` with a 10k-value JSON body (wrk, 16 connections);
- ZeroMQ DEALER ingest of 10k-value frames, acked (`bench_ingest.appliance_dealer`): the log's
  writer records its apply latency once per commit;

and reports per test the medians, the cost `1 - on/off` of the medians and the median of the
per-round paired ratios (what to trust on a shared machine). Goal: cost < 3 %. Also the time of
one scrape of GET /metrics, and, in process, the wrapper's own cost: the same GET /stats/
handler chain of two apps (metrics on / off) called directly on one event loop, interleaved,
so the difference is what metrics add per request, without the HTTP server's noise; it is set
against the server's CPU per GET /stats/ measured above.

    .venv/bin/python benches/bench_metrics.py                   # ~3 minutes
    .venv/bin/python benches/bench_metrics.py --rounds 2 --duration 2 --frames 50   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
sys.path.insert(0, str(BENCHES))
sys.path.insert(0, str(REPO))

from bench_ingest import FRAME_VALUES, appliance, appliance_dealer, zmq_env  # noqa: E402
from bench_rest import (  # noqa: E402
    Server,
    machine_info,
    request,
    run_wrk,
    write_post_script,
)

GOAL_COST = 0.03
STATS_SYMBOL = "BENCH-STATS"
TESTS = ("GET /stats (64 conn)", "POST /add_batch 10k (16 conn)", "ZeroMQ DEALER 10k frames")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Cost of [metrics] enabled: on vs off, interleaved.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    p.add_argument("--frames", type=int, default=200, help="10k-value frames per ZeroMQ run")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every measurement as JSON")
    return p.parse_args(argv)


@contextlib.contextmanager
def two_appliances(tmpdir: Path, core: int) -> Iterator[dict[str, tuple[Server, dict]]]:
    """{"on": (server, endpoints), "off": ...}, both with the same settings but [metrics]."""
    bounded = {  # keep two servers' memory and log small on a shared machine
        "APP_STORE__MAX_DATA_RETENTION": "20000000",
        "APP_STORE__CLEANUP_KEEP_COUNT": "10000000",
        "APP_LOG__FILE": "",
    }
    with contextlib.ExitStack() as stack:
        out = {}
        for name, enabled in (("on", "true"), ("off", "false")):
            env, endpoints = zmq_env(tmpdir, shm=False, durability=True)
            env.update(bounded, APP_METRICS__ENABLED=enabled)
            server = stack.enter_context(appliance(tmpdir, f"metrics-{name}", core, env))
            out[name] = (server, endpoints)
        yield out


def preload(server: Server) -> None:
    body = json.dumps({"symbol": STATS_SYMBOL, "values": list(np.linspace(100, 200, 1000))})
    status, reply = request(server, "POST", "/add_batch/", body.encode())
    if status != 200:
        raise RuntimeError(f"{server.name}: preload failed: {status} {reply[:200]!r}")


def scrape_ms(server: Server, times: int = 20) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        status, _ = request(server, "GET", "/metrics")
        samples.append((time.perf_counter() - started) * 1e3)
        assert status == 200, status
    return statistics.median(samples)


def cpu_seconds(server: Server) -> float:
    """The server process's user + system CPU time (/proc/PID/stat, clock ticks)."""
    assert server.proc is not None
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(
    servers: dict, order: list[str], args: argparse.Namespace, post: Path, round_no: int
) -> dict[str, dict[str, float]]:
    """Per server, per test: the rate, and the server's CPU microseconds per request (per 10k
    values for ZeroMQ). CPU per operation is what other load on a shared machine disturbs least:
    it is the server's own time, not how much of the cores it got."""
    values = np.random.default_rng(round_no + 1).uniform(100.0, 200.0, FRAME_VALUES)
    out: dict[str, dict[str, float]] = {name: {} for name in order}
    core = args.client_core
    for test in TESTS:
        for name in order:  # each test on both servers back to back
            server, endpoints = servers[name]
            cpu_before = cpu_seconds(server)
            if test.startswith("GET"):
                path = f"/stats/?symbol={STATS_SYMBOL}&exponent=3"
                result = run_wrk(server, test, path, 64, args.duration, core, round_no)
                rate, operations = result.requests_per_s, result.requests
            elif test.startswith("POST"):
                result = run_wrk(
                    server, test, "/add_batch/", 16, args.duration, core, round_no, post
                )
                rate, operations = result.requests_per_s, result.requests
            else:
                rate = appliance_dealer(server, endpoints["router"], values, args.frames, round_no)
                operations = args.frames  # 10k-value frames (the first one untimed, not the CPU)
            out[name][test] = rate
            out[name][f"{test} cpu_us"] = (cpu_seconds(server) - cpu_before) / operations * 1e6
    return out


def warmup_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "duration": 1.0, "frames": 20})


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for test in TESTS:
        on = [r["on"][test] for r in rounds]
        off = [r["off"][test] for r in rounds]
        paired = [a / b for a, b in zip(on, off, strict=True)]
        cpu_on = [r["on"][f"{test} cpu_us"] for r in rounds]
        cpu_off = [r["off"][f"{test} cpu_us"] for r in rounds]
        cpu_paired = [a / b for a, b in zip(cpu_on, cpu_off, strict=True)]
        summary[test] = {
            "on_median": statistics.median(on),
            "off_median": statistics.median(off),
            "cost_of_medians": 1 - statistics.median(on) / statistics.median(off),
            "cost_paired_median": 1 - statistics.median(paired),
            "cpu_us_on_median": statistics.median(cpu_on),
            "cpu_us_off_median": statistics.median(cpu_off),
            "cpu_cost_paired_median": statistics.median(cpu_paired) - 1,
        }
    return summary


def render(summary: dict, scrape: float, info: dict, args: argparse.Namespace) -> str:
    lines = [
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {info['git_commit']}"
        f"{' (dirty)' if info['git_dirty'] else ''}, {info['cpu_model']}, {info['cpus']} CPUs, "
        f"rounds {args.rounds}, wrk {args.duration:g} s, {args.frames} frames per ZeroMQ run",
        "",
        "| test | rate off / on (medians) | rate cost, paired rounds | server CPU us per op, "
        "off / on | CPU cost, paired rounds | goal < 3 % (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for test, row in summary.items():
        unit = "values/s" if test.startswith("ZeroMQ") else "req/s"
        op = "frame" if test.startswith("ZeroMQ") else "request"
        verdict = "met" if row["cpu_cost_paired_median"] < GOAL_COST else "**missed**"
        lines.append(
            f"| {test} | {row['off_median']:,.0f} / {row['on_median']:,.0f} {unit} | "
            f"{row['cost_paired_median'] * 100:+.1f} % | {row['cpu_us_off_median']:.1f} / "
            f"{row['cpu_us_on_median']:.1f} us per {op} | "
            f"{row['cpu_cost_paired_median'] * 100:+.1f} % | {verdict} |"
        )
    lines += ["", f"One GET /metrics scrape (metrics on, median of 20): {scrape:.2f} ms"]
    return "\n".join(lines)


def handler_us(app, calls: int) -> float:
    """Median over 7 runs of the per-call time of `app`'s GET /stats/ handler chain (the route
    hook, and the metrics wrapper when installed), called directly on one event loop."""
    import asyncio
    from types import SimpleNamespace

    handler = next(r.handler for r in app.router.routes if r.name.endswith(".stats"))
    request = SimpleNamespace(
        app=app, stream=None, query_string=f"symbol={STATS_SYMBOL}&exponent=3", headers={}
    )

    async def run() -> list[float]:
        times = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(calls):
                await handler(request)
            times.append((time.perf_counter() - started) / calls * 1e6)
        return times

    return statistics.median(asyncio.run(run()))


def wrapper_cost_us(calls: int = 20_000, rounds: int = 5) -> dict[str, float]:
    """In-process: per-request microseconds the metrics add to GET /stats/ (on minus off)."""
    from appliance.app import create_app
    from appliance.config import build_config

    apps = {}
    for state in ("on", "off"):
        config = build_config(
            {"metrics": {"enabled": state == "on"}, "engine": {"backend": "numpy"}}
        )
        app = create_app(config, name=f"bench_metrics_{state}")
        app.ctx.store.ingest(STATS_SYMBOL, np.linspace(1.0, 2.0, 10_000))
        app.ctx.readiness.mark_ready()
        apps[state] = app
    on, off = [], []
    for round_no in range(rounds):
        for state in ("on", "off") if round_no % 2 == 0 else ("off", "on"):
            (on if state == "on" else off).append(handler_us(apps[state], calls))
    return {
        "on_us": statistics.median(on),
        "off_us": statistics.median(off),
        "added_us": statistics.median(a - b for a, b in zip(on, off, strict=True)),
    }


def wal_timings_cost_us(calls: int = 200_000) -> float:
    """In process: what the log's writer records per commit with metrics on (one `committed`,
    one fsync's `fsync_started` + `fsync_done`: an upper bound, as fsyncs are rarer than
    commits under `interval`), in microseconds, median of 7."""
    from appliance.latency import WalTimings

    timings = WalTimings()
    times = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(calls):
            timings.committed(time.time_ns())
            timings.fsync_done(timings.fsync_started())
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        tmpdir = Path(tmp)
        post, _ = write_post_script(tmpdir, 2, 20261204)
        with two_appliances(tmpdir, args.server_core) as servers:
            for server, _ in servers.values():
                preload(server)
            # A discarded warm-up round: first touches of the hot tier's pages, sockets and
            # caches would otherwise be charged to whichever server goes first.
            run_round(servers, ["on", "off"], warmup_args(args), post, -1)
            for round_no in range(args.rounds):
                order = ["on", "off"] if round_no % 2 == 0 else ["off", "on"]
                rounds.append(run_round(servers, order, args, post, round_no))
                print(f"round {round_no}: {json.dumps(rounds[-1])}", file=sys.stderr)
            scrape = scrape_ms(servers["on"][0])
            status, _ = request(servers["off"][0], "GET", "/metrics")
            if status != 404:
                raise RuntimeError(f"metrics off: GET /metrics answered {status}, not 404")
    summary = summarize(rounds)
    wrapper = wrapper_cost_us()
    server_us = summary[TESTS[0]]["cpu_us_off_median"]
    print(render(summary, scrape, info, args))
    print(
        f"In process, GET /stats/ handler chain: {wrapper['off_us']:.2f} us off, "
        f"{wrapper['on_us']:.2f} us on: metrics add {wrapper['added_us']:.2f} us per request, "
        f"{wrapper['added_us'] / server_us * 100:.1f} % of the server's CPU per GET /stats/ "
        f"({server_us:.1f} us, metrics off, above)"
    )
    summary["in_process_wrapper"] = wrapper
    commit_us = wal_timings_cost_us()
    frame_us = summary[TESTS[2]]["cpu_us_off_median"]
    post_us = summary[TESTS[1]]["cpu_us_off_median"]
    print(
        f"In process, the log writer's recording per commit (commit + one fsync): "
        f"{commit_us:.2f} us, {commit_us / frame_us * 100:.2f} % of the server's CPU per "
        f"ZeroMQ frame ({frame_us:.0f} us) and, with the handler wrapper, "
        f"{(commit_us + wrapper['added_us']) / post_us * 100:.2f} % per POST /add_batch "
        f"({post_us:.0f} us): at most one commit per frame or batch"
    )
    summary["in_process_wal_timings_us"] = commit_us
    if args.json:
        report = {"machine": info, "args": vars(args), "rounds": rounds, "summary": summary}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
