"""The parts of the RDMA shim that need no device: enum lookup across rdma-core releases, the
queue-pair address checks applied to control requests, and the no-pyverbs message."""

from __future__ import annotations

import enum
import importlib.util
from types import ModuleType

import pytest

from transport.rdma import verbs
from transport.rdma.verbs import QpInfo, RdmaUnavailable

GID = "0000:0000:0000:0000:0000:ffff:0a63:0001"


def module(name: str, **attributes: object) -> ModuleType:
    made = ModuleType(name)
    made.__dict__.update(attributes)
    return made


def test_a_constant_is_found_flat_as_in_rdma_core_44() -> None:
    flat = module("pyverbs.enums", IBV_QPT_RC=2)
    assert verbs._find([flat], "IBV_QPT_RC") == 2


def test_a_constant_is_found_inside_an_enum_class_as_in_newer_rdma_core() -> None:
    class ibv_qp_type(enum.IntEnum):  # pyverbs' own spelling
        IBV_QPT_RC = 2
        IBV_QPT_UD = 4

    newer = module("pyverbs.libibverbs_enums", ibv_qp_type=ibv_qp_type)
    assert verbs._find([newer, module("pyverbs.enums")], "IBV_QPT_UD") == 4


def test_a_missing_constant_names_itself() -> None:
    with pytest.raises(RdmaUnavailable, match="IBV_WR_RDMA_WRITE_WITH_IMM"):
        verbs._find([module("pyverbs.enums")], "IBV_WR_RDMA_WRITE_WITH_IMM")


def test_queue_pair_info_round_trips_and_rejects_bad_fields() -> None:
    info = QpInfo(qpn=17, psn=0xABCDEF, gid=GID)
    assert QpInfo.from_dict(info.to_dict()) == info
    for field, bad in (("qpn", -1), ("qpn", 1 << 24), ("psn", True), ("psn", "1"),
                       ("gid", "fe80::1"), ("gid", 7)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            QpInfo.from_dict({**info.to_dict(), field: bad})


@pytest.mark.skipif(
    importlib.util.find_spec("pyverbs") is not None, reason="pyverbs is installed here"
)
def test_without_pyverbs_the_message_says_how_to_install_it() -> None:
    with pytest.raises(RdmaUnavailable) as error:
        verbs.load()
    message = str(error.value)
    assert "python3-pyverbs" in message and "--system-site-packages" in message
