"""The RDMA suite runs against real verbs: two devices that can reach each other (see lab.py).
Anywhere else every test here is skipped with what is missing, so the main suite stays green on
machines without RDMA and says why these did not run."""

from __future__ import annotations

import os

import pytest

from tests.rdma.lab import Lab, find_lab

_LAB = find_lab()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if isinstance(_LAB, Lab):
        return
    skip = pytest.mark.skip(reason=f"needs RDMA devices (run deploy/rdma-lab/lab.sh): {_LAB}")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab() -> Lab:
    assert isinstance(_LAB, Lab), _LAB
    return _LAB
