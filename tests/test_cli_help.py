"""The ``vipkg`` command's help: it imports no torch, and every option says what it does and its default."""

import argparse
import subprocess
import sys

import pytest

from vipkg.cli import _COMMANDS, _Parser
from vipkg.cli._help import HelpFormatter


def test_import_vipkg_cli_imports_no_torch():
    # A fresh interpreter: this one has torch loaded by the other tests. (`vipkg --help` took
    # 4.9 s in issue 22, nearly all of it importing torch, Pyro and ArviZ.)
    code = (
        "import sys, vipkg, vipkg.cli; vipkg.cli._Parser(prog='vipkg');"
        "heavy = [m for m in ('torch', 'pyro', 'arviz', 'matplotlib') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_help_builds_every_subparser_without_torch():
    code = (
        "import sys, contextlib, io, vipkg.cli\n"
        "for argv in (['--help'], ['compare', '--help'], ['fit', '--help'], ['models', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            vipkg.cli.main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def _subparsers():
    parser = _Parser(prog="vipkg")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS.values():
        command.add_parser(sub)
    return sub.choices


@pytest.mark.parametrize("command", ["compare", "fit"])
def test_every_option_has_help_and_its_default(command):
    p = _subparsers()[command]
    assert p.formatter_class is HelpFormatter
    fmt = HelpFormatter(prog=p.prog)
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = fmt._get_help_string(action)
        assert action.help and len(action.help) > 10, action.option_strings
        if not action.required:
            # A shown default ("(default: 1000)") or one said in words ("default: none").
            assert "default" in text, (action.option_strings, text)


def test_compare_help_shows_the_defaults():
    text = _subparsers()["compare"].format_help()
    for expected in ("(default: 1000)", "(default: 16)", "(default: 0.01)", "(default: vipkg-out)"):
        assert expected in " ".join(text.split()), expected


def test_plain_iwae_means_k8_and_help_says_so():
    from vipkg.cli.fit import DEFAULT_K, OBJECTIVE_HELP, _objective

    assert DEFAULT_K == 8
    assert "plain 'iwae' is iwae:8" in OBJECTIVE_HELP
    assert _objective("iwae").k == 8
    assert _objective("iwae:3").k == 3
    with pytest.raises(SystemExit, match=r"--objective 'iwae:x': K must be a positive integer, got 'x'"):
        _objective("iwae:x")


def test_fit_fbgvi_without_a_step_size(capsys):
    # Issue 22: `FBGVI()` raised "TypeError: _BuresWasserstein.__init__() missing ... 'step_size'".
    from vipkg.cli import main

    assert (
        main(
            [
                "fit",
                "--model",
                "eight_schools",
                "--guide",
                "fullrank",
                "--estimator",
                "fbgvi",
                "--steps",
                "30",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "FBGVI(step_size=None, hessian='autograd') on FullRankNormal, 30 steps" in out
