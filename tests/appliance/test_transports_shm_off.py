"""Shared memory without a ZeroMQ control socket: off with one warning, never a start failure."""

from __future__ import annotations

import logging

import pytest

from appliance.app import build_store
from appliance.config import build_config
from appliance.transports import Transports
from fallback import NumpyEngine


@pytest.mark.parametrize(
    "env",
    [
        {"APP_TRANSPORT__ZMQ__ENABLED": "false"},
        {
            "APP_TRANSPORT__ZMQ__CONTROL_ENDPOINT": "",
            "APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": "tcp://127.0.0.1:0",
            "APP_TRANSPORT__ZMQ__PULL_ENDPOINT": "tcp://127.0.0.1:0",
        },
    ],
)
def test_shm_without_a_control_socket_is_off_with_one_warning(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    config = build_config({}, env)
    transports = Transports(config, build_store(config, NumpyEngine()))
    assert transports.shm is None
    with caplog.at_level(logging.WARNING, logger="appliance.transports"):
        transports.bind()
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].startswith("shared-memory transport off")
        assert "shm" not in transports.snapshot()
    finally:
        transports.stop(2.0)
