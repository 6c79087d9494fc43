"""Is the publisher of a shared-memory ring still there? The appliance's side of ring reclaim.

Why a lock first and a process id second: a publisher states its pid at `shm.open`, but the pid
alone is a weak signal. In a container that shares /dev/shm but not the pid namespace, the pid
the publisher sees is not the one the appliance sees: it may name no process here, or another,
unrelated one. And a pid is reused once its process is gone. So:

- A publisher that says `"lock": true` holds a shared `flock` on the ring file for as long as it
  maps the ring. The kernel drops that lock when the last descriptor of the publisher's open
  file goes away, including when the process is killed, whatever its pid namespace (the lock
  belongs to the file, not to a pid). A free lock therefore proves that no such publisher maps
  the ring any more. Caveat: the lock belongs to the open file description, so a child forked
  while the publisher holds it keeps it (and the mapping) until it exits too.
- Without the lock, a pid counts only when it is verifiably the publisher: the appliance sees
  the process at `shm.open` (its start time in /proc/<pid>/stat is recorded, which guards
  against reuse), and later sees it mapping this very ring file (/proc/<pid>/maps). Only then
  does "no such process", "a zombie" or "another start time" mean dead. A pid the appliance
  cannot see, or never saw mapping the ring, is UNKNOWN: the idle rule decides for that ring.

Every function here reads /proc or makes one or two system calls; they run on the reaper
thread of `transport.shm.server`, never on the poller's frame path.
"""

from __future__ import annotations

import enum
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_STAT_STATE = 0  # fields after the ")" closing the command name: state is the first...
_STAT_STARTTIME = 19  # ...and starttime (field 22 of proc(5)) the twentieth
_DEAD_STATES = frozenset({b"Z", b"X", b"x"})  # zombie or dead: its descriptors are closed


class PidState(enum.Enum):
    ALIVE = "alive"
    GONE = "gone"
    UNKNOWN = "unknown"  # no pid given, or the appliance could not see it when it was given


def lock_held(fd: int) -> bool:
    """True while some other open file of the ring holds a lock on it (a live publisher).

    The probe takes an exclusive lock without blocking and drops it at once: a publisher that
    takes its shared lock in that instant waits microseconds (it blocks, it does not fail).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def process_start(pid: int, proc: Path = PROC) -> int | None:
    """The start time (clock ticks since boot) of a live process `pid` as this appliance sees
    it; None when there is no such process here, or it is a zombie."""
    try:  # os.open/os.read: half the cost of Path.read_text, and the reaper runs it often
        fd = os.open(proc / str(pid) / "stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    try:
        text = os.read(fd, 4096)
    except ProcessLookupError:  # the process went between open and read
        return None
    finally:
        os.close(fd)
    fields = text[text.rfind(b")") + 2 :].split()
    if len(fields) <= _STAT_STARTTIME or fields[_STAT_STATE] in _DEAD_STATES:
        return None
    return int(fields[_STAT_STARTTIME])


def maps_file(pid: int, device: int, inode: int, proc: Path = PROC) -> bool:
    """True if process `pid` has the file (device, inode) mapped (/proc/<pid>/maps)."""
    want = f"{os.major(device):02x}:{os.minor(device):02x} {inode} "
    try:
        with (proc / str(pid) / "maps").open() as maps:
            return any(want in line for line in maps)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


@dataclass(slots=True)
class Holder:
    """What the last `shm.open` of a ring said about its publisher, and what was verified."""

    pid: int | None = None
    start: int | None = None  # the pid's start time when it was declared; None: not seen
    lock: bool = False  # the publisher holds a shared flock on the ring file while mapped
    mapped: bool = False  # the pid was seen mapping the ring (pid rule without the lock)

    @classmethod
    def declared(cls, pid: int | None, lock: bool, proc: Path = PROC) -> Holder:
        return cls(pid, process_start(pid, proc) if pid else None, lock)

    def pid_state(self, proc: Path = PROC) -> PidState:
        if self.pid is None or self.start is None:
            return PidState.UNKNOWN
        now = process_start(self.pid, proc)
        return PidState.ALIVE if now == self.start else PidState.GONE

    def gone(self, device: int, inode: int, proc: Path = PROC) -> bool:
        """Whether the publisher has verifiably gone. For a lock holder, call only once the
        lock was found free: no publisher maps the ring then, and only a declared pid that is
        still alive (it may re-attach) keeps the ring, under the idle rule."""
        state = self.pid_state(proc)
        if self.lock:
            return state is not PidState.ALIVE
        if state is PidState.ALIVE and not self.mapped and self.pid is not None:
            self.mapped = maps_file(self.pid, device, inode, proc)  # once: then trust the pid
        return state is PidState.GONE and self.mapped

    def describe(self) -> str:
        """For the log line and the late client's error: who the publisher was."""
        return f" (pid {self.pid})" if self.pid else ""
