"""The ``vipkg`` command: ``vipkg compare``, ``vipkg fit`` and ``vipkg models``.

One module per subcommand (:mod:`~vipkg.cli.compare`, :mod:`~vipkg.cli.fit`,
:mod:`~vipkg.cli.models`), each with ``add_parser(sub)`` and ``run(parser, args)``.
``compare`` (the function) and ``Config`` stay importable from here.

Every error ends the command with one line on stderr (``vipkg <command>: error: ...``) and a
non-zero exit status: 2 for arguments the parser refuses, 1 for everything else, 130 when
interrupted. ``VIPKG_TRACEBACK=1`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

# The subcommand modules import torch and the rest of vipkg only inside their functions, so
# that building the parser (and --help) costs no torch import.
from vipkg.cli import compare as _compare_command
from vipkg.cli import fit as _fit_command
from vipkg.cli import models as _models_command
from vipkg.cli.compare import compare

__all__ = ["main", "compare", "Config"]

_COMMANDS = {"compare": _compare_command, "models": _models_command, "fit": _fit_command}


def __getattr__(name):
    if name == "Config":
        from vipkg.estimators.catalog import Config

        return Config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _user_errors() -> tuple:
    """Errors that describe the user's input or the fit's arithmetic: their message is the whole story."""
    from vipkg.estimators.base import IncompatibleEstimatorError
    from vipkg.fit import NonFiniteLossError

    return (ValueError, OSError, IncompatibleEstimatorError, NonFiniteLossError)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused argument reported on one line (argparse prints its usage first)."""

    def error(self, message):
        self.exit(2, _one_line(f"{self.prog}: error: {message} (see '{self.prog} --help')") + "\n")


def main(argv=None) -> int:
    """Run ``vipkg`` with ``argv`` (default ``sys.argv[1:]``); the exit status.

    Raises
    ------
    SystemExit
        On any error, with a one-line message (printed to stderr by the interpreter).
    """
    parser = _Parser(prog="vipkg", description="Variational inference with pluggable estimators.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS.values():
        command.add_parser(sub)
    args = parser.parse_args(argv)
    prog = f"vipkg {args.command}"
    try:
        return _COMMANDS[args.command].run(sub.choices[args.command], args)
    except SystemExit as err:
        if isinstance(err.code, str):  # a message of ours (the code of parser.error is an int)
            raise SystemExit(_one_line(f"{prog}: error: {err.code}")) from None
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if os.environ.get("VIPKG_TRACEBACK"):
            raise
        if isinstance(err, _user_errors()):
            line = f"{prog}: error: {err}"
        else:  # not a mistake in the input that we foresaw: name the error and where to look
            line = f"{prog}: error: {type(err).__name__}: {err} (VIPKG_TRACEBACK=1 shows where it came from)"
        raise SystemExit(_one_line(line)) from None
