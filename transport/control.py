"""The control protocol: small JSON requests on the ZeroMQ control socket (REQ -> REP).

Why a separate, slow channel: shared-memory rings (and RDMA queue pairs) need a handshake, who
creates what, with which size, under which name, but nothing on their data path may wait for a
socket. A request is one JSON object with an `op`; the reply is one JSON object with `ok` and
either the op's fields or an `error` text. Handlers are registered by the transports that own
the ops (`shm.open`, `shm.close`, later `rdma.connect`), so this module knows none of them.

A handler raises `ControlError` for a refusal the client should read (bad size, too many rings);
any other exception is logged by the caller and answered with a generic error.

Authentication happens here, once for every op (`ControlGate`): with `[auth] mode = "token"`
each request carries `token`; an unknown or missing token, or one without the `write` role, is
refused before any handler runs (`code` "unauthorized" / "forbidden"), and the refusal goes to
the audit trail. A handler receives the authenticated `Caller` (None with auth off) to record a
ring's owner and its symbol patterns. The token never reaches a handler or a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec
import zmq

from transport.curve import CurveKeys

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024

REQUIRED_ROLE = "write"  # every control op creates, attaches or closes a ring
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
DENIED_CODES = frozenset({UNAUTHORIZED, FORBIDDEN})


class Caller(Protocol):
    """Who sent a control request: what the transports need of `appliance.auth.Principal`."""

    @property
    def name(self) -> str: ...
    @property
    def symbols(self) -> tuple[str, ...] | None: ...
    def has_role(self, role: Any) -> bool: ...
    def may_access(self, symbol: str) -> bool: ...


class DeniedSink(Protocol):
    """The part of the audit trail (`appliance.audit.Audit`) a refused request goes to."""

    def denied(self, who: str | None, where: str, code: str, detail: str) -> None: ...


ControlHandler = Callable[[dict[str, Any], Caller | None], dict[str, Any]]

_DECODER = msgspec.json.Decoder(dict[str, Any])
_ENCODER = msgspec.json.Encoder()


class ControlError(Exception):
    """A request the handler refuses; the message goes back to the client as `error`, and
    `code` (when set: "unauthorized", "forbidden") as `code`."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class _NoDenials:
    def denied(self, who: str | None, where: str, code: str, detail: str) -> None:
        pass


class ControlGate:
    """Who may send control requests: everyone (`authenticate` None, auth off) or the holders
    of a token with the `write` role. Refusals (here or a handler's "forbidden") are audited."""

    def __init__(
        self,
        authenticate: Callable[[str], Caller | None] | None = None,
        audit: DeniedSink | None = None,
    ) -> None:
        self._authenticate = authenticate
        self.audit: DeniedSink = audit if audit is not None else _NoDenials()

    @property
    def required(self) -> bool:
        return self._authenticate is not None

    def caller(self, request: dict[str, Any]) -> Caller | None:
        """The request's caller (None with auth off); ControlError when it may not call."""
        token = request.pop("token", None)  # never kept in the request a handler sees
        if self._authenticate is None:
            return None
        if not isinstance(token, str) or not token:
            raise ControlError("this appliance requires a token (field `token`)", UNAUTHORIZED)
        caller = self._authenticate(token)
        if caller is None:
            raise ControlError("unknown token", UNAUTHORIZED)
        return caller

    @staticmethod
    def admit(caller: Caller | None) -> None:
        """Refuse (forbidden) a caller whose token lacks the role every control op needs."""
        if caller is not None and not caller.has_role(REQUIRED_ROLE):
            raise ControlError(
                f"token {caller.name!r} has role {getattr(caller, 'role', '?')}; control ops "
                f"need {REQUIRED_ROLE}",
                FORBIDDEN,
            )


OPEN_GATE = ControlGate()


def dispatch(
    raw: bytes, handlers: Mapping[str, ControlHandler], gate: ControlGate = OPEN_GATE
) -> bytes:
    """Decode a request, check its caller, run its handler, encode the reply. Never raises."""
    op: Any = None
    caller: Caller | None = None
    try:
        if len(raw) > MAX_REQUEST_BYTES:
            raise ControlError(f"request is {len(raw)} bytes; at most {MAX_REQUEST_BYTES}")
        try:
            request = _DECODER.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ControlError(f"request is not a JSON object: {exc}") from None
        op = request.get("op")
        caller = gate.caller(request)
        gate.admit(caller)
        handler = handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            known = ", ".join(sorted(handlers)) or "none"
            raise ControlError(f"unknown op {op!r}; known ops: {known}")
        reply = {"ok": True, **handler(request, caller)}
    except ControlError as exc:
        reply = {"ok": False, "error": str(exc)}
        if exc.code:
            reply["code"] = exc.code
        if exc.code in DENIED_CODES:
            where = f"control:{op}" if isinstance(op, str) else "control"
            gate.audit.denied(caller.name if caller else None, where, exc.code, str(exc))
    except Exception:
        log.exception("control request failed")
        reply = {"ok": False, "error": "internal error in the appliance (logged)"}
    return _ENCODER.encode(reply)


def request(
    endpoint: str,
    body: Mapping[str, Any],
    *,
    timeout_s: float = 5.0,
    context: zmq.Context | None = None,
    curve: CurveKeys | None = None,
) -> dict[str, Any]:
    """Send one control request and wait for its reply; raises ControlError on refusal/timeout.

    `curve`: this client's key pair and the appliance's public key, when its control socket
    requires CURVE (a client without them gets no reply: the handshake fails).

    A fresh REQ socket per request: control traffic is rare, and a REQ socket whose reply never
    came is unusable (strict send/recv alternation), so it is never reused.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    try:
        sock.connect(endpoint)
        sock.send(_ENCODER.encode(dict(body)))
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise ControlError(
                f"no reply from the appliance's control socket {endpoint} within {timeout_s} s "
                "(is the appliance running with transport.zmq.control_endpoint there?)"
            )
        reply = _DECODER.decode(sock.recv())
    finally:
        sock.close()
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request refused")), str(reply.get("code", "")))
    return reply


def int_field(
    request: dict[str, Any], key: str, low: int, high: int, default: int | None = None
) -> int:
    """`request[key]` as an int in low..high (`default` when absent); ControlError if not."""
    value = request.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"{key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ControlError(f"{key} must be in {low}..{high}, got {value}")
    return value
