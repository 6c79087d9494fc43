"""The audit trail's cost on the ZeroMQ ingest path (issue 15): audit off vs on, same run.

Two appliances (write-ahead log on, as users run it), one with `[audit] enabled`, measured in
alternating rounds with bench_ingest's DEALER and PUSH helpers: 10k-value frames (the issue-3
workload) and 10-value frames (where the per-frame audit call weighs most). Plus the call
itself in process: `StoreSink.submit_batch` over a no-op store with and without an `AuditLog`.

    .venv/bin/python benches/bench_audit.py [--rounds 3] [--frames 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))
sys.path.insert(0, str(BENCHES.parent))

from bench_ingest import (  # noqa: E402
    FRAME_VALUES,
    appliance,
    appliance_dealer,
    appliance_push,
    machine_info,
    pin_self,
    zmq_env,
)


def frames_per_s(rate_values: float) -> float:
    return rate_values / FRAME_VALUES  # the helpers count FRAME_VALUES per frame


def in_process(frames: int = 200_000, batch: int = 256) -> dict[str, float]:
    """ns per frame of `StoreSink.submit_batch` (no-op store), audit off and on."""
    from appliance.audit_log import AuditLog
    from appliance.ingest import StoreSink

    class NoStore:
        def __contains__(self, symbol: object) -> bool:
            return True

        def ingest(self, symbol, values, publisher_id=0, sequence=0) -> int:
            return 1

    values = np.ones(10)
    items = [("S", values, 1, n, None) for n in range(batch)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        audit = AuditLog(tmp)
        for name, sink in (
            ("off", StoreSink(NoStore(), 1000)),
            ("on", StoreSink(NoStore(), 1000, audit, "zmq")),
        ):
            started = time.perf_counter_ns()
            for _ in range(frames // batch):
                sink.submit_batch(items, lambda reasons: None)
            out[name] = (time.perf_counter_ns() - started) / (frames // batch * batch)
        audit.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    args = parser.parse_args()
    pin_self(args.client_core)
    print(f"machine: {machine_info()}")
    print(f"in process, ns per frame (submit_batch, no-op store): {in_process()}")
    big = np.random.default_rng(1).uniform(100.0, 200.0, FRAME_VALUES)
    small = big[:10]
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        tmpdir = Path(tmp)
        env_off, ep_off = zmq_env(tmpdir, shm=False, durability=True)
        env_on, ep_on = zmq_env(tmpdir, shm=False, durability=True)
        env_on["APP_AUDIT__ENABLED"] = "true"
        with (
            appliance(tmpdir, "off", args.server_core, env_off) as off,
            appliance(tmpdir, "on", args.server_core, env_on) as on,
        ):
            for round_no in range(args.rounds):
                for name, server, endpoints in (("off", off, ep_off), ("on", on, ep_on)):
                    for label, values in (("10k", big), ("10", small)):
                        key = f"{name} dealer {label}"
                        rate = appliance_dealer(
                            server,
                            endpoints["router"],
                            values,
                            args.frames,
                            round_no * 10 + len(label),
                        )
                        rates.setdefault(key, []).append(frames_per_s(rate))
                    rate = appliance_push(server, endpoints["pull"], big, args.frames, round_no)
                    rates.setdefault(f"{name} push 10k", []).append(frames_per_s(rate))
                print(f"round {round_no} done", file=sys.stderr)
    for mode in ("dealer 10k", "dealer 10", "push 10k"):
        off_rate = float(np.median(rates[f"off {mode}"]))
        on_rate = float(np.median(rates[f"on {mode}"]))
        print(
            f"{mode}: off {off_rate:,.0f} frames/s, on {on_rate:,.0f} frames/s, "
            f"on/off {on_rate / off_rate:.3f} (rounds: off {rates[f'off {mode}']}, "
            f"on {rates[f'on {mode}']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
