"""Registers ``optimum-cli export acttail`` (optimum's PEP 420 command-register namespace).

Kept lightweight: optimum-cli imports this file at start-up; the export itself is imported in ``run``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand

from acttail_export.commands.export import HELP, add_export_arguments

if TYPE_CHECKING:
    from argparse import ArgumentParser


class ActTailExportCommand(BaseOptimumCLICommand):
    """``optimum-cli export acttail --model MODEL [options] OUTPUT_DIR``."""

    COMMAND = CommandInfo(name="acttail", help=HELP)

    @staticmethod
    def parse_args(parser: "ArgumentParser") -> None:
        add_export_arguments(parser, default_base="optimum")  # optimum-cli runs where the optimum extra is installed

    def run(self) -> None:
        import logging

        from acttail_export.commands.export import run
        from acttail_export.errors import ActTailError

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            run(self.args)
        except ActTailError as exc:
            print(f"optimum-cli export acttail: error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            from acttail_export.cli import report_interrupt

            sys.exit(report_interrupt("optimum-cli export acttail"))


REGISTER_COMMANDS = [(ActTailExportCommand, ExportCommand)]
