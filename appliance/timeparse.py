"""Parse a point in time written by a person or a file: integer ns since the epoch, or ISO 8601.

Why one module: the history API (`start`/`end` by time), the `publish` / `replay` CLIs
(timestamp cells of a CSV file) and anything else that reads a time from text must agree on
what a time is, to the nanosecond. Integer arithmetic throughout: a float cannot hold every ns
timestamp of this century exactly.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT = re.compile(r"-?[0-9]+")
_FRACTION = re.compile(r"[.,]([0-9]+)")

EXAMPLE = "2026-01-02T15:04:05.123456789Z"


def parse_time(text: str, name: str = "time") -> int:
    """Integer ns since the epoch, or ISO 8601 (no zone = UTC; up to 9 fractional digits).

    Raises ValueError whose message starts with `name`. The result may be negative (before
    1970) or beyond int64: range rules are the caller's.
    """
    if _INT.fullmatch(text):
        return int(text)
    fraction_ns = 0
    match = _FRACTION.search(text)
    if match:
        digits = match.group(1)
        if len(digits) > 9:
            raise ValueError(f"{name}: more than 9 fractional digits")
        fraction_ns = int(digits.ljust(9, "0"))
        text = text[: match.start()] + text[match.end() :]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{name} must be integer ns since the epoch or ISO 8601 (e.g. {EXAMPLE})"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH  # integer arithmetic throughout: no float rounding of ns
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + fraction_ns
