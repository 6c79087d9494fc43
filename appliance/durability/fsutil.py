"""File-system durability primitives shared by the log, checkpoints and the warm tier.

File modes: every data file is created 0600 and every data directory 0700 (log segments,
checkpoints, warm segments, quarantine, archives), set with an explicit chmod after creation so
the result does not depend on the process's umask. The values are market data, and the key id
and layout of encrypted files are metadata: neither is for other local users.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_FILE_MODE = 0o600
DATA_DIR_MODE = 0o700


def fsync_dir(directory: Path) -> None:
    """Make a create, rename or unlink in `directory` durable: the entry lives in the
    directory's own data, which fsyncing the file does not cover."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(directory: Path) -> None:
    """`mkdir -p` whose created directories (and `directory` itself) are 0700.

    Parents that already exist are left as they are (they may be the operator's); `directory`
    itself is always set, so a data directory made by an older version is tightened too."""
    missing = []
    at = Path(directory)
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, DATA_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, DATA_DIR_MODE)
    os.chmod(directory, DATA_DIR_MODE)


def open_private(path: Path, flags: int) -> int:
    """`os.open` of a data file with O_CREAT, its mode 0600 whatever the umask."""
    fd = os.open(path, flags | os.O_CREAT, DATA_FILE_MODE)
    try:
        os.fchmod(fd, DATA_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes | memoryview) -> None:
    """Create (or truncate) `path` 0600, write `data`, fsync; no rename (callers do that)."""
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_private(path: Path, data: bytes | memoryview) -> None:
    """Replace `path` atomically and durably with `data`: a 0600 temp file beside it, fsync,
    rename, fsync of the directory. A crash leaves the old file or the new one, never half;
    a leftover `<name>.tmp` is garbage to delete."""
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
