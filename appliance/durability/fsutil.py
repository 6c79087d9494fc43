"""File-system durability primitives shared by the log, checkpoints and the warm tier."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a create, rename or unlink in `directory` durable: the entry lives in the
    directory's own data, which fsyncing the file does not cover."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
