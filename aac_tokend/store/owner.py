"""The single-owner lock: one daemon per state directory, for its whole life.

An exclusive ``flock`` on ``.owner.lock`` (``daemon.lock`` in 0.1.0, a name a profile called
``Daemon`` could take on a case-insensitive file system); the holder writes itself inside so
a second ``run`` can say who owns the chain: ``<pid>`` for a daemon, ``offline <pid>`` for a
command that changes state without a daemon (import, remove) and holds the lock for the
length of its write, so no daemon can start under it. A daemon that starts meanwhile waits
for such a command to end (it holds the lock for a bounded time), and exits 3 ("already
running") only for a live daemon: a service manager that does not restart on 3 must not give
up on a daemon that merely arrived during an offline `remove`.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import AlreadyRunningError, BusyError, StorageError
from .fileio import ensure_private_dir, open_lock_file, read_regular_file

__all__ = ["OFFLINE_HOLD_SECONDS", "OwnerLock", "holder", "holder_pid"]

#: A courier forked in the instant before its parent died still holds the inherited lock
#: until it closes it: microseconds normally, but a loaded machine may not schedule the
#: child for a while. A starting daemon that finds the recorded holder dead waits this
#: long before believing the lock is really taken.
DEAD_HOLDER_GRACE_SECONDS = 5.0
#: The longest an offline command holds the lock: `remove` waits up to the courier's
#: WAIT_SECONDS (55 s) for a refresh a killed daemon left running, then deletes; `import`
#: waits 10 s for the profile's lock. A daemon starting meanwhile waits this long.
OFFLINE_HOLD_SECONDS = 70.0
OFFLINE = "offline"


def holder(path: Path) -> tuple[bool, int] | None:
    """Who the lock file names: (offline, pid), or None if it names nobody readable."""
    try:
        # Non-blocking and regular files only: a FIFO planted at a lock path must not hang us.
        raw, _ = read_regular_file(path, 64, follow_symlinks=False)
        words = raw.decode("ascii").split("\n", 1)[0].split()
    except (OSError, UnicodeDecodeError):
        return None
    offline = len(words) == 2 and words[0] == OFFLINE
    if offline:
        words = words[1:]
    # A pid: 1 to 2**31 - 1 (0 would mean our own process group to kill(), and a longer
    # number is no pid and would overflow it).
    if len(words) != 1 or not words[0].isdigit() or len(words[0]) > 10:
        return None
    pid = int(words[0])
    return (offline, pid) if 0 < pid < 2**31 else None


def holder_pid(path: Path) -> int | None:
    """The pid written in the lock file (a daemon's or an offline command's), if any."""
    named = holder(path)
    return named[1] if named is not None else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The single-owner lock's name in 0.1.0, beside today's.
LEGACY_LOCK_NAME = "daemon.lock"


def _legacy_daemon(path: Path) -> int | None:
    """The pid of a 0.1.0 daemon still running from this state directory, if any.

    During an upgrade the old daemon may still run, holding ``daemon.lock`` (with its pid
    inside) rather than ``.owner.lock``; a new daemon or offline command beside it would
    refresh or rewrite the same chains, so it is refused as "already running" until the old
    one stops. Today ``daemon.lock`` is only a ``daemon`` profile's lock: held briefly, with
    no pid written in it (or a dead 0.1.0 daemon's), so it is never mistaken for a daemon.
    """
    legacy = path.with_name(LEGACY_LOCK_NAME)
    if legacy == path:
        return None
    named = holder(legacy)
    if named is None or named[0] or not _alive(named[1]):
        return None
    try:
        fd = os.open(legacy, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return named[1]
    finally:
        os.close(fd)
    return None


class OwnerLock:
    """Hold with ``acquire()``; released by ``release()`` or by the process's death."""

    def __init__(self, path: Path, *, offline_wait: float = OFFLINE_HOLD_SECONDS) -> None:
        self.path = path
        self._offline_wait = offline_wait
        self._fd: int | None = None

    def acquire(
        self, *, record_pid: bool = True, on_wait: Callable[[int], object] | None = None
    ) -> None:
        """Take the lock as the daemon (``record_pid``) or as an offline command.

        A live daemon holding it raises AlreadyRunningError at once; a live offline command
        is waited for (OFFLINE_HOLD_SECONDS at most, then BusyError; ``on_wait`` hears its
        pid once); a dead holder for DEAD_HOLDER_GRACE_SECONDS (see there).
        """
        ensure_private_dir(self.path.parent)
        try:
            fd = open_lock_file(self.path)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc.strerror}") from exc
        started = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                named = holder(self.path)
                pid = named[1] if named is not None else None
                waited = time.monotonic() - started
                if named is not None and _alive(named[1]):
                    if not named[0]:
                        os.close(fd)
                        raise AlreadyRunningError(pid) from None
                    if waited > self._offline_wait:
                        os.close(fd)
                        raise BusyError(
                            f"{self.path} is still held by an offline aac-tokend command (pid "
                            f"{pid}) after {self._offline_wait:.0f} s; let it finish, or "
                            "stop it, then try again"
                        ) from None
                    if on_wait is not None and not told:
                        on_wait(named[1])
                        told = True
                elif waited > DEAD_HOLDER_GRACE_SECONDS:
                    os.close(fd)
                    raise AlreadyRunningError(pid) from None
                time.sleep(0.05)
        old = _legacy_daemon(self.path)
        if old is not None:
            os.close(fd)
            raise AlreadyRunningError(old)
        # Written over in place (never truncated first), so a reader sees a whole first line.
        me = f"{os.getpid()}\n" if record_pid else f"{OFFLINE} {os.getpid()}\n"
        os.pwrite(fd, me.encode(), 0)
        os.ftruncate(fd, len(me))
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
