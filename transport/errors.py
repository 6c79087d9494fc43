"""Errors a transport raises while it starts, shared by every transport and the CLI.

Why one hierarchy: the CLI turns any of them into one line on stderr and exit status 2 (SPEC
section 7: "a transport that cannot bind its endpoint stops the start ... naming the endpoint"),
without knowing which transport failed or how.
"""

from __future__ import annotations


class TransportStartError(Exception):
    """A transport cannot start; the message is one line that says which and why."""


class TransportBindError(TransportStartError):
    """An endpoint cannot be bound or connected (in use, bad address, permissions).

    The message names the endpoint: `cannot bind transport endpoint tcp://...: Address already
    in use`. `action` is "bind" for listening sockets and "connect" for SUB-connects.
    """

    def __init__(self, endpoint: str, reason: str, *, action: str = "bind") -> None:
        super().__init__(f"cannot {action} transport endpoint {endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
