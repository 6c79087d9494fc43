"""Bearer tokens on a real server (issue 15, item 1): 401 / 403 / 200 per role and pattern,
per-item `forbidden` in POST /stats/batch, filtered GET /symbols, 429 with Retry-After, the
probes open, and the refusal to serve unauthenticated beyond loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_harness import Server, run_cli

from appliance.auth import new_token, tokens_file_entry

JSON_CT = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    cwd = tmp_path_factory.mktemp("auth")
    tokens = {name: new_token() for name in ("reader", "eur-feed", "admin", "slow")}
    entries = [
        tokens_file_entry("reader", tokens["reader"], "read"),
        tokens_file_entry("eur-feed", tokens["eur-feed"], "write", ["EUR/*", "GBP/USD"]),
        tokens_file_entry("admin", tokens["admin"], "admin"),
        tokens_file_entry("slow", tokens["slow"], "write")
        + "max_requests_per_s = 2.0\nmax_values_per_s = 1000.0\n",
    ]
    (cwd / "tokens.toml").write_text("\n".join(entries))
    server = Server(
        cwd,
        {
            "APP_AUTH__MODE": "token",
            "APP_AUTH__TOKENS_FILE": str(cwd / "tokens.toml"),
            "APP_DURABILITY__ENABLED": "false",
        },
    )
    try:
        server.wait_ready()
        yield server, tokens
    finally:
        assert server.stop() == 0


def call(server: Server, method: str, path: str, token: str | None, body: object = None):
    headers = dict(JSON_CT) if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    return server.request(method, path, data, headers)


def test_probes_need_no_token(secured) -> None:
    server, _ = secured
    for path in ("/health", "/live", "/ready"):
        assert call(server, "GET", path, None).status == 200, path


@pytest.mark.parametrize("path", ["/stats/?symbol=EUR/USD&exponent=1", "/symbols", "/ingest",
                                  "/openapi.json", "/metrics"])  # fmt: skip
def test_no_or_an_unknown_token_is_401_with_a_challenge(secured, path: str) -> None:
    server, _ = secured
    for token in (None, "hft_not-a-token"):
        response = call(server, "GET", path, token)
        assert (response.status, response.json["code"]) == (401, "unauthorized"), path
        assert response.headers["www-authenticate"].startswith("Bearer")
    response = server.request("GET", path, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert response.status == 401


def test_roles_and_symbol_patterns(secured) -> None:
    server, tokens = secured
    batch = {"symbol": "EUR/USD", "values": [1.1, 1.2]}
    # read may not write; a write token may write its symbols only; admin may write anything.
    response = call(server, "POST", "/add_batch/", tokens["reader"], batch)
    assert (response.status, response.json["code"]) == (403, "forbidden")
    assert "read" in response.json["error"]
    assert call(server, "POST", "/add_batch/", tokens["eur-feed"], batch).status == 200
    gbp, jpy = {**batch, "symbol": "GBP/USD"}, {**batch, "symbol": "USD/JPY"}
    assert call(server, "POST", "/add_batch/", tokens["eur-feed"], gbp).status == 200
    refused = call(server, "POST", "/add_batch/", tokens["eur-feed"], jpy)
    assert (refused.status, refused.json["code"]) == (403, "forbidden")
    assert "USD/JPY" in refused.json["error"]
    assert call(server, "POST", "/add_batch/", tokens["admin"], jpy).status == 200
    # Reads: the reader sees everything; the EUR feed only its patterns.
    assert call(server, "GET", "/stats/?symbol=USD/JPY&exponent=1", tokens["reader"]).status == 200
    response = call(server, "GET", "/stats/?symbol=USD/JPY&exponent=1", tokens["eur-feed"])
    assert (response.status, response.json["code"]) == (403, "forbidden")
    got = call(server, "GET", "/stats/?symbol=EUR/USD&exponent=1", tokens["eur-feed"]).json
    assert (got["min"], got["max"], got["last"]) == (1.1, 1.2, 1.2)
    assert got["var"] == pytest.approx(float(np.var([1.1, 1.2])), rel=1e-9)
    symbols = call(server, "GET", "/symbols", tokens["eur-feed"]).json["symbols"]
    names = [row["symbol"] for row in symbols]  # other tests may add EUR/* symbols first
    assert {"EUR/USD", "GBP/USD"} <= set(names) and "USD/JPY" not in names
    assert all(name.startswith("EUR/") or name == "GBP/USD" for name in names), names
    everything = call(server, "GET", "/symbols", tokens["reader"]).json["symbols"]
    assert {row["symbol"] for row in everything} >= {"EUR/USD", "GBP/USD", "USD/JPY"}
    # The refused write changed nothing.
    assert not any(row["symbol"] == "USD/JPY" and row["hot"] != 2 for row in everything)


def test_a_batch_query_outside_the_patterns_is_a_per_item_forbidden(secured) -> None:
    server, tokens = secured
    call(server, "POST", "/add_batch/", tokens["admin"], {"symbol": "EUR/CHF", "values": [0.9]})
    call(server, "POST", "/add_batch/", tokens["admin"], {"symbol": "AAPL", "values": [150.0]})
    body = {"queries": [{"symbol": "EUR/CHF", "exponent": 1}, {"symbol": "AAPL", "exponent": 1},
                        {"symbol": "EUR/NOPE", "exponent": 1}]}  # fmt: skip
    results = call(server, "POST", "/stats/batch", tokens["eur-feed"], body).json["results"]
    assert results[0]["last"] == 0.9
    assert results[1]["code"] == "forbidden"
    assert results[2]["code"] == "unknown_symbol"
    results = call(server, "POST", "/stats/batch", tokens["reader"], body).json["results"]
    assert results[1]["last"] == 150.0


def test_rate_limits_answer_429_with_retry_after(secured) -> None:
    server, tokens = secured
    # The symbol exists whatever ran before (tests of this module may run in any order).
    call(server, "POST", "/add_batch/", tokens["admin"], {"symbol": "EUR/RATE", "values": [1.0]})
    statuses = [
        call(server, "GET", "/stats/?symbol=EUR/RATE&exponent=1", tokens["slow"]).status
        for _ in range(6)
    ]
    assert statuses[:2] == [200, 200] and 429 in statuses, statuses
    limited = call(server, "GET", "/stats/?symbol=EUR/RATE&exponent=1", tokens["slow"])
    assert (limited.status, limited.json["code"]) == (429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    # Other tokens are not slowed by it.
    assert call(server, "GET", "/stats/?symbol=EUR/RATE&exponent=1", tokens["reader"]).status == 200


def test_values_per_second_limit_refuses_the_batch_whole(secured) -> None:
    server, tokens = secured
    import time

    time.sleep(1.1)  # a fresh second of the slow token's allowance
    big = {"symbol": "SLOW", "values": [1.0] * 1500}
    first = call(server, "POST", "/add_batch/", tokens["slow"], big)
    assert first.status == 200  # a batch above the rate passes once the bucket is full
    # 500 more at once: the bucket (1000 values, 1000/s) is empty and refills in 0.5 s.
    second = call(server, "POST", "/add_batch/", tokens["slow"], {**big, "values": [2.0] * 500})
    assert (second.status, second.json["code"]) == (429, "rate_limited")
    rows = call(server, "GET", "/symbols", tokens["reader"]).json["symbols"]
    hot = {row["symbol"]: row["hot"] for row in rows}
    assert hot["SLOW"] == 1500  # the refused batch added nothing


def test_serving_unauthenticated_beyond_loopback_is_refused(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", env={"APP_SERVER__HOST": "0.0.0.0"})
    assert result.returncode == 2
    assert "auth.mode" in result.stderr and "allow_unauthenticated" in result.stderr
    server = Server(tmp_path / "allowed", {
        "APP_SERVER__HOST": "0.0.0.0", "APP_AUTH__ALLOW_UNAUTHENTICATED": "true",
        "APP_DURABILITY__ENABLED": "false"})  # fmt: skip
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0


def test_a_bad_tokens_file_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[tokens]]\nname = "x"\nsha256 = "nothex"\nrole = "write"\n')
    env = {"APP_AUTH__MODE": "token", "APP_AUTH__TOKENS_FILE": str(path)}
    result = run_cli(tmp_path, "serve", env=env)
    assert result.returncode == 2
    assert "auth.tokens_file" in result.stderr and "sha256" in result.stderr


def test_token_new_prints_a_token_and_an_entry_that_admits_it(tmp_path: Path) -> None:
    args = ("token", "new", "--name", "desk", "--role", "read", "--symbols", "EUR/*")
    result = run_cli(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    token = next(line for line in result.stdout.splitlines() if line.startswith("hft_"))
    entry = result.stdout.split("restart the appliance:\n", 1)[1]
    (tmp_path / "tokens.toml").write_text(entry)
    from appliance.auth import Tokens

    principal = Tokens.from_file(tmp_path / "tokens.toml").authenticate(token)
    assert principal is not None and principal.name == "desk" and principal.role == "read"
    assert principal.may_access("EUR/USD") and not principal.may_access("USD/JPY")
