"""Structured logging: JSON lines to stdout and to a file rotated daily and by size.

Why JSON lines: log shippers and `jq` read them without a parser per message format. Sanic is
built with `configure_logging=False`, so its loggers (`sanic.root`, `sanic.error`,
`sanic.access`, `sanic.server`) propagate to the root logger configured here and come out in
the same format. Called once, by the CLI; library code only creates named loggers.

Every line carries `thread` (the thread's name: the event loop's `MainThread`, `wal-writer`,
`warm-seal_0`, ...), and lines logged while a REST request is handled carry `request_id`: the
app sets `request_id` (below) per request, and `RequestIdFilter`, on every handler, copies it
onto the record. A ContextVar and not a thread-local: one event-loop thread serves many
requests, each in its own asyncio task with its own copy of the context.

Warning and error lines are rate-limited (`ErrorRateLimitFilter`, `log.max_errors_per_s`): a
client that can make the server log an error per request must not be able to fill the disk.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from appliance.config import LogConfig

_FORMAT = "%(levelname)s %(name)s %(threadName)s %(message)s"
_RENAME = {"levelname": "level", "name": "logger", "threadName": "thread"}

# Loggers that would otherwise keep handlers or levels of their own.
_SANIC_LOGGERS = ("sanic", "sanic.root", "sanic.error", "sanic.access", "sanic.server")

# The REST request being handled in this context, or None. The app sets the request itself and
# its `.id` (Sanic's: the client's X-Request-ID, else a uuid4 made on first use) is read only
# when a line is logged, so a request that logs nothing never pays for making an id. A plain
# string is taken as the id.
request_id: ContextVar[Any] = ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Copies `request_id` onto each record as `record.request_id`, only when it is set (a line
    from outside a request has no such field rather than `null`). On handlers, not on the root
    logger: a logger's filters do not see records propagated from child loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_id.get()
        if current is not None and not hasattr(record, "request_id"):
            record.request_id = str(getattr(current, "id", current))
        return True


class _Window:
    """One (logger, message) pair's current interval: when it began, lines let through, lines
    dropped since the last line let through."""

    __slots__ = ("passed", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.passed = 0
        self.suppressed = 0


class ErrorRateLimitFilter(logging.Filter):
    """Lets at most `max_per_interval` WARNING-or-worse records per (logger name, message
    template) through per `interval_s`; drops the rest and counts them. The first record of
    that pair let through after a drop carries `suppressed` (how many were dropped), so the log
    says how much it left out. INFO and DEBUG records always pass: access logs and routine
    lines are bounded by their own settings, not here.

    Why per message template (`record.msg`, before `%` formatting) and not per line: a flood
    of one failure (the same traceback per bad request) is cut to a few lines, while a
    different failure in the same second is still logged. Why a count on the next line rather
    than a summary line of its own: a filter cannot emit a record without a timer thread, and
    the next line of the same kind is where a reader looks. A count still pending when no
    further line comes is lost with the process; the cap on lines is what matters.

    One instance is shared by all the root logger's handlers (stdout and file): the decision
    is stored on the record, so the second handler repeats it instead of counting the record
    twice. Pairs are tracked in a dict bounded by `max_keys`: past it, expired windows are
    dropped, and if none has expired a new pair shares one window per logger (an attacker who
    varies the message text gets no more lines than one pair). Thread-safe (one lock): the
    WAL writer and warm-tier threads log too.
    """

    _DECIDED = "_rate_limit_passed"

    def __init__(
        self,
        max_per_interval: int,
        interval_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        super().__init__()
        self.max_per_interval = max_per_interval
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, object], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.max_per_interval <= 0:
            return True
        decided = getattr(record, self._DECIDED, None)
        if decided is None:
            decided = self._decide(record)
            setattr(record, self._DECIDED, decided)
        return decided

    def _decide(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        with self._lock:
            window = self._window(record, now)
            if now - window.start >= self.interval_s:
                window.start, window.passed = now, 0
            if window.passed >= self.max_per_interval:
                window.suppressed += 1
                return False
            window.passed += 1
            if window.suppressed:
                record.suppressed = window.suppressed
                window.suppressed = 0
            return True

    def _window(self, record: logging.LogRecord, now: float) -> _Window:
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        key: tuple[str, object] = (record.name, template)
        window = self._windows.get(key)
        if window is not None:
            return window
        if len(self._windows) >= self.max_keys:
            # Drop windows that expired with nothing pending (a pending count would be lost).
            for old_key, old in list(self._windows.items()):
                if now - old.start >= self.interval_s and not old.suppressed:
                    del self._windows[old_key]
            if len(self._windows) >= self.max_keys:
                key = (record.name, None)
                window = self._windows.get(key)
                if window is not None:
                    return window
        window = self._windows[key] = _Window(now)
        return window


class SizeAndTimeRotatingFileHandler(TimedRotatingFileHandler):
    """Rotates at midnight (local time) and, with `max_bytes` > 0, whenever the file would grow
    past `max_bytes`.

    Why a subclass: the standard library has one handler per trigger (RotatingFileHandler,
    TimedRotatingFileHandler) and none for both. Two overrides: `shouldRollover` adds the size
    test, and `rotation_filename` appends a counter (`app.log.2026-12-05.001`, `.002`, ...)
    because the timed handler names a rotated file by its day alone and deletes an existing
    file of that name, which would drop every earlier size rotation of the same day. The
    zero-padded counter keeps name order equal to age order, which is how the timed handler
    picks the oldest files to delete beyond `backupCount` (its date pattern still matches).
    """

    def __init__(
        self, filename: str | os.PathLike[str], *, max_bytes: int = 0, backup_count: int = 14
    ) -> None:
        super().__init__(filename, when="midnight", backupCount=backup_count, encoding="utf-8")
        self.max_bytes = max_bytes

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if super().shouldRollover(record):
            return True
        if self.max_bytes <= 0:
            return False
        if self.stream is None:  # delay=True, or closed by a previous rollover
            self.stream = self._open()
        position = self.stream.tell()
        # An empty file is never rolled over: one line longer than max_bytes still goes in.
        return position > 0 and position + len(self.format(record)) + 1 > self.max_bytes

    def rotation_filename(self, default_name: str) -> str:
        name = super().rotation_filename(default_name)
        # One past the highest number of this day still present (not the first free one:
        # deleting the oldest frees low numbers, and reusing them would break the order).
        directory, base = os.path.split(name + ".")
        numbers = [
            int(entry[len(base) :])
            for entry in os.listdir(directory or ".")
            if entry.startswith(base) and entry[len(base) :].isdigit()
        ]
        return f"{name}.{max(numbers, default=0) + 1:03d}"


def _formatter() -> logging.Formatter:
    return JsonFormatter(_FORMAT, rename_fields=_RENAME, timestamp="time")


def setup_logging(config: LogConfig) -> list[logging.Handler]:
    """Install the stdout and file handlers on the root logger; returns the installed handlers.

    The file's directory is created if needed; the file rotates at midnight (local time) and
    past `log.max_file_bytes`, keeping `log.backup_count` rotated files. Warnings and errors
    are rate-limited per (logger, message) to `log.max_errors_per_s`.
    """
    formatter = _formatter()
    stream = logging.StreamHandler(sys.stdout)
    handlers: list[logging.Handler] = [stream]
    if config.file:
        path = Path(config.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            SizeAndTimeRotatingFileHandler(
                path, max_bytes=config.max_file_bytes, backup_count=config.backup_count
            )
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    request_ids = RequestIdFilter()
    # One per call, shared by this call's handlers (it counts each record once).
    rate_limit = ErrorRateLimitFilter(config.max_errors_per_s)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(rate_limit)
        handler.addFilter(request_ids)
        root.addHandler(handler)
    root.setLevel(config.level.upper())
    for name in _SANIC_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    return handlers
