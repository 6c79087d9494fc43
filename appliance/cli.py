"""The `hft-appliance` command line: `serve`, `publish`, `replay`, `fsck`, `archive`, `verify`,
`restore`, `audit verify`, and `--version`.

Why the socket is bound here, before Sanic starts: a port already in use, a bad config value or
an unavailable engine each become one line on stderr and exit status 2, instead of a traceback
from inside the server loop. The ingest transports' endpoints (ZeroMQ) are bound here too, right
after the REST socket and with the same one-line failure naming the endpoint; their threads start
in the app's `after_server_start` hook, before /ready turns 200. SIGINT/SIGTERM are handled by
Sanic (stop accepting, stop the transports, drain in-flight requests up to
`server.graceful_shutdown_s`), after which `serve` returns 0. With `[durability] enabled`, the
write-ahead log is replayed in that hook too, before the transports start (/ready is 503 until it
is done); a corrupt log stops the server and `serve` exits 2 with the one-line reason.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence

from appliance.config import AppConfig, ConfigError, load_config
from engine_core.contract import Engine

EXIT_OK = 0
EXIT_USAGE = 2
PROG = "hft-appliance"

log = logging.getLogger(__name__)


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def package_version() -> str:
    """The installed distribution's version (what `pip show hft-appliance` says).

    Why the metadata and not a constant: the version is declared once, in pyproject.toml, and
    installing (editable or not) records it. A source tree run without installing falls back to
    reading pyproject.toml beside the package, then to "unknown".
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROG)
    except PackageNotFoundError:
        pass
    import tomllib
    from pathlib import Path

    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as handle:
            return str(tomllib.load(handle)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def bind_listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """Bind and listen on host:port (IPv4 or IPv6); raises OSError with a readable cause."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(config_path: str | None, engine: Engine | None = None) -> int:
    """Load config, set up logging, pick the engine, bind, run until SIGINT/SIGTERM.

    `engine` replaces `[engine] backend`: benchmarks start a baseline engine on this exact path.
    """
    try:
        config: AppConfig = load_config(config_path)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")

    from appliance.engine import EngineUnavailableError, select_engine
    from appliance.logging_setup import setup_logging

    try:
        setup_logging(config.log)
    except OSError as exc:
        return _fail(f"config error: log.file: cannot open {config.log.file!r}: {exc.strerror}")
    if engine is None:
        try:
            engine = select_engine(config.engine.backend, config.engine.compile_cache_dir).engine
        except EngineUnavailableError as exc:
            log.error("engine unavailable", extra={"reason": str(exc)})
            return _fail(str(exc))

    host, port = config.server.host, config.server.port
    try:
        sock = bind_listen_socket(host, port)
    except OSError as exc:
        log.error("cannot listen", extra={"host": host, "port": port, "reason": str(exc)})
        return _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")

    from appliance.app import close_warm, create_app
    from appliance.audit_chain import AuditError
    from appliance.audit_log import open_audit
    from appliance.transports import Transports
    from transport.errors import TransportStartError

    try:  # before any producer: it writes the `start` record, and a damaged chain stops here
        audit = open_audit(config.audit, package_version())
    except (AuditError, OSError) as exc:
        sock.close()
        log.error("cannot open the audit log", extra={"reason": str(exc)})
        return _fail(f"audit log: {exc}")
    app = create_app(config, engine)
    app.ctx.audit = audit
    if config.durability.enabled:
        # Recovery runs in the app's after_server_start hook: the server already answers, with
        # /ready 503 until the replay ends; a corrupt log stops it and `serve` exits 2.
        from appliance.app import LogIngest

        app.ctx.recover_on_start = True
        # Transports ingest through the log's writer (same contract as the store).
        transports = Transports(config, LogIngest(app), audit)  # type: ignore[arg-type]
    else:
        transports = Transports(config, app.ctx.store, audit)
    try:
        transports.bind()
    except TransportStartError as exc:
        sock.close()
        audit.close()
        log.error("cannot start transports", extra={"reason": str(exc)})
        return _fail(str(exc))
    app.ctx.transports = transports
    log.info(
        "appliance starting",
        extra={
            "host": host,
            "port": port,
            "engine": getattr(engine, "name", type(engine).__name__),
            "max_symbols": config.store.max_symbols,
            "max_body_bytes": config.max_body_bytes,
            "zmq_endpoints": transports.zmq.bound_endpoints if transports.zmq else {},
        },
    )
    try:
        app.run(
            sock=sock,
            single_process=True,
            debug=False,
            auto_reload=False,
            access_log=config.log.access_log,
            motd=False,
        )
    finally:
        transports.stop()  # already stopped by the app's hook unless Sanic failed to start
        if app.ctx.durable is not None:
            app.ctx.durable.close()  # after every producer stopped: drains, fsyncs, checkpoints
        audit.close()  # after the log's writer: its commit callbacks report transport frames
        close_warm(app)  # then the warm tier finishes its queued seals
        sock.close()
    if app.ctx.start_error is not None:  # a corrupt log found by recovery: one line, status 2
        return _fail(app.ctx.start_error)
    return EXIT_OK


def fsck(config_path: str | None, repair: bool) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    from appliance.durability import fsck as wal_fsck
    from appliance.durability.wal import LogBusyError

    try:
        return wal_fsck.run(config.durability.dir, repair=repair, out=sys.stdout)
    except LogBusyError as exc:
        return _fail(f"{exc}: stop it first")


def _archive_command(args: argparse.Namespace) -> int:
    """`archive`, `verify` and `restore` (appliance.durability.archive and .restore)."""
    from pathlib import Path

    from appliance.durability import archive

    if args.command == "verify":
        return archive.run_verify(args.directory, sys.stdout)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    durability = config.durability
    if args.command == "restore":
        from appliance.durability.restore import run_restore

        return run_restore(args.source, durability.dir, durability.retain_days, sys.stdout)
    return archive.run_archive(Path(durability.dir) / "warm", args.to, sys.stdout)


def _audit_command(args: argparse.Namespace) -> int:
    """`audit verify [DIR | --config PATH]`: check the hash chain (appliance.audit_chain)."""
    from appliance.audit_chain import run_verify

    directory = args.directory
    if directory is None:
        try:
            directory = load_config(args.config).audit.dir
        except ConfigError as exc:
            return _fail(f"config error: {exc}")
    return run_verify(directory, sys.stdout)


def _add_audit_parser(commands: argparse._SubParsersAction) -> None:
    audit_parser = commands.add_parser("audit", help="the audit trail (docs/security.md)")
    actions = audit_parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify_parser = actions.add_parser(
        "verify",
        help="check the hash chain: exit 0 if intact, 1 naming the first record changed, "
        "missing or out of order",
    )
    where = verify_parser.add_mutually_exclusive_group()
    where.add_argument("directory", metavar="DIR", nargs="?", help="the audit directory")
    where.add_argument("--config", metavar="PATH", help="TOML config file ([audit] dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Low-latency market-data appliance (windowed statistics)."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="run the REST appliance")
    serve_parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: ./Config.toml if present, else built-in defaults); "
        "APP_<SECTION>__<KEY> environment variables override it",
    )
    fsck_parser = commands.add_parser(
        "fsck", help="check the write-ahead log under [durability] dir (exit 1 if damaged)"
    )
    fsck_parser.add_argument("--config", metavar="PATH", help="TOML config file")
    fsck_parser.add_argument(
        "--repair",
        action="store_true",
        help="keep every valid record, move bad bytes to DIR/quarantine/, trim torn tails",
    )
    archive_parser = commands.add_parser(
        "archive", help="copy sealed warm-tier segments to DIR with a manifest of sha256 sums"
    )
    archive_parser.add_argument("--to", metavar="DIR", required=True, help="archive directory")
    archive_parser.add_argument("--config", metavar="PATH", help="TOML config file")
    verify_parser = commands.add_parser(
        "verify", help="re-hash an archive against its manifest (exit 1 on any mismatch)"
    )
    verify_parser.add_argument("directory", metavar="DIR", help="a directory made by archive")
    restore_parser = commands.add_parser(
        "restore",
        help="verify an archive and rebuild [durability] dir's warm tier from it (the data "
        "directory must hold no file)",
    )
    restore_parser.add_argument(
        "--from", dest="source", metavar="DIR", required=True, help="a directory made by archive"
    )
    restore_parser.add_argument("--config", metavar="PATH", help="TOML config file")
    _add_audit_parser(commands)
    from appliance.publish_commands import add_commands

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.config)
    if args.command == "fsck":
        return fsck(args.config, args.repair)
    if args.command in ("archive", "verify", "restore"):
        return _archive_command(args)
    if args.command == "audit":
        return _audit_command(args)
    if args.command in ("publish", "replay"):
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return _fail(f"config error: {exc}")
        from appliance.publish_commands import run_publish, run_replay

        return run_publish(args, config) if args.command == "publish" else run_replay(args, config)
    return _fail(f"unknown command {args.command!r}")  # unreachable: argparse rejects it


if __name__ == "__main__":
    sys.exit(main())
