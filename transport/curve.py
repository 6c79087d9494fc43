"""ZeroMQ CURVE for the appliance's sockets: the server's key pair, the clients it admits, and
the keys a publisher or control client presents.

Why CURVE and a ZAP handler rather than a token in every frame: the ROUTER and PULL data
paths carry binary frames with no room for a credential, and checking one per frame would cost
the hot path. CURVE authenticates the connection once (and encrypts it); the ZAP handler
(pyzmq's `ThreadAuthenticator`, a thread of the appliance's own ZeroMQ context) admits only the
public keys listed in the clients file and names each connection after its client, which
ZeroMQ then stamps on every message as its `User-Id` property.

Key files: the server's is a pyzmq certificate (`zmq.auth.create_certificates`, the
`.key_secret` file holding both keys), loaded with `zmq.auth.load_certificate`. The clients
file is TOML, one entry per client:

    [[clients]]
    name = "feed-a"          # with [auth] mode = "token": the name of its token
    public_key = "<40 z85 characters>"

With `[auth] mode = "token"` each name must be a token of the tokens file with the `write`
role: the key stands for that token on the ZeroMQ data sockets.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import zmq
import zmq.auth
from msgspec import Meta
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

Z85_KEY = Annotated[str, Meta(pattern=r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")]
ZAP_DOMAIN = "hft-appliance"


class CurveConfigError(Exception):
    """A key file or the clients file cannot be used; the message names the file."""


@dataclass(frozen=True)
class CurveKeys:
    """A client's side: its key pair and the server's public key (all z85, as bytes)."""

    server_public_key: bytes
    public_key: bytes
    secret_key: bytes

    @classmethod
    def from_files(
        cls, server_public_file: str | Path, client_secret_file: str | Path
    ) -> CurveKeys:
        """From pyzmq certificate files: the server's public one and the client's secret one."""
        server_public, _ = _load(server_public_file)
        public, secret = _load(client_secret_file)
        if secret is None:
            raise CurveConfigError(f"{client_secret_file}: holds no secret key")
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client (before connect)."""
        sock.curve_serverkey = self.server_public_key
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key


class _Client(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    public_key: Z85_KEY


class _ClientsFile(msgspec.Struct, forbid_unknown_fields=True):
    clients: list[_Client] = []


@dataclass(frozen=True)
class CurveServer:
    """The appliance's key pair and the clients it admits (z85 public key -> name)."""

    public_key: bytes
    secret_key: bytes
    clients: Mapping[bytes, str]

    @classmethod
    def from_files(cls, secret_key_file: str | Path, clients_file: str | Path) -> CurveServer:
        public, secret = _load(secret_key_file)
        if secret is None:
            raise CurveConfigError(f"{secret_key_file}: holds no secret key (use .key_secret)")
        return cls(public, secret, read_clients(clients_file))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before bind); the ZAP handler decides who may connect."""
        sock.curve_server = True
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key
        sock.zap_domain = ZAP_DOMAIN.encode()


def read_clients(path: str | Path) -> dict[bytes, str]:
    """The clients file: z85 public key -> client name; CurveConfigError names what is wrong."""
    try:
        parsed = msgspec.convert(tomllib.loads(Path(path).read_text("utf-8")), _ClientsFile)
    except OSError as exc:
        message = f"cannot read CURVE clients file {str(path)!r}: {exc.strerror}"
        raise CurveConfigError(message) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, msgspec.ValidationError) as exc:
        raise CurveConfigError(f"CURVE clients file {str(path)!r}: {exc}") from None
    clients: dict[bytes, str] = {}
    for client in parsed.clients:
        key = client.public_key.encode("ascii")
        if key in clients:
            raise CurveConfigError(f"{path}: the key of {client.name!r} is listed twice")
        clients[key] = client.name
    return clients


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveConfigError(f"cannot load CURVE certificate {str(path)!r}: {exc}") from None


class _Admit:
    """The ZAP credentials provider: admits a listed key, reports any other as denied."""

    def __init__(self, clients: Mapping[bytes, str], denied: Callable[[str], None]) -> None:
        self._clients = clients
        self._denied = denied

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._clients:
            return True
        self._denied(key.decode("ascii", "replace"))
        return False


class ClientAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread, with each admitted key's User-Id set to its client's name."""

    def __init__(
        self, context: zmq.Context, server: CurveServer, denied: Callable[[str], None]
    ) -> None:
        super().__init__(context)
        self._names = dict(server.clients)
        self._provider = _Admit(self._names, denied)

    def start(self) -> None:
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._provider)
        super().start()

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names[z85.encode(client_public_key)]


def user_id(part: Any) -> str | None:
    """The client name ZeroMQ stamped on a received part (a `zmq.Frame`); None without CURVE."""
    try:
        return part.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        return None
