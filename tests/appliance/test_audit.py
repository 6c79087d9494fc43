"""The audit trail: the hash chain, `verify`'s verdicts, aggregation, folding and drops.

The writer is driven by hand (`start_thread=False`, a fake clock, `pump`), so every record
and every second boundary is deterministic.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.audit import NullAudit
from appliance.audit_chain import (
    ANCHOR_FILE,
    GENESIS,
    AuditError,
    line_hash,
    list_files,
    run_verify,
    verify,
)
from appliance.audit_log import AuditLog, open_audit
from appliance.config import AuditConfig
from appliance.ingest import StoreSink
from transport.wire import Reason

T0 = 1_700_000_000 * 10**9  # a whole second


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> int:
        self.now += ns
        return self.now


def make_log(directory: Path, clock: Clock | None = None, **options: int) -> AuditLog:
    return AuditLog(directory, clock=clock or Clock(), start_thread=False, **options)


def records(directory: Path) -> list[dict]:
    return [
        json.loads(line)
        for _, path in list_files(directory)
        for line in path.read_bytes().splitlines()
    ]


def lines_of(directory: Path) -> list[bytes]:
    (_, path), *_ = list_files(directory)
    return path.read_bytes().splitlines(keepends=True)


def write_chain(directory: Path, writes: int) -> None:
    """start, `writes` REST writes, stop: writes + 2 records in one file."""
    audit = make_log(directory)
    for index in range(writes):
        audit.rest_write("alice", "AAPL", 10, index * 10)
    audit.close()


def rewrite(directory: Path, lines: list[bytes]) -> None:
    (_, path), *_ = list_files(directory)
    path.write_bytes(b"".join(lines))


# --- the chain ---------------------------------------------------------------------------


def test_records_are_chained_by_the_hash_of_the_line_before(tmp_path: Path) -> None:
    write_chain(tmp_path, 3)
    lines = [line.rstrip(b"\n") for line in lines_of(tmp_path)]
    got = [json.loads(line) for line in lines]
    assert [r["seq"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["kind"] for r in got] == ["start", "write", "write", "write", "stop"]
    assert got[0]["prev"] == GENESIS
    for before, record in zip(lines, got[1:], strict=False):
        assert record["prev"] == line_hash(before)
    assert list(got[0])[:3] == ["seq", "time", "kind"] and list(got[0])[-1] == "prev"
    assert got[1] == {**got[1], "who": "alice", "symbol": "AAPL", "values": 10, "first_index": 0}
    anchor = json.loads((tmp_path / ANCHOR_FILE).read_text())
    assert anchor == {"seq": 5, "hash": line_hash(lines[-1]), "file": "audit-000001.jsonl"}


def test_an_intact_chain_verifies_with_a_summary(tmp_path: Path) -> None:
    write_chain(tmp_path, 3)
    out = io.StringIO()
    assert run_verify(tmp_path, out) == 0
    last = line_hash(lines_of(tmp_path)[-1].rstrip(b"\n"))
    assert f"5 records in 1 files, chain intact (anchored), last hash {last}" in out.getvalue()


def test_the_chain_continues_across_restarts(tmp_path: Path) -> None:
    write_chain(tmp_path, 2)
    write_chain(tmp_path, 1)
    got = records(tmp_path)
    assert [r["seq"] for r in got] == list(range(1, 8))
    assert [r["kind"] for r in got][3:5] == ["stop", "start"]
    assert verify(tmp_path).ok


def test_rotation_carries_the_chain_into_the_next_file(tmp_path: Path) -> None:
    audit = make_log(tmp_path, max_file_bytes=4096)
    for index in range(100):
        audit.rest_write("alice", "AAPL", 1, index)
    audit.close()
    files = list_files(tmp_path)
    assert len(files) > 2
    assert all(path.stat().st_size <= 4096 for _, path in files)
    last_of_first = files[0][1].read_bytes().splitlines()[-1]
    first_of_second = json.loads(files[1][1].read_bytes().splitlines()[0])
    assert first_of_second["prev"] == line_hash(last_of_first)
    verdict = verify(tmp_path)
    assert verdict.ok and f"102 records in {len(files)} files" in verdict.message


def test_a_deleted_middle_file_is_missing_records(tmp_path: Path) -> None:
    audit = make_log(tmp_path, max_file_bytes=4096)
    for index in range(100):
        audit.rest_write("alice", "AAPL", 1, index)
    audit.close()
    files = list_files(tmp_path)
    first_missing = len(files[0][1].read_bytes().splitlines()) + 1
    files[1][1].unlink()
    verdict = verify(tmp_path)
    assert not verdict.ok and verdict.message.startswith(f"record {first_missing} missing")


# --- verify's verdicts -------------------------------------------------------------------


def test_an_edited_record_is_named(tmp_path: Path) -> None:
    write_chain(tmp_path, 5)
    lines = lines_of(tmp_path)
    lines[3] = lines[3].replace(b'"values":10', b'"values":99')
    rewrite(tmp_path, lines)
    out = io.StringIO()
    assert run_verify(tmp_path, out) == 1
    assert "record 4 (file audit-000001.jsonl, line 4): changed" in out.getvalue()


def test_an_edit_that_recomputes_the_next_prev_is_still_caught(tmp_path: Path) -> None:
    """Re-linking the next record moves the break one record on: the chain names the first
    record whose successor no longer matches; an intruder must rewrite the rest and the anchor."""
    write_chain(tmp_path, 5)
    lines = lines_of(tmp_path)
    lines[3] = lines[3].replace(b'"values":10', b'"values":99')
    nxt = json.loads(lines[4])
    nxt["prev"] = line_hash(lines[3].rstrip(b"\n"))
    lines[4] = json.dumps(nxt, separators=(",", ":")).encode() + b"\n"
    rewrite(tmp_path, lines)
    verdict = verify(tmp_path)
    assert not verdict.ok and verdict.message.startswith("record 5 "), verdict.message


def test_a_deleted_record_is_named_missing(tmp_path: Path) -> None:
    write_chain(tmp_path, 5)
    lines = lines_of(tmp_path)
    del lines[2]
    rewrite(tmp_path, lines)
    verdict = verify(tmp_path)
    assert verdict.message == (
        "record 3 missing: record 4 (file audit-000001.jsonl, line 3) follows record 2"
    )


def test_swapped_records_are_out_of_order(tmp_path: Path) -> None:
    write_chain(tmp_path, 5)
    lines = lines_of(tmp_path)
    lines[2], lines[3] = lines[3], lines[2]
    rewrite(tmp_path, lines)
    verdict = verify(tmp_path)
    assert verdict.message == (
        "record 4 (file audit-000001.jsonl, line 3): out of order (found where record 3 belongs)"
    )


def test_a_cut_tail_is_caught_by_the_anchor_and_not_without_it(tmp_path: Path) -> None:
    write_chain(tmp_path, 5)
    lines = lines_of(tmp_path)
    rewrite(tmp_path, lines[:-2])
    verdict = verify(tmp_path)
    assert not verdict.ok and verdict.message.startswith("records 6..7 missing")
    (tmp_path / ANCHOR_FILE).unlink()  # what an intruder with the whole directory can do
    verdict = verify(tmp_path)
    assert verdict.ok and "tail not anchored" in verdict.message


def test_a_torn_last_line_is_named(tmp_path: Path) -> None:
    write_chain(tmp_path, 2)
    lines = lines_of(tmp_path)
    lines[-1] = lines[-1][:20]
    rewrite(tmp_path, lines)
    assert verify(tmp_path).message.startswith(
        "record 4 (file audit-000001.jsonl, line 4): changed"
    )


def test_an_edited_last_record_is_caught_by_the_anchor(tmp_path: Path) -> None:
    write_chain(tmp_path, 2)
    lines = lines_of(tmp_path)
    lines[-1] = lines[-1].replace(b'"kind":"stop"', b'"kind":"stoq"')
    rewrite(tmp_path, lines)
    assert verify(tmp_path).message.startswith(
        "record 4 (file audit-000001.jsonl, line 4): changed"
    )


def test_a_missing_directory_fails(tmp_path: Path) -> None:
    assert run_verify(tmp_path / "nope", io.StringIO()) == 1


# one edit (a byte changed in place), one deletion, or one adjacent swap, anywhere
mutations = st.one_of(
    st.tuples(st.just("edit"), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("swap"), st.integers(0, 10**6), st.just(0)),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=st.integers(1, 12), mutation=mutations)
def test_any_single_edit_deletion_or_swap_is_caught_at_its_record(
    tmp_path_factory: pytest.TempPathFactory, writes: int, mutation: tuple[str, int, int]
) -> None:
    directory = tmp_path_factory.mktemp("chain")
    write_chain(directory, writes)
    lines = lines_of(directory)
    kind, where, offset = mutation
    index = where % len(lines)
    if kind == "edit":
        body = lines[index].rstrip(b"\n")
        at = offset % len(body)
        replacement = b"x" if body[at : at + 1] != b"x" else b"y"
        lines[index] = body[:at] + replacement + body[at + 1 :] + b"\n"
        expected = f"record {index + 1} (file audit-000001.jsonl, line {index + 1}): changed"
    elif kind == "delete":
        del lines[index]
        expected = f"record {index + 1} missing" if index < len(lines) else "records"
    else:
        index = min(index, len(lines) - 2)
        lines[index], lines[index + 1] = lines[index + 1], lines[index]
        expected = f"record {index + 2} (file audit-000001.jsonl, line {index + 1}): out of order"
    rewrite(directory, lines)
    verdict = verify(directory)
    assert not verdict.ok
    assert verdict.message.startswith(expected), (kind, index, verdict.message)


# --- restarting on a damaged chain --------------------------------------------------------


def test_a_torn_tail_stops_the_next_start(tmp_path: Path) -> None:
    write_chain(tmp_path, 2)
    lines = lines_of(tmp_path)
    rewrite(tmp_path, [*lines[:-1], lines[-1][:10]])
    with pytest.raises(AuditError, match="torn"):
        make_log(tmp_path)


def test_a_cut_tail_stops_the_next_start(tmp_path: Path) -> None:
    write_chain(tmp_path, 2)
    rewrite(tmp_path, lines_of(tmp_path)[:-1])
    with pytest.raises(AuditError, match="records were removed"):
        make_log(tmp_path)


def test_two_writers_cannot_share_a_directory(tmp_path: Path) -> None:
    first = make_log(tmp_path)
    with pytest.raises(AuditError, match="in use"):
        make_log(tmp_path)
    first.close()


# --- aggregation, folding, drops ----------------------------------------------------------


def test_transport_frames_fold_into_one_record_per_session_per_second(tmp_path: Path) -> None:
    clock = Clock()
    audit = make_log(tmp_path, clock)
    for sequence in range(1, 6):
        audit.transport_write("zmq", 7, None, "AAPL", 100, sequence)
    audit.transport_write("shm", 8, "feed", "MSFT", 3, 40)
    audit.pump(clock.advance(400_000_000))  # same second: nothing written yet
    assert [r["kind"] for r in records(tmp_path)] == ["start"]
    audit.transport_write("zmq", 7, None, "AAPL", 50, 6)
    audit.pump(clock.advance(700_000_000))  # next second: the first second's records
    audit.transport_write("zmq", 7, None, "AAPL", 1, 7)
    audit.close()
    got = [r for r in records(tmp_path) if r["kind"] == "transport_write"]
    assert [
        (r["transport"], r["publisher_id"], r["who"], r["symbol"], r["frames"], r["values"],
         r["first_sequence"], r["last_sequence"])
        for r in got
    ] == [
        ("zmq", 7, None, "AAPL", 5, 500, 1, 5),
        ("shm", 8, "feed", "MSFT", 1, 3, 40, 40),
        ("zmq", 7, None, "AAPL", 2, 51, 6, 7),  # drained in the next second: counted there
    ]  # fmt: skip
    assert got[0]["second"] == "2023-11-14T22:13:20.000000Z"
    assert got[2]["second"] == "2023-11-14T22:13:21.000000Z"


def test_denials_are_rate_limited_with_counts(tmp_path: Path) -> None:
    clock = Clock()
    audit = make_log(tmp_path, clock, max_denied_per_s=2)
    for _ in range(10):
        audit.denied("mallory", "/add_batch/", "forbidden", "role read")
    audit.denied("bob", "/add_batch/", "unauthorized", "no token")
    audit.pump(clock.advance(1))
    audit.pump(clock.advance(1_000_000_000))
    audit.denied("mallory", "/add_batch/", "forbidden", "role read")
    audit.close()
    got = [r for r in records(tmp_path) if r["kind"] == "denied"]
    assert [(r["who"], r["count"], r.get("folded", False)) for r in got] == [
        ("mallory", 1, False),
        ("mallory", 1, False),
        ("bob", 1, False),
        ("mallory", 8, True),
        ("mallory", 1, False),
    ]
    assert verify(tmp_path).ok


def test_a_full_queue_drops_and_says_how_many(tmp_path: Path) -> None:
    clock = Clock()
    audit = make_log(tmp_path, clock, queue_records=3)
    for index in range(10):
        audit.rest_write("alice", "AAPL", 1, index)
    audit.pump(clock.advance(1))
    audit.close()
    kinds = [r["kind"] for r in records(tmp_path)]
    assert kinds == ["start", "write", "write", "write", "dropped", "stop"]
    assert records(tmp_path)[4]["count"] == 7


def test_admin_records_carry_the_detail(tmp_path: Path) -> None:
    audit = make_log(tmp_path)
    audit.admin("root", "delete_symbol", {"symbol": "AAPL", "values": 12})
    audit.close()
    admin = records(tmp_path)[1]
    assert (admin["kind"], admin["who"], admin["action"], admin["detail"]) == (
        "admin", "root", "delete_symbol", {"symbol": "AAPL", "values": 12},
    )  # fmt: skip


def test_the_writer_thread_writes_and_fsyncs_on_its_own(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, fsync_interval_ms=20)
    threads = [
        threading.Thread(
            target=lambda p=p: [
                audit.transport_write("zmq", p, None, "S", 1, s) for s in range(1, 1001)
            ]
        )
        for p in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    audit.close()
    got = [r for r in records(tmp_path) if r["kind"] == "transport_write"]
    assert sum(r["frames"] for r in got) == 4000
    assert verify(tmp_path).ok


def test_open_audit_is_null_when_disabled(tmp_path: Path) -> None:
    assert isinstance(open_audit(AuditConfig()), NullAudit)
    audit = open_audit(AuditConfig(enabled=True, dir=str(tmp_path / "a")))
    assert isinstance(audit, AuditLog)
    audit.close()


# --- the sink reports applied frames only -------------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.symbols: set[str] = set()

    def __contains__(self, symbol: object) -> bool:
        return symbol in self.symbols

    def ingest(self, symbol: str, values: np.ndarray, publisher_id: int = 0, sequence: int = 0,
               timestamps: np.ndarray | None = None):  # fmt: skip
        if symbol == "FULL":
            from appliance.store import SymbolLimitError

            raise SymbolLimitError("full")
        self.symbols.add(symbol)
        return values.shape[0]


class Recorder(NullAudit):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def transport_write(self, *args) -> None:  # type: ignore[override]
        self.calls.append(args)


def test_the_sink_reports_each_applied_frame_with_its_transport() -> None:
    audit = Recorder()
    sink = StoreSink(FakeStore(), 100, audit, "shm")
    sink.audit = audit  # a NullAudit subclass: forced on for the test
    values = np.ones(3)
    sink("AAPL", values, 5, 1)
    got: list[list[Reason]] = []
    sink.submit_batch([("AAPL", values, 5, 2, None), ("FULL", values, 6, 1, None)], got.append)
    assert got == [[Reason.NONE, Reason.SYMBOL_LIMIT]]
    assert audit.calls == [("shm", 5, None, "AAPL", 3, 1), ("shm", 5, None, "AAPL", 3, 2)]


def test_the_sink_makes_no_audit_call_without_an_audit_log() -> None:
    assert StoreSink(FakeStore(), 100, NullAudit(), "zmq").audit is None


def test_a_batch_is_folded_per_session_before_it_reaches_the_log(tmp_path: Path) -> None:
    clock = Clock()
    audit = make_log(tmp_path, clock)
    sink = StoreSink(FakeStore(), 100, audit, "zmq")
    values = np.ones(4)
    items = [("A", values, 1, 1, None), ("A", values, 1, 2, None), ("B", values, 2, 9, None),
             ("FULL", values, 3, 1, None), ("A", values, 1, 3, None)]  # fmt: skip
    sink.submit_batch(items, lambda reasons: None)
    assert len(audit._queue) == 1  # one entry for the whole batch
    sink("A", values, 1, 4)  # the per-frame path (shared memory, RDMA)
    audit.close()
    got = [r for r in records(tmp_path) if r["kind"] == "transport_write"]
    fields = ("publisher_id", "symbol", "frames", "values", "first_sequence", "last_sequence")
    assert [tuple(r[f] for f in fields) for r in got] == [
        (1, "A", 4, 16, 1, 4),
        (2, "B", 1, 4, 9, 9),
    ]
