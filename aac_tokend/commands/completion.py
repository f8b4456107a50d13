"""``aac-tokend completion bash|zsh|man``: completions and the man page, from the one parser.

They are generated at run time from the installed command's own argparse parser (every lazy
subcommand mounted), so they always match the version that prints them: a file generated
at build time would be one more artefact to keep in step, and would need the package
imported inside the build backend. shtab and argparse-manpage are imported only here.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "render", "run_cli"]

SHELLS = ("bash", "zsh")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "what", choices=[*SHELLS, "man"],
        help="bash or zsh: a completion script; man: the manual page (roff, for `man -l -`)",
    )  # fmt: skip


#: Profile names are completed by asking the installed command at completion time, so a
#: profile imported after the script was generated completes too. shtab reads an action's
#: ``complete`` attribute: a bash function name, or a zsh _arguments action.
_PROFILE_COMPLETION = {
    "bash": "_aac_tokend_profiles",
    # shtab puts this inside double quotes: the escaped $ keeps the command for _arguments
    # to run at completion time, not once when the script is loaded.
    "zsh": "{compadd -- \\$(aac-tokend profiles 2>/dev/null)}",
}
_PREAMBLE = {
    "bash": "_aac_tokend_profiles() {\n"
    '  compgen -W "$(aac-tokend profiles 2>/dev/null)" -- "$1"\n'
    "}\n",
}


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and every subcommand's parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def full_parser() -> argparse.ArgumentParser:
    """The whole command line with every subcommand's options (lazy ones included)."""
    from .main import EVERY_COMMAND, build_parser

    parser = build_parser(EVERY_COMMAND)
    for each in _parsers(parser):
        for action in each._actions:
            if action.dest == "profile" or (
                each.prog == "aac-tokend remove" and action.dest == "name"
            ):
                action.complete = _PROFILE_COMPLETION  # type: ignore[attr-defined]
    return parser


def render(what: str) -> str:
    """The completion script for a shell, or the man page's roff source."""
    parser = full_parser()
    if what == "man":
        from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

        from .. import __version__

        page = Manpage(parser)  # its documented way: set attributes, not the private _data
        page.description = "keep AAC OAuth 2.0 token chains alive and serve the access token"
        page.source = f"aac-tokend {__version__}"
        page.manual = "aac-tokend manual"
        return str(page)
    import shtab

    return str(shtab.complete(parser, shell=what, preamble=_PREAMBLE.get(what, "")))


def run_cli(args: argparse.Namespace) -> int:
    """Print what was asked for on stdout."""
    text = render(args.what)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
