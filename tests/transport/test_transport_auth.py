"""The control gate, ring ownership, per-token ring limits and symbol patterns, in process.

The same JSON dispatch the control socket runs, with an `appliance.auth.Tokens` behind the gate.
The end-to-end versions (real server, real sockets) are in
tests/integration/test_transport_security.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from appliance.auth import Tokens, new_token, tokens_file_entry
from appliance.config import AppConfig, ConfigError, load_config
from appliance.transports import max_message_bytes
from transport.control import ControlError, ControlGate, dispatch
from transport.curve import CurveConfigError, read_clients
from transport.publisher import PublishError
from transport.shm.publisher import ShmPublisher
from transport.shm.server import DEFAULT_DIRECTORY, ShmIngest
from transport.wire import Reason

pytestmark = pytest.mark.skipif(not DEFAULT_DIRECTORY.is_dir(), reason="needs /dev/shm")


class Denials:
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str, str]] = []

    def denied(self, who: str | None, where: str, code: str, detail: str) -> None:
        self.seen.append((who, where, code))


class Model:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def __call__(self, symbol: str, values: np.ndarray, *origin: int) -> None:
        self.values.setdefault(symbol, []).extend(values.tolist())


TOKENS = {"eur": new_token(), "any": new_token(), "reader": new_token()}


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    path = tmp_path / "tokens.toml"
    path.write_text(
        tokens_file_entry("eur", TOKENS["eur"], "write", ["EUR/*"])
        + tokens_file_entry("any", TOKENS["any"], "write")
        + tokens_file_entry("reader", TOKENS["reader"], "read")
    )
    return Tokens.from_file(path)


@pytest.fixture
def ingest() -> Iterator[ShmIngest]:
    ingest = ShmIngest(Model(), slots=8, slot_bytes=1024, max_slots=64, max_slot_bytes=4096,
                       max_rings=4, max_rings_per_token=2)  # fmt: skip
    yield ingest
    ingest.stop(5.0)


def client(
    ingest: ShmIngest, gate: ControlGate, token: str | None = None
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    handlers = ingest.control_handlers()

    def call(body: dict[str, Any]) -> dict[str, Any]:
        if token is not None:
            body = {**body, "token": token}
        reply = msgspec.json.decode(dispatch(msgspec.json.encode(body), handlers, gate))
        if not reply["ok"]:
            raise ControlError(reply["error"], reply.get("code", ""))
        return reply

    return call


def test_gate_refuses_missing_unknown_and_read_tokens(ingest: ShmIngest, tokens: Tokens) -> None:
    denials = Denials()
    gate = ControlGate(tokens.authenticate, denials)
    for token, code in ((None, "unauthorized"), ("hft_nope", "unauthorized"),
                        (TOKENS["reader"], "forbidden")):  # fmt: skip
        with pytest.raises(ControlError) as refused:
            client(ingest, gate, token)({"op": "shm.open", "publisher_id": 1})
        assert refused.value.code == code
    assert denials.seen == [
        (None, "control:shm.open", "unauthorized"),
        (None, "control:shm.open", "unauthorized"),
        ("reader", "control:shm.open", "forbidden"),
    ]
    assert ingest.snapshot()["rings_open"] == 0
    reply = client(ingest, gate, TOKENS["any"])({"op": "shm.open", "publisher_id": 1})
    assert len(reply["secret"]) == 32


def test_a_ring_belongs_to_its_token_and_secret(ingest: ShmIngest, tokens: Tokens) -> None:
    denials = Denials()
    gate = ControlGate(tokens.authenticate, denials)
    mine, other = client(ingest, gate, TOKENS["any"]), client(ingest, gate, TOKENS["eur"])
    reply = mine({"op": "shm.open", "publisher_id": 3})
    owned = {"publisher_id": 3, "secret": reply["secret"]}
    for call, body in ((mine, {"publisher_id": 3}), (mine, {"publisher_id": 3, "secret": "x"}),
                       (other, owned)):  # fmt: skip
        for op in ("shm.open", "shm.close"):
            with pytest.raises(ControlError) as refused:
                call({"op": op, **body})
            assert refused.value.code == "forbidden"
    assert len(denials.seen) == 6
    assert mine({"op": "shm.open", **owned})["name"] == reply["name"]
    assert mine({"op": "shm.close", **owned}) == {"ok": True, "closed": True}


def test_rings_per_token(ingest: ShmIngest, tokens: Tokens) -> None:
    gate = ControlGate(tokens.authenticate)
    mine, other = client(ingest, gate, TOKENS["any"]), client(ingest, gate, TOKENS["eur"])
    first = mine({"op": "shm.open", "publisher_id": 1})
    mine({"op": "shm.open", "publisher_id": 2})
    with pytest.raises(ControlError, match="max_rings_per_token is 2"):
        mine({"op": "shm.open", "publisher_id": 3})
    other({"op": "shm.open", "publisher_id": 4})  # another token has its own allowance
    mine({"op": "shm.close", "publisher_id": 1, "secret": first["secret"]})
    mine({"op": "shm.open", "publisher_id": 3})


def test_symbol_patterns_apply_to_ring_frames(ingest: ShmIngest, tokens: Tokens) -> None:
    gate = ControlGate(tokens.authenticate)
    model = ingest.sink
    assert isinstance(model, Model)
    pub = ShmPublisher(client(ingest, gate, TOKENS["eur"]))
    pub.publish("EUR/USD", [1.0])
    pub.publish("USD/JPY", [2.0])
    while ingest.poll_once():
        pass
    with pytest.raises(PublishError) as rejected:
        pub.flush(5.0)
    assert [(r.symbol, r.reason) for r in rejected.value.rejections] == [
        ("USD/JPY", Reason.FORBIDDEN)
    ]
    assert model.values == {"EUR/USD": [1.0]}
    assert ingest.snapshot()["totals"]["rejected.forbidden"] == 1
    pub.close()


def test_auth_off_still_protects_rings_by_secret(ingest: ShmIngest) -> None:
    call = client(ingest, ControlGate())
    reply = call({"op": "shm.open", "publisher_id": 8, "token": "ignored"})
    with pytest.raises(ControlError, match="belongs to the client that opened it"):
        call({"op": "shm.close", "publisher_id": 8})
    call({"op": "shm.close", "publisher_id": 8, "secret": reply["secret"]})


def test_snapshot_hides_ring_ids_unless_asked(ingest: ShmIngest) -> None:
    client(ingest, ControlGate())({"op": "shm.open", "publisher_id": 12345})
    assert list(ingest.snapshot()["rings"]) == ["12345"]
    hidden = ingest.snapshot(show_ring_ids=False)["rings"]
    assert isinstance(hidden, list) and len(hidden) == 1
    assert "name" not in hidden[0] and "12345" not in repr(hidden)


def test_message_cap_is_derived_from_max_batch_size() -> None:
    config = AppConfig()
    # 1_000_000 values with timestamps: 48 + 64 + 16 per value, plus 1 MiB for coalesced frames.
    assert max_message_bytes(config) == 48 + 64 + 16_000_000 + (1 << 20)
    explicit = msgspec.convert({"transport": {"zmq": {"max_message_bytes": 4096}}}, AppConfig)
    assert max_message_bytes(explicit) == 4096


def test_curve_files_are_both_or_neither(tmp_path: Path) -> None:
    path = tmp_path / "Config.toml"
    path.write_text('[transport.zmq]\ncurve_secret_key_file = "server.key_secret"\n')
    with pytest.raises(ConfigError, match="set both or neither"):
        load_config(path, environ={})
    clients = tmp_path / "clients.toml"
    clients.write_text('[[clients]]\nname = "a"\npublic_key = "short"\n')
    with pytest.raises(CurveConfigError, match=r"clients\.toml"):
        read_clients(clients)
