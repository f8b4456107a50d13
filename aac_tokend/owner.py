"""The single-owner lock: one daemon per state directory, for its whole life.

An exclusive ``flock`` on ``daemon.lock``; the holder's pid is written inside so a second
``run`` can say who owns the chain. Commands that change state without a daemon take the
same lock for the length of their write, so no daemon can start under them.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .errors import AlreadyRunningError, StorageError
from .fileio import ensure_private_dir

__all__ = ["OwnerLock", "holder_pid"]

#: A courier forked in the instant before its parent died still holds the inherited lock
#: until it closes it: microseconds normally, but a loaded machine may not schedule the
#: child for a while. A starting daemon that finds the recorded holder dead waits this
#: long before believing the lock is really taken.
DEAD_HOLDER_GRACE_SECONDS = 5.0


def holder_pid(path: Path) -> int | None:
    """The pid written in the lock file, if any."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnerLock:
    """Hold with ``acquire()``; released by ``release()`` or by the process's death."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, record_pid: bool = True) -> None:
        ensure_private_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc.strerror}") from exc
        deadline = time.monotonic() + DEAD_HOLDER_GRACE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = holder_pid(self.path)
                if (pid is not None and _alive(pid)) or time.monotonic() > deadline:
                    os.close(fd)
                    raise AlreadyRunningError(pid) from None
                time.sleep(0.05)
        if record_pid:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OwnerLock:
        self.acquire(record_pid=False)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
