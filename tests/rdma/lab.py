"""Where the RDMA tests find their devices, and why they cannot (a skip reason).

In the Soft-RoCE lab (`deploy/rdma-lab/lab.sh`) the devices are rxe0 (the appliance's) and rxe1
(the publishers'), on the two ends of a veth pair, named by HFT_RDMA_SERVER_DEVICE and
HFT_RDMA_CLIENT_DEVICE. Tests of the no-device path use `missing()` to run only where RDMA
cannot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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
        return str(exc)
    server = os.environ.get("HFT_RDMA_SERVER_DEVICE", names[0])
    client = os.environ.get("HFT_RDMA_CLIENT_DEVICE", names[-1])
    missing = [name for name in (server, client) if name not in names]
    if missing:
        return f"RDMA device(s) {', '.join(missing)} not present (have {', '.join(names)})"
    return Lab(server, client, int(os.environ.get("HFT_RDMA_GID_INDEX", "1")))


def missing() -> str | None:
    """Why RDMA cannot run here, in the transport's own words; None where it can."""
    found = find_lab()
    return found if isinstance(found, str) else None
