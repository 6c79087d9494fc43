"""`hft-appliance cluster status`: partitions, owners, applied sequence and lag, from NATS.

Read-only and independent of any appliance process: it reads KV `hft_nodes` (members),
`hft_owners` (who holds each partition's lease), `hft_status` (each owner's applied sequence,
put every renew tick) and each stream's last sequence. Lag = last sequence - applied sequence
(as of the owner's last status put, so up to lease_s / 3 stale).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from appliance.cluster.partitions import assignment, partition_key, stream_name
from appliance.config import ClusterConfig


async def _entries(js: Any, bucket: str) -> dict[str, bytes]:
    import nats.js.errors as js_errors

    try:
        kv = await js.key_value(bucket)
        keys = await kv.keys()
    except (js_errors.NotFoundError, js_errors.NoKeysError):
        return {}
    found: dict[str, bytes] = {}
    for key in keys:
        try:
            found[key] = (await kv.get(key)).value or b""
        except js_errors.NotFoundError:
            continue
    return found


async def collect(config: ClusterConfig, timeout_s: float = 5.0) -> dict[str, Any]:
    """The cluster's state as one dict (members, and a row per partition)."""
    import nats
    import nats.js.errors as js_errors

    nc = await nats.connect(
        servers=list(config.nats_urls), connect_timeout=timeout_s, max_reconnect_attempts=1
    )
    try:
        js = nc.jetstream(timeout=timeout_s)
        nodes = await _entries(js, "hft_nodes")
        owners = await _entries(js, "hft_owners")
        status = await _entries(js, "hft_status")
        members = sorted(nodes)
        desired = assignment(config.partitions, members)
        rows = []
        for p in range(config.partitions):
            key = partition_key(p)
            try:
                last: int | None = (await js.stream_info(stream_name(p))).state.last_seq
            except js_errors.NotFoundError:
                last = None
            owner = owners[key].decode() if key in owners else None
            applied = None
            if key in status:
                body = json.loads(status[key])
                if body.get("owner") == owner:
                    applied = body.get("applied_seq")
            rows.append(
                {
                    "partition": p,
                    "owner": owner,
                    "desired": desired[p],
                    "last_seq": last,
                    "applied_seq": applied,
                    "lag": None if last is None or applied is None else max(0, last - applied),
                }
            )
        return {"members": members, "partitions": rows}
    finally:
        await nc.close()


def render(state: dict[str, Any]) -> str:
    lines = [f"members: {', '.join(state['members']) or '(none)'}"]
    lines.append(f"{'partition':>9}  {'owner':<16} {'desired':<16} {'last_seq':>9} "
                 f"{'applied':>9} {'lag':>6}")  # fmt: skip
    for row in state["partitions"]:

        def show(value: Any) -> str:
            return "-" if value is None else str(value)

        lines.append(
            f"{row['partition']:>9}  {show(row['owner']):<16} {show(row['desired']):<16} "
            f"{show(row['last_seq']):>9} {show(row['applied_seq']):>9} {show(row['lag']):>6}"
        )
    return "\n".join(lines)


def run_status(config: ClusterConfig, as_json: bool = False) -> int:
    """Print the status; exit 0, or 1 when NATS cannot be reached."""
    try:
        state = asyncio.run(collect(config))
    except Exception as exc:
        print(f"cannot read the cluster state from {list(config.nats_urls)}: {exc!r}")
        return 1
    print(json.dumps(state) if as_json else render(state))
    return 0
