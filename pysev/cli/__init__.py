"""The ``pysev`` command line. Each subcommand lives in its own module with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("migrate", "certs", "bench", "vm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pysev", description="AMD SEV live migration in software")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"pysev.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, argparse.ArgumentTypeError) as exc:
        # Bad input found past argument parsing (a size, a policy, an option the guest cannot have):
        # one line that names it, as argparse does; -v keeps the traceback for a bug report.
        if args.verbose:
            raise
        print(f"pysev {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
