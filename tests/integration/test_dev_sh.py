"""dev.sh keeps the caller's working directory for `serve` and `run` (relative paths are theirs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from server_harness import REPO_ROOT, subprocess_env

DEV_SH = REPO_ROOT / "dev.sh"


def dev_sh(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEV_SH), *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_stays_in_the_callers_directory(tmp_path: Path) -> None:
    result = dev_sh(tmp_path, "run", "pwd")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == tmp_path.resolve()


def test_serve_resolves_a_relative_config_against_the_callers_directory(tmp_path: Path) -> None:
    # A config that fails validation: reaching it proves which file was read, without a server.
    (tmp_path / "my.toml").write_text("[store]\nmax_symbols = -5\n")
    result = dev_sh(tmp_path, "serve", "--config", "my.toml")
    assert result.returncode == 2
    assert "store.max_symbols" in result.stderr


def test_serve_reads_config_toml_from_the_callers_directory(tmp_path: Path) -> None:
    (tmp_path / "Config.toml").write_text("[store]\nmax_symbols = -7\n")
    result = dev_sh(tmp_path, "serve")
    assert result.returncode == 2
    assert "store.max_symbols" in result.stderr
    assert "-7" in result.stderr
