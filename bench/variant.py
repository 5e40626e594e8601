"""`python -m bench.variant --without limits -- <gateway args>`: the gateway with one service left out.

Prices a service: the bench runs this next to the gateway in its default shape and
compares the two under the same load. Bench-only; the product has no switch to turn
limits or accounting off.
"""

from __future__ import annotations

import argparse
import sys

SERVICES = {"limits": ("gateway.limits.limiter", "install_limits"), "accounting": ("gateway.accounting.ledger", "install_accounting")}


async def _left_out(gateway: object) -> None:
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.variant", description=__doc__.splitlines()[0])
    parser.add_argument("--without", choices=sorted(SERVICES), required=True)
    parser.add_argument("gateway_args", nargs=argparse.REMAINDER, help="passed to `gateway` (after --)")
    args = parser.parse_args(argv)
    module_name, installer = SERVICES[args.without]
    module = __import__(module_name, fromlist=[installer])
    setattr(module, installer, _left_out)  # services.py imports the installer when it runs
    from gateway.cli.main import main as gateway_main

    rest = args.gateway_args[1:] if args.gateway_args[:1] == ["--"] else args.gateway_args
    gateway_main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
