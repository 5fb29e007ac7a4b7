"""``vipkg models``: the model zoo, one line per model."""

from __future__ import annotations

import sys

__all__ = ["list_models", "add_parser", "run"]


def list_models(stream=None) -> None:
    """Print every zoo model's name and the first line of its docstring."""
    from vipkg.models import ZOO

    stream = stream or sys.stdout
    for name, fn in ZOO.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<30} {doc}", file=stream)


def add_parser(sub) -> None:
    """The ``models`` subcommand (no arguments)."""
    sub.add_parser("models", help="list the model zoo", description="List the model zoo: name and summary.")


def run(parser, args) -> int:
    list_models()
    return 0
