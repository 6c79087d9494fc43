"""The control protocol: small JSON requests on the ZeroMQ control socket (REQ -> REP).

Why a separate, slow channel: shared-memory rings (and RDMA queue pairs) need a handshake, who
creates what, with which size, under which name, but nothing on their data path may wait for a
socket. A request is one JSON object with an `op`; the reply is one JSON object with `ok` and
either the op's fields or an `error` text. Handlers are registered by the transports that own
the ops (`shm.open`, `shm.close`, later `rdma.connect`), so this module knows none of them.

A handler raises `ControlError` for a refusal the client should read (bad size, too many rings);
any other exception is logged by the caller and answered with a generic error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import zmq

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024

ControlHandler = Callable[[dict[str, Any]], dict[str, Any]]

_DECODER = msgspec.json.Decoder(dict[str, Any])
_ENCODER = msgspec.json.Encoder()


class ControlError(Exception):
    """A request the handler refuses; the message goes back to the client as `error`."""


def dispatch(raw: bytes, handlers: Mapping[str, ControlHandler]) -> bytes:
    """Decode a request, run its handler, encode the reply. Never raises."""
    try:
        if len(raw) > MAX_REQUEST_BYTES:
            raise ControlError(f"request is {len(raw)} bytes; at most {MAX_REQUEST_BYTES}")
        try:
            request = _DECODER.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ControlError(f"request is not a JSON object: {exc}") from None
        op = request.get("op")
        handler = handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            known = ", ".join(sorted(handlers)) or "none"
            raise ControlError(f"unknown op {op!r}; known ops: {known}")
        reply = {"ok": True, **handler(request)}
    except ControlError as exc:
        reply = {"ok": False, "error": str(exc)}
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
) -> dict[str, Any]:
    """Send one control request and wait for its reply; raises ControlError on refusal/timeout.

    A fresh REQ socket per request: control traffic is rare, and a REQ socket whose reply never
    came is unusable (strict send/recv alternation), so it is never reused.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
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
        raise ControlError(str(reply.get("error", "request refused")))
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
