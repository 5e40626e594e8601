"""`python -m bench.variant --without limits --config FILE --port N`: the gateway with one service off.

Prices a service: the bench runs this next to the gateway in its default shape and compares the two
under the same load. The service is switched off by `create_app`'s own parameter (`limits=False` or
`accounting=False`: its hook leaves the proxy path); the product's CLI has no such switch.
"""

from __future__ import annotations

import argparse
import sys

from gateway.app import create_app
from gateway.core.config import load_config
from gateway.core.logs import configure_logging
from gateway.security.first_run import ensure_runtime
from gateway.server import serve_app, settle_garbage_collector

SERVICES = ("accounting", "limits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.variant", description=__doc__.splitlines()[0])
    parser.add_argument("--without", choices=SERVICES, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    configure_logging(config.logging.level)
    ensure_runtime(config, announce=lambda line: print(line, file=sys.stderr, flush=True))
    app = create_app(config, limits=args.without != "limits", accounting=args.without != "accounting",
                     after_start=settle_garbage_collector)
    serve_app(app, args.host, args.port)


if __name__ == "__main__":
    main(sys.argv[1:])
