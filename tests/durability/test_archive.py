"""archive + verify + restore: round trip, flipped byte, missing file, CLI exit codes, and a
restored archive served again."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.durability.archive import MANIFEST, archive, load_manifest, run_verify, verify
from appliance.durability.checkpoint import load_latest
from appliance.durability.history import stats_by_index
from appliance.durability.restore import STAGING, RestoreError, restore
from appliance.durability.warm import symbol_key
from appliance.durability.warm_segment import read_header, read_segment, segment_name
from tests.durability.warm_helpers import Feeder, warm_tier
from tests.integration.server_harness import running_server


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


# ------------------------------------------------------------------ restore


def _history_rows(warm_dir: Path) -> dict[str, tuple]:
    """Every symbol's whole-history statistics, as GET /history/stats computes them."""
    with warm_tier(warm_dir) as warm:
        return {symbol: tuple(stats_by_index(warm, symbol)) for symbol in warm.symbols()}


def test_restore_rebuilds_the_warm_tier_and_the_totals(warm_dir: Path, tmp_path: Path) -> None:
    archive(warm_dir, tmp_path / "cold")
    data = tmp_path / "fresh" / "data"
    report = restore(tmp_path / "cold", data)
    assert (report.segments, report.totals) == (3, {"EUR/USD": 100, "日本円-USD": 50})
    assert _history_rows(data / "warm") == _history_rows(warm_dir)
    for entry in load_manifest(tmp_path / "cold").files:  # byte for byte, same layout
        assert (data / entry.path).read_bytes() == (tmp_path / "cold" / entry.path).read_bytes()
    # New values continue after the restored history: the checkpoint carries the totals.
    checkpoint = load_latest(data)
    assert checkpoint is not None and checkpoint.lsn == 0
    assert {s: (c.total, c.values.shape[0]) for s, c in checkpoint.symbols.items()} == {
        "EUR/USD": (100, 0),
        "日本円-USD": (50, 0),
    }
    assert sorted(p.name for p in data.iterdir()) == ["checkpoints", "warm"]  # no staging left


def test_restore_never_writes_over_data(warm_dir: Path, tmp_path: Path) -> None:
    archive(warm_dir, tmp_path / "cold")
    data = tmp_path / "data"  # the original: it holds warm segments
    before = sorted(p for p in data.rglob("*"))
    with pytest.raises(RestoreError, match="already holds data"):
        restore(tmp_path / "cold", data)
    assert sorted(p for p in data.rglob("*")) == before
    empty = tmp_path / "empty"
    (empty / "warm" / "leftover").mkdir(parents=True)  # empty directories are no data
    (empty / STAGING / "warm").mkdir(parents=True)  # an interrupted restore's staging
    (empty / STAGING / "warm" / "x.seg").write_bytes(b"partial")
    assert restore(tmp_path / "cold", empty).segments == 3
    assert not (empty / STAGING).exists() and not (empty / "warm" / "leftover").exists()


def test_restore_refuses_an_archive_that_does_not_verify(warm_dir: Path, tmp_path: Path) -> None:
    manifest = archive(warm_dir, tmp_path / "cold")
    flipped = tmp_path / "cold" / manifest.files[1].path
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x01
    flipped.write_bytes(bytes(data))
    with pytest.raises(RestoreError, match=f"sha256 mismatch: {manifest.files[1].path}"):
        restore(tmp_path / "cold", tmp_path / "fresh")
    assert not list((tmp_path / "fresh").rglob("*.seg"))


def test_restore_refuses_a_manifest_path_outside_the_layout(warm_dir: Path, tmp_path: Path) -> None:
    archive(warm_dir, tmp_path / "cold")
    listed = json.loads((tmp_path / "cold" / MANIFEST).read_text())
    source = tmp_path / "cold" / listed["files"][0]["path"]
    escape = tmp_path / "cold" / "warm" / "escape.seg"
    escape.write_bytes(source.read_bytes())
    listed["files"][0]["path"] = "warm/../warm/escape.seg"
    (tmp_path / "cold" / MANIFEST).write_text(json.dumps(listed))
    with pytest.raises(RestoreError, match="not where archive puts"):
        restore(tmp_path / "cold", tmp_path / "fresh")


def test_cli_restore(
    warm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    archive(warm_dir, tmp_path / "cold")
    monkeypatch.setenv("APP_LOG__FILE", "")
    monkeypatch.setenv("APP_DURABILITY__DIR", str(tmp_path / "fresh"))
    monkeypatch.setenv("APP_DURABILITY__RETAIN_DAYS", "1")  # the fixture's times are 1970
    assert main(["restore", "--from", str(tmp_path / "cold")]) == 0
    out = capsys.readouterr().out
    assert "restored 3 segments" in out and "2 symbols" in out
    assert "warning: 3 of these segments are older than [durability] retain_days = 1" in out
    assert main(["restore", "--from", str(tmp_path / "cold")]) == 1  # now it holds data
    assert "restore: nothing restored:" in capsys.readouterr().out


def test_restored_archive_answers_history_in_a_server_and_new_values_continue(
    tmp_path: Path,
) -> None:
    """Archive a real server's warm tier, restore it into a fresh directory, serve that: the
    same /history/stats, and new values are numbered after the restored ones."""
    env = {"APP_DURABILITY__WARM_SEGMENT_VALUES": "100", "APP_DURABILITY__SYNC": "always"}
    values = np.round(np.random.default_rng(3).uniform(100, 200, 740), 6)
    original, fresh = tmp_path / "original", tmp_path / "fresh"
    original.mkdir()
    fresh.mkdir()
    with running_server(original, env) as server:
        for batch in np.split(values, 20):
            assert server.post_batch("EUR/USD", batch.tolist()).status == 200
        assert server.stop() == 0
    with running_server(original, env) as server:  # the whole sealed range, as served there
        expected = _history(server, symbol="EUR/USD", end="700")
        assert server.stop() == 0
    archive(original / "data" / "warm", tmp_path / "cold")
    assert restore(tmp_path / "cold", fresh / "data").totals == {"EUR/USD": 700}
    with running_server(fresh, env) as server:
        assert _history(server, symbol="EUR/USD") == expected
        assert server.post_batch("EUR/USD", [1.0, 2.0]).status == 200
        body = _history(server, symbol="EUR/USD", start="699")
        assert (body["count"], body["first_index"], body["last_index"]) == (3, 699, 701)
        assert (body["first"], body["last"]) == (values[699], 2.0)
        assert server.stop() == 0


def _history(server, **params: str) -> dict:
    from urllib.parse import urlencode

    response = server.request("GET", "/history/stats?" + urlencode(params))
    assert response.status == 200, response
    return response.json
