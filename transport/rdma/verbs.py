"""pyverbs behind one small surface: loading it, naming what is missing, and RC queue pairs.

Why a shim: pyverbs is not on PyPI in a usable form for Debian 12 (the sdist needs rdma-core 59
libraries); it comes from the distribution (`python3-pyverbs`) and imports only under the
system interpreter or a venv made with `--system-site-packages`. Its enums moved between
releases: rdma-core 44 (Debian 12) has the flat module `pyverbs.enums`, newer releases
`pyverbs.libibverbs_enums` with IntEnum classes. `constants()` hides both. Everything else in
`transport/rdma` imports pyverbs only through `load()`, so the appliance starts (and says why
RDMA is off) on machines without it.

Both sides connect the same way: an RC queue pair per publisher, addressed by GID (RoCE needs a
global route; on Soft-RoCE GID index 1 is the IPv4-mapped GID, on other NICs check `show_gids`
or `ibv_devinfo -v`), path MTU 1024 (what Soft-RoCE and every RoCE NIC support). `QpInfo` is
what crosses the control socket.
"""

from __future__ import annotations

import errno
import importlib
import re
import secrets
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

INSTALL_HINT = (
    "install the distribution's python3-pyverbs (Debian/Ubuntu: apt-get install python3-pyverbs "
    "rdma-core ibverbs-providers) and run the appliance with /usr/bin/python3, or from a venv "
    "created with `python3 -m venv --system-site-packages`"
)
DEVICE_HINT = (
    "load the NIC's RDMA driver, or create a Soft-RoCE device for testing "
    "(modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0)"
)

# The verbs constants this package uses, looked up once by name.
_CONSTANT_NAMES = (
    "IBV_QPT_RC", "IBV_QPS_INIT", "IBV_QPS_RTR", "IBV_QPS_RTS", "IBV_QPS_ERR", "IBV_QP_STATE",
    "IBV_MTU_1024", "IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_WRITE",
    "IBV_ACCESS_REMOTE_READ", "IBV_WR_RDMA_WRITE", "IBV_WR_RDMA_WRITE_WITH_IMM",
    "IBV_WR_RDMA_READ", "IBV_SEND_SIGNALED", "IBV_WC_SUCCESS", "IBV_WC_RECV_RDMA_WITH_IMM",
    "IBV_WC_RDMA_WRITE", "IBV_WC_RDMA_READ",
)  # fmt: skip

# Queue-pair timing: local ACK timeout 4.096 us * 2^14 = 67 ms, 7 retries; a receiver not
# ready (no receive posted) is retried forever (rnr_retry 7), after 0.64 ms (min_rnr_timer 14).
ACK_TIMEOUT = 14
RETRY_COUNT = 7
RNR_RETRY = 7
MIN_RNR_TIMER = 14
PSN_MASK = 0xFFFFFF
_GID = re.compile(r"[0-9a-fA-F]{4}(:[0-9a-fA-F]{4}){7}")


class RdmaUnavailable(Exception):
    """RDMA cannot run here; the message says what is missing and how to get it."""


@dataclass(frozen=True, slots=True)
class QpInfo:
    """One side's queue-pair address, exchanged over the control socket."""

    qpn: int
    psn: int
    gid: str

    def to_dict(self) -> dict[str, Any]:
        return {"qpn": self.qpn, "psn": self.psn, "gid": self.gid}

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "") -> QpInfo:
        """Validated (ValueError) from a control message's `<prefix>qpn`, `psn`, `gid`."""
        qpn, psn, gid = (data.get(prefix + key) for key in ("qpn", "psn", "gid"))
        for name, value, high in (("qpn", qpn, 0xFFFFFF), ("psn", psn, PSN_MASK)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise ValueError(f"{prefix}{name} must be an integer in 0..{high}, got {value!r}")
        if not isinstance(gid, str) or not _GID.fullmatch(gid):
            raise ValueError(f"{prefix}gid must be a GID of 8 groups of 4 hex digits, got {gid!r}")
        return cls(qpn, psn, gid)


def load() -> SimpleNamespace:
    """The pyverbs modules and constants, or RdmaUnavailable saying what is missing."""
    try:
        modules = {
            name: importlib.import_module(f"pyverbs.{name}")
            for name in ("device", "pd", "cq", "mr", "qp", "wr", "addr", "pyverbs_error")
        }
    except ImportError as exc:
        raise RdmaUnavailable(f"pyverbs is not importable ({exc}): {INSTALL_HINT}") from None
    return SimpleNamespace(**modules, c=constants())


def constants() -> SimpleNamespace:
    """The constants in `_CONSTANT_NAMES` from whichever enums module this rdma-core has."""
    sources: list[ModuleType] = []
    for name in ("pyverbs.libibverbs_enums", "pyverbs.enums"):
        try:
            sources.append(importlib.import_module(name))
        except ImportError:
            continue
    if not sources:
        raise RdmaUnavailable(f"pyverbs has neither enums module: {INSTALL_HINT}")
    return SimpleNamespace(**{name: _find(sources, name) for name in _CONSTANT_NAMES})


def _find(sources: list[ModuleType], name: str) -> int:
    """A constant as a flat module attribute (rdma-core 44) or an enum member (newer)."""
    for module in sources:
        value = getattr(module, name, None)
        if value is not None:
            return int(value)
        for attribute in vars(module).values():
            member = getattr(attribute, "__members__", {}).get(name)
            if member is not None:
                return int(member)
    raise RdmaUnavailable(f"this pyverbs does not define {name}: {INSTALL_HINT}")


def device_names(verbs: SimpleNamespace) -> list[str]:
    """Names of the RDMA devices (RdmaUnavailable when there are none or no kernel support)."""
    try:
        devices = verbs.device.get_device_list()
    except verbs.pyverbs_error.PyverbsError as exc:
        code = getattr(exc, "error_code", 0)
        why = "this kernel has no RDMA support (ib_uverbs)" if code == errno.ENOSYS else str(exc)
        raise RdmaUnavailable(f"no RDMA devices: {why}; {DEVICE_HINT}") from None
    names = [_text(device.name) for device in devices]
    if not names:
        raise RdmaUnavailable(f"no RDMA device found; {DEVICE_HINT}")
    return names


def _text(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


class Port:
    """An open device, protection domain and port: what every queue pair and region hangs on."""

    def __init__(self, verbs: SimpleNamespace, device: str = "", port: int = 1, gid_index: int = 1):
        names = device_names(verbs)
        if device and device not in names:
            raise RdmaUnavailable(f"RDMA device {device!r} not found; present: {', '.join(names)}")
        self.verbs = verbs
        self.c = verbs.c
        self.device = device or names[0]
        self.port = port
        self.gid_index = gid_index
        try:
            self.context = verbs.device.Context(name=self.device)
            self.gid = str(self.context.query_gid(port, gid_index))
            self.max_qp_wr = int(self.context.query_device().max_qp_wr)
            self.pd = verbs.pd.PD(self.context)
        except verbs.pyverbs_error.PyverbsError as exc:
            raise RdmaUnavailable(
                f"RDMA device {self.device} port {port} GID index {gid_index} is unusable: {exc}"
            ) from None
        if self.gid.replace(":", "").strip("0") == "":
            raise RdmaUnavailable(
                f"RDMA device {self.device} port {port} has no GID at index {gid_index} (is the "
                "network interface up with an IP address?)"
            )

    def new_pd(self) -> Any:
        """A protection domain of its own: a queue pair reaches only the regions of its PD."""
        return self.verbs.pd.PD(self.context)

    def register(self, address: int, length: int, access: int, pd: Any = None) -> Any:
        """Register memory the caller owns (no copy); the caller keeps it alive and mapped."""
        return self.verbs.mr.MR(pd or self.pd, length, access, address=address)

    def rc_qp(
        self, cq: Any, *, send_depth: int, recv_depth: int, access: int, pd: Any = None
    ) -> Any:
        """A reliable-connected queue pair in INIT; completions are requested per work request."""
        v, c = self.verbs, self.c
        cap = v.qp.QPCap(max_send_wr=send_depth, max_recv_wr=max(recv_depth, 1),
                         max_send_sge=1, max_recv_sge=1)  # fmt: skip
        init = v.qp.QPInitAttr(qp_type=c.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
        attr = v.qp.QPAttr(port_num=self.port)
        attr.qp_access_flags = access
        return v.qp.QP(pd or self.pd, init, attr)

    def connect(self, qp: Any, remote: QpInfo, local_psn: int) -> None:
        """INIT -> RTR -> RTS towards `remote` (both sides call this with each other's info)."""
        v, c = self.verbs, self.c
        attr = v.qp.QPAttr(port_num=self.port, path_mtu=c.IBV_MTU_1024)
        attr.dest_qp_num = remote.qpn
        attr.rq_psn = remote.psn
        attr.sq_psn = local_psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = MIN_RNR_TIMER
        attr.timeout = ACK_TIMEOUT
        attr.retry_cnt = RETRY_COUNT
        attr.rnr_retry = RNR_RETRY
        # hop_limit 64: RoCE v2 may cross routers (the default of 1 would die at the first).
        route = v.addr.GlobalRoute(
            dgid=v.addr.GID(remote.gid), sgid_index=self.gid_index, hop_limit=64
        )
        attr.ah_attr = v.addr.AHAttr(port_num=self.port, is_global=1, gr=route)
        qp.to_rtr(attr)
        qp.to_rts(attr)

    def to_error(self, qp: Any) -> None:
        """Stop a queue pair: nothing more lands, posted work completes with a flush error."""
        attr = self.verbs.qp.QPAttr()
        attr.qp_state = self.c.IBV_QPS_ERR
        qp.modify(attr, self.c.IBV_QP_STATE)

    def close(self) -> None:
        """Release the protection domain and device (pyverbs closes dependants first)."""
        self.context.close()


def new_psn() -> int:
    return secrets.randbits(24)
