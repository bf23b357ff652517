"""``acttail-export`` command line: ``analyze``, ``evaluate``, ``export``, ``generate``.

Each subcommand lives in ``acttail_export.commands.<name>`` and exposes ``register(subparsers)``
which adds its parser and sets ``func``. Heavy imports happen inside the subcommand's run function.
User errors (:class:`ActTailError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import ActTailError

SUBCOMMANDS = ("analyze", "evaluate", "export", "generate")


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (a bad choice, a missing argument, an unknown flag) as one line and exit code 2, like every
    other user error, instead of the usage block first; subcommand parsers inherit it (``add_subparsers``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        root = self.prog.split()[0]
        self.exit(2, f"{root}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="acttail-export", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"acttail_export.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .progress import library_progress, library_warnings

    try:  # only our own lines on a stderr nobody watches, and transformers' warnings only with -v
        with library_progress(sys.stderr.isatty()), library_warnings(args.verbose):
            args.func(args)
    except ActTailError as exc:
        print(f"acttail-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupt("acttail-export")
    return 0


def report_interrupt(prog: str) -> int:
    """Say that ``prog`` was interrupted; returns its exit code, 130."""
    # CPython 3.11 marks a KeyboardInterrupt that left a string eval()/exec() (collections.namedtuple and
    # dataclasses build classes that way, so a signal can land there during any import) as unhandled, and
    # then ends `python -m` with SIGINT instead of this exit code. Evaluating a constant clears the mark.
    eval("None")
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
