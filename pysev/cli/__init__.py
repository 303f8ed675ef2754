"""The ``pysev`` command line. Each subcommand lives in its own module with ``register(subparsers)``.

Bad input ends with one line, ``pysev COMMAND: error: argument OPTION: PROBLEM``, and exit status 2,
before any work is done: argparse's own errors (its usage block left out) and the checks a command makes
past parsing (``units.option_error``) read the same.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

SUBCOMMANDS = ("migrate", "certs", "bench", "vm", "stream")

# A child process (the destination of ``pysev migrate --transport tcp``, a benchmark's source) imports the
# very files this process imported: ``python -m pysev.cli`` started in a source tree would put the tree
# first on sys.path and import its unbuilt csev (the plain-Python kernels, ~10x slower) instead.
_BOOTSTRAP = """\
import importlib.util, os, sys
for _name, _init in {inits!r}:
    _spec = importlib.util.spec_from_file_location(
        _name, _init, submodule_search_locations=[os.path.dirname(_init)]
    )
    sys.modules[_name] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, without argparse's usage block: ``pysev migrate: error: argument --memory: …``."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def installation() -> dict[str, str]:
    """Where this process's pysev and csev come from, and the csev backend it runs."""
    import csev
    import pysev

    return {"pysev": str(pysev.__file__), "csev": str(csev.__file__), "backend": csev.BACKEND}


def python_command(code: str, *args: str) -> list[str]:
    """``python -c CODE ARGS`` for a child process whose ``import pysev`` and ``import csev`` load this
    process's files, whatever the child's working directory or ``PYTHONPATH``."""
    where = installation()
    inits = [("csev", where["csev"]), ("pysev", where["pysev"])]
    return [sys.executable, "-c", _BOOTSTRAP.format(inits=inits) + code, *args]


def child_command(*args: str) -> list[str]:
    """``pysev ARGS`` in a child process running this installation (see ``python_command``)."""
    return python_command("from pysev.cli import main\nsys.exit(main())\n", *args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pysev", description="AMD SEV live migration in software")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"pysev.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2: bad input, reported on one line of stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or bad input argparse has reported: its status, not an exception
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, argparse.ArgumentTypeError) as exc:
        # Bad input found past argument parsing (a size, a policy, an option the guest cannot have, a
        # malformed stream file): one line that names it, as argparse does; -v keeps the traceback.
        if args.verbose:
            raise
        print(f"pysev {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
