"""The consumer-side poll loop shared by the shared-memory and RDMA transports.

Why spin then sleep: a ring (or completion queue) has no wake-up signal that costs less than
the frame itself, so the lowest latency is a busy loop; but a busy loop holds a core and, in
Python, the GIL that the REST server needs. The loop spins for `spin_us` after the last work
seen (yielding the GIL every few empty passes), then sleeps with a doubling pause up to
`backoff_max_us`, which bounds the wake-up latency of an idle transport.

The yield is `os.sched_yield()`, never `time.sleep(0)`: both release the GIL, but a sleep, even
of zero, is a timer wait in the kernel (timer slack): about 70 us on a 2-core VM, during which
a frame that arrives waits. A spin that sleeps every few passes is mostly asleep. A transport with a
wake-up signal (the shared-memory doorbell) passes `idle_wait`, which blocks like `time.sleep`
but returns early when a producer rings: the idle latency is then one wake-up, not the pause.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

SPIN_YIELD_EVERY = 32  # empty passes between GIL releases while spinning (lets REST run)
FIRST_BACKOFF_US = 10


def run_poll_loop(
    poll_once: Callable[[], int],
    running: Callable[[], bool],
    *,
    spin_us: int,
    backoff_max_us: int,
    transport: str,
    idle_wait: Callable[[float], None] = time.sleep,
) -> None:
    """Call `poll_once()` (returns the work done) until `running()` is false. Never raises:
    an unexpected error is logged and the loop pauses `backoff_max_us` before the next pass.

    `idle_wait(seconds)` is the back-off pause (default `time.sleep`); it may return early."""
    spin_ns = spin_us * 1_000
    backoff_max = backoff_max_us / 1e6
    first_backoff = min(FIRST_BACKOFF_US, backoff_max_us) / 1e6
    backoff = first_backoff
    idle_since = 0
    empty_passes = 0
    while running():
        try:
            work = poll_once()
        except Exception:
            log.exception("%s poller pass failed", transport, extra={"transport": transport})
            time.sleep(backoff_max)
            continue
        if work:
            idle_since = 0
            backoff = first_backoff
            continue
        now = time.monotonic_ns()
        if idle_since == 0:
            idle_since = now
        if now - idle_since < spin_ns:
            empty_passes += 1
            if empty_passes % SPIN_YIELD_EVERY == 0:
                os.sched_yield()  # releases the GIL without a timer wait (module docstring)
            continue
        try:
            idle_wait(backoff)
        except Exception:
            log.exception("%s idle wait failed", transport, extra={"transport": transport})
            time.sleep(backoff)
        backoff = min(backoff * 2, backoff_max)
