"""`hft-appliance fsck [--repair]`: report on every log segment, and repair damage on request.

Why a separate, explicit command: the appliance refuses to start over damage that is not a torn
tail, because dropping it could drop acknowledged batches. Only a person decides that; this
command shows what is there and, with `--repair`, keeps every record whose CRC checks, moves the
bad bytes to `DIR/quarantine/` (nothing is deleted) and rewrites the segment atomically
(temporary file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from appliance.durability import wal
from appliance.durability.encryption import DataCipher
from appliance.durability.fsutil import make_private_dir, write_private
from appliance.durability.keycheck import check_data_dir

EXIT_CLEAN = 0
EXIT_DAMAGED = 1


@dataclass
class Repaired:
    path: Path
    kept_records: int
    quarantined: list[Path]


def scan(
    data_dir: str | os.PathLike[str], cipher: DataCipher | None = None
) -> list[wal.SegmentScan]:
    return list(wal.iter_scans(wal.wal_dir(data_dir), cipher))


def repair_segment(seg: wal.SegmentScan, quarantine: Path) -> Repaired:
    """Keep every valid record of `seg`, quarantine each bad stretch, rewrite atomically."""
    data = seg.path.read_bytes()
    make_private_dir(quarantine)
    moved = []
    for damage in seg.damage:
        target = quarantine / f"{seg.path.name}.{damage.offset}-{damage.end}.bad"
        write_private(target, data[damage.offset : damage.end])
        moved.append(target)
    wal.fsync_dir(quarantine)
    kept = bytearray()
    for damage_free in _good_stretches(seg):
        kept += data[damage_free[0] : damage_free[1]]
    tmp = seg.path.with_name(seg.path.name + ".repair")
    write_private(tmp, kept)
    os.replace(tmp, seg.path)  # atomic: the segment is either the old or the repaired bytes
    wal.fsync_dir(seg.path.parent)
    return Repaired(seg.path, len(seg.records), moved)


def _good_stretches(seg: wal.SegmentScan) -> list[tuple[int, int]]:
    stretches = []
    at = 0
    for damage in seg.damage:
        if damage.offset > at:
            stretches.append((at, damage.offset))
        at = damage.end
    if at < seg.size:
        stretches.append((at, seg.size))
    return stretches


def run(
    data_dir: str | os.PathLike[str],
    *,
    repair: bool,
    out: TextIO,
    cipher: DataCipher | None = None,
) -> int:
    """Print one line per segment (and per problem); return the exit status.

    Holds the log directory's lock throughout: never run against a log being written. With a
    data key (`cipher`), a log written with another key raises `encryption.DataKeyError`
    before anything is read or repaired: a wrong key must never read as damage to quarantine.
    """
    directory = wal.wal_dir(data_dir)
    if not directory.is_dir():
        print(f"{directory}: no write-ahead log segments", file=out)
        return EXIT_CLEAN
    lock_fd = wal.lock_dir(directory)
    try:
        check_data_dir(data_dir, cipher)
        return _run(data_dir, directory, repair, out, cipher)
    finally:
        os.close(lock_fd)


def _run(
    data_dir: str | os.PathLike[str],
    directory: Path,
    repair: bool,
    out: TextIO,
    cipher: DataCipher | None,
) -> int:
    segments = scan(data_dir, cipher)
    if not segments:
        print(f"{directory}: no write-ahead log segments", file=out)
        return EXIT_CLEAN
    damaged = False
    previous_last = 0
    for seg in segments:
        first, last = seg.first_lsn, seg.last_lsn
        span = f"lsn {first}..{last}" if first is not None else "no records"
        state = "ok" if not seg.damage else f"{len(seg.damage)} problem(s)"
        timed = sum(record.timestamps is not None for _, record in seg.records)
        with_times = f" ({timed} with timestamps)" if timed else ""
        summary = f"{len(seg.records)} records{with_times}, {seg.size} bytes, {span}: {state}"
        print(f"{seg.path}: {summary}", file=out)
        for damage in seg.damage:
            kind = "torn tail" if damage is seg.torn_tail else "corrupt"
            print(
                f"  {kind} at offset {damage.offset} ({damage.end - damage.offset} bytes): "
                f"{damage.reason}",
                file=out,
            )
        if first is not None and first <= previous_last:
            print(f"  lsn {first} does not follow {previous_last} (not repairable)", file=out)
            damaged = True
        if last is not None:
            previous_last = last
        if seg.damage:
            damaged = True
            if repair:
                result = repair_segment(seg, Path(data_dir) / "quarantine")
                print(
                    f"  repaired: kept {result.kept_records} records, bad bytes moved to "
                    + ", ".join(str(p) for p in result.quarantined),
                    file=out,
                )
    if damaged and not repair:
        print('damage found: "hft-appliance fsck --repair" keeps every valid record', file=out)
        return EXIT_DAMAGED
    return EXIT_CLEAN
