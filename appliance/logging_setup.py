"""Structured logging: JSON lines to stdout and to a daily-rotated file.

Why JSON lines: log shippers and `jq` read them without a parser per message format. Sanic is
built with `configure_logging=False`, so its loggers (`sanic.root`, `sanic.error`,
`sanic.access`, `sanic.server`) propagate to the root logger configured here and come out in
the same format. Called once, by the CLI; library code only creates named loggers.
"""

from __future__ import annotations

import logging
import sys
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path

from pythonjsonlogger.json import JsonFormatter

from appliance.config import LogConfig

_FORMAT = "%(levelname)s %(name)s %(message)s"
_RENAME = {"levelname": "level", "name": "logger"}

# Loggers that would otherwise keep handlers or levels of their own.
_SANIC_LOGGERS = ("sanic", "sanic.root", "sanic.error", "sanic.access", "sanic.server")


def _formatter() -> logging.Formatter:
    return JsonFormatter(_FORMAT, rename_fields=_RENAME, timestamp="time")


def setup_logging(config: LogConfig) -> list[logging.Handler]:
    """Install the stdout and file handlers on the root logger; returns the installed handlers.

    The file's directory is created if needed; the file rotates at midnight (local time) and
    keeps 14 old files.
    """
    formatter = _formatter()
    stream = logging.StreamHandler(sys.stdout)
    handlers: list[logging.Handler] = [stream]
    if config.file:
        path = Path(config.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            TimedRotatingFileHandler(path, when="midnight", backupCount=14, encoding="utf-8")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(config.level.upper())
    for name in _SANIC_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    return handlers
