"""CLI exit codes for start-up failures (in-process) and the JSON log format."""

from __future__ import annotations

import json
import logging
import logging.handlers
import socket
from pathlib import Path

import pytest

from appliance.cli import bind_listen_socket, main
from appliance.config import LogConfig
from appliance.logging_setup import (
    ErrorRateLimitFilter,
    SizeAndTimeRotatingFileHandler,
    request_id,
    setup_logging,
)


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_bad_env_value_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APP_STORE__MAX_SYMBOLS", "-1")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "store.max_symbols" in err


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_bind_failure_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            bind_listen_socket("127.0.0.1", taken.getsockname()[1])


def test_bind_listen_socket_listens() -> None:
    sock = bind_listen_socket("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=5):
            pass
    finally:
        sock.close()


def test_json_lines_to_stdout_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logger: None
) -> None:
    log_file = tmp_path / "nested" / "dir" / "app.log"
    handlers = setup_logging(LogConfig(level="debug", file=str(log_file)))
    logging.getLogger("appliance.test").info("hello", extra={"symbol": "AAPL"})
    logging.getLogger("sanic.root").warning("from sanic")
    for handler in handlers:
        handler.flush()
    stdout_lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    file_lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    for lines in (stdout_lines, file_lines):
        assert lines[0]["message"] == "hello"
        assert lines[0]["symbol"] == "AAPL"
        assert lines[0]["level"] == "INFO"
        assert lines[0]["logger"] == "appliance.test"
        assert "time" in lines[0]
        assert lines[0]["thread"] == "MainThread"
        assert "request_id" not in lines[0]  # outside a request: no field, not null
        assert lines[1]["logger"] == "sanic.root"
    rotating = [h for h in handlers if isinstance(h, logging.handlers.TimedRotatingFileHandler)]
    assert rotating and rotating[0].when == "MIDNIGHT"


def test_empty_log_file_means_stdout_only(tmp_path: Path, restore_root_logger: None) -> None:
    handlers = setup_logging(LogConfig(file=""))
    assert len(handlers) == 1
    assert not any(tmp_path.iterdir())


def test_version_prints_the_installed_distribution_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hft-appliance {version('hft-appliance')}"


def test_version_falls_back_to_pyproject_when_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata
    import tomllib

    from appliance.cli import package_version

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    expected = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert package_version() == expected


def test_lines_carry_the_request_id_and_the_thread_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logger: None
) -> None:
    import threading

    log_file = tmp_path / "app.log"
    handlers = setup_logging(LogConfig(file=str(log_file)))
    logger = logging.getLogger("appliance.test")
    token = request_id.set("4f1c-req")
    try:
        logger.info("inside a request")
    finally:
        request_id.reset(token)
    worker = threading.Thread(target=lambda: logger.info("from a worker"), name="wal-writer")
    worker.start()
    worker.join()
    for handler in handlers:
        handler.flush()
    for text in (capsys.readouterr().out, log_file.read_text()):
        inside, other = (json.loads(x) for x in text.splitlines())
        assert inside["request_id"] == "4f1c-req"
        assert inside["thread"] == "MainThread"
        assert "request_id" not in other  # another thread has its own context: no id
        assert other["thread"] == "wal-writer"


def test_log_file_rotates_by_size_keeping_backup_count_files(
    tmp_path: Path, restore_root_logger: None
) -> None:
    log_file = tmp_path / "app.log"
    handlers = setup_logging(LogConfig(file=str(log_file), max_file_bytes=1000, backup_count=3))
    rotating = [h for h in handlers if isinstance(h, SizeAndTimeRotatingFileHandler)]
    assert rotating and rotating[0].when == "MIDNIGHT" and rotating[0].max_bytes == 1000
    logger = logging.getLogger("appliance.test")
    for number in range(60):  # ~120 bytes a line: about 8 lines a file, 7 rotations
        logger.info("line %03d %s", number, "x" * 40)
    for handler in handlers:
        handler.flush()
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "app.log")
    assert len(rotated) == 3, rotated  # older ones deleted beyond backup_count
    assert all(name.startswith("app.log.") and name[-4] == "." for name in rotated), rotated
    assert log_file.stat().st_size <= 1000
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 1000
    # Name order is age order, and nothing of the newest lines was lost.
    kept = [json.loads(x)["message"] for p in [*sorted(tmp_path.glob("app.log.*")), log_file]
            for x in p.read_text().splitlines()]  # fmt: skip
    numbers = [int(message.split()[1]) for message in kept]
    assert numbers == list(range(numbers[0], 60))


def test_zero_max_file_bytes_rotates_daily_only(tmp_path: Path, restore_root_logger: None) -> None:
    handler = SizeAndTimeRotatingFileHandler(tmp_path / "app.log", max_bytes=0)
    try:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "x" * 10_000, None, None)
        for _ in range(5):
            assert not handler.shouldRollover(record)
            handler.emit(record)
    finally:
        handler.close()
    assert [p.name for p in tmp_path.iterdir()] == ["app.log"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str = "bad request %s", level: int = logging.ERROR, name: str = "sanic.error"):
    return logging.LogRecord(name, level, __file__, 1, msg, ("x",), None)


def test_rate_limit_passes_n_per_interval_then_reports_the_dropped_count() -> None:
    clock = FakeClock()
    limit = ErrorRateLimitFilter(3, interval_s=1.0, clock=clock)
    passed = [limit.filter(_record()) for _ in range(200)]
    assert passed == [True] * 3 + [False] * 197
    clock.now += 0.5  # same interval: still dropped
    assert not limit.filter(_record())
    clock.now += 0.5
    first = _record()
    assert limit.filter(first)
    assert first.suppressed == 198
    second = _record()
    assert limit.filter(second)
    assert not hasattr(second, "suppressed")  # the count is reported once


def test_rate_limit_is_per_logger_and_message_template_and_spares_info() -> None:
    limit = ErrorRateLimitFilter(1, clock=FakeClock())
    assert limit.filter(_record("a %s"))
    assert not limit.filter(_record("a %s"))
    assert limit.filter(_record("b %s"))  # another template
    assert limit.filter(_record("a %s", name="appliance.app"))  # another logger
    assert limit.filter(_record("a %s", level=logging.WARNING, name="other"))
    assert not limit.filter(_record("a %s", level=logging.WARNING, name="other"))
    assert all(limit.filter(_record("a %s", level=logging.INFO)) for _ in range(50))


def test_rate_limit_zero_means_no_limit() -> None:
    limit = ErrorRateLimitFilter(0, clock=FakeClock())
    assert all(limit.filter(_record()) for _ in range(1000))


def test_rate_limit_decides_once_per_record_for_several_handlers() -> None:
    """The filter is shared by the stdout and file handlers: a record seen twice counts once."""
    limit = ErrorRateLimitFilter(2, clock=FakeClock())
    for _ in range(2):
        record = _record()
        assert limit.filter(record) and limit.filter(record)
    record = _record()
    assert not limit.filter(record) and not limit.filter(record)


def test_rate_limit_bounds_its_memory_when_every_message_differs() -> None:
    """Varying the text (an f-string with the client's URL) gets no more lines than one pair."""
    clock = FakeClock()
    limit = ErrorRateLimitFilter(2, clock=clock, max_keys=8)
    passed = sum(limit.filter(_record(f"bad url /{n}")) for n in range(1000))
    assert passed == 8 + 2  # one window per key until the table is full, then one shared
    assert len(limit._windows) == 9
    clock.now += 1.0  # expired windows with nothing pending are dropped for new keys
    assert limit.filter(_record("new one"))
    assert len(limit._windows) <= 9


def test_setup_logging_rate_limits_errors_in_stdout_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_root_logger: None
) -> None:
    log_file = tmp_path / "app.log"
    handlers = setup_logging(LogConfig(file=str(log_file), max_errors_per_s=5))
    for n in range(500):
        try:
            raise ValueError(f"bad {n}")
        except ValueError:
            logging.getLogger("sanic.error").exception("protocol.connection_task uncaught")
    logging.getLogger("appliance.test").info("still logged")
    for handler in handlers:
        handler.flush()
    for text in (capsys.readouterr().out, log_file.read_text()):
        lines = [json.loads(x) for x in text.splitlines()]
        assert [line["logger"] for line in lines] == ["sanic.error"] * 5 + ["appliance.test"]
        assert "_rate_limit_passed" not in lines[0]
