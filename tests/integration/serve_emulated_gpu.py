"""Serve exactly as `hft-appliance serve` does, on the GPU engine over the CPU build of its
kernels (tests/engine/emulated_device.py): the GPU engine's code behind a real socket on a
machine without a GPU. Compiles the kernels into the working directory first.

`--hybrid`: the hybrid engine over the compiled engine and that device, sending batches of 4
distinct queries or more to the device mirrors, and bars and rolling statistics over 4 values
or more to the device (single queries and appends stay on the host)."""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.cli import serve
from gpu_kernels import CupyEngine
from tests.engine.emulated_device import EmulatedDevice, build_library

if __name__ == "__main__":
    device = EmulatedDevice(build_library(Path.cwd()))
    engine = CupyEngine(device=device, coalesce_values=64)
    if "--hybrid" in sys.argv[1:]:
        from fallback.compiled import CompiledEngine, prepare_kernels
        from gpu_kernels.hybrid import HybridEngine

        prepare_kernels()
        engine = HybridEngine(CompiledEngine(), engine, batch_min_queries=4, history_min_values=4)
    sys.exit(serve(None, engine=engine))
