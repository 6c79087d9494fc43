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

With `server.tls_cert_file` and `server.tls_key_file` the REST API speaks HTTPS only
(`tls_context`): the files are read and matched here, before the socket is bound, so a missing,
unreadable, malformed or mismatched file is one line naming it and exit status 2. The server
runs with `AppHttpProtocol` (appliance.http_protocol), Sanic's own protocol with a fix that
answers a request line with an unparseable URL with the JSON 400.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from appliance.config import AppConfig, ConfigError, ServerConfig, load_config
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


class TlsFileError(Exception):
    """A TLS file cannot be used; the message is one line naming the key and the file."""


def _read_pem(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TlsFileError(f"server.{key}: cannot read {path!r}: {exc.strerror or exc}") from None


def _check_pem_files(server: ServerConfig) -> None:
    """Parse each file on its own, so an error names the file at fault.

    Why not leave it to `load_cert_chain`: OpenSSL's error for a bad certificate and for a bad
    key is the same "PEM lib", which names neither.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    checks = [("tls_cert_file", server.tls_cert_file, x509.load_pem_x509_certificates)]
    checks.append(("tls_key_file", server.tls_key_file, lambda d: load_pem_private_key(d, None)))
    if server.tls_client_ca_file:
        checks.append(
            ("tls_client_ca_file", server.tls_client_ca_file, x509.load_pem_x509_certificates)
        )
    for key, path, parse in checks:
        data = _read_pem(key, path)
        try:
            parse(data)
        except TypeError:  # the key is encrypted: we never ask for a passphrase
            raise TlsFileError(
                f"server.{key}: {path!r} is an encrypted private key; give an unencrypted one "
                "(readable by this user only)"
            ) from None
        except ValueError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TlsFileError(f"server.{key}: {path!r} is not valid PEM: {reason}") from None


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The server-side TLS context for `[server]`, or None for plain HTTP.

    TLS 1.2 or later with Python's default server ciphers (forward-secret AEAD suites), ALPN
    `http/1.1` (the only protocol served), no compression, no renegotiation. With
    `tls_client_ca_file`, a client certificate signed by one of its CAs is required. Raises
    TlsFileError (one line naming the file) for anything that would fail at the first handshake.
    """
    if not server.tls:
        return None
    _check_pem_files(server)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    except ssl.SSLError as exc:  # both parse: the key is not the certificate's
        raise TlsFileError(
            f"server.tls_key_file: {server.tls_key_file!r} does not match the certificate in "
            f"{server.tls_cert_file!r} ({exc.reason or exc})"
        ) from None
    if server.tls_client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=server.tls_client_ca_file)
    return context


def serve(config_path: str | None, engine: Engine | None = None) -> int:
    """Load config, set up logging, pick the engine, bind, run until SIGINT/SIGTERM.

    `engine` replaces `[engine] backend`: benchmarks start a baseline engine on this exact path.
    """
    try:
        config: AppConfig = load_config(config_path)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")

    from appliance.engine import EngineUnavailableError, select_configured_engine
    from appliance.logging_setup import setup_logging

    try:
        setup_logging(config.log)
    except OSError as exc:
        return _fail(f"config error: log.file: cannot open {config.log.file!r}: {exc.strerror}")
    from appliance.heap import tune_heap

    # Before anything large is allocated (the engine, the app): see appliance/heap.py.
    heap = tune_heap(
        config.server.heap_mmap_threshold_bytes, config.server.heap_trim_threshold_bytes
    )
    log.info("heap settings", extra={"heap": heap})
    try:  # before the engine (which may take seconds to load): a bad file fails at once
        tokens, tls, data_cipher = load_security(config)
    except StartRefused as exc:
        log.error("refusing to start", extra={"reason": str(exc)})
        return _fail(str(exc))
    if engine is None:
        try:
            engine = select_configured_engine(config.engine).engine
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
    from appliance.http_protocol import AppHttpProtocol
    from transport.errors import TransportStartError

    try:  # before any producer: it writes the `start` record, and a damaged chain stops here
        audit = open_audit(config.audit, package_version())
    except (AuditError, OSError) as exc:
        sock.close()
        log.error("cannot open the audit log", extra={"reason": str(exc)})
        return _fail(f"audit log: {exc}")
    # The audit trail also records REST writes, admin actions and denials (app.ctx.audit).
    app = create_app(config, engine, tokens=tokens, audit=audit)
    app.ctx.data_cipher = data_cipher  # encryption at rest: read by attach_durability
    transports = _make_transports(config, app, tokens, audit)
    try:
        transports.bind()
        app.ctx.live.bind_pub()  # transport.zmq.stats_pub_endpoint (live statistics)
    except TransportStartError as exc:
        transports.stop()
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
            "tls": tls is not None,
            "client_certificates": bool(config.server.tls_client_ca_file),
            "engine": getattr(engine, "name", type(engine).__name__),
            "max_symbols": config.store.max_symbols,
            "max_body_bytes": config.max_body_bytes,
            "zmq_endpoints": transports.zmq.bound_endpoints if transports.zmq else {},
            "stats_pub_endpoint": app.ctx.live.pub_bound,
        },
    )
    try:
        app.run(
            sock=sock,
            ssl=tls,
            protocol=AppHttpProtocol,
            single_process=True,
            debug=False,
            auto_reload=False,
            access_log=config.log.access_log,
            motd=False,
        )
    finally:
        transports.stop()  # already stopped by the app's hook unless Sanic failed to start
        app.ctx.live.close_pub()  # likewise (the app's hook closed it)
        if app.ctx.durable is not None:
            app.ctx.durable.close()  # after every producer stopped: drains, fsyncs, checkpoints
        audit.close()  # after the log's writer: its commit callbacks report transport frames
        close_warm(app)  # then the warm tier finishes its queued seals
        sock.close()
    if app.ctx.start_error is not None:  # a corrupt log found by recovery: one line, status 2
        return _fail(app.ctx.start_error)
    return EXIT_OK


def _make_transports(config: AppConfig, app: Any, tokens: Any, audit: Any) -> Any:
    """The binary transports, ingesting into the store, the write-ahead log's writer, or (in
    cluster mode) the partitions' owners."""
    from appliance.transports import Transports

    if config.durability.enabled:
        # Recovery runs in the app's after_server_start hook: the server already answers, with
        # /ready 503 until the replay ends; a corrupt log stops it and `serve` exits 2.
        from appliance.app import LogIngest

        app.ctx.recover_on_start = True
        # Transports ingest through the log's writer (same contract as the store).
        transports = Transports(config, LogIngest(app), tokens=tokens, audit=audit)  # type: ignore[arg-type]
    elif config.cluster.enabled:
        # Each batch goes to its partition's owner through the cluster, once it has joined.
        from appliance.app import ClusterIngestSlot

        app.ctx.cluster_ingest = ClusterIngestSlot(app.ctx.store)
        transports = Transports(config, app.ctx.cluster_ingest, tokens=tokens, audit=audit)  # type: ignore[arg-type]
    else:
        transports = Transports(config, app.ctx.store, tokens=tokens, audit=audit)
    return transports


class StartRefused(Exception):
    """The appliance must not start as configured; the message is the one line to print."""


def load_security(config: AppConfig) -> tuple[Any, Any, Any]:
    """(tokens, TLS context, data cipher; each None when off) for `serve`; raises
    StartRefused: serving unauthenticated beyond loopback, an unusable tokens file, unusable
    TLS files, an unusable data key file ([security] data_key_file: encryption at rest)."""
    from appliance.auth import Tokens, TokensFileError
    from appliance.durability.encryption import KeyFileError, load_cipher

    if config.cluster.enabled and config.durability.enabled:
        raise StartRefused(
            "config error: cluster.enabled and durability.enabled are both true: in cluster "
            "mode the replicated log is NATS JetStream, not the local write-ahead log; set "
            "durability.enabled = false (APP_DURABILITY__ENABLED=false)"
        )
    exposed = unauthenticated_exposure(config)
    if exposed:
        raise StartRefused(exposed)
    tokens = None
    if config.auth.mode == "token":
        try:
            tokens = Tokens.from_file(config.auth.tokens_file)
        except TokensFileError as exc:
            raise StartRefused(f"config error: auth.tokens_file: {exc}") from None
    try:
        tls = tls_context(config.server)
    except TlsFileError as exc:
        raise StartRefused(str(exc)) from None
    try:
        cipher = load_cipher(config.security.data_key_file)
    except KeyFileError as exc:
        raise StartRefused(f"config error: {exc}") from None
    return tokens, tls, cipher


def unauthenticated_exposure(config: AppConfig) -> str:
    """Why the appliance must not start: serving without authentication beyond loopback
    (SPEC section 9), unless `auth.allow_unauthenticated` says the operator means it; "" if
    it may. A host name counts as loopback only if every address it resolves to is."""
    if config.auth.mode != "off" or config.auth.allow_unauthenticated:
        return ""
    host = config.server.host
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        addresses = set()
    if addresses and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return ""
    return (
        f'server.host = {host!r} is not a loopback address and auth.mode = "off": anyone who '
        'reaches it could write and read every symbol. Set auth.mode = "token" with '
        "auth.tokens_file (docs/security.md), or auth.allow_unauthenticated = true if a "
        "network boundary you trust protects it"
    )


def token_new(name: str, role: str, symbols: Sequence[str]) -> int:
    """Print a fresh token once, and the tokens-file entry that admits it."""
    from appliance.auth import new_token, tokens_file_entry

    token = new_token()
    print(f"token (shown once; give it to {name!r}, keep it secret):\n{token}\n")
    print("add this entry to the tokens file (auth.tokens_file) and restart the appliance:\n")
    print(tokens_file_entry(name, token, role, symbols), end="")  # type: ignore[arg-type]
    return EXIT_OK


def fsck(config_path: str | None, repair: bool) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    from appliance.durability import fsck as wal_fsck
    from appliance.durability.encryption import DataKeyError, KeyFileError, load_cipher
    from appliance.durability.wal import LogBusyError

    try:
        cipher = load_cipher(config.security.data_key_file)
        return wal_fsck.run(config.durability.dir, repair=repair, out=sys.stdout, cipher=cipher)
    except LogBusyError as exc:
        return _fail(f"{exc}: stop it first")
    except KeyFileError as exc:
        return _fail(f"config error: {exc}")
    except DataKeyError as exc:
        return _fail(str(exc))


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
    from appliance.durability.encryption import DataKeyError, KeyFileError, load_cipher

    try:
        cipher = load_cipher(config.security.data_key_file)
    except KeyFileError as exc:
        return _fail(f"config error: {exc}")
    if args.command == "restore":
        from appliance.durability.restore import run_restore

        return run_restore(args.source, durability.dir, durability.retain_days, sys.stdout, cipher)
    try:
        return archive.run_archive(Path(durability.dir) / "warm", args.to, sys.stdout, cipher)
    except DataKeyError as exc:
        return _fail(str(exc))


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
    token_parser = commands.add_parser(
        "token", help="bearer tokens for auth.mode = token (docs/security.md)"
    )
    token_commands = token_parser.add_subparsers(dest="token_command", required=True)
    new_parser = token_commands.add_parser(
        "new", help="print a fresh random token once, and the tokens-file entry to add"
    )
    new_parser.add_argument("--name", required=True, help="shows in logs and the audit trail")
    new_parser.add_argument("--role", required=True, choices=["read", "write", "admin"])
    new_parser.add_argument(
        "--symbols",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="fnmatch patterns of the symbols it may touch (default: every symbol)",
    )
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
    cluster_parser = commands.add_parser("cluster", help="cluster mode on NATS (docs/cluster.md)")
    cluster_commands = cluster_parser.add_subparsers(dest="cluster_command", required=True)
    status_parser = cluster_commands.add_parser(
        "status", help="members, each partition's owner, applied sequence and lag"
    )
    status_parser.add_argument("--config", metavar="PATH", help="TOML config file ([cluster])")
    status_parser.add_argument("--json", action="store_true", help="print one JSON object")
    from appliance.publish_commands import add_commands

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.config)
    if args.command == "token":
        return token_new(args.name, args.role, args.symbols)
    if args.command == "fsck":
        return fsck(args.config, args.repair)
    if args.command in ("archive", "verify", "restore"):
        return _archive_command(args)
    if args.command == "audit":
        return _audit_command(args)
    if args.command == "cluster":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return _fail(f"config error: {exc}")
        from appliance.cluster.status import run_status

        return run_status(config.cluster, as_json=args.json)
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
