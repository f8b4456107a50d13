"""The first module a spawned courier runs: deaf to signals before its heavy imports.

A cold courier has its job (a refresh token) on stdin from its first instant, and its
imports (requests, cryptography) take 0.1-0.5 s: a SIGTERM then would end it with the job
half-known, and the refresh LOST. So the daemon starts it with SIGTERM/SIGINT/SIGHUP
blocked (spawn.py's ``_spawn``): one sent before this module runs stays pending, and
ignoring the signal here discards it (POSIX). Only then the imports, and spawn.py's ``main``.
"""

from __future__ import annotations

import os
import signal

_DEAF = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
for _sig in _DEAF:
    signal.signal(_sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEAF)

from .spawn import main  # noqa: E402  (after the signals, on purpose)

if __name__ == "__main__":
    code = main()
    # Not sys.exit: the interpreter's teardown takes 50-200 ms here, and the daemon waits
    # for our end (EOF) before it has its answer. What matters is durable and flushed.
    os._exit(code)
