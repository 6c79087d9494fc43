"""Run the appliance exactly as `hft-appliance serve` does, but with a chosen engine.

Used by `benches/bench_rest.py` to start the baseline server (the flat-array engine of
`benches/baseline_engine.py`) on the same code path as the real one: same config loading
(`--config`, `APP_<SECTION>__<KEY>`), logging, socket binding and `app.run` arguments as
`appliance.cli.serve`, only `create_app(config, engine=...)` gets the injected engine.

    .venv/bin/python benches/serve_with_engine.py --engine baseline [--config Config.toml]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from appliance.app import create_app
from appliance.cli import bind_listen_socket
from appliance.config import ConfigError, load_config
from appliance.logging_setup import setup_logging


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
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"serve_with_engine: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log)
    sock = bind_listen_socket(config.server.host, config.server.port)
    app = create_app(config, engine=make_engine(args.engine), name=f"bench_{args.engine}")
    try:
        app.run(
            sock=sock,
            single_process=True,
            debug=False,
            auto_reload=False,
            access_log=config.log.access_log,
            motd=False,
        )
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
