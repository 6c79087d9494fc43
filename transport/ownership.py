"""Who owns a ring (shared memory, RDMA): its secret, its owner's token, its allowed symbols.

Why a secret and not the publisher id: ids are not secrets (a publisher picks its own, GET
/ingest lists them to admins, logs print them), so a second client that knew one could re-attach
to another publisher's ring and write forged frames into it, or close it. `shm.open` /
`rdma.open` return a random 128-bit secret that re-attaching and closing must present; it is
compared in constant time. With auth on, the ring also records the name of the token that
opened it, and only that token may act on it.

Symbol patterns: a token limited to some symbols may only publish those through its rings. The
check wraps the ring's sink and caches each symbol's verdict, so the cost per frame is one dict
lookup, and nothing at all for a token without patterns or with auth off.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np

from transport.control import FORBIDDEN, Caller, ControlError
from transport.ingest import Rejected, Sink
from transport.wire import Reason

SECRET_BYTES = 16
MAX_CACHED_SYMBOLS = 65_536  # verdicts kept per ring; beyond, patterns are matched each time


def new_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


def check_owner(
    publisher_id: int, secret: str, owner: str | None, request: dict[str, Any],
    caller: Caller | None,
) -> None:  # fmt: skip
    """Refuse (ControlError "forbidden") a request on a ring it does not own: a missing or
    wrong `secret`, or (auth on) another token than the one that opened the ring."""
    given = request.get("secret")
    if not isinstance(given, str) or not secrets.compare_digest(given, secret):
        raise ControlError(
            f"publisher {publisher_id}'s ring belongs to the client that opened it: re-attach "
            "and close need the `secret` the open returned",
            FORBIDDEN,
        )
    if owner is not None and (caller is None or caller.name != owner):
        raise ControlError(
            f"publisher {publisher_id}'s ring was opened with another token", FORBIDDEN
        )


def rings_per_token(
    transport: str, caller: Caller | None, limit: int, owners: Iterable[str | None]
) -> None:
    """Refuse a new ring beyond `transport.<transport>.max_rings_per_token` (0: no limit). Only
    with auth on: without a token the control socket cannot tell one client from another."""
    if caller is None or limit <= 0:
        return
    held = sum(1 for owner in owners if owner == caller.name)
    if held >= limit:
        raise ControlError(
            f"token {caller.name!r} holds {held} {transport} ring(s); "
            f"transport.{transport}.max_rings_per_token is {limit} (close one first)"
        )


class SymbolCheck:
    """Raises Rejected(FORBIDDEN) for a symbol its token may not write; the verdict per symbol
    is cached, so a frame costs one dict lookup (a ring's or a CURVE client's token)."""

    __slots__ = ("_allowed", "_caller")

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        self._allowed: dict[str, bool] = {}

    def __call__(self, symbol: str) -> None:
        allowed = self._allowed.get(symbol)
        if allowed is None:
            allowed = self._caller.may_access(symbol)
            if len(self._allowed) < MAX_CACHED_SYMBOLS:
                self._allowed[symbol] = allowed
        if not allowed:
            raise Rejected(
                Reason.FORBIDDEN, f"token {self._caller.name!r} may not write symbol {symbol!r}"
            )


def symbol_check(caller: Caller | None) -> SymbolCheck | None:
    """The check for `caller`'s frames; None when it may write every symbol (no cost)."""
    if caller is None or caller.symbols is None:
        return None
    return SymbolCheck(caller)


class _SymbolGate:
    """A sink that refuses (FORBIDDEN) symbols its token may not access."""

    __slots__ = ("_check", "_sink")

    def __init__(self, sink: Sink, check: SymbolCheck) -> None:
        self._sink = sink
        self._check = check

    def __call__(
        self,
        symbol: str,
        values: np.ndarray,
        publisher_id: int,
        sequence: int,
        timestamps: np.ndarray | None = None,
    ) -> None:
        self._check(symbol)
        self._sink(symbol, values, publisher_id, sequence, timestamps)


def owner_sink(sink: Sink, caller: Caller | None) -> Sink:
    """`sink` for a ring opened by `caller`: as is without symbol patterns, else gated."""
    check = symbol_check(caller)
    return sink if check is None else _SymbolGate(sink, check)
