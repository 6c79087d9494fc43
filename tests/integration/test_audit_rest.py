"""The REST side of the audit trail on a real server with tokens (issue 15): accepted batches,
admin actions and denials are recorded with the token's name, the chain verifies, and GET
/ingest shows ring ids to admins only."""

from __future__ import annotations

import json
from pathlib import Path

from server_harness import Server, run_cli

from appliance.auth import new_token, tokens_file_entry


def test_writes_admin_actions_and_denials_are_audited_by_token(tmp_path: Path) -> None:
    tokens = {"feed": new_token(), "ops": new_token(), "viewer": new_token()}
    (tmp_path / "tokens.toml").write_text(
        tokens_file_entry("feed", tokens["feed"], "write", ["EUR/*"])
        + tokens_file_entry("ops", tokens["ops"], "admin")
        + tokens_file_entry("viewer", tokens["viewer"], "read")
    )
    env = {
        "APP_AUTH__MODE": "token",
        "APP_AUTH__TOKENS_FILE": str(tmp_path / "tokens.toml"),
        "APP_AUDIT__ENABLED": "true",
        "APP_AUDIT__FSYNC_INTERVAL_MS": "50",
    }
    server = Server(tmp_path, env)

    def call(method: str, path: str, token: str | None, body: object = None):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        return server.request(method, path, data, headers)

    try:
        server.wait_ready()
        batch = {"symbol": "EUR/USD", "values": [1.1, 1.2, 1.3]}
        assert call("POST", "/add_batch/", tokens["feed"], batch).status == 200
        assert call("POST", "/add_batch/", tokens["viewer"], batch).status == 403
        assert call("GET", "/symbols", None).status == 401
        assert call("DELETE", "/symbols/EUR/USD", tokens["feed"]).status == 403  # not admin
        assert call("DELETE", "/symbols/EUR/USD", tokens["ops"]).status == 200
        # GET /ingest: ring ids for admins only. A ring opened with the feed's token:
        from transport.shm.publisher import ShmPublisher

        with ShmPublisher(server.control_endpoint, token=tokens["feed"]) as publisher:
            publisher.publish("EUR/GBP", [0.85])
            publisher.flush()
            admin_view = call("GET", "/ingest", tokens["ops"]).json["transports"]["shm"]
            viewer = call("GET", "/ingest", tokens["viewer"]).json["transports"]["shm"]
        assert list(admin_view["rings"]) == [str(publisher.publisher_id)]
        assert isinstance(viewer["rings"], list) and len(viewer["rings"]) == 1
        assert "name" not in viewer["rings"][0] and viewer["rings_open"] == 1
    finally:
        assert server.stop() == 0
    records = [
        json.loads(line)
        for path in sorted((tmp_path / "data" / "audit").glob("audit-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    writes = [r for r in records if r["kind"] == "write"]
    assert [(r["who"], r["symbol"], r["values"], r["first_index"]) for r in writes] == [
        ("feed", "EUR/USD", 3, 0)
    ]
    admin = [r for r in records if r["kind"] == "admin"]
    assert [(r["who"], r["action"], r["detail"]["symbol"]) for r in admin] == [
        ("ops", "delete_symbol", "EUR/USD")
    ]
    denied = {(r["who"], r["code"]) for r in records if r["kind"] == "denied"}
    assert denied >= {("viewer", "forbidden"), (None, "unauthorized"), ("feed", "forbidden")}
    result = run_cli(tmp_path, "audit", "verify", str(tmp_path / "data" / "audit"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chain intact" in result.stdout
