"""Where the appliance is in its life, and the one wait every data route goes through.

Why a wait instead of a 503: a client that starts the appliance and writes at once (a script, a
pod whose sidecar starts first) should see its write succeed a little later, not a `not_ready`
it has to retry. Data routes await `wait_accepting()`, bounded by `server.wait_for_ready_s`;
only past that bound, or when the start failed or the appliance is stopping before it ever got
ready, do they answer 503 `not_ready`. The probes never wait: `/live` answers whenever HTTP is
served, `/health` and `/ready` answer 200 only in the `ready` phase.

One object per app (`app.ctx.readiness`); its phase is written on the event loop only, and the
replay's progress counters by the replay thread (plain ints read under the GIL, a snapshot that
may be one segment stale, which is all a progress body promises).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from appliance.errors import ApiError


class Phase(StrEnum):
    STARTING = "starting"  # HTTP served, the transports and (if any) the replay not started
    REPLAYING = "replaying"  # the write-ahead log is being replayed into the store
    READY = "ready"  # reads and writes are accepted
    STOPPING = "stopping"  # SIGINT/SIGTERM: in-flight requests drain, probes answer 503
    FAILED = "failed"  # the start failed (a corrupt log); the server is stopping


@dataclass
class ReplayProgress:
    """Counters the replay thread advances, for the 503 body of `/health` while starting."""

    segments_total: int = 0
    segments_done: int = 0
    records: int = 0
    values: int = 0
    started_monotonic: float = field(default_factory=time.monotonic)

    def to_body(self) -> dict[str, Any]:
        return {
            "segments_total": self.segments_total,
            "segments_done": self.segments_done,
            "records": self.records,
            "values": self.values,
            "elapsed_s": round(time.monotonic() - self.started_monotonic, 3),
        }


_WHY_NOT_READY = {
    Phase.STARTING: "the appliance is starting",
    Phase.REPLAYING: "the appliance is replaying its write-ahead log",
    Phase.STOPPING: "the appliance is stopping",
    Phase.FAILED: "the appliance failed to start (see its log) and is stopping",
}


class Readiness:
    """The phase, the replay's progress, and the wake-up of requests waiting to be served."""

    def __init__(self, wait_for_ready_s: float) -> None:
        self.phase = Phase.STARTING
        self.progress = ReplayProgress()
        self.wait_for_ready_s = wait_for_ready_s
        # True once the phase first turns READY, never cleared: a request that arrives while
        # stopping is still served (draining), as before readiness existed.
        self.accepting = False
        # One future per waiting request, on that request's loop (not an asyncio.Event: an app
        # may be served by more than one loop over its life, in tests, and an Event binds to
        # the first loop that waits on it). A dict keeps arrival order: woken first come first.
        self._waiters: dict[asyncio.Future[None], None] = {}

    @property
    def ready(self) -> bool:
        """What the probes report: reads and writes are accepted and no stop has begun."""
        return self.phase is Phase.READY

    @property
    def draining(self) -> bool:
        return self.phase is Phase.STOPPING or self.phase is Phase.FAILED

    def mark_replaying(self) -> None:
        self.phase = Phase.REPLAYING
        self.progress = ReplayProgress()

    def mark_ready(self) -> None:
        self.phase = Phase.READY
        self.accepting = True
        self._wake_waiters()

    def mark_stopping(self) -> None:
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPING
        self._wake_waiters()

    def mark_failed(self) -> None:
        self.phase = Phase.FAILED
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def wait_accepting(self) -> None:
        """Return once data routes may run; raise ApiError `not_ready` past the bound.

        A start that failed, or a stop that came before the appliance ever got ready, answers
        at once: waiting could not end well.
        """
        if self.accepting:
            return
        waited = False
        if not self.draining and self.wait_for_ready_s > 0:
            waited = True
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[waiter] = None
            try:
                await asyncio.wait_for(waiter, timeout=self.wait_for_ready_s)
            except TimeoutError:
                pass
            finally:
                self._waiters.pop(waiter, None)
            if self.accepting:
                return
        raise self.not_ready_error(waited=waited and not self.draining)

    def not_ready_error(self, *, waited: bool = False) -> ApiError:
        message = _WHY_NOT_READY.get(self.phase, "the appliance is not ready")
        if waited:
            message += f" (waited {self.wait_for_ready_s:g} s: server.wait_for_ready_s); retry"
        return ApiError("not_ready", message)

    def health_body(self) -> dict[str, Any]:
        """The 503 body of `/health` before ready: the error body plus the phase and progress."""
        body: dict[str, Any] = {**self.not_ready_error().to_body(), "status": str(self.phase)}
        if self.phase is Phase.REPLAYING:
            body["progress"] = self.progress.to_body()
        return body


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
