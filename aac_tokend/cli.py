"""The ``aac-tokend`` command line: thin clients of the daemon, plus ``run``.

``aac-tokend token`` is called before every API call by some tools, so its path imports
only ``socket`` when the daemon answers; everything else (argparse, requests, cryptography,
structlog) is imported lazily by the commands that need it.

Exit statuses: 0 success; 1 other failure; 2 usage; 3 already running; 4 daemon not
running; 65 bad input; 69 a rejected or expired chain; 75 temporary failure; 78 bad config;
130 Ctrl-C; 141 (EXIT_BROKEN_PIPE) stdout a pipe its reader closed.
``AAC_TOKEND_PROFILE`` names the profile used when a command is given no ``--profile``.
"""

from __future__ import annotations

import errno  # errno and time are built into the interpreter: no import cost
import os
import sys
import time

__all__ = ["EXIT_BROKEN_PIPE", "fast_token_args", "main"]

#: client.READ_TIMEOUT_SECONDS (a test pins them), without importing client for argparse's
#: commands: the one budget of `token` across the token socket and the control socket.
_READ_TIMEOUT_SECONDS = 5.0


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


def _fast_token(args: list[str], deadline: float) -> int | None:
    """``token [--profile NAME] [--header|--curl-config]`` straight from the token socket.

    Returns None to go the long way (argparse, the control socket), which also explains
    every failure; both ways share one budget, ``deadline`` (time.monotonic()).
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
        token = read_token(f"{runtime}/{token_socket_name(profile)}", deadline=deadline)
    except OSError:
        return None
    if not token:
        return None  # the long way explains why there is no token
    sys.stdout.write(format_token(token, form))
    return 0


class _ClosedOutput:
    """sys.stdout when the command was started with it closed (``>&-``): Python then sets
    it to None, and print() drops every line without a word. Writing here fails instead."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")

    def flush(self) -> None:
        pass


#: 128 + SIGPIPE: what a shell reports for a command killed by writing to a closed pipe,
#: as `aac-tokend status | head -1` closes it. Quiet, like the other commands in a pipe.
EXIT_BROKEN_PIPE = 141


def _run(args: list[str]) -> int:
    deadline = time.monotonic() + _READ_TIMEOUT_SECONDS
    if args[:1] == ["token"]:
        fast = _fast_token(args[1:], deadline)
        if fast is not None:
            return fast
    from .commands.main import dispatch

    return dispatch(args, deadline=deadline)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status.

    The one guard around the output: a closed or full stdout is one line and exit 1, a
    pipe closed by its reader a quiet EXIT_BROKEN_PIPE, Ctrl-C a quiet 130.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if sys.stdout is None:
        sys.stdout = _ClosedOutput()
    try:
        status = _run(args)
        sys.stdout.flush()  # here, not at exit, where a failure is a traceback
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _discard_output()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        _discard_output()
        print(f"aac-tokend: error: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 1


#: write(2) failures on stdout: closed, full, or a failing device.
_OUTPUT_ERRNOS = frozenset({errno.EBADF, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _discard_output() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what could not be
    written does not fail again (with a traceback) on the way out."""
    try:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
