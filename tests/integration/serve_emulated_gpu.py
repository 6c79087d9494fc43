"""Serve exactly as `hft-appliance serve` does, on the GPU engine over the CPU build of its
kernels (tests/engine/emulated_device.py): the GPU engine's code behind a real socket on a
machine without a GPU. Compiles the kernels into the working directory first."""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.cli import serve
from gpu_kernels import CupyEngine
from tests.engine.emulated_device import EmulatedDevice, build_library

if __name__ == "__main__":
    device = EmulatedDevice(build_library(Path.cwd()))
    sys.exit(serve(None, engine=CupyEngine(device=device, coalesce_values=64)))
