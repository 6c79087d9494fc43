"""Publishers for every transport behind one API: the module a feed handler imports.

    from transport.publishers import connect

    with connect("zmq", endpoint="tcp://127.0.0.1:5555") as pub:
        pub.publish("EUR/USD", [1.0850, 1.0851])
        # with event times (int64 ns since the epoch, one per value): version-2 frames
        pub.publish("EUR/USD", [1.0852], timestamps=[1_767_225_600_000_000_000])
    # leaving the block flushed: every frame was applied (or PublishError was raised)

`connect` picks the class; each class can also be constructed directly with its own options
(`ZmqPublisher(..., window=256)`, `ShmPublisher(..., slots=4096)`).

Reading goes over REST: `QueryClient` (transport.query_client, re-exported here) answers
`stats`, `stats_batch`, `history`, `symbols` and the probes, raising typed `ApplianceError`s.
"""

from __future__ import annotations

from typing import Any, Literal

from transport.publisher import Publisher, PublishError, Rejection
from transport.query_client import ApplianceError, QueryClient

TransportName = Literal["zmq", "zmq-push", "shm", "rdma"]
TRANSPORTS: tuple[str, ...] = ("zmq", "zmq-push", "shm", "rdma")

__all__ = [
    "TRANSPORTS",
    "ApplianceError",
    "PublishError",
    "Publisher",
    "QueryClient",
    "Rejection",
    "connect",
]


def connect(
    transport: TransportName,
    *,
    endpoint: str | None = None,
    control_endpoint: str | None = None,
    **options: Any,
) -> Publisher:
    """A publisher on `transport`:

    - `zmq`: DEALER to the ROUTER `endpoint`, every frame acknowledged (the default choice);
    - `zmq-push`: PUSH to the PULL `endpoint`, fire-and-forget (no acks, `flush` cannot report
      rejections; back-pressure only through the high-water mark);
    - `shm`: a shared-memory ring negotiated over `control_endpoint` (same host only);
    - `rdma`: the same ring in the appliance's memory, written with one-sided RDMA over an RC
      queue pair negotiated over `control_endpoint` (needs pyverbs and an RDMA device).
    """
    if transport in ("zmq", "zmq-push"):
        if not endpoint:
            raise ValueError(f"transport {transport!r} needs endpoint=")
        from transport.zmq.publisher import ZmqPublisher

        mode = "dealer" if transport == "zmq" else "push"
        return ZmqPublisher(endpoint, mode=mode, **options)
    if transport == "shm":
        if not control_endpoint:
            raise ValueError("transport 'shm' needs control_endpoint=")
        from transport.shm.publisher import ShmPublisher

        return ShmPublisher(control_endpoint, **options)
    if transport == "rdma":
        if not control_endpoint:
            raise ValueError("transport 'rdma' needs control_endpoint=")
        from transport.rdma.publisher import RdmaPublisher

        return RdmaPublisher(control_endpoint, **options)
    raise ValueError(f"unknown transport {transport!r}; one of {', '.join(TRANSPORTS)}")
