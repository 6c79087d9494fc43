"""appliance.transports.Transports: config in, bound and started transports over a real Store.

The end-to-end path (publisher -> ZeroMQ -> make_sink -> Store) runs in-process here; the same
path through a server subprocess is tests/integration/test_zmq_ingest.py.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from appliance.app import build_store
from appliance.config import AppConfig, build_config
from appliance.store import Store
from appliance.transports import RDMA_NO_CONTROL, Transports
from fallback import NumpyEngine
from tests.rdma import lab as rdma_lab
from transport.errors import TransportBindError, TransportStartError
from transport.publisher import PublishError
from transport.wire import Reason
from transport.zmq.publisher import ZmqPublisher

LOCAL_ENV = {
    "APP_TRANSPORT__ZMQ__ROUTER_ENDPOINT": "tcp://127.0.0.1:0",
    "APP_TRANSPORT__ZMQ__PULL_ENDPOINT": "tcp://127.0.0.1:0",
    "APP_TRANSPORT__ZMQ__CONTROL_ENDPOINT": "tcp://127.0.0.1:0",
}


def config(**env: str) -> AppConfig:
    return build_config({}, {**LOCAL_ENV, **env})


@pytest.fixture
def store() -> Store:
    return build_store(AppConfig(), NumpyEngine())


@pytest.fixture
def started(store: Store) -> Iterator[Transports]:
    cfg = config(APP_TRANSPORT__SHM__ENABLED="false", APP_STORE__MAX_BATCH_SIZE="100")
    transports = Transports(cfg, store)
    transports.bind()
    transports.start()
    yield transports
    transports.stop(2.0)


def test_frames_reach_the_store_through_the_rest_validation(
    started: Transports, store: Store
) -> None:
    assert started.zmq is not None
    values = np.random.default_rng(3).random(250) * 10
    endpoint = started.zmq.bound_endpoints["router"]
    with ZmqPublisher(endpoint, max_frame_bytes=512) as publisher:
        publisher.publish("EUR/USD", values)
        publisher.publish("bad\x01symbol", [1.0])
        with pytest.raises(PublishError) as error:
            publisher.flush()
    assert [r.reason for r in error.value.rejections] == [Reason.INVALID_SYMBOL]
    stats = store.stats("EUR/USD", 3)
    assert (stats.min, stats.max, stats.last) == (values.min(), values.max(), values[-1])
    assert stats.avg == pytest.approx(values.mean(), rel=1e-9)
    assert stats.var == pytest.approx(values.var(), rel=1e-9)
    assert store.symbols() == ["EUR/USD"]
    counters = started.snapshot()["zmq"]["router"]
    assert counters["values_applied"] == 250
    assert counters["rejected"] == {"invalid_symbol": 1}


def test_a_frame_over_max_batch_size_is_rejected_as_rest_would(started: Transports) -> None:
    assert started.zmq is not None
    with ZmqPublisher(started.zmq.bound_endpoints["router"]) as publisher:
        publisher.publish("BIG", np.ones(101))  # one frame: store.max_batch_size is 100
        with pytest.raises(PublishError) as error:
            publisher.flush()
    assert error.value.rejections[0].reason is Reason.BATCH_TOO_LARGE


def test_shm_control_ops_are_registered_on_the_control_socket() -> None:
    cfg = config()
    transports = Transports(cfg, build_store(cfg, NumpyEngine()))
    transports.bind()
    try:
        snapshot = transports.snapshot()
        assert {"shm.open", "shm.close"} <= set(snapshot["zmq"]["control"]["ops"])
        assert "shm" in snapshot
    finally:
        transports.stop(2.0)  # never started: still closes everything


def test_nothing_is_built_when_every_transport_is_disabled() -> None:
    cfg = config(APP_TRANSPORT__ZMQ__ENABLED="false", APP_TRANSPORT__SHM__ENABLED="false")
    transports = Transports(cfg, build_store(cfg, NumpyEngine()))
    transports.bind()
    transports.start()
    assert transports.snapshot() == {}
    transports.stop()


def test_a_busy_endpoint_is_one_start_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        cfg = config(APP_TRANSPORT__ZMQ__PULL_ENDPOINT=busy, APP_TRANSPORT__SHM__ENABLED="false")
        with pytest.raises(TransportStartError) as error:
            Transports(cfg, build_store(cfg, NumpyEngine())).bind()
    assert isinstance(error.value, TransportBindError)
    assert str(error.value).startswith(f"cannot bind transport endpoint {busy}: ")


def rdma_missing_here() -> str:
    """What this host lacks for RDMA (skip where RDMA works)."""
    reason = rdma_lab.missing()
    if reason is None:
        pytest.skip("an RDMA device is present here: the no-device path cannot be exercised")
    return reason


def test_rdma_required_refuses_to_start() -> None:
    missing = rdma_missing_here()
    cfg = config(APP_TRANSPORT__RDMA__ENABLED='"required"', APP_TRANSPORT__SHM__ENABLED="false")
    with pytest.raises(TransportStartError, match=r"transport\.rdma\.enabled") as error:
        Transports(cfg, build_store(cfg, NumpyEngine())).bind()
    assert missing in str(error.value)
    assert "\n" not in str(error.value)


def test_rdma_unavailable_message_says_how_to_get_it() -> None:
    missing = rdma_missing_here()
    if "pyverbs is not importable" in missing:
        assert "python3-pyverbs" in missing and "--system-site-packages" in missing
    else:
        assert "rdma link add" in missing or "RDMA device" in missing


def test_rdma_enabled_warns_once_and_the_others_work(caplog: pytest.LogCaptureFixture) -> None:
    missing = rdma_missing_here()
    cfg = config(APP_TRANSPORT__RDMA__ENABLED="true", APP_TRANSPORT__SHM__ENABLED="false")
    store = build_store(cfg, NumpyEngine())
    transports = Transports(cfg, store)
    with caplog.at_level(logging.WARNING, logger="appliance.transports"):
        transports.bind()
    transports.start()
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"RDMA transport off: {missing}; the other transports keep working"]
        snapshot = transports.snapshot()
        assert snapshot["rdma"] == {"status": "unavailable", "reason": missing}
        assert "rdma.open" not in snapshot["zmq"]["control"]["ops"]
        assert transports.zmq is not None
        with ZmqPublisher(transports.zmq.bound_endpoints["router"]) as publisher:
            publisher.publish("STILL", [1.5, 2.5])
        assert store.stats("STILL", 1).last == 2.5
    finally:
        transports.stop(2.0)


def test_rdma_without_a_control_socket_is_off_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = config(APP_TRANSPORT__RDMA__ENABLED="true", APP_TRANSPORT__ZMQ__ENABLED="false")
    transports = Transports(cfg, build_store(cfg, NumpyEngine()))
    with caplog.at_level(logging.WARNING, logger="appliance.transports"):
        transports.bind()
    try:
        assert any(RDMA_NO_CONTROL in r.getMessage() for r in caplog.records)
        assert transports.snapshot()["rdma"]["reason"] == RDMA_NO_CONTROL
    finally:
        transports.stop(2.0)
