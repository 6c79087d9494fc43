"""The audit trail against a real server: ZeroMQ frames through StoreSink into the hash chain,
then the real `hft-appliance audit verify` on the files it left, intact and tampered with.

One server run (over a second of publishing) feeds every check: each tampering test works on a
copy of its audit directory.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from server_harness import Server, run_cli

from transport.zmq.publisher import ZmqPublisher

PUBLISH_S = 1.5
FRAME_VALUES = 50


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """(the stopped server's working directory, frames published, values published)."""
    cwd = tmp_path_factory.mktemp("audit")
    env = {
        "APP_AUDIT__ENABLED": "true",
        "APP_AUDIT__FSYNC_INTERVAL_MS": "50",
        "APP_TRANSPORT__SHM__ENABLED": "false",
        "APP_STORE__STARTING_CAPACITY": "1024",
    }
    server = Server(cwd, env)
    try:
        server.wait_ready()
        frames = 0
        values = np.arange(FRAME_VALUES, dtype=np.float64)
        with ZmqPublisher(server.router_endpoint, max_frame_bytes=4096) as publisher:
            deadline = time.monotonic() + PUBLISH_S
            while time.monotonic() < deadline:
                publisher.publish("AUD", values)
                frames += 1
                time.sleep(0.002)
            publisher.flush()
    finally:
        assert server.stop() == 0, server.stderr()
    return cwd, frames, frames * FRAME_VALUES


def audit_records(directory: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def test_transport_writes_are_recorded_per_second_and_the_chain_verifies(
    audited: tuple[Path, int, int],
) -> None:
    cwd, frames, values = audited
    got = audit_records(cwd / "data" / "audit")
    kinds = [r["kind"] for r in got]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    writes = [r for r in got if r["kind"] == "transport_write"]
    assert len(writes) >= 2  # over a second of publishing: at least two seconds' records
    assert {(r["transport"], r["symbol"]) for r in writes} == {("zmq", "AUD")}
    assert sum(r["frames"] for r in writes) == frames
    assert sum(r["values"] for r in writes) == values
    sequences = [(r["first_sequence"], r["last_sequence"]) for r in writes]
    assert sequences[0][0] == 1 and sequences[-1][1] == frames
    for (_, last), (first, _) in itertools.pairwise(sequences):
        assert first == last + 1  # per second, the session's range, without gaps
    result = run_cli(cwd, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(got)} records in 1 files, chain intact (anchored)" in result.stdout


def tampered(audited: tuple[Path, int, int], tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    """A copy of the server's audit directory: (its parent, the file, the file's lines)."""
    cwd, _, _ = audited
    shutil.copytree(cwd / "data" / "audit", tmp_path / "data" / "audit")
    path = tmp_path / "data" / "audit" / "audit-000001.jsonl"
    return tmp_path, path, path.read_bytes().splitlines(keepends=True)


def verify_fails(cwd: Path, expected: str) -> None:
    result = run_cli(cwd, "audit", "verify", "data/audit")
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


def test_verify_names_an_edited_record(audited: tuple[Path, int, int], tmp_path: Path) -> None:
    cwd, path, lines = tampered(audited, tmp_path)
    record = json.loads(lines[1])
    record["values"] = record.get("values", 0) + 1
    lines[1] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    verify_fails(cwd, "record 2 (file audit-000001.jsonl, line 2): changed")


def test_verify_names_a_deleted_record(audited: tuple[Path, int, int], tmp_path: Path) -> None:
    cwd, path, lines = tampered(audited, tmp_path)
    del lines[1]
    path.write_bytes(b"".join(lines))
    verify_fails(cwd, "record 2 missing")


def test_verify_names_a_reordered_record(audited: tuple[Path, int, int], tmp_path: Path) -> None:
    cwd, path, lines = tampered(audited, tmp_path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    verify_fails(cwd, "record 3 (file audit-000001.jsonl, line 2): out of order")


def test_a_restart_continues_the_chain(audited: tuple[Path, int, int], tmp_path: Path) -> None:
    cwd, _, _ = tampered(audited, tmp_path)
    before = len(audit_records(cwd / "data" / "audit"))
    server = Server(cwd, {"APP_AUDIT__ENABLED": "true", "APP_TRANSPORT__SHM__ENABLED": "false"})
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0, server.stderr()
    got = audit_records(cwd / "data" / "audit")
    assert [r["kind"] for r in got[before:]] == ["start", "stop"]
    assert run_cli(cwd, "audit", "verify").returncode == 0


def test_a_damaged_tail_stops_the_server_with_exit_2(
    audited: tuple[Path, int, int], tmp_path: Path
) -> None:
    cwd, path, lines = tampered(audited, tmp_path)
    path.write_bytes(b"".join(lines[:-1]))  # the stop record cut off: anchor.json says more
    result = run_cli(cwd, "serve", env={"APP_AUDIT__ENABLED": "true"})
    assert result.returncode == 2
    assert "audit log:" in result.stderr and "records were removed" in result.stderr
