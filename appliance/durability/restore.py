"""`hft-appliance restore --from ARCHIVE`: turn an archive made by `archive` back into a data
directory whose warm tier `serve` reads (GET /history/stats answers as it did).

What comes back: every sealed warm segment listed in the archive's manifest, byte for byte
(the manifest is verified first: any missing or changed file and nothing is restored), at
`<durability.dir>/warm/<hex of the UTF-8 symbol>/<first index, 20 digits>.seg`, the layout the
warm tier scans at start. What does not: the hot tier (GET /stats/ answers a restored symbol
only once new values arrive), the write-ahead log, and the values that were not yet sealed
when the archive was made; none of them is in an archive.

Why a checkpoint is written too: the log's writer numbers a symbol's values from its total,
which a data directory without a log or checkpoint would start at 0, and the warm tier drops
values below what it already holds (its recovery idempotence). A checkpoint at lsn 0 that
holds no hot values but each symbol's total (the end of its newest restored segment) makes new
values continue after the restored history.

Never over data: the data directory must hold no file (empty directories are fine). Everything
is first written under `<dir>/.restoring/` (same filesystem: renames are atomic), then moved in:
checkpoints first, warm last, so an interruption never leaves segments without the totals that
protect them. A leftover `.restoring/` from an interrupted run is ours and is removed.

Encrypted archives: the segments are copied as they are (still encrypted) and read with the
configured data key (a segment written with another key stops the restore, naming both key
ids); the checkpoint is written encrypted with it.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple, TextIO

from appliance.durability.archive import ManifestEntry, _copy_durably, load_manifest, verify
from appliance.durability.checkpoint import CHECKPOINTS, Snapshot, SymbolSnapshot, write_snapshot
from appliance.durability.encryption import DataCipher
from appliance.durability.fsutil import fsync_dir, make_private_dir
from appliance.durability.warm import NS_PER_DAY, symbol_key
from appliance.durability.warm_segment import SegmentCorruptError, read_header, segment_name

STAGING = ".restoring"
WARM = "warm"
_ENTRY_PATH = re.compile(r"warm/(?P<key>[0-9a-f]+)/(?P<name>[0-9]+\.seg)")


class RestoreError(Exception):
    """Nothing was restored; the message says why (one line per problem)."""


class RestoreReport(NamedTuple):
    segments: int
    bytes: int
    totals: dict[str, int]  # symbol -> index after its newest restored value
    expired: int  # segments older than retain_days: `serve` would delete them at start


def _held_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if not p.is_dir()] if data_dir.exists() else []


def _check_entry(entry: ManifestEntry) -> None:
    """The manifest is data from outside: a path must be exactly where `archive` puts it."""
    match = _ENTRY_PATH.fullmatch(entry.path)
    if (
        match is None
        or match.group("key") != symbol_key(entry.symbol)
        or match.group("name") != segment_name(entry.first_index)
    ):
        raise RestoreError(
            f"manifest entry {entry.path!r} is not where archive puts {entry.symbol!r}"
        )


def _copy_segments(
    archive_dir: Path, entries: list[ManifestEntry], staging: Path, cipher: DataCipher | None
) -> dict[str, int]:
    """Copy and re-read every listed segment; per symbol, the end of its newest one."""
    ends: dict[str, int] = {}
    for entry in sorted(entries, key=lambda e: (e.symbol, e.first_index)):
        if entry.first_index < ends.get(entry.symbol, 0):
            raise RestoreError(f"{entry.path}: overlaps the previous segment of {entry.symbol!r}")
        target = staging / entry.path
        _copy_durably(archive_dir / entry.path, target)
        try:
            header = read_header(target, cipher)
        except SegmentCorruptError as exc:
            raise RestoreError(str(exc)) from None
        if (header.symbol, header.first_index, header.end_index) != (
            entry.symbol, entry.first_index, entry.end_index,
        ):  # fmt: skip
            raise RestoreError(f"{entry.path}: its header does not match the manifest")
        ends[entry.symbol] = header.end_index
    return ends


def _move_in(staging: Path, data_dir: Path) -> None:
    """Checkpoints, then warm: each an atomic rename over an absent or file-less directory."""
    for name in (CHECKPOINTS, WARM):
        source, target = staging / name, data_dir / name
        if not source.exists():
            continue
        if target.exists():
            shutil.rmtree(target)  # holds no file (checked): only empty directories
        source.rename(target)
        fsync_dir(data_dir)
    shutil.rmtree(staging)
    fsync_dir(data_dir)


def restore(
    archive_dir: Path | str,
    data_dir: Path | str,
    *,
    retain_days: int = 0,
    now_ns: int | None = None,
    cipher: DataCipher | None = None,
) -> RestoreReport:
    """Verify `archive_dir`, then rebuild `data_dir`'s warm tier from it (module docstring)."""
    archive_dir, data_dir = Path(archive_dir), Path(data_dir)
    try:
        report = verify(archive_dir)
        manifest = load_manifest(archive_dir)
    except (OSError, ValueError) as exc:
        raise RestoreError(f"cannot read the archive's manifest: {exc}") from None
    if not report.ok:
        raise RestoreError("the archive does not verify: " + "; ".join(report.problems))
    for entry in manifest.files:
        _check_entry(entry)
    staging = data_dir / STAGING
    if staging.exists():
        shutil.rmtree(staging)  # an interrupted restore's: never read by serve
    held = _held_files(data_dir)
    if held:
        raise RestoreError(
            f"{data_dir} already holds data ({len(held)} files, e.g. {held[0]}): restore only "
            "into an empty data directory; move this one aside or set [durability] dir"
        )
    make_private_dir(staging)
    ends = _copy_segments(archive_dir, list(manifest.files), staging, cipher)
    if ends:
        snapshot = Snapshot(0, {symbol: SymbolSnapshot(end, ()) for symbol, end in ends.items()})
        write_snapshot(staging, snapshot, cipher)
    _move_in(staging, data_dir)
    cutoff = (time.time_ns() if now_ns is None else now_ns) - retain_days * NS_PER_DAY
    expired = sum(e.last_received_ns < cutoff for e in manifest.files) if retain_days > 0 else 0
    return RestoreReport(len(manifest.files), sum(e.bytes for e in manifest.files), ends, expired)


def run_restore(
    archive_dir: Path | str,
    data_dir: Path | str,
    retain_days: int,
    out: TextIO,
    cipher: DataCipher | None = None,
) -> int:
    """`hft-appliance restore --from ARCHIVE`: 0 once the data directory is durable, else 1."""
    try:
        report = restore(archive_dir, data_dir, retain_days=retain_days, cipher=cipher)
    except RestoreError as exc:
        print(f"restore: nothing restored: {exc}", file=out)
        return 1
    print(
        f"restored {report.segments} segments ({report.bytes} bytes, {len(report.totals)} "
        f"symbols) from {archive_dir} into {Path(data_dir) / WARM}",
        file=out,
    )
    if report.expired:
        print(
            f"warning: {report.expired} of these segments are older than [durability] "
            f"retain_days = {retain_days}: serve deletes them at start; set retain_days = 0 "
            "(APP_DURABILITY__RETAIN_DAYS=0) to keep them",
            file=out,
        )
    return 0
