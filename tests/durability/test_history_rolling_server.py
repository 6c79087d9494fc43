"""GET /history/rolling on a real server (a real socket, tokens, the write-ahead log, sealed
warm segments and memory pieces, values the hot tier evicted long ago), on the numpy and the
compiled CPU engine, compared with `rolling_reference` over the values sent; every refusal
answered 4xx with the state unchanged; 403 for a token without the symbol; history_disabled
without durability."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from appliance.auth import new_token, tokens_file_entry
from appliance.durability.warm import symbol_key
from engine_core.rolling import rolling_reference
from tests.integration.server_harness import Server
from tests.waiting import wait_until

MAX_POSITIONS, MAX_VALUES = 300, 600
ENV = {
    "APP_DURABILITY__WARM_SEGMENT_VALUES": "100",
    "APP_DURABILITY__SYNC": "always",
    "APP_STORE__MAX_DATA_RETENTION": "150",  # most windows hold values the hot tier evicted
    "APP_STORE__CLEANUP_KEEP_COUNT": "100",
    "APP_HISTORY__MAX_ROLLING_POSITIONS": str(MAX_POSITIONS),
    "APP_HISTORY__MAX_ROLLING_VALUES": str(MAX_VALUES),
    "APP_AUTH__MODE": "token",
}


class Fed:
    """A running server with tokens, and the values it was sent per symbol."""

    def __init__(self, server: Server, tokens: dict[str, str], engine: str) -> None:
        self.engine = engine
        self.server = server
        self.tokens = tokens
        self.values: dict[str, np.ndarray] = {}

    def get(self, path: str, token: str = "reader", **params: str):
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        return self.server.request("GET", f"{path}?{urlencode(params)}", headers=headers)

    def send(self, symbol: str, batches: list[np.ndarray]) -> None:
        for batch in batches:
            body = json.dumps({"symbol": symbol, "values": batch.tolist()}).encode()
            headers = {
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.tokens['admin']}",
            }
            response = self.server.request("POST", "/add_batch/", body, headers)
            assert response.status == 200, response
        self.values[symbol] = np.concatenate(batches)


@pytest.fixture(scope="module", params=["numpy", "cpu"])
def fed(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    cwd = tmp_path_factory.mktemp(f"rolling-{request.param}")
    tokens = {"reader": new_token(), "admin": new_token()}
    (cwd / "tokens.toml").write_text(
        tokens_file_entry("reader", tokens["reader"], "read", ["EUR/*"])
        + tokens_file_entry("admin", tokens["admin"], "admin")
    )
    env = {
        **ENV,
        "APP_AUTH__TOKENS_FILE": str(cwd / "tokens.toml"),
        "APP_ENGINE__BACKEND": request.param,
    }
    server = Server(cwd, env)
    try:
        server.wait_ready(timeout_s=120)
        fed = Fed(server, tokens, request.param)
        rng = np.random.default_rng(41)
        # 740 values: 1e9-scale prices with 1e-3 noise (the case the cumsum formula fails).
        fed.send("EUR/USD", [1e9 + np.round(rng.uniform(0, 1e-3, 37), 9) for _ in range(20)])
        fed.send("GBP/USD", [1.25 + rng.uniform(0, 0.01, 50) for _ in range(5)])
        warm_dir = cwd / "data" / "warm" / symbol_key("EUR/USD")
        # 700 values sealed (by a background thread), 40 in memory.
        wait_until(lambda: len(list(warm_dir.glob("*.seg"))) == 7, what="seven sealed segments")
        yield fed
    finally:
        assert server.stop() == 0


def _assert_answer(body: dict, x: np.ndarray, window: int, start: int, end: int, step: int):
    assert list(body) == [
        "symbol", "window", "start", "end", "step", "positions", "min", "max", "avg", "var",
    ]  # fmt: skip
    assert (body["window"], body["start"], body["end"], body["step"]) == (window, start, end, step)
    assert body["positions"] == list(range(start + window - 1, end, step))
    want = rolling_reference(x[start:end], window, step)
    assert body["min"] == want.min.tolist()  # exact (JSON round-trips a float64)
    assert body["max"] == want.max.tolist()
    np.testing.assert_allclose(body["avg"], want.avg, rtol=1e-9, atol=0)
    np.testing.assert_allclose(body["var"], want.var, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    ("window", "start", "end", "step"),
    [
        (50, 10, 590, 2),  # across five sealed segments, evicted from the hot tier long ago
        (100, 150, 740, 3),  # sealed segments into the memory values
        (37, 0, 600, 5),  # sealed only, from the first index
        (1, 700, 740, 1),  # memory only: each value is its own window
        (600, 140, 740, 1),  # one window of 600, just at the values limit
        (5, 95, 105, 1000),  # across one segment boundary, one output
        (5, 95, 105, 2**63 - 1),  # the largest step: one output, no int64 overflow
    ],
)
def test_rolling_over_sealed_and_memory_matches_the_reference(
    fed: Fed, window: int, start: int, end: int, step: int
) -> None:
    response = fed.get(
        "/history/rolling",
        symbol="EUR/USD",
        window=str(window),
        start=str(start),
        end=str(end),
        step=str(step),
    )
    assert response.status == 200, response
    assert response.json["symbol"] == "EUR/USD"
    _assert_answer(response.json, fed.values["EUR/USD"], window, start, end, step)


def test_defaults_are_the_held_range_and_step_one(fed: Fed) -> None:
    response = fed.get("/history/rolling", token="admin", symbol="GBP/USD", window="10")
    assert response.status == 200, response
    _assert_answer(response.json, fed.values["GBP/USD"], 10, 0, 250, 1)
    response = fed.get("/history/rolling", symbol="EUR/USD", window="10", start="500")
    assert response.status == 200, response
    _assert_answer(response.json, fed.values["EUR/USD"], 10, 500, 740, 1)


def test_every_refusal_is_a_4xx_and_changes_nothing(fed: Fed) -> None:
    before = [
        fed.get("/symbols", token="admin").json,
        fed.get("/history/stats", symbol="EUR/USD").json,
    ]
    ok = {"symbol": "EUR/USD", "window": "10", "start": "100", "end": "300"}
    assert fed.get("/history/rolling", **ok).status == 200
    cases = [
        ({"window": None}, 400, "invalid_window"),
        ({"window": "0"}, 400, "invalid_window"),
        ({"window": "-5"}, 400, "invalid_window"),
        ({"window": "ten"}, 400, "invalid_window"),
        ({"window": "1.5"}, 400, "invalid_window"),
        ({"window": "9" * 3000}, 400, "invalid_window"),
        ({"step": "0"}, 400, "invalid_window"),
        ({"step": "2x"}, 400, "invalid_window"),
        ({"step": str(2**63)}, 400, "invalid_window"),  # 19 digits, past int64
        ({"step": "9" * 19}, 400, "invalid_window"),
        ({"start": str(2**63)}, 400, "invalid_range"),
        ({"start": "x"}, 400, "invalid_range"),
        ({"end": "1e3"}, 400, "invalid_range"),
        ({"start": "-1"}, 400, "invalid_range"),
        ({"start": "300"}, 400, "invalid_range"),  # start >= end
        ({"start": "301"}, 400, "invalid_range"),
        ({"end": "741"}, 400, "invalid_range"),  # past the held end
        ({"end": "9" * 3000}, 400, "invalid_range"),
        ({"window": "201"}, 400, "invalid_range"),  # fewer values than one window
        ({"start": "735", "end": "740"}, 400, "invalid_range"),
        ({"window": "1", "end": "401"}, 413, "batch_too_large"),  # 301 positions > 300
        ({"start": "0", "end": "740", "step": "100"}, 413, "batch_too_large"),  # 740 > 600
        ({"symbol": None}, 400, "missing_parameter"),
        ({"symbol": ""}, 400, "invalid_symbol"),
        ({"symbol": "EUR/NOPE"}, 404, "unknown_symbol"),
    ]
    for change, status, code in cases:
        params = {k: v for k, v in {**ok, **change}.items() if v is not None}
        response = fed.get("/history/rolling", **params)
        assert (response.status, response.json["code"]) == (status, code), (change, response)
        assert response.json["error"]
    held = fed.get("/history/rolling", **{**ok, "end": "741"}).json["error"]
    assert "[0, 740)" in held  # says what is held
    after = [
        fed.get("/symbols", token="admin").json,
        fed.get("/history/stats", symbol="EUR/USD").json,
    ]
    assert after == before


def test_a_token_without_the_symbol_is_403_and_no_token_is_401(fed: Fed) -> None:
    response = fed.get("/history/rolling", symbol="GBP/USD", window="10")
    assert (response.status, response.json["code"]) == (403, "forbidden")
    response = fed.get("/history/rolling", token="", symbol="EUR/USD", window="10")
    assert (response.status, response.json["code"]) == (401, "unauthorized")
    # Refused before the symbol is looked up: an unknown symbol outside the patterns is 403 too.
    response = fed.get("/history/rolling", symbol="JPY/NOPE", window="10")
    assert (response.status, response.json["code"]) == (403, "forbidden")


def test_history_disabled_without_durability(tmp_path: Path) -> None:
    server = Server(tmp_path, {"APP_DURABILITY__ENABLED": "false"})
    try:
        server.wait_ready()
        assert server.post_batch("EUR/USD", [1.0, 2.0, 3.0]).status == 200
        response = server.request("GET", "/history/rolling?symbol=EUR/USD&window=2")
        assert (response.status, response.json["code"]) == (404, "history_disabled")
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_documented_example_is_the_real_output(fed: Fed, doc: str) -> None:
    """The docs show the exact bytes of the answer (wrapped over `# ` lines) for the seed batch
    of their /add_batch/ example."""
    from tests.integration.server_harness import REPO_ROOT

    text = (REPO_ROOT / doc).read_text(encoding="utf-8")
    seed = json.loads(text.split("-d '", 1)[1].split("'\n", 1)[0])
    assert seed["symbol"] == "AAPL"
    example = text.split("curl -s 'http://127.0.0.1:8080/history/rolling?", 1)[1]
    query, rest = example.split("'\n", 1)
    shown = ""
    for line in rest.splitlines():
        if not line.startswith("#"):
            break
        shown += line[1:].strip()
    symbol = f"AAPL{doc}"  # its own symbol per parameter (the module's server is shared)
    if symbol not in fed.values:
        fed.send(symbol, [np.array(seed["values"])])
    params = dict(p.split("=", 1) for p in query.split("&"))
    response = fed.get("/history/rolling", token="admin", **{**params, "symbol": symbol})
    expected = shown.replace('"AAPL"', json.dumps(symbol))
    if fed.engine == "cpu":  # the default engine wrote the docs: the same bytes
        assert response.body.decode() == expected
        return
    # The numpy engine sums in another order (a scan of Chan merges): the same answer to
    # rounding, so the last digit of avg or var may differ.
    got, want = json.loads(response.body), json.loads(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key in ("avg", "var"):
            np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-15)
        else:
            assert got[key] == value, key
