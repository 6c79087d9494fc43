"""Hot-tier checkpoints: round trip, crash mid-write, corruption, prune, limits, scheduling."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.durability import checkpoint as ckpt
from appliance.durability import wal
from appliance.durability.checkpoint import (
    Checkpoint,
    Checkpointer,
    SymbolCheckpoint,
    load_latest,
    prune,
    restore,
    write_checkpoint,
)
from appliance.durability.recovery import recover, replay_batch_by_batch
from appliance.durability.writer import DurableWriter
from appliance.store import Store
from engine_core import Geometry, RetentionPolicy
from fallback import NumpyEngine

SMALL = Geometry(block=4, fanout=4, chunk=64)  # a few hundred values cross pages and levels


def make_store(max_symbols: int = 10, max_values: int = 5000, keep: int = 3000) -> Store:
    return Store(
        NumpyEngine(geometry=SMALL),
        retention=RetentionPolicy(max_values, keep),
        max_symbols=max_symbols,
        starting_capacity=0,
    )


def fill(store: Store, rng: np.random.Generator, symbols: dict[str, int]) -> dict[str, np.ndarray]:
    """Ingest random batches; return what each symbol accepted in total (evicted included)."""
    accepted: dict[str, list[np.ndarray]] = {s: [] for s in symbols}
    for symbol, count in symbols.items():
        left = count
        while left:
            batch = rng.uniform(0, 1000, min(left, int(rng.integers(1, 700))))
            store.ingest(symbol, batch)
            accepted[symbol].append(batch)
            left -= len(batch)
    return {s: np.concatenate(parts) for s, parts in accepted.items()}


def assert_same_hot_tier(restored: Store, original: Store) -> None:
    assert restored.symbols() == original.symbols()
    for symbol in original.symbols():
        expected = original.snapshot_values(symbol)
        np.testing.assert_array_equal(restored.snapshot_values(symbol), expected)
        for exponent in range(1, 5):
            window = expected[-min(10**exponent, len(expected)) :]
            got = restored.stats(symbol, exponent)
            assert got.count == len(window)
            assert got.min == window.min() and got.max == window.max()
            assert got.last == window[-1]
            assert got.avg == pytest.approx(window.mean(), rel=1e-9)
            assert got.var == pytest.approx(window.var(), rel=1e-9, abs=1e-9)


def test_round_trip_restores_the_hot_tier_and_totals(tmp_path: Path) -> None:
    store = make_store()
    accepted = fill(store, np.random.default_rng(1), {"A": 12_345, "B": 700, "C": 1})
    totals = {s: len(v) for s, v in accepted.items()}
    path = write_checkpoint(tmp_path, store, 42, totals)
    assert path == tmp_path / "checkpoints" / f"ckpt-{42:020d}"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["lsn"] == 42
    assert [e["symbol"] for e in manifest["symbols"]] == ["A", "B", "C"]
    assert [e["hot"] for e in manifest["symbols"]] == [store.length(s) for s in "ABC"]

    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.lsn == 42
    assert {s: item.total for s, item in loaded.symbols.items()} == totals
    # The hot window of A is the newest values it accepted (it went through a cleanup).
    np.testing.assert_array_equal(loaded.symbols["A"].values, accepted["A"][-store.length("A") :])
    restored = make_store()
    assert restore(restored, loaded, chunk=1000) == totals
    assert_same_hot_tier(restored, store)


def test_restored_store_keeps_applying_retention_like_the_original(tmp_path: Path) -> None:
    store = make_store()
    fill(store, np.random.default_rng(2), {"A": 4_900})
    write_checkpoint(tmp_path, store, 1, {"A": 4_900})
    restored = make_store()
    restore(restored, load_latest(tmp_path))
    batch = np.random.default_rng(3).uniform(0, 10, 400)  # crosses max_values: a cleanup
    store.ingest("A", batch)
    restored.ingest("A", batch)
    assert_same_hot_tier(restored, store)


def test_no_checkpoint_means_full_replay(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert load_latest(tmp_path) is None


def test_crash_mid_write_leaves_a_tmp_dir_that_is_ignored_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    fill(store, np.random.default_rng(4), {"A": 1000, "B": 1000})
    write_checkpoint(tmp_path, store, 10, {"A": 1000, "B": 1000})
    store.ingest("A", np.array([1.0, 2.0]))

    calls = []
    real = ckpt._write_npy

    def crash_on_second_file(path: Path, values: np.ndarray) -> int:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("simulated crash")  # as if the process died here
        return real(path, values)

    monkeypatch.setattr(ckpt, "_write_npy", crash_on_second_file)
    with pytest.raises(OSError):
        write_checkpoint(tmp_path, store, 20, {"A": 1002, "B": 1000})
    leftover = tmp_path / "checkpoints" / f"ckpt-{20:020d}.tmp"
    assert leftover.is_dir()

    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.lsn == 10  # the older, complete one
    assert not leftover.exists()
    monkeypatch.setattr(ckpt, "_write_npy", real)
    assert write_checkpoint(tmp_path, store, 20, {"A": 1002, "B": 1000}).is_dir()
    assert load_latest(tmp_path).lsn == 20


@pytest.mark.parametrize(
    "damage",
    ["flip-data", "flip-header", "truncate", "manifest", "missing", "no-key", "outside", "format"],
)
def test_a_corrupted_checkpoint_is_skipped_for_an_older_one(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    fill(store, np.random.default_rng(5), {"A": 3000})
    write_checkpoint(tmp_path, store, 1, {"A": 3000})
    store.ingest("A", np.array([7.0]))
    newest = write_checkpoint(tmp_path, store, 2, {"A": 3001})
    data = newest / "s0000.npy"
    if damage == "flip-data":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) - 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
    elif damage == "flip-header":
        with open(data, "r+b") as f:
            f.seek(20)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x20]))
    elif damage == "truncate":
        os.truncate(data, os.path.getsize(data) - 8)
    elif damage == "manifest":
        (newest / "manifest.json").write_text('{"format": 1, "lsn": 2, "symb')
    elif damage in ("no-key", "outside", "format"):
        manifest = json.loads((newest / "manifest.json").read_text())
        if damage == "no-key":
            del manifest["symbols"][0]["crc32c"]
        elif damage == "outside":
            manifest["symbols"][0]["file"] = f"../ckpt-{1:020d}/s0000.npy"
        else:
            manifest["format"] = 99
        (newest / "manifest.json").write_text(json.dumps(manifest))
    else:
        data.unlink()
    with caplog.at_level(logging.WARNING):
        loaded = load_latest(tmp_path)
    assert loaded is not None and loaded.lsn == 1
    assert "skipping checkpoint" in caplog.text
    assert len(loaded.symbols["A"].values) == 3000


def test_only_corrupted_checkpoints_mean_full_replay(tmp_path: Path) -> None:
    store = make_store()
    fill(store, np.random.default_rng(6), {"A": 100})
    path = write_checkpoint(tmp_path, store, 5, {"A": 100})
    (path / "manifest.json").write_text("not json")
    assert load_latest(tmp_path) is None


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    store = make_store()
    fill(store, np.random.default_rng(7), {"A": 10})
    for lsn in (3, 1, 20, 7):
        write_checkpoint(tmp_path, store, lsn, {"A": 10})
    (tmp_path / "checkpoints" / "unrelated").mkdir()
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [f"ckpt-{1:020d}", f"ckpt-{3:020d}"]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"ckpt-{7:020d}", f"ckpt-{20:020d}", "unrelated"]
    assert ckpt.oldest_lsn(tmp_path) == 7
    assert prune(tmp_path, keep=2) == []
    with pytest.raises(ValueError):
        prune(tmp_path, keep=0)


def test_same_lsn_twice_keeps_the_first(tmp_path: Path) -> None:
    store = make_store()
    fill(store, np.random.default_rng(8), {"A": 10})
    first = write_checkpoint(tmp_path, store, 9, {"A": 10})
    assert write_checkpoint(tmp_path, store, 9, {"A": 10}) == first


def test_restore_respects_a_smaller_retention_and_the_symbol_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(max_values=5000, keep=3000)
    accepted = fill(store, np.random.default_rng(9), {"A": 4800, "B": 50, "C": 60})
    write_checkpoint(tmp_path, store, 3, {s: len(v) for s, v in accepted.items()})
    smaller = make_store(max_symbols=2, max_values=1000, keep=500)
    with caplog.at_level(logging.WARNING):
        totals = restore(smaller, load_latest(tmp_path), chunk=300)
    assert totals == {"A": 4800, "B": 50}
    assert smaller.symbols() == ["A", "B"]
    assert "C not restored" in caplog.text
    assert smaller.length("A") == 1000  # the newest values that fit, no cleanup cascade
    np.testing.assert_array_equal(smaller.snapshot_values("A"), accepted["A"][-1000:])
    np.testing.assert_array_equal(smaller.snapshot_values("B"), accepted["B"])


def test_restore_needs_an_empty_store(tmp_path: Path) -> None:
    store = make_store()
    store.ingest("A", np.array([1.0]))
    empty = Checkpoint(0, None, {"A": SymbolCheckpoint(1, np.array([1.0]))})
    with pytest.raises(ValueError):
        restore(store, empty)


def test_checkpointer_schedule_and_background_write(tmp_path: Path) -> None:
    now = [1000.0]
    written = []
    checkpointer = Checkpointer(
        tmp_path, 300, keep=2, on_written=written.append, clock=lambda: now[0]
    )
    store = make_store()
    fill(store, np.random.default_rng(10), {"A": 500})
    assert not checkpointer.due()
    now[0] += 300
    assert checkpointer.due()
    checkpointer.run(store, 11, {"A": 500})
    store.ingest("A", np.array([3.0]))  # after the snapshot: not in checkpoint 11
    checkpointer.wait()
    assert written == [11] and checkpointer.last_lsn == 11
    assert not checkpointer.due()
    loaded = load_latest(tmp_path)
    assert loaded.lsn == 11 and len(loaded.symbols["A"].values) == 500

    for lsn in (12, 13):
        now[0] += 300
        assert checkpointer.due(now[0])
        checkpointer.run(store, lsn, {"A": 501})
        if checkpointer.busy:  # one checkpoint at a time
            assert not checkpointer.due(now[0] + 1000)
        checkpointer.wait()
    checkpointer.close(store, 14, {"A": 501})  # the shutdown checkpoint, inline
    assert written == [11, 12, 13, 14]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"ckpt-{13:020d}", f"ckpt-{14:020d}"]
    checkpointer.close(store, 14, {"A": 501})  # nothing new: nothing written
    assert written == [11, 12, 13, 14]


def test_checkpointer_interval_zero_only_at_shutdown(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, 0, clock=lambda: 1e12)
    assert not checkpointer.due()
    store = make_store()
    checkpointer.close(store, 0, {})  # nothing was ever logged: nothing to checkpoint
    assert load_latest(tmp_path) is None
    store.ingest("A", np.array([1.0, 2.0]))
    checkpointer.close(store, 2, {"A": 2})
    assert load_latest(tmp_path).lsn == 2


def test_checkpointer_survives_a_failed_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    checkpointer = Checkpointer(blocker, 1, background=False)
    store = make_store()
    store.ingest("A", np.array([1.0]))
    checkpointer.run(store, 1, {"A": 1})  # logs, does not raise into the log's writer
    assert checkpointer.last_error is not None and checkpointer.last_lsn is None


# -- wired into the log: the writer checkpoints between groups, recovery starts from it ------


def _log_with_a_checkpoint(data: Path, crash_copy: Path) -> int:
    """Log 60 batches over two symbols, a periodic checkpoint after the 31st; copy the data
    directory after the 60th as a crash would leave it (before the shutdown checkpoint).
    Return the lsn of the periodic checkpoint."""
    now = [0.0]
    store = make_store()
    checkpointer = Checkpointer(data, 10, background=False, clock=lambda: now[0])
    writer = DurableWriter(store, wal.wal_dir(data), sync="never", checkpointer=checkpointer)
    writer.start()
    rng = np.random.default_rng(12)
    for i in range(60):
        batch = rng.uniform(0, 100, int(rng.integers(1, 400)))
        writer.submit("AB"[i % 2], batch).result()  # one at a time: one group per batch
        if i == 29:
            now[0] += 10  # due: the next group (lsn 31) is followed by a checkpoint
    periodic = checkpointer.last_lsn
    shutil.copytree(data, crash_copy)
    writer.close()  # the shutdown checkpoint, in `data` only
    assert checkpointer.last_lsn == 60
    return periodic


def test_recovery_from_a_checkpoint_and_the_log_after_it_equals_full_replay(
    tmp_path: Path,
) -> None:
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    assert _log_with_a_checkpoint(data, crashed) == 31
    reference = make_store()
    replay_batch_by_batch(reference, crashed)  # every record through retention, no checkpoint

    from_checkpoint = make_store()
    result = recover(from_checkpoint, crashed)
    assert result.checkpoint_lsn == 31 and result.records == 29 and result.next_lsn == 61
    assert_same_hot_tier(from_checkpoint, reference)
    full = make_store()
    assert recover(full, crashed, use_checkpoint=False).totals == result.totals

    after_shutdown = make_store()
    clean = recover(after_shutdown, data)
    assert clean.checkpoint_lsn == 60 and clean.records == 0
    assert_same_hot_tier(after_shutdown, reference)


def test_recovery_falls_back_to_the_log_when_the_checkpoint_is_damaged(tmp_path: Path) -> None:
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    _log_with_a_checkpoint(data, crashed)
    for file in (crashed / "checkpoints").rglob("s0001.npy"):
        with open(file, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\x00\xff\x00")
    reference = make_store()
    replay_batch_by_batch(reference, crashed)
    store = make_store()
    result = recover(store, crashed)
    assert result.checkpoint_lsn is None and result.records == 60
    assert_same_hot_tier(store, reference)


def test_a_snapshot_is_unchanged_by_appends_and_evictions_before_it_is_written(
    tmp_path: Path,
) -> None:
    """The numpy engine's snapshot is page views, not a copy: the checkpoint written after
    later ingest (cleanups included) must still hold the values as of its lsn."""
    store = make_store(max_values=5000, keep=3000)
    rng = np.random.default_rng(14)
    fill(store, rng, {"A": 4900})
    expected = store.snapshot_values("A")
    taken = ckpt.snapshot(store, 7, {"A": 4900})
    assert len(taken.symbols["A"].parts) > 1  # several pages: views, not one copy
    fill(store, rng, {"A": 20_000})  # several cleanups retire and free the viewed pages
    ckpt.write_snapshot(tmp_path, taken)
    np.testing.assert_array_equal(load_latest(tmp_path).symbols["A"].values, expected)


class _CopyOnlyEngine:
    """An engine with only the `Series` protocol (no tail_views), like the future GPU one."""

    name = "copy-only"

    def new_series(self, retention: RetentionPolicy, starting_capacity: int):
        inner = NumpyEngine(geometry=SMALL).new_series(retention, starting_capacity)

        class Series:
            append, stats, tail = inner.append, inner.stats, inner.tail
            nbytes = property(lambda self: inner.nbytes)

            def __len__(self) -> int:
                return len(inner)

        return Series()


def test_round_trip_with_an_engine_without_tail_views(tmp_path: Path) -> None:
    store = Store(
        _CopyOnlyEngine(), retention=RetentionPolicy(5000, 3000), max_symbols=3, starting_capacity=0
    )
    accepted = fill(store, np.random.default_rng(15), {"A": 7000, "B": 10})
    assert len(store.snapshot_parts("A")) == 1  # the copy from `tail`
    write_checkpoint(tmp_path, store, 3, {s: len(v) for s, v in accepted.items()})
    restored = make_store()
    restore(restored, load_latest(tmp_path))
    assert_same_hot_tier(restored, store)
