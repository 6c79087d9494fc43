"""Fixtures for the integration suite; the harness itself lives in server_harness.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from server_harness import Server, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One appliance per xdist worker, shared by tests that only add unique symbols."""
    env = {"APP_STORE__MAX_SYMBOLS": "100000", "APP_STORE__STARTING_CAPACITY": "1024"}
    with running_server(tmp_path_factory.mktemp("appliance"), env) as srv:
        yield srv
