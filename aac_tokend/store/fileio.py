"""The file layer under the state store: small enough that a test can swap in failures.

Every durable write goes through ``write_durably`` + ``rename`` + ``fsync_dir``; the
crash campaign replaces this layer with one that fails with ENOSPC or EIO on demand.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import InputError

__all__ = [
    "FileLayer",
    "OsFileLayer",
    "ensure_private_dir",
    "open_lock_file",
    "read_regular_file",
]

#: The largest state file we will read: a state is a few KiB; anything bigger is not ours.
MAX_READ_BYTES = 1024 * 1024


class FileLayer(Protocol):
    """The file operations the store needs, and nothing more."""

    def read(self, path: Path) -> bytes: ...
    def write_durably(self, path: Path, data: bytes) -> None: ...
    def rename(self, src: Path, dst: Path) -> None: ...
    def fsync_dir(self, path: Path) -> None: ...


class OsFileLayer:
    """The real thing: O_NOFOLLOW everywhere, 0600 files, fsync before rename."""

    def read(self, path: Path) -> bytes:
        # O_NONBLOCK: a FIFO in place of a state file would otherwise block the open (and
        # the daemon) until someone writes to it; it is refused below like a directory.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            kind = os.fstat(fd).st_mode
            if stat.S_ISDIR(kind):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            if not stat.S_ISREG(kind):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            return f.read(MAX_READ_BYTES)

    def write_durably(self, path: Path, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) as a 0700 directory we own, or check that it is one.

    A symlink at ``path`` is refused, never followed: the check and the chmod go through a
    descriptor opened with O_NOFOLLOW, so nothing can be swapped in between.
    """
    try:
        # A parent we create (AAC_TOKEND_HOME itself) is private too; existing ones are left as is.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise InputError(f"cannot create directory {path}: {exc.strerror}") from exc
    try:
        kind = os.lstat(path).st_mode
        if stat.S_ISLNK(kind):
            raise InputError(f"{path} is a symlink; remove it or choose another directory")
        if not stat.S_ISDIR(kind):
            raise InputError(f"{path} is not a directory; remove it or choose another directory")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        # Including a directory swapped for a symlink between lstat() and open().
        raise InputError(f"{path} cannot be opened as a directory: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise InputError(
                f"directory {path} is owned by uid {st.st_uid}, not by us ({os.getuid()}); "
                "choose a directory of our own"
            )
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise InputError(f"cannot make directory {path} private: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read_regular_file(
    path: Path, limit: int, *, follow_symlinks: bool = True
) -> tuple[bytes, os.stat_result]:
    """At most ``limit`` bytes of the regular file ``path``, and its fstat; OSError otherwise.

    A FIFO, a directory or a device in the file's place is an OSError (EINVAL, "not a regular
    file"), never a hang: O_NONBLOCK makes the open of a FIFO return at once.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # before fdopen, which has its own word for a dir
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        return file.read(limit), info


def open_lock_file(path: Path) -> int:
    """A read-write fd on the regular lock file ``path`` (created 0600); OSError otherwise.

    A FIFO, a directory or a device planted there is an OSError (EINVAL, "not a regular file;
    move it aside") rather than a later "Illegal seek" from the pid record: O_NONBLOCK keeps the
    open of a FIFO from blocking, and the fstat decides before anything is written.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except IsADirectoryError:  # refused by open itself: the same words as for a FIFO
        raise OSError(errno.EINVAL, "not a regular file; move it aside") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file; move it aside")
    except BaseException:
        os.close(fd)
        raise
    return fd


def flock_within(
    fd: int, timeout: float, poll: float, sleep: Callable[[float], None] = time.sleep
) -> bool:
    """An exclusive flock on ``fd``, tried every ``poll`` s for ``timeout`` s; False if held."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            sleep(poll)
