"""Hot-tier checkpoints: bound replay time by saving every symbol's retained raw values.

Why raw values and not the engine's summaries: the summaries are rebuilt by appending the values
(about 1e8 values per second on the numpy engine), the file format then does not depend on the
engine or its geometry, and a checkpoint is plain `.npy` files anyone can inspect.

Layout, under `DIR/checkpoints/`:

    ckpt-00000000000000001234/        one finished checkpoint, covering log records lsn <= 1234
        manifest.json                 format, lsn; per symbol: hot, total, file, crc32c
                                      (and marks, marks_file, marks_crc32c: see below)
        s0000.npy, s0001.npy, ...     each symbol's hot window, oldest value first
        t0000.npy, t0001.npy, ...     each symbol's time marks, int64 (2, marks)
    ckpt-00000000000000001300.tmp/    one being written (or abandoned by a crash)

Crash-safety invariants:
- a checkpoint is written entirely inside a `.tmp` directory; its files and the directory are
  fsynced before the rename to the final name, and the parent is fsynced after it, so a final
  name on disk always means complete, durable contents;
- `load_latest` never reads a `.tmp` directory (it deletes them) and verifies every file's
  CRC32C before trusting a checkpoint; a bad one is skipped with a warning for an older one,
  or for a full replay of the log (None);
- the values of a checkpoint are exactly the store after record `lsn` and before `lsn + 1`: the
  log's writer thread, the store's only appender, takes the snapshot between two groups.

Time marks (`Store.time_marks`): every value has a timestamp (`appliance.timestamps`), kept as
(first index of a run of equal times relative to the oldest hot value, its time) pairs, taken
under the log's commit lock with the values and saved beside them as an int64 array of shape
(2, marks) (row 0 the indexes, row 1 the ns), restored after the values are appended
(`Store.restore_time_marks`). They extend format 1 compatibly: three optional keys per symbol
(`marks`, `marks_file`, `marks_crc32c`) that an older reader ignores. A checkpoint without them
(written before they existed) still loads; its values then have the restore's time, a receive
time, and later records that precede it are moved forward to it, as the store moves them.

Encrypted (`[security] data_key_file`): each symbol's values are `sNNNN.enc` instead of `.npy`,
an `encryption` chunked file (4 MiB chunks, AES-256-GCM) whose associated data binds the
checkpoint's lsn and the manifest's symbol, hot length and total, so a manifest edited or a file
swapped between symbols or checkpoints fails authentication. The manifest (symbols, lengths,
totals, CRCs: no values) stays readable and records the key id; the CRC32C covers the file as
written (ciphertext), so damage reads as damage before any decryption.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from appliance.durability.encryption import (
    KIND_CHECKPOINT,
    DataCipher,
    DecryptError,
    open_chunks,
    seal_chunks,
)
from appliance.durability.fsutil import fsync_dir, make_private_dir, open_private
from appliance.store import Store, SymbolLimitError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1
_PREFIX = "ckpt-"
_FILE_NAME = re.compile(r"[st][0-9]{4,}\.(npy|enc)")
_TMP = ".tmp"
# Values per store append during restore: large enough that per-call costs vanish, small
# enough that the temporary copies of one append stay a few tens of MiB.
RESTORE_CHUNK = 4 * 1024 * 1024
# Bytes written between two fdatasync calls while writing a checkpoint file (see _write_npy).
_SYNC_BYTES = 4 << 20


class CheckpointError(Exception):
    """A checkpoint directory that cannot be trusted (missing file, bad checksum, bad manifest)."""


@dataclass(frozen=True, slots=True)
class SymbolCheckpoint:
    """One symbol: its hot window and how many values it had ever accepted (evicted included)."""

    total: int
    values: np.ndarray  # float64, oldest first; a read-only memmap when loaded from disk
    # (run start indexes relative to values[0], their ns), or None: a checkpoint without marks
    marks: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The hot tier as it was after log record `lsn`; symbols in the store's creation order."""

    lsn: int
    path: Path | None
    symbols: dict[str, SymbolCheckpoint]


@dataclass(frozen=True, slots=True)
class SymbolSnapshot:
    """One symbol as taken from the store: its hot window as read-only pieces, in order."""

    total: int
    parts: tuple[np.ndarray, ...]
    marks: tuple[np.ndarray, np.ndarray] | None = None  # `Store.time_marks`, taken with parts

    @property
    def hot(self) -> int:
        return sum(int(part.shape[0]) for part in self.parts)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The store at log record `lsn`, not yet on disk (see `snapshot`)."""

    lsn: int
    symbols: dict[str, SymbolSnapshot]


def checkpoint_dir(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / CHECKPOINTS


def _name(lsn: int) -> str:
    return f"{_PREFIX}{lsn:020d}"


def _lsn_of(name: str) -> int | None:
    """The lsn of a finished checkpoint's directory name, None for anything else."""
    if not name.startswith(_PREFIX) or name.endswith(_TMP):
        return None
    digits = name[len(_PREFIX) :]
    return int(digits) if len(digits) == 20 and digits.isdigit() else None


# -- write ----------------------------------------------------------------------------------


def snapshot(store: Store, lsn: int, totals: Mapping[str, int]) -> Snapshot:
    """Take every symbol's hot window now (each under its symbol lock).

    This is the only part that must run where the store is consistent with `lsn` (the log's
    writer thread, between groups); `write_snapshot` can then run anywhere. On the numpy
    engine it copies nothing (read-only views of pages the engine never rewrites, see
    `SegmentTreeSeries.tail_views`): the pause is a list of page views, and pages evicted
    meanwhile stay in memory until the write ends. Other engines are copied (`tail`).
    """
    symbols = {}
    for symbol in store.symbols():
        parts = tuple(store.snapshot_parts(symbol))
        marks = store.time_marks(symbol)  # no append between the two: see the docstring
        taken = SymbolSnapshot(0, parts)
        # A total below the hot length would be a caller bug; never record an impossible one.
        total = max(int(totals.get(symbol, 0)), taken.hot)
        symbols[symbol] = SymbolSnapshot(total, parts, marks)
    return Snapshot(lsn, symbols)


def write_checkpoint(
    directory: str | os.PathLike[str],
    store: Store,
    lsn: int,
    totals: Mapping[str, int],
    cipher: DataCipher | None = None,
) -> Path:
    """Write the store's hot tier as checkpoint `lsn` (see the module docstring); its path."""
    return write_snapshot(directory, snapshot(store, lsn, totals), cipher)


def _context(lsn: int, symbol: str, hot: int, total: int) -> bytes:
    """The associated data of an encrypted values file: what the manifest says about it."""
    return f"checkpoint\0{lsn}\0{symbol}\0{hot}\0{total}".encode()


def _marks_context(lsn: int, symbol: str, hot: int, marks: int) -> bytes:
    """The associated data of an encrypted marks file (never valid as a values file's)."""
    return f"checkpoint marks\0{lsn}\0{symbol}\0{hot}\0{marks}".encode()


def write_snapshot(
    directory: str | os.PathLike[str], checkpoint: Snapshot, cipher: DataCipher | None = None
) -> Path:
    """Write `checkpoint` durably: .tmp directory, fsync files and directory, rename, fsync parent.

    Writing a checkpoint for an lsn that already has one returns the existing one (nothing
    was logged in between, so the contents are the same).
    """
    root = checkpoint_dir(directory)
    make_private_dir(root)
    final = root / _name(checkpoint.lsn)
    if final.exists():
        return final
    tmp = root / (_name(checkpoint.lsn) + _TMP)
    if tmp.exists():  # left by a crash, or by a failed attempt of this same process
        shutil.rmtree(tmp)
    make_private_dir(tmp)
    entries = []
    for number, (symbol, item) in enumerate(checkpoint.symbols.items()):
        if cipher is None:
            file_name = f"s{number:04d}.npy"
            checksum = _write_npy(tmp / file_name, item.parts)
        else:
            file_name = f"s{number:04d}.enc"
            context = _context(checkpoint.lsn, symbol, item.hot, item.total)
            checksum = _write_encrypted(tmp / file_name, item.parts, cipher, context)
        entry: dict[str, object] = {
            "symbol": symbol,
            "hot": item.hot,
            "total": item.total,
            "file": file_name,
            "crc32c": checksum,
        }
        if item.marks is not None and item.hot:
            entry.update(_write_marks(tmp, number, checkpoint.lsn, symbol, item, cipher))
        entries.append(entry)
    manifest: dict[str, object] = {"format": FORMAT, "lsn": checkpoint.lsn, "symbols": entries}
    if cipher is not None:
        manifest["key_id"] = cipher.key_id_hex
    with open(open_private(tmp / MANIFEST, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)  # the directory entries of the files, before the name says "complete"
    os.rename(tmp, final)
    fsync_dir(root)  # the rename itself
    return final


def _write_npy(path: Path, parts: tuple[np.ndarray, ...]) -> int:
    """Write the concatenation of `parts` as one float64 .npy file and fsync it; return the
    CRC32C of the file's bytes (header included)."""
    parts = tuple(np.ascontiguousarray(part, dtype=np.float64) for part in parts)
    count = sum(int(part.shape[0]) for part in parts)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": (count,)}
    )
    header = buffer.getvalue()
    checksum = crc32c.crc32c(header)
    with open(open_private(path, os.O_WRONLY | os.O_TRUNC), "wb", buffering=0) as f:
        f.write(header)
        unsynced = 0
        for part in parts:
            data = memoryview(part).cast("B")
            for start in range(0, len(data), _SYNC_BYTES):
                piece = data[start : start + _SYNC_BYTES]
                f.write(piece)  # no copy: the page's own buffer
                checksum = crc32c.crc32c(piece, value=checksum)
                unsynced += len(piece)
                if unsynced >= _SYNC_BYTES:
                    # Flush as we go: one fsync of a GB of dirty pages at the end would stall
                    # the log's own fsyncs on the same disk (acks under `always`) for its
                    # whole duration; a few MiB at a time keeps each stall short.
                    os.fdatasync(f.fileno())
                    unsynced = 0
        os.fsync(f.fileno())
    return checksum


def _write_marks(
    directory: Path,
    number: int,
    lsn: int,
    symbol: str,
    item: SymbolSnapshot,
    cipher: DataCipher | None,
) -> dict[str, object]:
    """Write one symbol's marks as `tNNNN.npy` (or `.enc`) and fsync it; the manifest keys."""
    assert item.marks is not None
    table = np.ascontiguousarray(np.stack(item.marks).astype("<i8", copy=False))
    count = int(table.shape[1])
    if cipher is None:
        file_name = f"t{number:04d}.npy"
        buffer = io.BytesIO()
        np.save(buffer, table, allow_pickle=False)
        data = buffer.getvalue()
    else:
        file_name = f"t{number:04d}.enc"
        context = _marks_context(lsn, symbol, item.hot, count)
        raw = memoryview(table).cast("B")
        data = b"".join(seal_chunks(cipher, KIND_CHECKPOINT, [raw], context))
    with open(open_private(directory / file_name, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"marks": count, "marks_file": file_name, "marks_crc32c": crc32c.crc32c(data)}


def _load_marks(
    path: Path, lsn: int, entry: dict, cipher: DataCipher | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """A symbol's marks as the manifest describes them (None if it lists none), verified:
    CRC, shape, first index 0, indexes increasing below `hot`, times not decreasing."""
    if "marks_file" not in entry:
        return None
    name, count, hot = entry["marks_file"], int(entry["marks"]), int(entry["hot"])
    if not _FILE_NAME.fullmatch(name) or not name.startswith("t"):
        raise CheckpointError(f"bad marks file name {name!r} in the manifest")
    file = path / name
    data = file.read_bytes()
    if crc32c.crc32c(data) != entry["marks_crc32c"]:
        raise CheckpointError(f"{name}: crc32c does not match the manifest")
    if cipher is not None:
        context = _marks_context(lsn, entry["symbol"], hot, count)
        try:
            raw = b"".join(open_chunks(cipher, KIND_CHECKPOINT, data, context))
        except DecryptError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
        if len(raw) != 16 * count:
            raise CheckpointError(f"{name}: {len(raw) // 16} marks, the manifest says {count}")
        table = np.frombuffer(raw, dtype="<i8").reshape(2, count)
    else:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    if table.dtype != np.int64 or table.shape != (2, count) or count < 1:
        raise CheckpointError(f"{name}: {table.dtype} {table.shape}, not ({2}, {count}) int64")
    index, ns = table[0], table[1]
    if (
        int(index[0]) != 0
        or int(index[-1]) >= hot
        or bool((index[1:] <= index[:-1]).any())
        or bool((ns[1:] < ns[:-1]).any())
    ):
        raise CheckpointError(f"{name}: marks out of order or outside the {hot} values")
    return index.copy(), ns.copy()


def _write_encrypted(
    path: Path, parts: tuple[np.ndarray, ...], cipher: DataCipher, context: bytes
) -> int:
    """`_write_npy` for an encrypted checkpoint: raw float64 values in 4 MiB AES-GCM chunks
    (no .npy header: the manifest says how many); returns the CRC32C of the file's bytes."""

    def pieces():  # no copy before the cipher: views of the pages, 4 MiB at a time
        for part in parts:
            data = memoryview(np.ascontiguousarray(part, dtype="<f8")).cast("B")
            for start in range(0, len(data), _SYNC_BYTES):
                yield data[start : start + _SYNC_BYTES]

    checksum = 0
    with open(open_private(path, os.O_WRONLY | os.O_TRUNC), "wb", buffering=0) as f:
        unsynced = 0
        for piece in seal_chunks(cipher, KIND_CHECKPOINT, pieces(), context):
            f.write(piece)
            checksum = crc32c.crc32c(piece, value=checksum)
            unsynced += len(piece)
            if unsynced >= _SYNC_BYTES:  # see _write_npy: keep each stall of the log short
                os.fdatasync(f.fileno())
                unsynced = 0
        os.fsync(f.fileno())
    return checksum


def _read_encrypted(file: Path, cipher: DataCipher, context: bytes, hot: int) -> np.ndarray:
    values = np.empty(hot, dtype="<f8")
    target = memoryview(values).cast("B")
    at = 0
    try:
        for plain in open_chunks(cipher, KIND_CHECKPOINT, file.read_bytes(), context):
            if at + len(plain) > len(target):
                raise CheckpointError(f"{file.name}: more values than the manifest's {hot}")
            target[at : at + len(plain)] = plain
            at += len(plain)
    except DecryptError as exc:
        raise CheckpointError(f"{file.name}: {exc}") from None
    if at != len(target):
        raise CheckpointError(f"{file.name}: {at // 8} values, the manifest says {hot}")
    values.setflags(write=False)
    return values


# -- read -----------------------------------------------------------------------------------


def load_latest(
    directory: str | os.PathLike[str], cipher: DataCipher | None = None
) -> Checkpoint | None:
    """The newest checkpoint whose files all verify, or None (replay the whole log).

    Deletes `.tmp` directories (interrupted checkpoints) first. Call it before a `Checkpointer`
    starts writing: it cannot tell an abandoned `.tmp` from one being written.
    """
    root = checkpoint_dir(directory)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        if path.name.startswith(_PREFIX) and path.name.endswith(_TMP):
            log.warning("removing interrupted checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        lsn = _lsn_of(path.name)
        if lsn is not None and path.is_dir():
            found.append((lsn, path))
    for lsn, path in sorted(found, reverse=True):
        try:
            return _load(path, lsn, cipher)
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping checkpoint %s, it cannot be trusted: %s", path, exc)
    return None


def _load(path: Path, lsn: int, cipher: DataCipher | None = None) -> Checkpoint:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"unknown manifest format {manifest.get('format')!r}")
    if manifest.get("lsn") != lsn:
        raise CheckpointError(f"manifest lsn {manifest.get('lsn')} does not match the name")
    kid = manifest.get("key_id")
    if (cipher is None) != (kid is None) or (cipher is not None and kid != cipher.key_id_hex):
        configured = "none" if cipher is None else cipher.key_id_hex
        raise CheckpointError(f"written with data key {kid or 'none'}, configured {configured}")
    symbols = {}
    for entry in manifest["symbols"]:
        if not _FILE_NAME.fullmatch(entry["file"]):  # never read outside the checkpoint
            raise CheckpointError(f"bad file name {entry['file']!r} in the manifest")
        file = path / entry["file"]
        checksum = _file_crc32c(file)
        if checksum != entry["crc32c"]:
            raise CheckpointError(f"{file.name}: crc32c {checksum} != manifest {entry['crc32c']}")
        if cipher is not None:
            context = _context(lsn, entry["symbol"], entry["hot"], entry["total"])
            values = _read_encrypted(file, cipher, context, int(entry["hot"]))
        else:
            values = np.load(file, mmap_mode="r") if entry["hot"] else np.load(file)
        if values.dtype != np.float64 or values.shape != (entry["hot"],):
            raise CheckpointError(f"{file.name}: {values.dtype} {values.shape}, not the manifest's")
        marks = _load_marks(path, lsn, entry, cipher) if entry["hot"] else None
        symbols[entry["symbol"]] = SymbolCheckpoint(int(entry["total"]), values, marks)
    return Checkpoint(lsn, path, symbols)


def _file_crc32c(path: Path) -> int:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return crc32c.crc32c(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return crc32c.crc32c(mapped)


def restore(store: Store, checkpoint: Checkpoint, chunk: int = RESTORE_CHUNK) -> dict[str, int]:
    """Append each symbol's checkpointed values to an empty store; return the restored totals.

    A checkpointed hot window is at most the retention bound it was written under, so no
    eviction happens and the hot tier equals the checkpoint. If `max_data_retention` has
    shrunk since, only the newest values that fit are restored (the older ones stay in the
    warm tier). Symbols beyond `max_symbols` (the limit was lowered) are skipped with a
    warning, as the log replay would refuse their batches. Each symbol's marks are put back
    after its values (a checkpoint without marks leaves the appends' receive-time ones).
    """
    if len(store):
        raise ValueError("restore needs an empty store")
    limit = store.retention.max_values
    totals = {}
    for symbol, item in checkpoint.symbols.items():
        values, marks = item.values, item.marks
        if values.shape[0] > limit:
            log.warning(
                "checkpoint %s: %s holds %d hot values, retention allows %d: restoring the newest",
                checkpoint.lsn,
                symbol,
                values.shape[0],
                limit,
            )
            if marks is not None:
                marks = cut_marks(*marks, values.shape[0] - limit)
            values = values[values.shape[0] - limit :]
        try:
            for start in range(0, values.shape[0], chunk):
                store.ingest(symbol, np.ascontiguousarray(values[start : start + chunk]))
        except SymbolLimitError:
            log.warning(
                "checkpoint %s: %s not restored, store.max_symbols is %d",
                checkpoint.lsn,
                symbol,
                store.max_symbols,
            )
            continue
        if marks is not None and values.shape[0]:
            store.restore_time_marks(symbol, *marks)
        totals[symbol] = item.total
    return totals


def cut_marks(index: np.ndarray, ns: np.ndarray, drop: int) -> tuple[np.ndarray, np.ndarray]:
    """Marks of the values after the first `drop` (the run holding the new first value
    starts at 0)."""
    first = int(np.searchsorted(index, drop, side="right")) - 1
    index, ns = index[first:] - drop, ns[first:].copy()
    index[0] = 0
    return index, ns


def prune(directory: str | os.PathLike[str], keep: int = 2) -> list[Path]:
    """Delete all but the newest `keep` finished checkpoints; return what was deleted.

    Keeping two means a checkpoint damaged on disk still leaves an older one to fall back to
    (the log must then still hold the records after the older one: retire segments by the
    oldest kept checkpoint's lsn, see `oldest_lsn`).
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    found = _finished(directory)
    removed = [path for _, path in found[:-keep]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def manifest_key_id(path: Path) -> tuple[bool, str | None]:
    """(whether `path` is a readable checkpoint manifest, its key id or None if plain): the
    up-front wrong-key check at start (a damaged manifest is left to `load_latest`)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, None
    if not isinstance(manifest, dict):
        return False, None
    kid = manifest.get("key_id")
    return True, kid if isinstance(kid, str) else None


def oldest_lsn(directory: str | os.PathLike[str]) -> int | None:
    """The lsn of the oldest finished checkpoint kept: log records up to it are covered twice."""
    found = _finished(directory)
    return found[0][0] if found else None


def finished(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Every finished checkpoint, (lsn, path), oldest first."""
    return _finished(directory)


def _finished(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    root = checkpoint_dir(directory)
    if not root.is_dir():
        return []
    found = [(_lsn_of(path.name), path) for path in root.iterdir()]
    return sorted((lsn, path) for lsn, path in found if lsn is not None)


def _newest_mtime(directory: str | os.PathLike[str]) -> float | None:
    """When the newest finished checkpoint in `directory` was written (None: there is none)."""
    finished = _finished(directory)
    if not finished:
        return None
    try:
        return finished[-1][1].stat().st_mtime
    except OSError:
        return None


# -- scheduling -----------------------------------------------------------------------------


class Checkpointer:
    """Periodic checkpoints for the log's writer thread.

    The writer calls `due(now)` between groups and, when it is due, `run(store, lsn, totals)`:
    the snapshot (page views, or a copy) happens there, consistent with `lsn`; files are
    written, fsynced and pruned on a background thread so ingest pauses only for the snapshot.
    At shutdown `close` writes a final checkpoint inline. `interval_s == 0` means only at shutdown.
    `on_written(lsn)` is called once a checkpoint is durable (e.g. to retire log segments).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        interval_s: float,
        *,
        keep: int = 2,
        background: bool = True,
        on_written: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cipher: DataCipher | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.cipher = cipher
        self.interval_s = interval_s
        self.keep = keep
        self.background = background
        self.on_written = on_written
        self._clock = clock
        self._last_run = clock()
        self._thread: threading.Thread | None = None
        self.last_lsn: int | None = None  # lsn of the newest durable checkpoint written here
        self.last_path: Path | None = None
        self.last_error: BaseException | None = None
        self.last_duration_s: float = 0.0
        # Wall-clock time (s) the newest durable checkpoint was written (GET /metrics: its
        # age); at start, the newest one already on disk; None when there is none yet.
        self.last_written_unix: float | None = _newest_mtime(self.directory)

    def due(self, now: float | None = None) -> bool:
        """True when a periodic checkpoint should start (and the previous one has finished)."""
        if self.interval_s <= 0 or self.busy:
            return False
        now = self._clock() if now is None else now
        return now - self._last_run >= self.interval_s

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, store: Store, lsn: int, totals: Mapping[str, int]) -> None:
        """Checkpoint the store as of `lsn` (call only where the store is consistent with it)."""
        self._last_run = self._clock()
        self.wait()
        if lsn <= 0 or lsn == self.last_lsn:  # nothing logged yet, or nothing since the last
            return
        try:
            taken = snapshot(store, lsn, totals)
        except MemoryError as exc:  # no room for the copy: skip this one, never stop the log
            self.last_error = exc
            log.error("checkpoint at lsn %d skipped, no memory for the snapshot", lsn)
            return
        if self.background:
            self._thread = threading.Thread(
                target=self._write, args=(taken,), name="checkpoint", daemon=True
            )
            self._thread.start()
        else:
            self._write(taken)

    def wait(self) -> None:
        """Block until a background checkpoint in progress is durable (or has failed)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(
        self,
        store: Store | None = None,
        lsn: int | None = None,
        totals: Mapping[str, int] | None = None,
    ) -> None:
        """Finish the background write; with a store, write a final checkpoint inline."""
        self.wait()
        if store is not None and lsn is not None:
            background, self.background = self.background, False
            try:
                self.run(store, lsn, totals or {})
            finally:
                self.background = background

    def _write(self, taken: Snapshot) -> None:
        started = time.perf_counter()
        try:
            path = write_snapshot(self.directory, taken, self.cipher)
            prune(self.directory, self.keep)
        except Exception as exc:  # a full disk must not kill the writer: log, retry next time
            self.last_error = exc
            log.error("checkpoint at lsn %d failed: %s", taken.lsn, exc)
            return
        self.last_duration_s = time.perf_counter() - started
        self.last_lsn, self.last_path, self.last_error = taken.lsn, path, None
        self.last_written_unix = time.time()
        log.info(
            "checkpoint at lsn %d written in %.2f s: %s", taken.lsn, self.last_duration_s, path
        )
        if self.on_written is not None:
            self.on_written(taken.lsn)
