"""archive + verify: round trip, flipped byte, missing file, CLI exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.durability.archive import MANIFEST, archive, run_verify, verify
from appliance.durability.warm import symbol_key
from appliance.durability.warm_segment import read_header, read_segment, segment_name
from tests.durability.warm_helpers import Feeder, warm_tier


@pytest.fixture
def warm_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data" / "warm"
    with warm_tier(directory, segment_values=50) as warm:
        feed = Feeder(warm)
        feed.send("EUR/USD", np.arange(130.0))  # 2 sealed + 30 unsealed
        feed.send("日本円-USD", np.arange(50.0))  # 1 sealed
        warm.drain()
    (directory / symbol_key("EUR/USD") / (segment_name(100) + ".tmp")).write_bytes(b"torn")
    return directory


def test_round_trip(warm_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "cold"
    manifest = archive(warm_dir, target)
    assert [(e.symbol, e.first_index, e.end_index) for e in manifest.files] == [
        ("EUR/USD", 0, 50),
        ("EUR/USD", 50, 100),
        ("日本円-USD", 0, 50),
    ]
    listed = json.loads((target / MANIFEST).read_text())
    assert {"path", "bytes", "sha256", "symbol", "first_received_ns", "last_received_ns"} <= set(
        listed["files"][0]
    )
    assert not list(target.rglob("*.tmp"))  # unfinished seals are never archived
    copy = target / manifest.files[1].path
    assert np.array_equal(read_segment(copy, read_header(copy)).values, np.arange(50.0, 100.0))
    report = verify(target)
    assert report.ok and report.checked == 3 and report.unlisted == []
    # Archiving again is idempotent.
    assert archive(warm_dir, target).files == manifest.files


def test_flipped_byte_and_missing_file_fail_naming_the_file(warm_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "cold"
    manifest = archive(warm_dir, target)
    flipped = target / manifest.files[0].path
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    (target / manifest.files[2].path).unlink()
    out = io.StringIO()
    assert run_verify(target, out) == 1
    text = out.getvalue()
    assert f"sha256 mismatch: {manifest.files[0].path}" in text
    assert f"missing: {manifest.files[2].path}" in text
    assert manifest.files[1].path not in text


def test_cli_archive_and_verify(
    warm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("APP_DURABILITY__DIR", str(warm_dir.parent))
    monkeypatch.setenv("APP_LOG__FILE", "")
    target = tmp_path / "cold"
    assert main(["archive", "--to", str(target)]) == 0
    assert "archived 3 segments" in capsys.readouterr().out
    assert main(["verify", str(target)]) == 0
    assert "3 files checked, ok" in capsys.readouterr().out
    (target / MANIFEST).write_text("{not json")
    assert main(["verify", str(target)]) == 1
    assert "manifest" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nowhere")]) == 1
