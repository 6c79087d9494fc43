"""Run the appliance exactly as `hft-appliance serve` does, but with a chosen engine.

Used by `benches/bench_rest.py` to start the baseline server (the flat-array engine of
`benches/baseline_engine.py`) on the same code path as the real one: `appliance.cli.serve`
with the engine injected (same config loading, logging, socket binding and `app.run`).

    .venv/bin/python benches/serve_with_engine.py --engine baseline [--config Config.toml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from appliance.cli import serve


def make_engine(name: str):
    if name == "baseline":
        from baseline_engine import FlatArrayEngine

        return FlatArrayEngine()
    from fallback import NumpyEngine

    return NumpyEngine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("baseline", "numpy"), default="baseline")
    parser.add_argument("--config", metavar="PATH")
    args = parser.parse_args(argv)
    return serve(args.config, engine=make_engine(args.engine))


if __name__ == "__main__":
    sys.exit(main())
