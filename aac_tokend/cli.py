"""The ``aac-tokend`` command line: thin clients of the daemon, plus ``run``.

``aac-tokend token`` is called before every API call by some tools, so its path imports
only ``socket`` when the daemon answers; everything else (argparse, requests, cryptography,
structlog) is imported lazily by the commands that need it.

Exit statuses: 0 success; 1 other failure; 2 usage; 3 already running; 4 daemon not
running; 65 bad input; 69 a rejected or expired chain; 75 temporary failure; 78 bad config.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def _fast_token(args: list[str]) -> int | None:
    """``token [--profile NAME]`` straight from the token socket, or None to go the long way."""
    profile = "default"
    if len(args) == 2 and args[0] in ("--profile", "-p"):
        profile = args[1]
    elif len(args) == 1 and args[0].startswith("--profile="):
        profile = args[0].split("=", 1)[1]
    elif args:
        return None
    if not profile or "/" in profile or profile.startswith("."):
        return None
    from .rundir import runtime_dir_fast  # not .paths: see rundir's docstring

    runtime = runtime_dir_fast(os.environ)
    if runtime is None:
        return None
    from .client import read_token

    try:
        token = read_token(f"{runtime}/{profile}.token.sock")
    except OSError:
        return None
    if not token:
        return None  # the long way explains why there is no token
    sys.stdout.write(token + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["token"]:
        fast = _fast_token(args[1:])
        if fast is not None:
            return fast
    from .commands import dispatch

    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
