"""REST benchmark: the real appliance against a flat-array baseline, both measured in one run.

What it does (issue 2, "Benchmarks", REST part):

- starts the real server (`hft-appliance serve`, numpy segment-tree engine forced with
  `APP_ENGINE__BACKEND=cpu`) and a baseline server (`benches/serve_with_engine.py --engine
  baseline`: same app, flat float64 array, window recomputed with np.min/max/mean/var per query),
  each as a subprocess pinned to the server core (`taskset -c 0`);
- preloads, through the REST API itself in batches of 1M values, one symbol per size N
  (default 1e6 and 1e7) on both servers, and checks both answer like numpy on the full window;
- runs wrk pinned to the client core (`taskset -c 1 wrk -t1 -c64 -d10s --latency`) against:
  GET /health; GET /stats?symbol=S&exponent=k with 10^k >= N (the whole series); POST /add_batch/
  with a 10k-value JSON body (to a separate symbol) at 64 and 16 connections;
- interleaves everything over several rounds (each test on both servers back to back) and
  reports medians, the stats/health ratio computed within each round, and each target's verdict.

Targets (issue 2): stats/health >= 0.9 and stats p99 <= 2 ms at 64 connections;
POST /add_batch/ with 10k values >= 20M values/s.

    .venv/bin/python benches/bench_rest.py                # full run (~6 minutes)
    .venv/bin/python benches/bench_rest.py --quick        # smoke test (~30 s)
    .venv/bin/python benches/bench_rest.py --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import msgspec
import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCHES = REPO / "benches"
POST_VALUES = 10_000
PRELOAD_BATCH = 1_000_000
POST_SYMBOL = "BENCH-POST"

TARGET_STATS_RATIO = 0.9
TARGET_STATS_P99_MS = 2.0
TARGET_POST_VALUES_PER_S = 20e6

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass
class WrkResult:
    server: str
    test: str
    round: int
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    loadavg_1m: float
    command: str


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/sec, p50/p99 (ms), total requests, non-2xx and socket errors from wrk output."""
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "requests_per_s": float(rps.group(1)),
        "p50_ms": parse_duration_ms(p50.group(1)),
        "p99_ms": parse_duration_ms(p99.group(1)),
        "requests": int(total.group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0,
    }


def request(
    server: Server, method: str, path: str, body: bytes | None = None, timeout: float = 120
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def exponent_for(n: int) -> int:
    """Smallest k in 1..8 with 10^k >= n: the query window covers the whole series."""
    return min(8, max(1, math.ceil(math.log10(n))))


def cmd_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine_info() -> dict[str, object]:
    lscpu = cmd_output(["lscpu"])
    model = re.search(r"^Model name:\s+(.+)$", lscpu, re.M)
    versions = {"python": platform.python_version()}
    for dist in ("numpy", "sanic", "msgspec", "hft-appliance"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    wrk_version = (
        cmd_output(["wrk", "--version"])
        or subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stderr
    )
    versions["wrk"] = wrk_version.splitlines()[0].split(" [")[0] if wrk_version else "?"
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "git_commit": cmd_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(cmd_output(["git", "-C", str(REPO), "status", "--porcelain", "-uno"])),
        "versions": versions,
    }


# ----------------------------------------------------------------------------- servers


def start_server(server: Server, core: int, config: Path | None) -> None:
    env = dict(os.environ)
    env.update(
        {
            "APP_SERVER__HOST": "127.0.0.1",
            "APP_SERVER__PORT": str(server.port),
            "APP_LOG__LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(server.extra_env)
    argv = ["taskset", "-c", str(core), *server.argv]
    if config is not None:
        argv += ["--config", str(config)]
    server.log_path = server.workdir / "server.out"
    with server.log_path.open("wb") as out:
        server.proc = subprocess.Popen(
            argv, cwd=server.workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.log_path.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            status, _ = request(server, "GET", "/ready", timeout=2)
            if status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready after 60 s: {server.log_path.read_text()[-2000:]}")


def stop_server(server: Server) -> int | None:
    if server.proc is None or server.proc.poll() is not None:
        return server.proc.returncode if server.proc else None
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        return server.proc.wait()


def preload(server: Server, symbol: str, values: np.ndarray) -> float:
    """POST `values` in batches of PRELOAD_BATCH; return seconds taken."""
    started = time.perf_counter()
    for start in range(0, values.shape[0], PRELOAD_BATCH):
        chunk = values[start : start + PRELOAD_BATCH]
        body = msgspec.json.encode({"symbol": symbol, "values": chunk.tolist()})
        status, reply = request(server, "POST", "/add_batch/", body)
        if status != 200:
            raise RuntimeError(f"{server.name}: preload {symbol} failed: {status} {reply[:300]!r}")
    return time.perf_counter() - started


def check_stats(server: Server, symbol: str, exponent: int, values: np.ndarray) -> None:
    status, reply = request(server, "GET", f"/stats/?symbol={symbol}&exponent={exponent}")
    if status != 200:
        raise RuntimeError(f"{server.name}: stats {symbol} failed: {status} {reply[:300]!r}")
    got = json.loads(reply)
    window = values[-(10**exponent) :]
    want = {
        "min": float(window.min()),
        "max": float(window.max()),
        "last": float(window[-1]),
        "avg": float(window.mean()),
        "var": float(window.var()),
    }
    for key, expected in want.items():
        if not math.isclose(got[key], expected, rel_tol=1e-9, abs_tol=0.0):
            raise RuntimeError(f"{server.name}: {symbol} {key} = {got[key]} != numpy {expected}")


# ----------------------------------------------------------------------------- wrk


def run_wrk(
    server: Server,
    test: str,
    path: str,
    connections: int,
    duration_s: float,
    core: int,
    round_no: int,
    script: Path | None = None,
) -> WrkResult:
    argv = ["taskset", "-c", str(core), "wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s"]
    argv += ["--latency", "--timeout", "30s"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(server.base + path)
    loadavg = os.getloadavg()[0]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    if server.proc is not None and server.proc.poll() is not None:
        tail = server.log_path.read_text()[-2000:] if server.log_path else ""
        raise RuntimeError(f"{server.name} died during {test}: {tail}")
    parsed = parse_wrk(done.stdout)
    return WrkResult(
        server=server.name,
        test=test,
        round=round_no,
        connections=connections,
        loadavg_1m=loadavg,
        command=shlex.join(argv),
        **parsed,
    )


def write_post_script(workdir: Path, decimals: int | None, seed: int) -> tuple[Path, int]:
    rng = np.random.default_rng(seed)
    values = rng.uniform(100.0, 200.0, POST_VALUES)
    if decimals is not None:
        values = np.round(values, decimals)
    body = workdir / "post_body.json"
    body.write_bytes(msgspec.json.encode({"symbol": POST_SYMBOL, "values": values.tolist()}))
    script = workdir / "post.lua"
    script.write_text(
        f'local f = assert(io.open("{body}", "rb"))\n'
        'wrk.method = "POST"\n'
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script, body.stat().st_size


def write_mixed_script(workdir: Path, n: int) -> Path:
    """wrk script alternating POST of 1 value to BENCH-n and GET /stats of BENCH-n.

    The store caches each symbol's stats per exponent until the next append, so a read-only
    /stats run measures that cache; this mix makes (about) every query recompute from the engine.
    """
    body = msgspec.json.encode({"symbol": f"BENCH-{n}", "values": [150.25]}).decode()
    script = workdir / f"mixed_{n}.lua"
    script.write_text(
        f"local body = '{body}'\n"
        f'local stats = "{stats_path(n)}"\n'
        'local headers = {["Content-Type"] = "application/json"}\n'
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        "  if i % 2 == 1 then\n"
        '    return wrk.format("POST", "/add_batch/", headers, body)\n'
        "  end\n"
        '  return wrk.format("GET", stats)\n'
        "end\n"
    )
    return script


# ----------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(results: list[WrkResult], servers: list[str], tests: list[str]) -> dict:
    by_key: dict[tuple[str, str], list[WrkResult]] = {}
    for r in results:
        by_key.setdefault((r.server, r.test), []).append(r)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for s in servers:
        summary[s] = {}
        for t in tests:
            runs = by_key.get((s, t), [])
            if not runs:
                continue
            entry = {
                "requests_per_s": median([r.requests_per_s for r in runs]),
                "p50_ms": median([r.p50_ms for r in runs]),
                "p99_ms": median([r.p99_ms for r in runs]),
                "errors": sum(r.non_2xx + r.socket_errors for r in runs),
                "runs": len(runs),
            }
            if t.startswith("post"):
                entry["values_per_s"] = entry["requests_per_s"] * POST_VALUES
            if t.startswith(("stats", "mixed")):
                ratios = []
                for r in runs:
                    health = [h for h in by_key.get((s, "health"), []) if h.round == r.round]
                    if health:
                        ratios.append(r.requests_per_s / health[0].requests_per_s)
                entry["ratio_to_health"] = median(ratios)
            summary[s][t] = entry
    return summary


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def verdicts(summary: dict, sizes: list[int]) -> list[str]:
    lines = []
    tree = summary.get("tree", {})
    for n in sizes:
        for kind, what in (("stats", "read-only GET /stats"), ("mixed", "1:1 append+stats mix")):
            entry = tree.get(f"{kind} N={n:.0e}")
            if not entry:
                continue
            ratio, p99 = entry["ratio_to_health"], entry["p99_ms"]
            ok = ratio >= TARGET_STATS_RATIO
            miss = f"MISSED by {TARGET_STATS_RATIO - ratio:.2f}"
            lines.append(
                f"- {what} at N={n:.0e}: ratio to /health {ratio:.2f} (target >= "
                f"{TARGET_STATS_RATIO}): {'met' if ok else miss}"
            )
            ok = p99 <= TARGET_STATS_P99_MS
            miss = f"MISSED by {p99 - TARGET_STATS_P99_MS:.2f} ms"
            lines.append(
                f"- {what} at N={n:.0e}: p99 {p99:.2f} ms (target <= {TARGET_STATS_P99_MS} ms): "
                f"{'met' if ok else miss}"
            )
    for test in ("post c64", "post c16"):
        entry = tree.get(test)
        if not entry:
            continue
        vps = entry["values_per_s"]
        ok = vps >= TARGET_POST_VALUES_PER_S
        miss = f"MISSED by {(1 - vps / TARGET_POST_VALUES_PER_S) * 100:.0f} %"
        lines.append(
            f"- POST /add_batch/ 10k values, {test[-3:]}: {vps / 1e6:.1f}M values/s (target >= "
            f"{TARGET_POST_VALUES_PER_S / 1e6:.0f}M/s): {'met' if ok else miss}"
        )
    return lines


def render_markdown(report: dict) -> str:
    m = report["machine"]
    cfg = report["config"]
    summary = report["summary"]
    sizes = cfg["sizes"]
    out = [
        "## REST benchmark (`benches/bench_rest.py`)",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- commit: {m['git_commit']}{' (+ uncommitted changes)' if m['git_dirty'] else ''}",
        f"- command: `{report['command']}`",
        f"- servers pinned to core {cfg['server_core']}, wrk pinned to core {cfg['client_core']}; "
        f"wrk -t1, {cfg['duration_s']:g} s per run, {cfg['rounds']} interleaved rounds, medians; "
        f"POST body {cfg['post_body_bytes']} bytes ({POST_VALUES} values, "
        f"{cfg['post_decimals'] if cfg['post_decimals'] is not None else 'full'} decimals)",
        "- tree = `hft-appliance serve` (numpy segment-tree engine); baseline = same app with "
        "`benches/baseline_engine.py` (flat array, np.min/max/mean/var over the window per query)",
        "",
        "| test | conns | tree req/s | tree p50 / p99 ms | baseline req/s | "
        "baseline p50 / p99 ms | tree / baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for test in report["tests"]:
        t = summary.get("tree", {}).get(test)
        b = summary.get("baseline", {}).get(test)
        if not t or not b:
            continue
        conns = cfg["post_connections"] if test == "post c16" else cfg["connections"]
        label = test
        if test.startswith("stats"):
            label = f"GET /stats {test[6:]} (k={cfg['exponents'][test]}), read-only"
        elif test.startswith("mixed"):
            k = cfg["exponents"]["stats" + test[5:]]
            label = f"1:1 POST 1 value + GET /stats {test[6:]} (k={k})"
        elif test == "health":
            label = "GET /health"
        else:
            label = "POST /add_batch/ 10k values"
        rate_t, rate_b = fmt_rate(t["requests_per_s"]), fmt_rate(b["requests_per_s"])
        if "values_per_s" in t:
            rate_t += f" ({fmt_rate(t['values_per_s'])} values/s)"
            rate_b += f" ({fmt_rate(b['values_per_s'])} values/s)"
        if "ratio_to_health" in t:
            rate_t += f"; {t['ratio_to_health']:.2f}x health"
            rate_b += f"; {b['ratio_to_health']:.3f}x health"
        speedup = t["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else math.inf
        out.append(
            f"| {label} | {conns} | {rate_t} | {t['p50_ms']:.2f} / {t['p99_ms']:.2f} | {rate_b} | "
            f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {speedup:.1f}x |"
        )
    errors = sum(e["errors"] for s in summary.values() for e in s.values())
    loads = sorted(r["loadavg_1m"] for r in report["runs"])
    out += ["", f"Non-2xx responses and socket errors over all runs: {errors}."]
    if loads:
        out.append(
            f"Load average (1 min) at the start of each run: min {loads[0]:.2f}, median "
            f"{median(loads):.2f}, max {loads[-1]:.2f} (about 1 = quiet for this benchmark: "
            "its own server or wrk; higher means other work shared the cores)."
        )
    out.append("")
    out += ["Targets (tree):", "", *verdicts(summary, sizes), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="REST benchmark: tree vs flat-array baseline (wrk).")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s runs, 1 round, small N")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="1e6,1e7", help="preloaded series sizes, comma-separated")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--post-connections", type=int, default=16)
    p.add_argument("--post-decimals", type=int, default=2, help="-1: full-precision floats")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--config", type=Path, default=None, help="default: ./Config.toml of the repo")
    p.add_argument("--json", type=Path, help="write the full report (every run) as JSON")
    p.add_argument("--markdown", type=Path, help="write the markdown table here too")
    p.add_argument("--seed", type=int, default=20261121)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 2.0, 1
        if args.sizes == "1e6,1e7":
            args.sizes = "1e5,1e6"
    return args


@contextlib.contextmanager
def running(servers: list[Server], core: int, config: Path | None) -> Iterator[None]:
    try:
        for s in servers:
            start_server(s, core, config)
        yield
    finally:
        for s in servers:
            rc = stop_server(s)
            if rc not in (0, None):
                print(f"warning: {s.name} exited with status {rc}", file=sys.stderr)


def make_servers(tmpdir: Path, cli: Path) -> list[Server]:
    servers = []
    baseline = [sys.executable, str(BENCHES / "serve_with_engine.py"), "--engine", "baseline"]
    for name, argv in (("tree", [str(cli), "serve"]), ("baseline", baseline)):
        workdir = tmpdir / name
        workdir.mkdir()
        # REST only: both servers run at once and would compete for the default ZeroMQ ports.
        env = {
            "APP_ENGINE__BACKEND": "cpu",
            "APP_TRANSPORT__ZMQ__ENABLED": "false",
            "APP_TRANSPORT__SHM__ENABLED": "false",
        }
        servers.append(Server(name, argv, free_port(), workdir, extra_env=env))
    return servers


def stats_path(n: int) -> str:
    return f"/stats?symbol=BENCH-{n}&exponent={exponent_for(n)}"


def wrk_target(
    test: str, args: argparse.Namespace, scripts: dict[str, Path]
) -> tuple[str, int, Path | None]:
    """(path, connections, lua script) of one test name."""
    if test == "health":
        return "/health", args.connections, None
    if test.startswith("stats"):
        return stats_path(int(float(test.split("=")[1]))), args.connections, None
    if test.startswith("mixed"):
        return "/", args.connections, scripts[test]
    conns = args.connections if test == "post c64" else args.post_connections
    return "/add_batch/", conns, scripts["post"]


def run_rounds(
    servers: list[Server], tests: list[str], args: argparse.Namespace, scripts: dict[str, Path]
) -> list[WrkResult]:
    """Every test on every server, back to back, for each round (server order alternates)."""
    results = []
    for round_no in range(1, args.rounds + 1):
        for test in tests:
            for s in servers if round_no % 2 else reversed(servers):
                path, conns, lua = wrk_target(test, args, scripts)
                r = run_wrk(s, test, path, conns, args.duration, args.client_core, round_no, lua)
                results.append(r)
                print(
                    f"round {round_no} {s.name:8s} {test:14s} c{conns:<3d} "
                    f"{r.requests_per_s:10.1f} req/s p50 {r.p50_ms:8.2f} ms "
                    f"p99 {r.p99_ms:8.2f} ms errors {r.non_2xx + r.socket_errors} "
                    f"load {r.loadavg_1m:.2f}",
                    file=sys.stderr,
                )
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool, package in (("wrk", "wrk"), ("taskset", "util-linux")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y {package}")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    config = args.config or (REPO / "Config.toml")
    config = config if config.is_file() else None
    decimals = None if args.post_decimals < 0 else args.post_decimals
    cli = Path(sys.executable).parent / "hft-appliance"
    if not cli.exists():
        sys.exit(f"{cli} not found: run ./dev.sh setup first")

    rng = np.random.default_rng(args.seed)
    data = {n: rng.uniform(100.0, 200.0, n) for n in sizes}
    exponents = {f"stats N={n:.0e}": exponent_for(n) for n in sizes}
    mixed = [f"mixed N={n:.0e}" for n in sizes]
    tests = ["health", *exponents, *mixed, "post c64", "post c16"]
    preload_s: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        tmpdir = Path(tmp)
        script, body_bytes = write_post_script(tmpdir, decimals, args.seed)
        scripts = {"post": script}
        scripts.update({f"mixed N={n:.0e}": write_mixed_script(tmpdir, n) for n in sizes})
        servers = make_servers(tmpdir, cli)
        with running(servers, args.server_core, config):
            for s in servers:
                preload_s[s.name] = {}
                for n, values in data.items():
                    symbol = f"BENCH-{n}"
                    preload_s[s.name][symbol] = round(preload(s, symbol, values), 3)
                    check_stats(s, symbol, exponent_for(n), values)
            print(f"preloaded and checked against numpy: {preload_s}", file=sys.stderr)
            results = run_rounds(servers, tests, args, scripts)

    command = [
        ".venv/bin/python",
        "benches/bench_rest.py",
        *(sys.argv[1:] if argv is None else argv),
    ]
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(command),
        "machine": machine_info(),
        "config": {
            "sizes": sizes,
            "exponents": exponents,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "post_connections": args.post_connections,
            "post_decimals": decimals,
            "post_body_bytes": body_bytes,
            "server_core": args.server_core,
            "client_core": args.client_core,
            "config_file": str(config) if config else "built-in defaults",
        },
        "preload_s": preload_s,
        "tests": tests,
        "summary": summarize(results, ["tree", "baseline"], tests),
        "runs": [asdict(r) for r in results],
    }
    markdown = render_markdown(report)
    print(markdown)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
