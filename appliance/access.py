"""Who may do what on the REST API: the checks the request hook and the handlers share.

Why one object: the route hook (`appliance.app._route`) authenticates, checks the route's role
and spends a request of the token's rate once per request; a handler that learns the symbol from
the body (POST /add_batch/) or serves several symbols (POST /stats/batch, GET /symbols) asks the
same object about each symbol. Every refusal goes to the audit trail (rate-limited there) and
answers with the error table's code: 401 `unauthorized` (with `WWW-Authenticate: Bearer`), 403
`forbidden`, 429 `rate_limited` (with `Retry-After`).

With `auth.mode = "off"` there is no `Access` object at all (`app.ctx.access` is None) and the
hook skips every check: the requests of an appliance without authentication pay nothing.
"""

from __future__ import annotations

from typing import Any

from appliance.audit import Audit
from appliance.auth import Principal, Role, Tokens
from appliance.errors import ApiError
from appliance.rate_limit import RateLimits, retry_after_header

_VERDICTS_SIZE = 65_536
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="hft-appliance"'}


class Access:
    """Tokens, rate limits and the audit trail of one app."""

    def __init__(self, tokens: Tokens, limits: RateLimits, audit: Audit) -> None:
        self.tokens = tokens
        self.limits = limits
        self.audit = audit
        # (token name, symbol) -> may access: fnmatch per request was about 1 us. Symbols come
        # from clients, so the table is bounded (cleared when full), not a leak.
        self._verdicts: dict[tuple[str, str], bool] = {}
        # No request rate set anywhere (the [auth] default nor any token): skip the buckets.
        self._requests_limited = bool(limits.default_requests_per_s) or any(
            p.max_requests_per_s for p in tokens.principals()
        )

    def authorize(self, request: Any, role: Role) -> Principal:
        """The request's principal if it may use a route that needs `role`; raises ApiError."""
        principal = self.tokens.from_authorization(request.headers.get("authorization"))
        if principal is None:
            where = _where(request)
            self.audit.denied(None, where, "unauthorized", "no or unknown bearer token")
            raise ApiError(
                "unauthorized",
                "this route needs `Authorization: Bearer <token>` with a known token",
                headers=_CHALLENGE,
            )
        if not principal.has_role(role):
            self.audit.denied(principal.name, _where(request), "forbidden", f"needs role {role}")
            raise ApiError(
                "forbidden",
                f"token {principal.name!r} has role {principal.role!r}; this route needs "
                f"{role!r} (read < write < admin)",
            )
        if self._requests_limited:
            self.spend(principal, _where(request), 0)
        return principal

    def spend(self, principal: Principal, where: str, values: int) -> None:
        """One request (values=0) or `values` values of the token's allowance; 429 if spent."""
        if values:
            wait_s = self.limits.take_values(principal, values)
        else:
            wait_s = self.limits.take_request(principal)
        if wait_s > 0:
            what = "values" if values else "requests"
            self.audit.denied(principal.name, where, "rate_limited", f"{what} per second")
            raise ApiError(
                "rate_limited",
                f"token {principal.name!r} is over its {what} per second; retry in {wait_s:.2f} s",
                headers=retry_after_header(wait_s),
            )

    def check_symbol(self, principal: Principal, symbol: str, where: str) -> None:
        """403 unless the token's patterns cover `symbol`."""
        if principal.symbols is None:
            return
        key = (principal.name, symbol)
        allowed = self._verdicts.get(key)
        if allowed is None:
            if len(self._verdicts) >= _VERDICTS_SIZE:
                self._verdicts.clear()
            allowed = self._verdicts[key] = principal.may_access(symbol)
        if not allowed:
            self.audit.denied(principal.name, where, "forbidden", f"symbol {symbol!r}")
            raise forbidden_symbol(principal, symbol)


def _where(request: Any) -> str:
    return f"{request.method} {request.path}"


def forbidden_symbol(principal: Principal, symbol: str) -> ApiError:
    return ApiError(
        "forbidden",
        f"token {principal.name!r} may not access symbol {symbol!r} (its patterns: "
        f"{', '.join(principal.symbols or ())})",
    )


def restrict_queries(principal: Principal, items: list[Any]) -> list[Any]:
    """POST /stats/batch: a query on a symbol outside the token's patterns becomes its
    per-item `forbidden` error; the other queries are answered as usual."""
    if principal.symbols is None:
        return items
    allowed: dict[str, bool] = {}
    out = []
    for item in items:
        if type(item) is tuple:
            symbol = item[0]
            ok = allowed.get(symbol)
            if ok is None:
                ok = allowed[symbol] = principal.may_access(symbol)
            if not ok:
                item = forbidden_symbol(principal, symbol)
        out.append(item)
    return out


def principal_of(request: Any) -> Principal | None:
    """The principal the hook put on the request; None with authentication off."""
    return getattr(getattr(request, "ctx", None), "principal", None)
