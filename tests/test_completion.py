"""`aac-tokend completion bash|zsh|man`: every command and option of the one parser, for real.

The expected names come from walking the argparse parser itself (every lazy subcommand
mounted), so a new option that the generated files missed fails here. The bash script is
loaded into a real bash and asked to complete; the man page is rendered by `man -l`.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aac_tokend.commands.completion import full_parser
from tests.helpers_e2e import CONSOLE_SCRIPT, E2EHome, RecordingSandbox, import_pair


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) pair, the top-level parser first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings a parser accepts itself (not its subcommands')."""
    return {s for action in parser._actions for s in action.option_strings}


COMMANDS = list(subcommands(full_parser()))


def test_the_walk_sees_lazy_subcommands() -> None:
    """The parser walked here has the options of lazily mounted commands (sandbox, api)."""
    found = dict(COMMANDS)
    assert "--port" in options(found[("sandbox",)])
    assert "--dry-run" in options(found[("service", "install")])
    assert {"--header", "--curl-config"} <= options(found[("token",)])
    assert len(COMMANDS) > 15


def _generate(home: E2EHome, what: str) -> str:
    result = home.cli("completion", what)
    assert result.returncode == 0 and result.stderr == "", str(result)
    return result.stdout


class TestBash:
    """The bash completion, loaded into bash, completes every command and option."""

    def complete(
        self, script: str, words: list[str], current: str, env: dict[str, str] | None = None
    ) -> set[str]:
        """What bash offers for ``current`` typed after `aac-tokend WORDS`."""
        all_words = ["aac-tokend", *words, current]
        line = " ".join(all_words)
        probe = (
            f"{script}\nCOMP_WORDS=({' '.join(shlex.quote(w) for w in all_words)}); "
            f"COMP_CWORD={len(all_words) - 1}; COMP_LINE={shlex.quote(line)}; "
            'COMP_POINT=${#COMP_LINE}; _shtab_aac_tokend; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        result = subprocess.run(
            ["bash", "-c", probe], capture_output=True, text=True, timeout=30, env=env
        )
        assert result.returncode == 0, result.stderr
        return set(result.stdout.split())

    def test_every_command_and_option_completes(self, home: E2EHome) -> None:
        """At each level bash offers every subcommand name, and after `-` every option."""
        script = _generate(home, "bash")
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
        for path, parser in COMMANDS:
            names = {n for p, _ in COMMANDS if len(p) == len(path) + 1 and p[:-1] == path
                     for n in p[-1:]}  # fmt: skip
            if names:
                assert names <= self.complete(script, list(path), ""), path
            wanted = options(parser)
            assert wanted <= self.complete(script, list(path), "-"), (path, wanted)

    def test_profile_names_complete_at_completion_time(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """`--profile w<TAB>` and `remove <TAB>` offer the profiles that exist when asked."""
        script = _generate(home, "bash")  # generated before any profile exists
        sandbox = sandboxes()
        for name in ("work", "default"):
            import_pair(home, sandbox, profile=name)
        env = dict(home.env, PATH=f"{Path(CONSOLE_SCRIPT).parent}:{home.env['PATH']}")
        assert self.complete(script, ["token", "--profile"], "w", env) == {"work"}
        assert self.complete(script, ["exec", "-p"], "", env) == {"default", "work"}
        assert self.complete(script, ["remove"], "", env) == {"default", "work"}


class TestZsh:
    """The zsh completion names every command and option, and is valid zsh."""

    def test_every_command_and_option_appears(self, home: E2EHome) -> None:
        """Each subcommand name and each option string is in the generated #compdef file."""
        script = _generate(home, "zsh")
        assert script.startswith("#compdef aac-tokend")
        for path, parser in COMMANDS:
            if path:
                assert f"{path[-1]}:" in script or f"'{path[-1]}'" in script, path
            for option in options(parser):
                assert option in script, (path, option)

    @pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (.ci/sysdeps)")
    def test_zsh_parses_it(self, home: E2EHome) -> None:
        """`zsh -n` accepts the script."""
        result = subprocess.run(
            ["zsh", "-n"], input=_generate(home, "zsh"), text=True, capture_output=True
        )
        assert result.returncode == 0, result.stderr

    @pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (.ci/sysdeps)")
    def test_profile_action_runs_at_completion_time(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """The loaded --profile action still holds the command, and running it lists profiles."""
        script = _generate(home, "zsh")
        sandbox = sandboxes()
        for name in ("work", "default"):
            import_pair(home, sandbox, profile=name)
        env = dict(home.env, PATH=f"{Path(CONSOLE_SCRIPT).parent}:{home.env['PATH']}")
        # Load the file's arrays without compinit, then run the action as _arguments would,
        # with compadd printing what it was given.
        probe = (
            "compdef() { :; }; _arguments() { :; }\n" + script + "\n"
            "action=${${(M)_shtab_aac_tokend_token_options:#--profile*}##*:profile:}\n"
            'print -r -- "$action" >&2\n'
            'compadd() { shift; print -rl -- "$@"; }\n'
            'eval "${${action#\\{}%\\}}"\n'
        )
        result = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True,
                                env=env, timeout=30)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "$(aac-tokend profiles" in result.stderr, "expanded when the script loaded"
        assert result.stdout.split() == ["default", "work"]


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed (.ci/sysdeps)")
class TestManPage:
    """`man -l` renders the page, and it documents every command and option."""

    def test_man_renders_every_command_and_option(self, home: E2EHome) -> None:
        """The rendered page has a NAME line, every command path and every option string."""
        page = _generate(home, "man")
        env = dict(home.env, LC_ALL="C", MANWIDTH="200", MAN_KEEP_FORMATTING="")
        result = subprocess.run(["man", "-l", "-"], input=page, capture_output=True,
                                text=True, env=env, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        text = result.stdout
        assert "aac-tokend - keep AAC OAuth 2.0 token chains alive" in text
        for path, parser in COMMANDS:
            if path:
                assert f"aac-tokend {' '.join(path)}" in text, path
            # argparse-manpage leaves out -h/--help, as man pages do: the page is the help.
            for option in options(parser) - {"-h", "--help"}:
                assert option in text, (path, option)
        assert "exit status" in text
