"""The ``vipkg`` command: ``vipkg compare``, ``vipkg fit`` and ``vipkg models``.

One module per subcommand (:mod:`~vipkg.cli.compare`, :mod:`~vipkg.cli.fit`,
:mod:`~vipkg.cli.models`), each with ``add_parser(sub)`` and ``run(parser, args)``.
``compare`` (the function) and ``Config`` stay importable from here.
"""

from __future__ import annotations

import argparse

from vipkg.cli import compare as _compare_command
from vipkg.cli import fit as _fit_command
from vipkg.cli import models as _models_command
from vipkg.cli.compare import compare
from vipkg.estimators.catalog import Config

__all__ = ["main", "compare", "Config"]

_COMMANDS = {"compare": _compare_command, "models": _models_command, "fit": _fit_command}


def main(argv=None) -> int:
    """Run ``vipkg`` with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = argparse.ArgumentParser(
        prog="vipkg", description="Variational inference with pluggable estimators."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS.values():
        command.add_parser(sub)
    args = parser.parse_args(argv)
    return _COMMANDS[args.command].run(parser, args)
