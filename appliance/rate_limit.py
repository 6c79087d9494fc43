"""Per-token rate limits: requests per second and values per second, as token buckets.

Why buckets: a trading client sends bursts (a snapshot, then a steady feed); a bucket with a
one-second capacity lets a burst of up to one second's allowance through and then holds the
client to the rate, where a fixed window would let twice the rate through at a window's edge.
Refused requests spend nothing, so a client that backs off for `Retry-After` is served again.

One `RateLimits` per app, used on the event loop only (no lock).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.auth import Principal


@dataclass(slots=True)
class _Bucket:
    rate: float  # per second; capacity = rate (one second's allowance)
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` fits (0 if it fits now); more than the capacity never fits
        whole, so it is let through once the bucket is full (one oversized batch a second)."""
        needed = min(amount, self.rate) - self.level
        return needed / self.rate if needed > 0 else 0.0


class RateLimits:
    """Request and value buckets per token name, with the [auth] defaults for tokens whose
    entry sets no limit."""

    def __init__(
        self,
        default_requests_per_s: float,
        default_values_per_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_requests_per_s = default_requests_per_s
        self.default_values_per_s = default_values_per_s
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._values: dict[str, _Bucket] = {}

    def take_request(self, principal: Principal) -> float:
        """Spend one request of the token's allowance: 0.0 if granted, else the seconds to
        wait (nothing spent)."""
        rate = principal.max_requests_per_s or self.default_requests_per_s
        return self._take(self._requests, principal.name, rate, 1)

    def take_values(self, principal: Principal, values: int) -> float:
        """Spend `values` values of the token's allowance (POST /add_batch/), like
        `take_request`."""
        rate = principal.max_values_per_s or self.default_values_per_s
        return self._take(self._values, principal.name, rate, values)

    def _take(self, buckets: dict[str, _Bucket], name: str, rate: float, amount: int) -> float:
        bucket = self._bucket(buckets, name, rate, self._clock())
        if bucket is None:
            return 0.0
        wait = bucket.wait_s(amount)
        if wait == 0:
            bucket.level -= min(amount, bucket.rate)
        return wait

    def _bucket(
        self, buckets: dict[str, _Bucket], name: str, rate: float, now: float
    ) -> _Bucket | None:
        if rate <= 0:
            return None  # unlimited
        bucket = buckets.get(name)
        if bucket is None or bucket.rate != rate:
            bucket = buckets[name] = _Bucket(rate, rate, now)
        else:
            bucket.refill(now)
        return bucket


def retry_after_header(wait_s: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (HTTP allows no fraction), at least 1."""
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
