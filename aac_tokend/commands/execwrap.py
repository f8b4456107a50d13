"""``aac-tokend exec -- CMD ARGS...``: run CMD with AAC_ACCESS_TOKEN in its environment.

AAC_ACCESS_TOKEN is a snapshot: the token at the moment CMD starts, which expires with it.
CMD also gets AAC_TOKEND_PROFILE, so a long job that runs ``aac-tokend token`` (or
``TokendAuth()``) before each call reads a fresh token of the same profile.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError

__all__ = ["add_arguments", "run_cli"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .main import add_profile_option  # already imported: commands mounts this one

    add_profile_option(parser)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")


def run_cli(args: argparse.Namespace) -> int:
    """Replace this process with CMD; the token goes in the environment, never in argv."""
    from ..api import get_token

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("exec needs a command: aac-tokend exec -- CMD ARGS...")
    from ..rundir import PROFILE_ENV

    env = dict(os.environ, AAC_ACCESS_TOKEN=get_token(args.profile))
    env[PROFILE_ENV] = args.profile  # fresh tokens later come from the same profile
    from ..host.coredump import allow_core_dumps_after_exec, forbid_core_dumps

    allow_core_dumps_after_exec()  # CMD is the user's: it gets the user's core limit back
    try:
        os.execvpe(cmd[0], cmd, env)  # noqa: S606 - running the user's own command is the point
    except OSError as exc:
        forbid_core_dumps()  # still us, still holding the token
        # A shell's statuses: 127 for a command not found, 126 for one found but not run.
        print(f"aac-tokend: error: cannot run {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 127
