"""Help text shared by the subcommands."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where the help says the default itself
    (options whose default is None or off, for which "(default: None)" would tell nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # Identity, not ==: a default of 0 is a default worth showing, though 0 == False.
        quiet = any(action.default is x for x in (None, False, argparse.SUPPRESS))
        if "default" in text or quiet or action.required:
            return text
        return super()._get_help_string(action)
