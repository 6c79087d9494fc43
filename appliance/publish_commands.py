"""`hft-appliance publish` and `hft-appliance replay`: push ticks from a shell or a CSV file.

Why in the appliance's CLI: an operator checking a deployment wants to push a few ticks over
the real binary path with the endpoints of the same Config.toml the server reads (the
`--config` file and `APP_*` variables give the defaults), not write a script.

Both commands flush before they report: the numbers printed are frames the appliance
acknowledged (zmq, shm), except with `zmq-push`, which has no acknowledgements.

Event times: `publish --timestamps T1,T2,...` (one per value) and a timestamp column in the
`replay` CSV (appliance.replay) travel in version-2 frames; each time is integer ns since the
epoch or ISO 8601 (appliance.timeparse). Without them the appliance stamps each batch with its
receive time.

`replay` and a bad row: without `--skip-bad-rows` it stops there with `FILE:LINE: reason`,
after applying (and flushing) every value of the lines before it and none after, so the
`--start-line LINE` the message suggests resumes the fixed file with nothing applied twice.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from appliance.config import AppConfig
from appliance.replay import BadRowError, Layout, ReplayError, RowProgress, read_batches
from appliance.timeparse import parse_time
from transport.control import ControlError
from transport.curve import CurveConfigError, CurveKeys
from transport.publisher import Publisher, PublishError
from transport.publishers import TRANSPORTS, connect

EXIT_OK = 0
EXIT_FAILED = 1


TOKEN_ENV = "HFT_TOKEN"


def add_transport_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="zmq",
        help="zmq: DEALER with acks (default); zmq-push: PUSH, no acks; shm: shared-memory ring; "
        "rdma: the ring written over RDMA verbs",
    )
    parser.add_argument(
        "--endpoint",
        help="ZeroMQ endpoint (default: transport.zmq.router_endpoint, or pull_endpoint for "
        "zmq-push, from the config)",
    )
    parser.add_argument(
        "--control-endpoint",
        help="control socket for shm and rdma (default: transport.zmq.control_endpoint)",
    )
    parser.add_argument(
        "--rdma-device",
        help="local RDMA device for rdma (default: transport.rdma.device, '' = the first)",
    )
    parser.add_argument(
        "--gid-index", type=int, help="GID index for rdma (default: transport.rdma.gid_index)"
    )
    parser.add_argument(
        "--publisher-id", type=int, help="64-bit publisher id (default: random per run)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for acks (default 30)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"token for the control socket (shm, rdma) when the appliance has auth on "
        f"(default: ${TOKEN_ENV}; prefer the variable: arguments are visible in ps)",
    )
    parser.add_argument(
        "--curve-server-key",
        metavar="PATH",
        help="the appliance's CURVE public certificate (server.key), when its sockets use CURVE",
    )
    parser.add_argument(
        "--curve-key",
        metavar="PATH",
        help="this client's CURVE secret certificate (.key_secret); with --curve-server-key",
    )


def curve_keys(args: argparse.Namespace) -> CurveKeys | None:
    """The CURVE keys of --curve-server-key / --curve-key (both or neither)."""
    if not args.curve_server_key and not args.curve_key:
        return None
    if not (args.curve_server_key and args.curve_key):
        raise PublishError("--curve-server-key and --curve-key go together")
    try:
        return CurveKeys.from_files(args.curve_server_key, args.curve_key)
    except CurveConfigError as exc:
        raise PublishError(str(exc)) from None


def open_publisher(args: argparse.Namespace, config: AppConfig) -> Publisher:
    zmq_config = config.transport.zmq
    default = (
        zmq_config.pull_endpoint if args.transport == "zmq-push" else zmq_config.router_endpoint
    )
    # A command is a one-shot publisher: its ring is released at the end, not left to count
    # against the appliance's transport.shm.max_rings (or rdma.max_rings).
    options: dict[str, object] = {"curve": curve_keys(args)}
    if args.transport in ("shm", "rdma"):
        options["release_on_close"] = True
        options["token"] = args.token
    if args.transport == "rdma":
        rdma = config.transport.rdma
        options["device"] = rdma.device if args.rdma_device is None else args.rdma_device
        options["gid_index"] = rdma.gid_index if args.gid_index is None else args.gid_index
        options["port"] = rdma.port
    return connect(
        args.transport,
        endpoint=args.endpoint or default,
        control_endpoint=args.control_endpoint or zmq_config.control_endpoint,
        publisher_id=args.publisher_id,
        **options,
    )


@dataclass
class Summary:
    """What a run sent, for the closing line."""

    values: int = 0
    frames: int = 0
    batches: int = 0
    seconds: float = 0.0
    acked: bool = True  # False for zmq-push: "sent", never known to be applied

    def line(self, what: str) -> str:
        rate = self.values / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{what}: {self.values} values in {self.batches} batches ({self.frames} frames) "
            f"in {self.seconds:.3f} s: {rate:,.0f} values/s, "
            f"{self.frames / self.seconds if self.seconds > 0 else float('inf'):,.0f} frames/s"
        )


def read_values(tokens: list[str], stdin: TextIO) -> np.ndarray:
    """Values from the command line, or whitespace/comma-separated from stdin for `-`."""
    if tokens == ["-"]:
        tokens = stdin.read().replace(",", " ").split()
    try:
        return np.array([float(token) for token in tokens], dtype=np.float64)
    except ValueError as exc:
        raise ReplayError(f"not a number: {exc}") from None


def read_timestamps(text: str | None, count: int) -> np.ndarray | None:
    """`--timestamps`: comma or whitespace separated times, one per value (None without)."""
    if text is None:
        return None
    cells = text.replace(",", " ").split()
    if len(cells) != count:
        raise ReplayError(f"--timestamps has {len(cells)} times for {count} values: one per value")
    times = []
    for number, cell in enumerate(cells, start=1):
        try:
            value = parse_time(cell, f"--timestamps: time {number} ({cell!r})")
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        if not 0 <= value < 1 << 63:
            raise ReplayError(f"--timestamps: time {number} ({cell!r}) is not in 1970..2262")
        times.append(value)
    return np.array(times, dtype=np.int64)


@contextmanager
def _reporting(command: str) -> Iterator[None]:
    """Turn the expected failures into one line on stderr (raised as SystemExit(1))."""
    try:
        yield
    except (PublishError, ControlError, ReplayError, ValueError, OSError) as exc:
        print(f"hft-appliance {command}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_FAILED) from None


def run_publish(args: argparse.Namespace, config: AppConfig, stdin: TextIO = sys.stdin) -> int:
    with _reporting("publish"):
        values = read_values(args.values, stdin)
        timestamps = read_timestamps(args.timestamps, values.shape[0])
        started = time.perf_counter()
        with open_publisher(args, config) as publisher:
            last = publisher.publish(args.symbol, values, timestamps)
            publisher.flush(args.timeout)
            frames = publisher.frames_sent
        summary = Summary(values.shape[0], frames, 1, time.perf_counter() - started)
        print(f"{summary.line(f'published {args.symbol!r}')}; last sequence {last}")
    return EXIT_OK


def _progress(lines: Iterable[str], total_bytes: int, enabled: bool) -> Iterator[str]:
    """Yield lines while advancing a tqdm bar by their size (bytes read is the honest unit)."""
    from tqdm import tqdm

    with tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="replay", disable=not enabled,
        file=sys.stderr, mininterval=0.25,
    ) as bar:  # fmt: skip
        for line in lines:
            bar.update(len(line))
            yield line


def _say(command: str, message: str) -> None:
    print(f"hft-appliance {command}: {message}", file=sys.stderr, flush=True)


def _stopped_line(name: str, error: BadRowError, summary: Summary, progress: RowProgress) -> str:
    """What a bad row stopped, what was applied, and the exact flags to go on."""
    acked = "sent (zmq-push: no acknowledgements)" if summary.acked is False else "applied"
    last = f"last line applied: {progress.last_line}" if progress.last_line else "none"
    return (
        f"{name}:{error.line}: {error.reason}; stopped there: {summary.values} values from the "
        f"lines before it {acked} ({last}), nothing from line {error.line} on. Fix the row and "
        f"resume with --start-line {error.line}, or skip it with --start-line {error.line + 1}, "
        "or rerun with --skip-bad-rows"
    )


def run_replay(args: argparse.Namespace, config: AppConfig) -> int:
    path = Path(args.file)
    skipped: list[int] = []

    def skip(error: BadRowError) -> None:
        skipped.append(error.line)
        _say("replay", f"{path.name}:{error.line}: {error.reason} (row skipped)")

    with _reporting("replay"):
        summary = Summary(acked=args.transport != "zmq-push")
        progress = RowProgress()
        layout: Layout = args.layout
        started = time.perf_counter()
        with path.open(encoding="utf-8", newline="") as handle, open_publisher(
            args, config
        ) as publisher:  # fmt: skip
            lines = _progress(handle, path.stat().st_size, not args.quiet)
            batches = read_batches(
                lines, batch=args.batch, layout=layout, start_line=args.start_line,
                skip_bad_rows=args.skip_bad_rows, on_skip=skip, progress=progress,
                timestamp_column="" if args.no_timestamps else args.timestamp_column,
            )  # fmt: skip
            try:
                for symbol, values, timestamps in batches:
                    publisher.publish(symbol, values, timestamps)
                    summary.values += values.shape[0]
                    summary.batches += 1
            except BadRowError as error:
                publisher.flush(args.timeout)  # "applied" below means acknowledged
                _say("replay", _stopped_line(path.name, error, summary, progress))
                return EXIT_FAILED
            publisher.flush(args.timeout)
            summary.frames = publisher.frames_sent
        summary.seconds = time.perf_counter() - started
        line = summary.line(f"replayed {path.name}")
        if args.start_line > 1:
            line += f"; started at line {args.start_line}"
        if skipped:
            shown = ", ".join(map(str, skipped[:20])) + (", ..." if len(skipped) > 20 else "")
            line += f"; {len(skipped)} bad rows skipped (lines {shown})"
        print(line)
    return EXIT_OK


def _line_number(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"a line number is >= 1, got {number}")
    return number


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `publish` and `replay` on the CLI's subcommand parser."""
    publish = commands.add_parser(
        "publish", help="publish values for one symbol over a binary transport"
    )
    add_transport_arguments(publish)
    publish.add_argument("symbol", help="the symbol (1..64 UTF-8 bytes)")
    publish.add_argument("values", nargs="+", help="values, or - to read them from stdin")
    publish.add_argument(
        "--timestamps", metavar="TIMES",
        help="event times, one per value, comma or space separated: integer ns since the "
        "epoch or ISO 8601 (default: the appliance's receive time)",
    )  # fmt: skip

    replay = commands.add_parser(
        "replay", help="publish a CSV file (symbol,value rows or one column per symbol)"
    )
    add_transport_arguments(replay)
    replay.add_argument("file", help="CSV file")
    replay.add_argument(
        "--layout", choices=("auto", "long", "wide"), default="auto",
        help="long: symbol,value rows; wide: a header of symbols (default: detect)",
    )  # fmt: skip
    replay.add_argument(
        "--batch", type=int, default=10_000, help="values per batch and symbol (default 10000)"
    )
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    replay.add_argument(
        "--timestamp-column", metavar="NAME",
        help="the header column holding event times (integer ns since the epoch or ISO 8601); "
        "default: a column named timestamp or ts, if any",
    )  # fmt: skip
    replay.add_argument(
        "--no-timestamps", action="store_true",
        help="read no timestamp column (a wide file's 'timestamp' or 'ts' column is then a "
        "symbol); the appliance stamps each batch with its receive time",
    )  # fmt: skip
    replay.add_argument(
        "--start-line", type=_line_number, default=1, metavar="N",
        help="skip the rows before line N (the header is still read): resumes a replay that "
        "stopped at a bad row, as its message says (default 1)",
    )  # fmt: skip
    replay.add_argument(
        "--skip-bad-rows", action="store_true",
        help="leave out malformed rows (each one is reported on stderr, and their count at "
        "the end) instead of stopping at the first",
    )  # fmt: skip
    for sub in (publish, replay):
        sub.add_argument("--config", metavar="PATH", help="config file for default endpoints")
