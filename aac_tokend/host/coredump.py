"""Keeping tokens out of core files.

A core file is the whole memory of a process, tokens in plaintext, written where the
process's working directory or the system's crash collector keeps it. A command that holds
a token forbids core dumps before it reads one; ``exec`` gives its command the user's own
core limit back, since that command is the user's and not ours.
"""

from __future__ import annotations

import resource  # a small C module (well under 1 ms): the token fast path can afford it
import sys

__all__ = ["allow_core_dumps_after_exec", "forbid_core_dumps"]

#: prctl(2)'s option from <linux/prctl.h> (stable kernel ABI).
_PR_SET_DUMPABLE = 4

#: The soft RLIMIT_CORE the user gave us, for a command that ``exec`` runs in our place.
_user_soft_limit: int | None = None


def forbid_core_dumps(*, undumpable: bool = True) -> None:
    """No core file from this process: RLIMIT_CORE 0 and, on Linux with ``undumpable``,
    not dumpable at all."""
    global _user_soft_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if _user_soft_limit is None:
        _user_soft_limit = soft
    # The soft limit only: the hard one stays, so `exec` can give its command the user's back.
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    if undumpable and sys.platform.startswith("linux"):
        _set_undumpable()


def _set_undumpable() -> None:
    # RLIMIT_CORE does not bind a core_pattern that pipes to a handler (systemd-coredump,
    # apport): the kernel hands the handler the core whatever the limit, and only the handler
    # may choose to honour it. A process that is not dumpable gives no core to anyone, and
    # other processes of the same user cannot ptrace it or read its /proc/<pid>/mem either.
    # Python has no prctl binding, so ctypes; it costs ~5 ms to import, which is why the
    # `token` fast path makes do with the limit for the milliseconds it holds a token.
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # unsigned long arguments: the kernel refuses PR_SET_DUMPABLE with garbage in arg2.
        libc.prctl(_PR_SET_DUMPABLE, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0))  # fmt: skip
    except (OSError, AttributeError):
        pass  # no prctl to be found: RLIMIT_CORE 0 still stops a core file


def allow_core_dumps_after_exec() -> None:
    """The user's own core limit back, for a command about to replace this process.

    execve(2) makes the new program dumpable again by itself (unless it is set-user-ID).
    """
    if _user_soft_limit is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (_user_soft_limit, hard))
