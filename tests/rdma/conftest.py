"""The RDMA suite runs against real verbs: two devices that can reach each other.

In the Soft-RoCE lab (`deploy/rdma-lab/lab.sh`) they are rxe0 (the appliance's) and rxe1 (the
publishers'), on the two ends of a veth pair, named by HFT_RDMA_SERVER_DEVICE and
HFT_RDMA_CLIENT_DEVICE. Anywhere else every test here is skipped with what is missing, so the
main suite stays green on machines without RDMA and says why these did not run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Lab:
    server_device: str
    client_device: str
    gid_index: int


def find_lab() -> Lab | str:
    """The lab's devices, or why there are none (a skip reason)."""
    from transport.rdma import verbs

    try:
        names = verbs.device_names(verbs.load())
    except verbs.RdmaUnavailable as exc:
        return f"needs RDMA devices (run deploy/rdma-lab/lab.sh): {exc}"
    server = os.environ.get("HFT_RDMA_SERVER_DEVICE", names[0])
    client = os.environ.get("HFT_RDMA_CLIENT_DEVICE", names[-1])
    missing = [name for name in (server, client) if name not in names]
    if missing:
        return f"RDMA device(s) {', '.join(missing)} not present (have {', '.join(names)})"
    return Lab(server, client, int(os.environ.get("HFT_RDMA_GID_INDEX", "1")))


_LAB = find_lab()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if isinstance(_LAB, Lab):
        return
    skip = pytest.mark.skip(reason=_LAB)
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab() -> Lab:
    assert isinstance(_LAB, Lab), _LAB
    return _LAB
