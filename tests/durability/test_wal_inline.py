"""Inline commits (`DurableWriter.commit` / `ingest` under `interval` and `never`): the calling
thread logs, applies and notifies under the commit lock the writer thread's groups also take."""

from __future__ import annotations

import errno
import itertools
import os
import threading

import numpy as np
import pytest

from appliance.durability import wal
from appliance.durability.records import BatchRecord
from appliance.durability.recovery import recover
from appliance.durability.writer import DurableWriter, StorageUnavailableError
from appliance.store import SymbolLimitError
from tests.durability.test_wal import fail_batches_starting_with, hot, make_store, make_writer
from tests.waiting import wait_until
from transport.ingest import Rejected
from transport.wire import Reason

BIG = {"max_values": 10**6, "keep": 10**6}


class Trace:
    """A listener, and a wrapper of `store.ingest`: who applied what, and in which order."""

    def __init__(self, store) -> None:
        self.applied: list[float] = []
        self.notified: list[tuple[int, float, str]] = []  # (lsn, first value, thread)
        real = store.ingest

        def ingest(symbol, values, *origin):
            self.applied.append(float(values[0]))
            return real(symbol, values, *origin)

        store.ingest = ingest

    def on_record(self, record: BatchRecord) -> None:
        name = threading.current_thread().name
        self.notified.append((record.lsn, float(record.values[0]), name))


@pytest.mark.parametrize("sync", ["interval", "never"])
def test_inline_commits_and_group_commits_share_one_lsn_order(tmp_path, sync) -> None:
    store = make_store(**BIG)
    trace = Trace(store)
    writer = make_writer(store, tmp_path, sync=sync, interval_ms=1)
    writer.add_listener(trace)
    n = 300
    inline: dict[int, list[BatchRecord]] = {}
    failures: list[BaseException] = []

    def committer(k: int) -> None:
        try:
            inline[k] = [
                writer.commit(f"I{k}", np.array([k * 1e6 + i]), k, i + 1) for i in range(n)
            ]
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    def grouper() -> None:
        for i in range(0, n, 3):
            done = threading.Event()

            def finished(results: list, done: threading.Event = done) -> None:
                failures.extend(r for r in results if r is not None)
                done.set()

            items = [("G", np.array([9e6 + i + j]), 9, i + j + 1, None) for j in range(3)]
            writer.submit_group(items, finished)
            assert done.wait(10)

    def submitter() -> None:
        for i in range(n):
            writer.submit("F", np.array([8e6 + i])).result(10)

    threads = [threading.Thread(target=committer, args=(k,), name=f"inline-{k}") for k in (1, 2)]
    threads += [threading.Thread(target=grouper), threading.Thread(target=submitter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    writer.close()
    assert not failures
    total = 4 * n
    lsns = [lsn for lsn, _, _ in trace.notified]
    assert lsns == list(range(1, total + 1))  # listeners ran in lsn order, every lsn once
    assert trace.applied == [v for _, v, _ in trace.notified]  # apply order == lsn order
    assert writer.inline_commits == 2 * n
    for k, records in inline.items():
        assert [r.first_index for r in records] == list(range(n))
        # an inline commit runs its listeners on the calling thread, never the writer's
        mine = {v: name for _, v, name in trace.notified}
        assert {mine[float(r.values[0])] for r in records} == {f"inline-{k}"}
    assert {name for _, v, name in trace.notified if v >= 8e6} == {"wal-writer"}
    fresh = make_store(**BIG)
    recover(fresh, tmp_path, use_checkpoint=False)
    assert all(hot(fresh, s) == hot(store, s) for s in store.symbols())
    assert sorted(store.symbols()) == ["F", "G", "I1", "I2"]


@pytest.mark.parametrize("fail_on", ["write", "short write"])
def test_inline_commit_on_a_full_disk_raises_and_changes_nothing(
    tmp_path, monkeypatch, fail_on
) -> None:
    store = make_store()
    trace = Trace(store)
    writer = make_writer(store, tmp_path, sync="interval")
    writer.add_listener(trace)
    assert writer.commit("A", np.array([1.0, 2.0])).lsn == 1
    real_writev = os.writev

    def writev(fd, chunks):
        if fail_on == "short write":  # a file-size limit reached mid-record
            return real_writev(fd, [bytes(chunks[0])[:20]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", writev)
    for _ in range(3):
        with pytest.raises(StorageUnavailableError):
            writer.commit("A", np.array([5.0]))
        with pytest.raises(StorageUnavailableError):
            writer.ingest("B", np.array([5.0]), 3, 1)
    assert store.length("A") == 2 and "B" not in store  # nothing applied
    assert writer.next_lsn == 2 and len(trace.notified) == 1  # no lsn used, nobody told
    monkeypatch.undo()
    assert writer.commit("A", np.array([3.0])).lsn == 2  # the service recovers by itself
    assert writer.commit("B", np.array([4.0])).first_index == 0
    writer.close()
    fresh = make_store()
    result = recover(fresh, tmp_path, use_checkpoint=False)
    assert not result.truncated and result.next_lsn == 4
    assert hot(fresh, "A") == hot(store, "A") and hot(fresh, "B") == hot(store, "B")


def test_inline_commit_refuses_a_symbol_over_the_limit_without_logging_it(tmp_path) -> None:
    store = make_store(max_symbols=1)
    writer = make_writer(store, tmp_path, sync="never")
    writer.commit("A", np.array([1.0]))
    with pytest.raises(SymbolLimitError):
        writer.commit("B", np.array([1.0]))
    assert writer.commit("A", np.array([2.0])).lsn == 2
    writer.close()
    records = [r for _, r in wal.scan_segment(wal.list_segments(wal.wal_dir(tmp_path))[0]).records]
    assert [r.symbol for r in records] == ["A", "A"]


def test_inline_commit_on_a_closed_writer_raises_and_close_drains_the_rest(tmp_path) -> None:
    store = make_store(**BIG)
    writer = make_writer(store, tmp_path, sync="interval")
    acked: list[BatchRecord] = []
    refused: list[BaseException] = []
    started = threading.Barrier(3)

    def committer(k: int) -> None:
        started.wait()
        for i in itertools.count():
            try:
                acked.append(writer.commit(f"S{k}", np.array([float(i)])))
            except RuntimeError as exc:
                refused.append(exc)
                return

    threads = [threading.Thread(target=committer, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    started.wait()
    wait_until(lambda: len(acked) > 200, "inline commits", 10)
    writer.close()
    for thread in threads:
        thread.join(10)
    assert len(refused) == 2 and all("closed" in str(e) for e in refused)
    with pytest.raises(RuntimeError, match="closed"):
        writer.ingest("S0", np.array([1.0]))
    fresh = make_store(**BIG)
    result = recover(fresh, tmp_path, use_checkpoint=False)
    # every acknowledged commit is in the log, and nothing else
    assert result.next_lsn == len(acked) + 1
    assert all(hot(fresh, s) == hot(store, s) for s in store.symbols())


def test_inline_commits_are_fsynced_by_the_interval_thread(tmp_path) -> None:
    writer = make_writer(make_store(), tmp_path, sync="interval", interval_ms=20)
    writer.commit("A", np.array([1.0]))
    assert writer.inline_commits == 1
    wait_until(lambda: writer.fsyncs >= 1, "the interval fsync after an inline commit", 5)
    writer.commit("A", np.array([2.0]))  # the next window is scheduled again
    wait_until(lambda: writer.fsyncs >= 2, "the second interval fsync", 5)
    writer.close()


def test_a_due_checkpoint_after_inline_commits_follows_an_fsync(tmp_path) -> None:
    class Probe:
        def __init__(self) -> None:
            self.runs: list[tuple[int, int]] = []  # (fsyncs before, lsn)

        def due(self) -> bool:
            return not self.runs

        def run(self, store, lsn, totals) -> None:
            self.runs.append((writer.fsyncs, lsn))

        def close(self, store, lsn, totals) -> None:
            pass

    probe = Probe()
    writer = make_writer(make_store(), tmp_path, sync="interval", interval_ms=3_600_000,
                         checkpointer=probe)  # fmt: skip
    writer.commit("A", np.array([1.0]))
    wait_until(lambda: probe.runs, "the writer thread takes the checkpoint", 5)
    assert probe.runs[0][0] >= 1 and probe.runs[0][1] == 1  # on disk first, exactly lsn 1
    writer.close()


def test_under_always_commit_waits_for_the_writer_threads_group_fsync(tmp_path) -> None:
    store = make_store()
    trace = Trace(store)
    writer = make_writer(store, tmp_path, sync="always")
    writer.add_listener(trace)
    record = writer.commit("A", np.array([1.0]))
    assert record.lsn == 1 and writer.fsyncs >= 1 and writer.inline_commits == 0
    assert trace.notified == [(1, 1.0, "wal-writer")]
    writer.close()


def test_the_transport_sink_commits_inline_and_nacks_a_full_disk_unavailable(
    tmp_path, monkeypatch
) -> None:
    from appliance.ingest import make_sink

    store = make_store()
    writer = make_writer(store, tmp_path, sync="interval")
    sink = make_sink(writer, 100)
    sink("A", np.array([1.0]), 5, 1)
    assert writer.inline_commits == 1 and store.length("A") == 1

    def writev(fd, chunks):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", writev)
    with pytest.raises(Rejected) as refused:
        sink("A", np.array([2.0]), 5, 2)
    assert refused.value.reason is Reason.UNAVAILABLE and store.length("A") == 1
    monkeypatch.undo()
    writer.close()


def test_a_writer_never_started_waits_for_start(tmp_path) -> None:
    store = make_store()
    result = recover(store, tmp_path, use_checkpoint=False)
    writer = DurableWriter(store, wal.wal_dir(tmp_path), sync="interval",
                           next_lsn=result.next_lsn, totals=result.totals)  # fmt: skip
    box: list[BatchRecord] = []
    thread = threading.Thread(target=lambda: box.append(writer.commit("A", np.array([1.0]))))
    thread.start()
    thread.join(0.2)
    assert not box  # queued until the writer runs
    writer.start()
    thread.join(5)
    assert box[0].lsn == 1
    writer.close()


def test_an_engine_fault_fails_only_that_inline_commit(tmp_path, monkeypatch) -> None:
    store = make_store()
    writer = make_writer(store, tmp_path, sync="never")
    fail_batches_starting_with(store, monkeypatch, 66.0)
    writer.commit("A", np.array([1.0]))
    with pytest.raises(RuntimeError, match="engine fault"):
        writer.commit("A", np.array([66.0]))  # logged (lsn 2), not applied, reported here
    assert writer.commit("A", np.array([2.0])).lsn == 3
    assert store.length("A") == 2
    writer.close()
    records = [r for _, r in wal.scan_segment(wal.list_segments(wal.wal_dir(tmp_path))[0]).records]
    assert [(r.lsn, r.first_index, float(r.values[0])) for r in records] == [
        (1, 0, 1.0), (2, 1, 66.0), (3, 2, 2.0),
    ]  # fmt: skip
