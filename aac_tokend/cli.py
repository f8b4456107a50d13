"""The ``aac-tokend`` command line: thin clients of the daemon, plus ``run``.

``aac-tokend token`` is called before every API call by some tools, so its path imports
only ``socket`` when the daemon answers; everything else (argparse, requests, cryptography,
structlog) is imported lazily by the commands that need it.

Exit statuses: 0 success; 1 other failure; 2 usage; 3 already running; 4 daemon not
running; 65 bad input; 69 a rejected or expired chain; 75 temporary failure; 78 bad config.
``AAC_TOKEND_PROFILE`` names the profile used when a command is given no ``--profile``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


#: ``token`` options the fast path understands; anything else goes the long way.
_FAST_FORMATS = {"--header": "header", "--curl-config": "curl-config"}


def _fast_token(args: list[str]) -> int | None:
    """``token [--profile NAME] [--header|--curl-config]`` straight from the token socket.

    Returns None to go the long way (argparse, the control socket), which also explains
    every failure.
    """
    profile = os.environ.get("AAC_TOKEND_PROFILE") or "default"
    form = "plain"
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in _FAST_FORMATS and form == "plain":
            form = _FAST_FORMATS[arg]
        elif arg in ("--profile", "-p") and rest:
            profile = rest.pop(0)
        elif arg.startswith("--profile="):
            profile = arg.split("=", 1)[1]
        else:
            return None
    if not profile or "/" in profile or profile.startswith("."):
        return None
    from .rundir import runtime_dir_fast  # not .paths: see rundir's docstring

    runtime = runtime_dir_fast(os.environ)
    if runtime is None:
        return None
    from .client import format_token, read_token

    try:
        token = read_token(f"{runtime}/{profile}.token.sock")
    except OSError:
        return None
    if not token:
        return None  # the long way explains why there is no token
    sys.stdout.write(format_token(token, form))
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
