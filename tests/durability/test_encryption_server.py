"""Encryption at rest against a real server: a restart with the key serves the same data, a
restart with the wrong key (or none) exits 2 with a clear message and changes nothing on disk,
a bad key file is a config error, and no file holds a value in clear."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from tests.durability.test_encryption import KEY, MARKER, MARKER_BYTES, OTHER_KEY, all_files
from tests.integration.server_harness import Server, run_cli, running_server

ENV = {
    "APP_DURABILITY__WARM_SEGMENT_VALUES": "50",  # sealed segments, by the sealing child
    "APP_DURABILITY__SYNC": "always",
    "APP_DURABILITY__CHECKPOINT_INTERVAL_S": "1",
}


def _key_file(directory: Path, key: bytes, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(key)
    path.chmod(0o600)
    return path


def _answers(server: Server) -> tuple[dict, dict]:
    stats = server.stats("EUR/USD", 2)
    history = server.request("GET", "/history/stats?" + urlencode({"symbol": "EUR/USD"}))
    assert stats.status == 200 and history.status == 200, (stats, history)
    return stats.json, history.json


def test_restart_with_the_key_and_with_the_wrong_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    env = {**ENV, "APP_SECURITY__DATA_KEY_FILE": str(_key_file(keys, KEY, "data.key"))}
    cwd = tmp_path / "srv"
    values = np.full(130, MARKER) + np.arange(130) * 1e-3
    values[::2] = MARKER  # the marker itself, many times
    with running_server(cwd, env) as server:
        for start in range(0, 130, 13):
            response = server.post_batch("EUR/USD", values[start : start + 13].tolist())
            assert response.status == 200, response
        before = _answers(server)
        assert before[1]["count"] == 130
        assert server.stop() == 0

    data = cwd / "data"
    files = all_files(data)
    assert any(name.startswith("warm/") for name in files)
    assert any(name.startswith("checkpoints/") for name in files)
    assert any(name.startswith("wal/") for name in files)
    for name, (content, mode) in files.items():
        assert MARKER_BYTES not in content, name
        assert mode == 0o600, name
    for directory in [data, *(p for p in data.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory

    wrong = {**ENV, "APP_SECURITY__DATA_KEY_FILE": str(_key_file(keys, OTHER_KEY, "old.key"))}
    result = run_cli(cwd, "serve", env=wrong, timeout_s=60)
    assert result.returncode == 2, result.stderr
    assert "data key does not match the key these files were written with" in result.stderr
    assert all_files(data) == files  # nothing changed on disk

    result = run_cli(cwd, "serve", env=ENV, timeout_s=60)  # encryption off over encrypted data
    assert result.returncode == 2 and "data_key_file is not set" in result.stderr, result.stderr
    assert all_files(data) == files

    with running_server(cwd, env) as server:
        stats, history = _answers(server)
    assert stats == before[0]
    # The history merges sealed and unsealed parts differently after a restart: same values,
    # the variance may differ in the last bits.
    assert history["var"] == pytest.approx(before[1]["var"], rel=1e-12)
    assert {**history, "var": 0} == {**before[1], "var": 0}


def test_a_bad_key_file_is_a_config_error(tmp_path: Path) -> None:
    short = _key_file(tmp_path / "keys", KEY[:16], "short.key")
    result = run_cli(tmp_path, "serve", env={"APP_SECURITY__DATA_KEY_FILE": str(short)})
    assert result.returncode == 2
    assert "config error: security.data_key_file" in result.stderr
    assert "exactly 32 raw bytes" in result.stderr
    readable = _key_file(tmp_path / "keys", KEY, "readable.key")
    readable.chmod(0o644)
    result = run_cli(tmp_path, "serve", env={"APP_SECURITY__DATA_KEY_FILE": str(readable)})
    assert result.returncode == 2 and "chmod 600" in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()


def test_encryption_over_a_plain_data_directory_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path, ENV) as server:
        assert server.post_batch("EUR/USD", [1.0, 2.0]).status == 200
    before = all_files(tmp_path / "data")
    key = _key_file(tmp_path / "keys", KEY, "data.key")
    result = run_cli(tmp_path, "serve", env={**ENV, "APP_SECURITY__DATA_KEY_FILE": str(key)})
    assert result.returncode == 2
    assert "is not encrypted but [security] data_key_file is set" in result.stderr
    assert all_files(tmp_path / "data") == before
