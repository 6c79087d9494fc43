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
"""

from __future__ import annotations

import logging
import os
import sys
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
    past `log.max_file_bytes`, keeping `log.backup_count` rotated files.
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
    for handler in handlers:
        handler.setFormatter(formatter)
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
