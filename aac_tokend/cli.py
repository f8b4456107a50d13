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

__all__ = ["fast_token_args", "main"]


#: ``token`` options the fast path understands; anything else goes the long way.
_FAST_FORMATS = {"--header": "header", "--curl-config": "curl-config"}


def fast_token_args(args: list[str], default_profile: str) -> tuple[str, str] | None:
    """(profile, form) of ``token`` ARGS when the fast path can serve them, else None.

    Pure, and never reads ARGS differently from argparse: anything it is not sure of
    (``-pNAME``, a repeated or unknown option, a name no profile can have) goes the long way.
    """
    profile, form = default_profile, "plain"
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in _FAST_FORMATS and form == "plain":
            form = _FAST_FORMATS[arg]
        elif arg in ("--profile", "-p") and rest and not rest[0].startswith("-"):
            # argparse reads a following "-..." word as an option, not as the profile
            profile = rest.pop(0)
        elif arg.startswith("--profile="):
            profile = arg.split("=", 1)[1]
        else:
            return None
    from .rundir import is_profile_name  # imported by the fast path anyway

    if not is_profile_name(profile):
        return None  # the long way names the bad name (or $AAC_TOKEND_PROFILE)
    return profile, form


def _fast_token(args: list[str]) -> int | None:
    """``token [--profile NAME] [--header|--curl-config]`` straight from the token socket.

    Returns None to go the long way (argparse, the control socket), which also explains
    every failure.
    """
    parsed = fast_token_args(args, os.environ.get("AAC_TOKEND_PROFILE") or "default")
    if parsed is None:
        return None
    profile, form = parsed
    from .rundir import runtime_dir_fast, token_socket_name  # not .paths: see rundir

    runtime = runtime_dir_fast(os.environ)
    if runtime is None:
        return None
    import resource  # a small C module; coredump.py itself, and ctypes, cost more

    from .client import format_token, read_token

    # No core file with the token (coredump.forbid_core_dumps, minus the prctl that needs
    # ctypes: this process holds the token for milliseconds).
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    try:
        token = read_token(f"{runtime}/{token_socket_name(profile)}")
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
    from .commands.main import dispatch

    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
