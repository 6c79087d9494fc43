"""Cold-tier export: copy sealed warm segments to a directory with a manifest of checksums.

Why a manifest of whole-file sha256 (on top of each segment's own payload hash): compliance
needs to prove later, with nothing but the archive and `sha256sum`-level tooling, that no byte
changed or went missing. `hft-appliance verify DIR` re-hashes every listed file.

Sealed segments are immutable, so archiving a running appliance's directory is safe: only
`*.seg` files (renamed into place complete) are read, never `*.tmp`. Re-archiving into the
same directory copies only files that are new or differ, and rewrites the manifest.

Encrypted segments (`[security] data_key_file`) are copied as they are: an archive is as
encrypted as the data directory, `verify` checks the sha256 of the encrypted bytes without the
key, and `archive` (which reads each header for the manifest) and `restore` need the key. The
manifest (paths, symbols, index and time ranges, hashes: no values) stays readable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import msgspec

from appliance.durability.encryption import DataCipher
from appliance.durability.fsutil import fsync_dir, make_private_dir, open_private
from appliance.durability.keycheck import check_data_dir
from appliance.durability.warm import symbol_from_key
from appliance.durability.warm_segment import (
    SUFFIX,
    SegmentCorruptError,
    read_header,
    write_atomically,
)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class ManifestEntry(msgspec.Struct, frozen=True):
    path: str  # relative to the archive directory, "/"-separated
    bytes: int
    sha256: str
    symbol: str
    first_index: int
    end_index: int  # exclusive
    first_received_ns: int
    last_received_ns: int


class Manifest(msgspec.Struct, frozen=True):
    version: int
    created_ns: int
    files: list[ManifestEntry]


class VerifyReport(NamedTuple):
    checked: int
    problems: list[str]  # one line per bad file, naming it
    unlisted: list[str]  # files present but not in the manifest (reported, not failing)

    @property
    def ok(self) -> bool:
        return not self.problems


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_durably(source: Path, target: Path) -> None:
    """Copy via a temp file, fsync, rename, fsync the directory (never a half file)."""
    make_private_dir(target.parent)
    tmp = target.with_name(target.name + ".tmp")
    dst_fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    with open(source, "rb") as src, open(dst_fd, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def archive(
    warm_dir: Path | str,
    to: Path | str,
    *,
    progress: Callable[[str], None] = lambda line: None,
    cipher: DataCipher | None = None,
) -> Manifest:
    """Copy every sealed segment under `warm_dir` into `to` and write `to/manifest.json`."""
    warm_dir, to = Path(warm_dir), Path(to)
    make_private_dir(to)
    entries: list[ManifestEntry] = []
    for sub in sorted(p for p in warm_dir.iterdir() if p.is_dir()) if warm_dir.is_dir() else []:
        try:
            symbol = symbol_from_key(sub.name)
        except (ValueError, UnicodeDecodeError):
            continue
        for source in sorted(sub.glob("*" + SUFFIX)):
            try:
                header = read_header(source, cipher)
                digest = sha256_file(source)
            except FileNotFoundError:  # deleted by retention meanwhile
                continue
            except SegmentCorruptError as exc:
                progress(f"skipped (corrupt): {exc}")
                continue
            relative = f"warm/{sub.name}/{source.name}"
            target = to / relative
            if not (target.is_file() and sha256_file(target) == digest):
                _copy_durably(source, target)
                progress(f"copied {relative}")
            entries.append(
                ManifestEntry(
                    path=relative,
                    bytes=source.stat().st_size,
                    sha256=digest,
                    symbol=symbol,
                    first_index=header.first_index,
                    end_index=header.end_index,
                    first_received_ns=header.first_received_ns,
                    last_received_ns=header.last_received_ns,
                )
            )
    manifest = Manifest(MANIFEST_VERSION, time.time_ns(), entries)
    write_atomically(to, MANIFEST, msgspec.json.format(msgspec.json.encode(manifest)))
    return manifest


def load_manifest(directory: Path | str) -> Manifest:
    """Raises OSError or ValueError (naming the file) for a missing or unreadable manifest."""
    path = Path(directory) / MANIFEST
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: unreadable manifest: {exc}") from None


def verify(directory: Path | str) -> VerifyReport:
    """Re-hash every file listed in the manifest; report missing and changed ones by path."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems: list[str] = []
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file():
            problems.append(f"missing: {entry.path}")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems.append(f"size mismatch: {entry.path} ({size} bytes, manifest {entry.bytes})")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"sha256 mismatch: {entry.path}")
    listed = {entry.path for entry in manifest.files}
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {
        MANIFEST
    }
    return VerifyReport(len(manifest.files), problems, sorted(present - listed))


def summary_line(manifest: Manifest) -> dict[str, Any]:
    return {
        "files": len(manifest.files),
        "bytes": sum(entry.bytes for entry in manifest.files),
        "symbols": len({entry.symbol for entry in manifest.files}),
    }


def run_archive(
    warm_dir: Path | str, to: Path | str, out: TextIO, cipher: DataCipher | None = None
) -> int:
    """`hft-appliance archive --to DIR`: 0 once the copy and manifest are durable.

    Raises `encryption.DataKeyError` (exit 2) when the data key does not fit the segments."""
    check_data_dir(Path(warm_dir).parent, cipher)
    manifest = archive(warm_dir, to, progress=lambda line: print(line, file=out), cipher=cipher)
    totals = summary_line(manifest)
    print(
        f"archived {totals['files']} segments ({totals['bytes']} bytes, {totals['symbols']} "
        f"symbols) from {warm_dir} to {to}; manifest {Path(to) / MANIFEST}",
        file=out,
    )
    return 0


def run_verify(directory: Path | str, out: TextIO) -> int:
    """`hft-appliance verify DIR`: 0 when every listed file matches, 1 otherwise."""
    try:
        report = verify(directory)
    except (OSError, ValueError) as exc:
        print(f"cannot read the manifest: {exc}", file=out)
        return 1
    for line in report.problems:
        print(line, file=out)
    for path in report.unlisted:
        print(f"note: not in the manifest: {path}", file=out)
    verdict = "ok" if report.ok else f"FAILED ({len(report.problems)} bad)"
    print(f"verify {directory}: {report.checked} files checked, {verdict}", file=out)
    return 0 if report.ok else 1
