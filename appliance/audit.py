"""The audit trail's interface: who wrote what, who did what as admin, who was refused.

The hash-chained log behind it (issue 15, item 4) implements `Audit`; an appliance without an
audit log uses `NullAudit`. Callers: the REST request hook and handlers (writes, admin actions,
denials), the transports' sink (writes, aggregated per session), the control socket (denials).
Calls must be cheap and never raise into the caller's path: a failing audit log is logged and
counted by the implementation, not turned into a refused batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Audit(Protocol):
    def rest_write(self, who: str | None, symbol: str, values: int, first_index: int) -> None:
        """One accepted POST /add_batch/ batch (`first_index`: its first value's index)."""

    def transport_write(
        self, transport: str, publisher_id: int, who: str | None, symbol: str,
        values: int, sequence: int,
    ) -> None:  # fmt: skip
        """One applied transport frame; the implementation aggregates per session per second."""

    def admin(self, who: str, action: str, detail: Mapping[str, Any]) -> None:
        """An admin action (DELETE /symbols/{symbol}, ...), recorded before it is answered."""

    def denied(self, who: str | None, where: str, code: str, detail: str) -> None:
        """A refused request (401, 403, 429, a refused control op); rate-limited by the
        implementation, with counts of what it folded."""

    def close(self) -> None:
        """Flush and close (after every producer stopped)."""


class NullAudit:
    """No audit log: every call does nothing."""

    def rest_write(self, who: str | None, symbol: str, values: int, first_index: int) -> None:
        pass

    def transport_write(
        self, transport: str, publisher_id: int, who: str | None, symbol: str,
        values: int, sequence: int,
    ) -> None:  # fmt: skip
        pass

    def admin(self, who: str, action: str, detail: Mapping[str, Any]) -> None:
        pass

    def denied(self, who: str | None, where: str, code: str, detail: str) -> None:
        pass

    def close(self) -> None:
        pass
