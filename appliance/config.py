"""Typed, frozen configuration: Config.toml, then `APP_<SECTION>__<KEY>` environment overrides.

Why msgspec Structs: one declaration gives the defaults, the types, the bounds and the error text;
`forbid_unknown_fields` turns a typo in a key into a startup error instead of a silently ignored
setting. Every failure is a `ConfigError` whose message is one line naming the key
(`store.max_symbols: ...`), which the CLI prints before exiting with status 2.

Precedence (lowest to highest): built-in defaults (equal to the shipped Config.toml), the file,
the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta, Struct

ENV_PREFIX = "APP_"
DEFAULT_CONFIG_FILE = "Config.toml"

# Worst-case bytes one JSON value occupies in a POST body ("1.2345678901234567e-300, " is 25),
# rounded up; used when `server.max_body_bytes` is 0 (derived from `store.max_batch_size`).
# A value and its timestamp as JSON, with margin: "1.7976931348623157e+308," is 24 bytes and
# "9223372036854775807," 20.
BODY_BYTES_PER_VALUE = 48
BODY_BYTES_OVERHEAD = 64 * 1024

Port = Annotated[int, Meta(ge=1, le=65535)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Host = Annotated[str, Meta(min_length=1)]
ShutdownSeconds = Annotated[float, Meta(gt=0, le=3600)]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
Backend = Literal["auto", "cpu", "numpy", "gpu"]
Placement = Literal["hybrid", "device"]
# ZeroMQ endpoints the appliance binds: TCP or IPC (inproc is meaningless across processes).
Endpoint = Annotated[str, Meta(pattern=r"^(tcp|ipc)://.+")]
OptionalEndpoint = Annotated[str, Meta(pattern=r"^((tcp|ipc)://.+)?$")]
ConnectEndpoint = Annotated[str, Meta(pattern=r"^(tcp|ipc|pgm|epgm)://.+")]
PowerOfTwo = Annotated[int, Meta(ge=2, le=1 << 24)]
SlotBytes = Annotated[int, Meta(ge=256, le=1 << 30, multiple_of=64)]


class ConfigError(Exception):
    """A configuration value is unusable; the message is one line that names the key."""


class _Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base for every section: immutable, and unknown keys are errors, not silently ignored."""


class ServerConfig(_Section):
    """[server]: where the REST API listens and how it bounds request bodies and shutdown."""

    host: Host = "127.0.0.1"
    port: Port = 8080
    # 0 = derived: BODY_BYTES_PER_VALUE * store.max_batch_size + BODY_BYTES_OVERHEAD.
    max_body_bytes: NonNegativeInt = 0
    # Most queries in one POST /stats/batch (413 batch_too_large above it).
    max_stats_queries: PositiveInt = 10_000
    graceful_shutdown_s: ShutdownSeconds = 15.0
    # A data request that arrives while the appliance starts (log replay) waits at most this
    # long for it to turn ready, then answers 503 not_ready; 0 = answer 503 at once.
    wait_for_ready_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    # TLS for the REST API: PEM certificate (chain) and private key, both or neither ("" = plain
    # HTTP). Read and matched at start; an unreadable or mismatched file exits with status 2.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # PEM CA bundle: when set, every client must present a certificate signed by one of these
    # CAs (mutual TLS); "" = any client may connect. Needs tls_cert_file and tls_key_file.
    tls_client_ca_file: str = ""
    # glibc heap settings applied at start (appliance/heap.py: request-sized buffers stay in the
    # heap, warm, instead of a fresh mmap per request); 0 = glibc's own setting. mallopt takes
    # an int: at most 2**31 - 1.
    heap_mmap_threshold_bytes: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 4 * 1024 * 1024
    heap_trim_threshold_bytes: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "tls_key_file" if self.tls_cert_file else "tls_cert_file"
            present = "tls_cert_file" if self.tls_cert_file else "tls_key_file"
            raise ValueError(f"server.{missing}: required when server.{present} is set")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError(
                "server.tls_cert_file: required when server.tls_client_ca_file is set "
                "(client certificates are only asked for over TLS)"
            )

    @property
    def tls(self) -> bool:
        """True when the REST API speaks HTTPS (a certificate and key are configured)."""
        return bool(self.tls_cert_file)


class StoreConfig(_Section):
    """[store]: SPEC section 4, the hot-tier bounds of every series and of the symbol registry."""

    max_data_retention: PositiveInt = 150_000_000
    cleanup_keep_count: NonNegativeInt = 100_000_000
    max_symbols: PositiveInt = 10
    starting_capacity: PositiveInt = 1_000_000
    max_batch_size: PositiveInt = 1_000_000
    # A batch whose timestamps go backwards: "reject" refuses it whole (400 out_of_order, nack
    # OUT_OF_ORDER); "clamp" stores each value that goes back at the previous timestamp and
    # counts it (appliance.timestamps).
    out_of_order: Literal["reject", "clamp"] = "reject"

    def __post_init__(self) -> None:
        if self.cleanup_keep_count > self.max_data_retention:
            raise ValueError(
                f"store.cleanup_keep_count ({self.cleanup_keep_count}) must be <= "
                f"store.max_data_retention ({self.max_data_retention})"
            )


class LogConfig(_Section):
    """[log]: JSON-lines logging to stdout and a rotated file ("" disables the file)."""

    level: LogLevel = "info"
    file: str = "logs/app.log"
    access_log: bool = False
    # The file also rotates when it would grow past this many bytes (0 = daily only).
    max_file_bytes: NonNegativeInt = 100 << 20
    # Rotated files kept, daily and size rotations together (0 = keep every one).
    backup_count: NonNegativeInt = 14
    # Warning and error lines let through per second for each (logger, message) pair; the rest
    # are dropped and counted, and the next line let through carries `"suppressed": n`. Bounds
    # the log a client can cause with bad requests (0 = no limit).
    max_errors_per_s: NonNegativeInt = 10


class EngineConfig(_Section):
    """[engine]: which statistics engine backs the store (see appliance.engine)."""

    backend: Backend = "auto"
    # Where numba keeps the compiled CPU kernels ("" = numba's default: the package's
    # __pycache__ if writable, else the user's cache directory). Unwritable: compiled in memory.
    compile_cache_dir: str = ""
    # With a GPU (backend "gpu", or "auto" when one loads): "hybrid" answers appends and single
    # queries on the compiled CPU tree, large query batches on a device mirror, and bars and
    # rolling statistics over long histories on the device (on the values read for them);
    # "device" puts everything on the GPU (the plain CuPy engine).
    placement: Placement = "hybrid"
    # Hybrid: a batch goes to the device when the engine receives at least this many DISTINCT
    # queries, smaller ones go to the host. What the engine receives is the store's distinct
    # cache misses, (symbol, window) pairs, at most 8 count windows per symbol: not the number
    # of queries in the request. 512 is a reasoned default, not a measured crossover
    # (benches/bench_gpu.py measures it, over distinct pairs).
    gpu_batch_min_queries: PositiveInt = 512
    # Hybrid: bars and rolling statistics over at least this many values go to the device,
    # shorter histories to the host. 1e6 is reasoned, not measured (gpu_kernels.hybrid).
    gpu_history_min_values: PositiveInt = 1_000_000


SyncPolicy = Literal["always", "interval", "never"]


class DurabilityConfig(_Section):
    """[durability]: SPEC section 8, write-ahead log, checkpoints and the warm tier."""

    enabled: bool = True
    # Data directory (relative to the working directory): wal/, checkpoints/, warm/.
    dir: str = "data"
    # always: acks wait for the fsync that covers them (group commit); interval: acks once
    # written to the OS, fsync every interval_ms (a power loss loses at most that window);
    # never: no fsync (the OS flushes when it likes).
    sync: SyncPolicy = "interval"
    interval_ms: PositiveInt = 5
    # A log segment is sealed and a new one started past this size.
    segment_bytes: Annotated[int, Meta(ge=1 << 16)] = 64 << 20
    # Hot-tier checkpoint every this many seconds (0 = only at shutdown); bounds replay time.
    checkpoint_interval_s: NonNegativeInt = 300
    # Values per sealed warm-tier segment (per symbol, compressed, with a summary).
    warm_segment_values: PositiveInt = 1_000_000
    # Delete warm segments older than this many days (0 = keep everything forever).
    retain_days: NonNegativeInt = 0


class SecurityConfig(_Section):
    """[security]: SPEC section 9 (docs/security.md)."""

    # Encryption at rest (AES-256-GCM) of the write-ahead log, checkpoints, warm segments and
    # archives: a file of exactly 32 raw bytes, mode 0600 (or stricter). "" = off. Checked at
    # start (a bad file is a config error; a key that does not fit the data: exit 2).
    data_key_file: str = ""


class MetricsConfig(_Section):
    """[metrics]: Prometheus metrics at GET /metrics (docs/metrics.md)."""

    # false: no /metrics route (404 not_found) and no per-request timing at all.
    enabled: bool = True


class StreamConfig(_Section):
    """[stream]: live statistics pushed to clients (GET /stream, the stats PUB socket)."""

    # Most events per symbol per second on each stream: batches in between coalesce (the
    # newest state wins).
    max_rate_hz: Annotated[float, Meta(gt=0, le=1000)] = 10.0
    # Events queued per SSE client; a client that falls this far behind is dropped with a
    # final event, never slowing ingest or other clients.
    queue_events: PositiveInt = 256
    # Most concurrent GET /stream clients (429 rate_limited above it).
    max_clients: PositiveInt = 64
    # A comment line sent on an idle stream this often, so proxies keep it open.
    heartbeat_s: Annotated[float, Meta(gt=0, le=3600)] = 15.0
    # The window of the PUB socket's events: the last 10**pub_exponent values.
    pub_exponent: Annotated[int, Meta(ge=1, le=8)] = 3


class HistoryConfig(_Section):
    """[history]: bounds of history answers (GET /history/bars, GET /history/rolling)."""

    # Most bars in one GET /history/bars answer (413 batch_too_large above it).
    max_bars: PositiveInt = 100_000
    # Most output positions in one GET /history/rolling answer (413 above it; the JSON of
    # one position is about 100 bytes).
    max_rolling_positions: PositiveInt = 1_000_000
    # Most values [start, end) one GET /history/rolling may read (413 above it): they are
    # gathered into one float64 array, 8 bytes each (20M = 160 MB).
    max_rolling_values: PositiveInt = 20_000_000


AuthMode = Literal["off", "token"]


class AuthConfig(_Section):
    """[auth]: bearer tokens with roles and symbol patterns (docs/security.md)."""

    # "off": no authentication (refused on a non-loopback server.host unless
    # allow_unauthenticated); "token": every request but the probes needs a token.
    mode: AuthMode = "off"
    # TOML file of [[tokens]] entries (name, sha256, role, symbols), read at start.
    tokens_file: str = ""
    # true: the operator means to serve without authentication on a non-loopback address.
    allow_unauthenticated: bool = False
    # Per-token rate limits when its entry sets none (0 = unlimited): 429 rate_limited above.
    default_max_requests_per_s: Annotated[float, Meta(ge=0)] = 0.0
    default_max_values_per_s: Annotated[float, Meta(ge=0)] = 0.0

    def __post_init__(self) -> None:
        if self.mode == "token" and not self.tokens_file:
            raise ValueError('auth.tokens_file: required with auth.mode = "token"')


class AuditConfig(_Section):
    """[audit]: the hash-chained audit trail of writes, admin actions and denials
    (docs/security.md, "Audit trail")."""

    enabled: bool = False
    # Directory of audit-NNNNNN.jsonl files and anchor.json (relative to the working directory).
    dir: str = "data/audit"
    # A new file is started past this size; the chain runs on across files.
    max_file_bytes: Annotated[int, Meta(ge=4096)] = 64 << 20
    # fsync (and anchor.json rewrite) period; a power loss loses at most this window.
    fsync_interval_ms: PositiveInt = 1000
    # Denials written one by one per (who, where, code) per second; the rest become one
    # counted record at the end of the second.
    max_denied_per_s: PositiveInt = 1
    # Most records queued for the writer thread; past it calls are counted and reported in
    # one "dropped" record instead of blocking ingest.
    queue_records: PositiveInt = 100_000


class ZmqConfig(_Section):
    """[transport.zmq]: ZeroMQ ingest (SPEC section 7). An empty endpoint disables that socket."""

    enabled: bool = True
    # DEALER publishers, acked frame by frame.
    router_endpoint: Endpoint = "tcp://127.0.0.1:5555"
    # PUSH publishers, fire-and-forget; back-pressure through the high-water mark.
    pull_endpoint: OptionalEndpoint = "tcp://127.0.0.1:5556"
    # REP socket for control requests (shared-memory rings, later RDMA queue pairs).
    control_endpoint: OptionalEndpoint = "tcp://127.0.0.1:5557"
    # External PUB endpoints to SUB-connect to (all topics).
    sub_connect: tuple[ConnectEndpoint, ...] = ()
    # Messages queued per socket before senders block (DEALER, PUSH) or PUB drops.
    rcvhwm: PositiveInt = 10_000
    # Most messages handled per poll wakeup before the loop yields to other sockets.
    batch_messages: PositiveInt = 256
    # Largest message part a ROUTER, PULL or SUB socket accepts (ZMQ_MAXMSGSIZE: a peer that
    # declares more is disconnected before anything is allocated); 0 = derived from
    # store.max_batch_size (one full frame plus 1 MiB for coalesced frames).
    max_message_bytes: NonNegativeInt = 0
    # CURVE (docs/security.md): the server's pyzmq certificate (`.key_secret`) and a TOML file
    # of the client public keys it admits ([[clients]] name, public_key). Both or neither;
    # with them the ROUTER, PULL and control sockets refuse clients without a listed key.
    curve_secret_key_file: str = ""
    curve_clients_file: str = ""
    # PUB socket of live statistics (the events of GET /stream, topic = symbol, window
    # stream.pub_exponent); "" = off.
    stats_pub_endpoint: OptionalEndpoint = ""

    def __post_init__(self) -> None:
        if bool(self.curve_secret_key_file) != bool(self.curve_clients_file):
            raise ValueError(
                "transport.zmq.curve_secret_key_file and curve_clients_file: set both or neither"
            )


class ShmConfig(_Section):
    """[transport.shm]: shared-memory rings, one per publisher, created over the control socket."""

    enabled: bool = True
    # Default and largest ring a publisher may ask for.
    slots: PowerOfTwo = 1024
    slot_bytes: SlotBytes = 65_536
    max_slots: PowerOfTwo = 65_536
    max_slot_bytes: SlotBytes = 1 << 20
    # Most rings at once (one per publisher).
    max_rings: PositiveInt = 64
    # The poller busy-polls this long after the last frame, then blocks on the rings' doorbell
    # (a publisher wakes it) for pauses doubling up to backoff_max_us.
    spin_us: NonNegativeInt = 200
    backoff_max_us: PositiveInt = 1_000
    # A ring with no frame and no shm.open for this long is reclaimed (0: never), unless its
    # publisher still holds the ring's lock (alive and attached). The ring of a publisher that
    # has verifiably gone is reclaimed within seconds whatever this says.
    idle_reclaim_s: NonNegativeInt = 600
    # With [auth] mode = "token": most rings one token holds at once (0 = only max_rings).
    max_rings_per_token: NonNegativeInt = 0


class RdmaConfig(_Section):
    """[transport.rdma]: RDMA verbs ingest: false, true (when a device exists), "required".

    Rings are created over the ZeroMQ control socket, like shared-memory rings, and each is
    registered with the device; a publisher's slot count is also its receive-queue depth.
    """

    enabled: bool | Literal["required"] = False
    # RDMA device ("" = the first one), its port, and the GID index (1 = the IPv4-mapped GID on
    # Soft-RoCE; on other NICs see `show_gids` or `ibv_devinfo -v`).
    device: str = ""
    port: PositiveInt = 1
    gid_index: NonNegativeInt = 1
    slots: PowerOfTwo = 256
    slot_bytes: SlotBytes = 65_536
    max_slots: PowerOfTwo = 4096
    max_slot_bytes: SlotBytes = 1 << 20
    max_rings: PositiveInt = 16
    # Most bytes of all RDMA rings together: registered memory is pinned (locked) in RAM.
    max_total_bytes: PositiveInt = 1 << 30
    spin_us: NonNegativeInt = 200
    backoff_max_us: PositiveInt = 1_000
    # With [auth] mode = "token": most RDMA rings one token holds at once (0 = only max_rings).
    max_rings_per_token: NonNegativeInt = 0


class TransportConfig(_Section):
    """[transport.*]: the binary ingest paths; all end in the same store call as REST."""

    zmq: ZmqConfig = msgspec.field(default_factory=ZmqConfig)
    shm: ShmConfig = msgspec.field(default_factory=ShmConfig)
    rdma: RdmaConfig = msgspec.field(default_factory=RdmaConfig)

    @property
    def shm_active(self) -> bool:
        """Shared memory runs only with a control socket to create rings over; without one it
        is off (with a warning at start), so `APP_TRANSPORT__ZMQ__ENABLED=false` alone works."""
        return self.shm.enabled and self.zmq.enabled and bool(self.zmq.control_endpoint)

    @property
    def rdma_control(self) -> bool:
        """RDMA queue pairs are negotiated over the control socket, as shared-memory rings."""
        return self.zmq.enabled and bool(self.zmq.control_endpoint)

    def __post_init__(self) -> None:
        for section, ring in (("shm", self.shm), ("rdma", self.rdma)):
            for name in ("slots", "max_slots"):  # the ring indexes slots with a mask
                value = getattr(ring, name)
                if value & (value - 1):
                    raise ValueError(
                        f"transport.{section}.{name} must be a power of two, got {value}"
                    )
            if ring.slots > ring.max_slots or ring.slot_bytes > ring.max_slot_bytes:
                raise ValueError(
                    f"transport.{section}.slots / slot_bytes must be <= transport.{section}."
                    "max_slots / max_slot_bytes"
                )


NodeId = Annotated[str, Meta(pattern=r"^([A-Za-z0-9_-]{1,64})?$")]
NatsUrl = Annotated[str, Meta(pattern=r"^(nats|tls|ws|wss)://.+")]


class ClusterConfig(_Section):
    """[cluster]: symbol-partitioned cluster mode on NATS JetStream (docs/cluster.md).

    Off by default: nothing imports nats. On, the replicated log is JetStream, not the local
    write-ahead log, so `[durability] enabled` must be false (the CLI refuses both, exit 2).
    """

    enabled: bool = False
    # This node's name in the cluster (KV keys, owners); required when enabled.
    node_id: NodeId = ""
    nats_urls: tuple[NatsUrl, ...] = ("nats://127.0.0.1:4222",)
    # Symbols -> zlib.crc32(symbol) % partitions; FIXED for a cluster's life (streams HFT_P<N>).
    partitions: Annotated[int, Meta(ge=1, le=4096)] = 16
    # JetStream replicas of every stream and bucket (3 in a 3-node NATS cluster).
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    # Ownership and membership lease: a dead node's partitions move after about this long.
    lease_s: Annotated[float, Meta(ge=0.5, le=60)] = 3.0
    # Each owned partition's state goes to the object store this often (bounds replay).
    checkpoint_interval_s: Annotated[float, Meta(gt=0, le=86400)] = 30.0
    # A request forwarded to another node's partition, and a JetStream publish, wait this long.
    # Must be below lease_s when enabled: a publish must end while the lease is surely ours.
    request_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 2.0
    # JetStream's duplicate window of the partition streams: a retried batch (same
    # Idempotency-Key or publisher sequence) within it is not applied twice. Set when a stream
    # is created. A stream's messages are purged once a checkpoint covers them and they are
    # older than this window (docs/cluster.md).
    duplicate_window_s: Annotated[float, Meta(ge=1, le=86400)] = 120.0

    def __post_init__(self) -> None:
        if self.enabled and not self.node_id:
            raise ValueError("cluster.node_id: required when cluster.enabled is true")
        if self.enabled and not self.nats_urls:
            raise ValueError("cluster.nats_urls: at least one URL when cluster.enabled is true")
        if self.enabled and self.request_timeout_s >= self.lease_s:
            raise ValueError(
                "cluster.request_timeout_s: must be below cluster.lease_s "
                f"({self.request_timeout_s} >= {self.lease_s}): a write's publish must end "
                "while its owner's lease surely lasts"
            )


class AppConfig(_Section):
    """The whole configuration tree, one attribute per TOML section."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    durability: DurabilityConfig = msgspec.field(default_factory=DurabilityConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    stream: StreamConfig = msgspec.field(default_factory=StreamConfig)
    history: HistoryConfig = msgspec.field(default_factory=HistoryConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    @property
    def max_body_bytes(self) -> int:
        """The effective request-body limit in bytes (explicit, or derived from max_batch_size)."""
        if self.server.max_body_bytes:
            return self.server.max_body_bytes
        return BODY_BYTES_PER_VALUE * self.store.max_batch_size + BODY_BYTES_OVERHEAD


def _parse_env_value(raw: str, annotation: Any = None) -> Any:
    """A TOML literal if `raw` is one (`8080`, `true`, `"x"`, `1.5`), else the raw string.

    For a text key (`log.file`, `server.host`, `log.level`) only a quoted TOML string is
    unquoted; anything else is taken verbatim, so `APP_LOG__FILE=123` is the file "123", not
    the integer 123 that the key would then reject.
    """
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    # "1\nother = 2" parses as two keys: that is not one literal, so keep the raw string.
    if len(parsed) != 1:
        return raw
    if _is_text(annotation) and not isinstance(parsed["v"], str):
        return raw
    return parsed["v"]


def _field_type(*path: str) -> Any:
    """The declared type at `path` (e.g. "transport", "zmq", "enabled"), bounds removed.

    None if the path names no field.
    """
    owner: Any = AppConfig
    annotation: Any = None
    for name in path:
        if not (isinstance(owner, type) and issubclass(owner, Struct)) or not name:
            return None
        annotation = get_type_hints(owner).get(name)
        if annotation is None:
            return None
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        owner = annotation
    return annotation


def _is_text(annotation: Any) -> bool:
    """True for `str` keys and for enum-like `Literal["a", "b"]` keys."""
    return annotation is str or get_origin(annotation) is Literal


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """Collect `APP_<SECTION>__<KEY>` variables as {(section, ..., key): (variable, value)}.

    Names are matched case-insensitively; each further double underscore goes one table deeper
    (`APP_TRANSPORT__ZMQ__ENABLED` is `[transport.zmq] enabled`). Variables with the prefix but
    without `__` are not ours and are ignored; an empty part (`APP_A____B`) is an error.
    """
    found: dict[tuple[str, ...], tuple[str, Any]] = {}
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        if not all(parts):
            raise ConfigError(
                f"{name}: expected APP_<SECTION>__<KEY> (double underscores between parts), "
                "e.g. APP_SERVER__PORT or APP_TRANSPORT__ZMQ__ENABLED"
            )
        found[parts] = (name, _parse_env_value(raw, _field_type(*parts)))
    return found


_PATH_RE = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")


def _format_validation_error(
    exc: msgspec.ValidationError, data: Mapping[str, Any], origins: Mapping[str, str]
) -> str:
    """Turn msgspec's `Expected ... - at `$.store.max_symbols`` into `store.max_symbols: ...`."""
    match = _PATH_RE.match(str(exc))
    problem = match.group("problem") if match else str(exc)
    key = (match.group("path") or "").lstrip(".") if match else ""
    unknown = _UNKNOWN_RE.match(problem)
    if unknown:
        key = f"{key}.{unknown.group('field')}" if key else unknown.group("field")
        problem = "unknown key"
    value: Any = data
    table_key = re.sub(r"\[\d+\]", "", key)  # `sub_connect[0]`: the key is `sub_connect`
    for part in table_key.split(".") if key else ():
        value = value.get(part) if isinstance(value, Mapping) else None
    if key and key.count(".") == 0 and problem.startswith(f"{key}."):
        # A cross-field check (a section's __post_init__) whose message already names its keys:
        # msgspec reports it at the section, so the origin is every variable that set one of
        # the keys it names, never one that merely touched the same section.
        named = _origins_named_in(problem, origins)
        return f"{problem} (from {', '.join(named)})" if named else problem
    origin = origins.get(table_key)
    where = f" (from {origin})" if origin else ""
    shown = "" if value is None or isinstance(value, Mapping) else f" (value: {value!r})"
    choices = _choices(key)
    if choices and problem.startswith("Invalid enum value"):
        problem = "must be one of " + ", ".join(repr(c) for c in choices)
    return f"{key or 'config'}{where}: {problem}{shown}"


def _origins_named_in(problem: str, origins: Mapping[str, str]) -> list[str]:
    """The variables whose key a cross-field message names: in full (`store.max_symbols`) or
    as a bare name after its table (`transport.shm.slots / slot_bytes` names slot_bytes)."""
    named = []
    for key, variable in origins.items():
        table, _, leaf = key.rpartition(".")
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", problem) or (
            table and table in problem and re.search(rf"(?<![\w.]){re.escape(leaf)}\b", problem)
        ):
            named.append(variable)
    return sorted(set(named))


def _choices(key: str) -> tuple[Any, ...]:
    """The allowed values of a Literal-typed key such as `log.level` (empty for other keys)."""
    annotation = _field_type(*key.split("."))
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _normalize_choices(data: dict[str, Any], path: tuple[str, ...] = ()) -> None:
    """Lower-case enum-like values (`INFO`, `CPU`): people write them either way, file or env."""
    for key, value in data.items():
        if isinstance(value, dict):
            _normalize_choices(value, (*path, key))
        elif isinstance(value, str) and _choices(".".join((*path, key))):
            data[key] = value.lower()


def build_config(
    file_data: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> AppConfig:
    """Merge parsed TOML with environment overrides and validate; raises ConfigError."""
    data = _deep_copy_tables(file_data or {})
    origins: dict[str, str] = {}
    for path, (name, value) in env_overrides(environ if environ is not None else {}).items():
        target = data
        for depth, part in enumerate(path[:-1]):
            if part not in target:
                # A table this variable creates (an unknown one is then its doing); a table
                # that already exists is not, so its errors never name this variable.
                origins.setdefault(".".join(path[: depth + 1]), name)
            table = target.setdefault(part, {})
            if not isinstance(table, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"{where}: expected a table, got {table!r}")
            target = table
        target[path[-1]] = value
        origins[".".join(path)] = name
    _normalize_choices(data)
    try:
        return msgspec.convert(data, AppConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, data, origins)) from None


def _deep_copy_tables(tables: Mapping[str, Any]) -> dict[str, Any]:
    """Copy nested tables so environment overrides never mutate the caller's mapping."""
    return {
        key: _deep_copy_tables(value) if isinstance(value, Mapping) else value
        for key, value in tables.items()
    }


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; an unreadable or malformed file is a one-line ConfigError."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition; tomllib does not wrap this
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> AppConfig:
    """`--config PATH`, else `./Config.toml` if present, else built-in defaults; then the env."""
    if path is not None:
        file_data = read_toml(Path(path))
    else:
        candidate = Path(cwd if cwd is not None else os.getcwd()) / DEFAULT_CONFIG_FILE
        file_data = read_toml(candidate) if candidate.is_file() else {}
    return build_config(file_data, os.environ if environ is None else environ)
