"""POST /stats/batch of 10k queries over 100 series (issue 13 item 2): in process and over HTTP.

Same-run measurements, for the numpy engine and the compiled `cpu` engine:

- in process: `Store.stats_many` (the list API), `Store.stats_columns` (the columnar path the
  endpoint uses), `Engine.stats_table` alone over the batch's distinct queries (the engine's
  share), the decoder (`decode_columns`), the store plus encoder (`answer_columns`), and the
  whole handler (decode + store + encode), each cold (every symbol appended to just before,
  outside the timing: nothing cached) and warm (every answer cached); yardstick:
  `msgspec.json.decode` of the body alone (a generic decode to Python objects);
- end to end: a real server (`python -m appliance.cli serve`, what `hft-appliance serve` runs;
  durability and transports off) pinned to CPU 0, this process as the client pinned to CPU 1,
  POSTing the ~330 KB body over one keep-alive connection (raw socket, reading the whole
  ~1 MB answer), median and p99 latency, warm and cold; yardsticks from the same client in
  the same run: GET /health on that server, and the same POST to a trivial echo server
  (asyncio, same CPU) that answers the very bytes the appliance answered.

    .venv/bin/python benches/bench_stats_batch.py             # full run (~2 min)
    .venv/bin/python benches/bench_stats_batch.py --quick     # smoke run
    .venv/bin/python benches/bench_stats_batch.py \
        --server-env MALLOC_MMAP_THRESHOLD_=33554432,MALLOC_TOP_PAD_=67108864

Each `--server-env` adds one more server run per engine with that environment (glibc malloc
settings, for instance: on a VM where page faults are dear, the server's fresh megabyte buffers
cost more than the batch itself; see benches/results/stats-batch-2026-12-05.md). The server's
CPU time and minor page faults per request are read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.stats_batch import StatsBatchDecoder, answer_columns  # noqa: E402
from appliance.store import Store  # noqa: E402
from engine_core import RetentionPolicy  # noqa: E402
from fallback import NumpyEngine  # noqa: E402
from fallback.compiled import CompiledEngine, prepare_kernels  # noqa: E402

QUERIES = 10_000
SYMBOLS = 100
EXPONENTS = range(1, 9)
SERVER_CPU, CLIENT_CPU = 0, 1


def machine() -> str:
    model = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} vCPU, Python {platform.python_version()}, "
        f"numpy {np.__version__}, msgspec {msgspec.__version__}"
    )


def the_batch(rng: np.random.Generator) -> tuple[list[str], list[tuple[str, int]], bytes]:
    names = [f"SYM{i:03d}" for i in range(SYMBOLS)]
    pairs = [(name, k) for name in names for k in EXPONENTS]
    queries = [pairs[i % len(pairs)] for i in range(QUERIES)]
    rng.shuffle(queries)
    body = msgspec.json.encode({"queries": [{"symbol": s, "exponent": k} for s, k in queries]})
    return names, queries, body


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def p99_ms(samples: list[float]) -> float:
    return float(np.percentile(samples, 99)) * 1e3


# -- in process -------------------------------------------------------------------------------


def bench_in_process(engine, values: int, repeats: int, rng) -> list[dict]:
    store = Store(engine, retention=RetentionPolicy(), max_symbols=1000, starting_capacity=values)
    names, queries, body = the_batch(rng)
    block = rng.uniform(100.0, 200.0, values)
    for name in names:
        store.ingest(name, block)
    decoder = StatsBatchDecoder(QUERIES)
    columns = decoder.decode_columns(body)
    tick = np.array([150.0])
    series = [store._entries[name].series for name in names]  # the engine's share, alone
    which = np.repeat(np.arange(SYMBOLS, dtype=np.int64), len(EXPONENTS))
    windows = np.tile(np.array([10**k for k in EXPONENTS], dtype=np.int64), SYMBOLS)

    def invalidate() -> None:
        for name in names:
            store.ingest(name, tick)

    cases = {
        "msgspec.json.decode (yardstick)": lambda: msgspec.json.decode(body),
        "decode_columns": lambda: decoder.decode_columns(body),
        "stats_many": lambda: store.stats_many(queries),
        "stats_columns": lambda: store.stats_columns(columns.symbols, columns.keys),
        "engine.stats_table (800 distinct)": lambda: engine.stats_table(series, which, windows),
        "answer_columns (store + encode)": lambda: answer_columns(store, columns),
        "handler (decode + store + encode)": lambda: answer_columns(
            store, decoder.decode_columns(body)
        ),
    }
    rows = []
    for cache in ("cold", "warm"):
        for label, fn in cases.items():
            samples = []
            for _ in range(repeats):
                if cache == "cold":
                    invalidate()
                else:
                    fn()
                started = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - started)
            rows.append(
                {
                    "engine": engine.name,
                    "cache": cache,
                    "case": label,
                    "median_ms": median_ms(samples),
                    "p99_ms": p99_ms(samples),
                }
            )
    return rows


# -- over HTTP --------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection over a raw socket: the least client work per request
    (http.client's line reader costs more than the server's encode at 1 MB answers)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        header, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in lines
            if line.lower().startswith(b"content-length")
        )
        chunks = [rest]
        have = len(rest)
        while have < length:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            chunks.append(chunk)
            have += len(chunk)
        data = b"".join(chunks)
        self.buffer = data[length:]
        return status, data[:length]

    def _read(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    argv: list[str], env: dict[str, str], port: int, workdir: Path, code: Path = REPO
) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1", **env}
    out = (workdir / f"server-{port}.out").open("wb")
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CPU), *argv],
        cwd=workdir,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited: {(workdir / f'server-{port}.out').read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not listen within 120 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_appliance(
    backend: str, port: int, workdir: Path, extra: dict[str, str], code: Path = REPO
) -> subprocess.Popen:
    env = {
        "APP_SERVER__HOST": "127.0.0.1",
        "APP_SERVER__PORT": str(port),
        "APP_ENGINE__BACKEND": backend,
        "APP_DURABILITY__ENABLED": "false",
        "APP_STORE__MAX_SYMBOLS": "1000",
        "APP_TRANSPORT__ZMQ__ENABLED": "false",
        "APP_TRANSPORT__SHM__ENABLED": "false",
        "APP_LOG__LEVEL": "warning",
        **extra,
    }
    return start([sys.executable, "-m", "appliance.cli", "serve"], env, port, workdir, code)


def timed(fn, repeats: int, before=None) -> list[float]:
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def bench_http(
    backend: str, values: int, repeats: int, rng, extra: dict[str, str], code: Path = REPO
) -> dict:
    names, _, body = the_batch(rng)
    block = rng.uniform(100.0, 200.0, values)
    workdir = Path(tempfile.mkdtemp(prefix="bench-stats-batch-"))
    port = free_port()
    proc = serve_appliance(backend, port, workdir, extra, code)
    try:
        client = Client(port)
        preload = msgspec.json.encode({"symbol": "X", "values": block.tolist()})
        for name in names:
            status, reply = client.request(
                "POST", "/add_batch/", preload.replace(b'"X"', f'"{name}"'.encode(), 1)
            )
            assert status == 200, reply[:300]
        status, answer = client.request("POST", "/stats/batch", body)
        assert status == 200, answer[:300]
        results = msgspec.json.decode(answer)["results"]
        assert len(results) == QUERIES and all("min" in r for r in results)
        ticks = [msgspec.json.encode({"symbol": name, "values": [150.0]}) for name in names]

        def invalidate() -> None:
            for tick in ticks:
                client.request("POST", "/add_batch/", tick)

        post = lambda: client.request("POST", "/stats/batch", body)  # noqa: E731
        for _ in range(20):  # warm up the server's allocator and caches
            post()
        faults, cpu_ticks = server_usage(proc.pid)
        warm = timed(post, repeats)
        faults_after, cpu_ticks_after = server_usage(proc.pid)
        cold = timed(post, max(repeats // 4, 5), invalidate)
        health = timed(lambda: client.request("GET", "/health"), repeats)
        client.close()
    finally:
        stop(proc)
    echo = bench_echo(body, answer, repeats, workdir)
    return {
        "engine": backend,
        "server_env": (" ".join(f"{k}={v}" for k, v in extra.items()) or "default")
        + ("" if code == REPO else f" (code of {code})"),
        "body_bytes": len(body),
        "answer_bytes": len(answer),
        "warm_median_ms": median_ms(warm),
        "warm_p99_ms": p99_ms(warm),
        "server_cpu_ms": (cpu_ticks_after - cpu_ticks) * 1e3 / os.sysconf("SC_CLK_TCK") / repeats,
        "server_faults": (faults_after - faults) / repeats,
        "cold_median_ms": median_ms(cold),
        "cold_p99_ms": p99_ms(cold),
        "health_median_ms": median_ms(health),
        "echo_median_ms": echo[0],
        "echo_p99_ms": echo[1],
    }


def server_usage(pid: int) -> tuple[int, int]:
    """(minor page faults, user + system CPU ticks) of a process so far (/proc/PID/stat): the
    server's own cost per request, apart from the client's and the scheduler's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[11]) + int(fields[12])


def bench_echo(body: bytes, answer: bytes, repeats: int, workdir: Path) -> tuple[float, float]:
    """The same client and body against a server that does nothing but read the request and
    send back `answer` (the transport's and the client's share of the latency)."""
    answer_file = workdir / "answer.bin"
    answer_file.write_bytes(answer)
    port = free_port()
    proc = start(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--echo-server",
            str(port),
            str(answer_file),
        ],
        {},
        port,
        workdir,
    )
    try:
        client = Client(port)
        post = lambda: client.request("POST", "/stats/batch", body)  # noqa: E731
        for _ in range(20):
            post()
        samples = timed(post, repeats)
        client.close()
    finally:
        stop(proc)
    return median_ms(samples), p99_ms(samples)


def echo_server(port: int, answer_path: str) -> None:
    answer = Path(answer_path).read_bytes()
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}"
        "\r\n\r\n"
    ).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                header = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = 0
            for line in header.split(b"\r\n"):
                if line.lower().startswith(b"content-length"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(head + answer)
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- report -----------------------------------------------------------------------------------


def print_report(in_process: list[dict], http: list[dict], args) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"machine: {machine()}\ndate: {now}\ncommand: {' '.join(sys.argv)}")
    print(f"case: {QUERIES} queries over {SYMBOLS} series x 8 exponents, {args.values} values each")
    print("\n| engine | cache | in process | median ms | p99 ms |\n|---|---|---|---|---|")
    for row in in_process:
        print(
            f"| {row['engine']} | {row['cache']} | {row['case']} | {row['median_ms']:.3f} | "
            f"{row['p99_ms']:.3f} |"
        )
    print(
        "\n| engine | server env | POST /stats/batch warm median / p99 ms | cold median / p99 ms"
        " | server CPU ms / request (warm) | server page faults / request (warm)"
        " | GET /health median ms | echo server median / p99 ms | warm / echo |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in http:
        print(
            f"| {row['engine']} | {row['server_env']} | {row['warm_median_ms']:.2f} / "
            f"{row['warm_p99_ms']:.2f} | {row['cold_median_ms']:.2f} / {row['cold_p99_ms']:.2f}"
            f" | {row['server_cpu_ms']:.2f} | {row['server_faults']:.0f}"
            f" | {row['health_median_ms']:.3f} | {row['echo_median_ms']:.2f} / "
            f"{row['echo_p99_ms']:.2f} | {row['warm_median_ms'] / row['echo_median_ms']:.2f}x |"
        )
    if http:
        print(f"\nbody {http[0]['body_bytes']} bytes, answer {http[0]['answer_bytes']} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--values", type=int, default=100_000, help="values per series")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="one more server run per engine with this environment (repeatable)",
    )
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="CHECKOUT",
        help="also serve the code of this checkout (the same run's before, default env only)",
    )
    parser.add_argument("--echo-server", nargs=2, metavar=("PORT", "ANSWER_FILE"))
    args = parser.parse_args()
    if args.echo_server:
        echo_server(int(args.echo_server[0]), args.echo_server[1])
        return
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {CLIENT_CPU})
    prepare_kernels()
    repeats = 11 if args.quick else 101
    rng = np.random.default_rng(13)
    in_process = []
    for engine in (NumpyEngine(), CompiledEngine()):
        in_process += bench_in_process(engine, args.values, repeats, rng)
    http = []
    if not args.no_http:
        variants = [{}] + [
            dict(item.split("=", 1) for item in group.split(",")) for group in args.server_env
        ]
        for backend in ("numpy", "cpu"):
            if args.before is not None:
                http.append(bench_http(backend, args.values, repeats, rng, {}, args.before))
            for extra in variants:
                http.append(bench_http(backend, args.values, repeats, rng, extra))
    print_report(in_process, http, args)


if __name__ == "__main__":
    main()
