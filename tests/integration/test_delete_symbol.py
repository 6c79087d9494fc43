"""DELETE /symbols/{symbol} on a real server (issue 15): the slot is freed, the hot values go,
the history stays, and all of it survives a restart (the tombstone), with index numbering that
goes on where the deleted series stopped."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from server_harness import Server

ENV = {"APP_STORE__MAX_SYMBOLS": "2", "APP_DURABILITY__SYNC": "always"}


def delete(server: Server, symbol: str, encode: bool = True):
    return server.request("DELETE", "/symbols/" + (quote(symbol, safe="") if encode else symbol))


def symbols(server: Server) -> dict[str, tuple[int, int | None]]:
    rows = server.request("GET", "/symbols").json["symbols"]
    return {row["symbol"]: (row["hot"], row["total"]) for row in rows}


def test_delete_frees_the_slot_keeps_history_and_survives_a_restart(tmp_path: Path) -> None:
    server = Server(tmp_path, ENV)
    try:
        server.wait_ready()
        assert server.post_batch("EUR/USD", [1.0, 2.0, 3.0]).status == 200
        assert server.post_batch("B", [5.0]).status == 200
        assert server.post_batch("C", [7.0]).json["code"] == "symbol_limit"
        response = delete(server, "EUR/USD", encode=False)  # the slash as is
        assert response.status == 200, response
        assert response.json["hot_values_dropped"] == 3
        assert "index 3" in response.json["history"]
        assert server.stats("EUR/USD", 1).json["code"] == "unknown_symbol"
        assert server.post_batch("C", [7.0]).status == 200  # the slot is free again
        assert symbols(server)["EUR/USD"] == (0, 3)  # history kept
        assert delete(server, "EUR/USD").json["code"] == "unknown_symbol"
        assert delete(server, "NEVER").status == 404
    finally:
        assert server.stop() == 0
    server = Server(tmp_path, ENV)  # the replay must not bring EUR/USD back
    try:
        server.wait_ready()
        assert server.stats("EUR/USD", 1).json["code"] == "unknown_symbol"
        assert symbols(server)["C"] == (1, 1)
        assert delete(server, "C").status == 200  # %-encoded name, a free slot again
        assert server.post_batch("EUR/USD", [4.0]).status == 200
        # The new series continues the history's numbering: index 3 is the new value.
        history = server.request("GET", "/history/stats?symbol=EUR/USD&start=3&end=4").json
        assert (history["count"], history["min"]) == (1, 4.0)
        assert server.stats("EUR/USD", 1).json["last"] == 4.0
    finally:
        assert server.stop() == 0
    server = Server(tmp_path, ENV)
    try:
        server.wait_ready()
        assert symbols(server)["EUR/USD"] == (1, 4)
        assert "C" not in {s for s, (hot, _) in symbols(server).items() if hot}
    finally:
        assert server.stop() == 0


def test_delete_without_durability(tmp_path: Path) -> None:
    server = Server(tmp_path, {"APP_DURABILITY__ENABLED": "false"})
    try:
        server.wait_ready()
        assert server.post_batch("A", [1.0]).status == 200
        response = delete(server, "A")
        assert response.status == 200 and response.json["history"].startswith("none")
        assert "A" not in symbols(server)
    finally:
        assert server.stop() == 0
