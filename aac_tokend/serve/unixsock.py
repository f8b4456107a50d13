"""Unix-socket plumbing shared by the token and control servers.

Everything here is a thin, checked wrapper over the socket API: private directories,
listeners that never steal a live socket or follow a planted symlink, and the peer's uid
read from the kernel (the only credential we trust on a local socket).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from aac_tokend.errors import AlreadyRunningError, InputError
from aac_tokend.store.fileio import ensure_private_dir

__all__ = [
    "LISTEN_BACKLOG",
    "UNIX_PATH_MAX",
    "adopt_listener",
    "bind_listener",
    "check_path_length",
    "ensure_private_dir",
    "fast_acceptor",
    "peer_uid",
]

# sizeof(sockaddr_un.sun_path): 104 on the BSDs and macOS, 108 on Linux. One byte goes to the
# terminating NUL, so the usable length is one less.
UNIX_PATH_MAX = 104 if sys.platform == "darwin" or sys.platform.startswith("freebsd") else 108

# Bursts of readers (a build spawning one tool per core, each asking for the token) must wait
# in the queue rather than fail: a non-blocking connect() on a Unix socket whose backlog is
# full fails at once with EAGAIN. The kernel clamps this to net.core.somaxconn (4096 on
# Linux >= 5.4, 128 by default on macOS), so a large value costs nothing.
LISTEN_BACKLOG = 512

# How long the stale-socket probe waits for a live owner that is too busy to accept at once;
# a connect to a local socket either succeeds or is refused within microseconds otherwise.
_PROBE_TIMEOUT = 1.0

_UCRED = struct.Struct("=iII")  # Linux struct ucred: pid_t pid; uid_t uid; gid_t gid
_XUCRED_HEAD = struct.Struct("=II")  # BSD struct xucred: u_int cr_version; uid_t cr_uid; ...
_XUCRED_SIZE = 76  # 4 (version) + 4 (uid) + 2 (ngroups) + 2 (pad) + 16 * 4 (groups)
_SOL_LOCAL = 0  # <sys/un.h>; not exposed by the socket module
_LOCAL_PEERCRED = 1
_XUCRED_VERSION = 0


def check_path_length(path: Path) -> None:
    """Raise InputError when ``path`` is too long to be a Unix socket address."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX - 1:
        raise InputError(
            f"socket path {path} is {size} bytes, over the {UNIX_PATH_MAX - 1}-byte limit "
            "of Unix sockets; set AAC_TOKEND_HOME to a shorter directory"
        )


def _clear_stale(path: Path) -> None:
    """Unlink a dead socket at ``path``; refuse a live one or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InputError(f"{path} exists and is not a socket; remove it and start again")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a crashed daemon left it behind
        return
    except (TimeoutError, BlockingIOError) as exc:
        raise AlreadyRunningError(None) from exc  # a live owner whose backlog is full
    except OSError as exc:
        raise InputError(f"cannot probe socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    raise AlreadyRunningError(None)


_FCHMOD_BEFORE_BIND = sys.platform.startswith("linux")
_UMASK_LOCK = threading.Lock()


def bind_listener(path: Path) -> socket.socket:
    """Bind a non-blocking, 0600 listening Unix socket at ``path``.

    A stale socket left by a dead daemon is replaced; a live one raises AlreadyRunningError;
    anything else at ``path`` (file, directory, symlink) raises InputError and is left alone.
    """
    check_path_length(path)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The socket must never exist with a wider mode, which a chmod after bind() alone
        # cannot promise. Linux creates it with the socket inode's mode (less the umask), so
        # an fchmod before bind() does it without touching the umask, which is process-wide:
        # a swap would hit every thread's mkdir and open (and a courier forked meanwhile).
        # Elsewhere the swap stays, under a lock, and the runtime directory is 0700 anyway.
        if _FCHMOD_BEFORE_BIND:
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(os.fspath(path))
        else:
            with _UMASK_LOCK:
                old_umask = os.umask(0o177)
                try:
                    sock.bind(os.fspath(path))
                finally:
                    os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AlreadyRunningError(None) from exc  # another process bound it just now
        raise InputError(f"cannot listen on {path}: {exc.strerror}") from exc
    return sock


def adopt_listener(sock: socket.socket) -> socket.socket:
    """Prepare a listener handed over by socket activation (systemd) for our selector loop."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise InputError("the inherited socket is not a Unix stream socket; fix the unit file")
    sock.setblocking(False)
    return sock


def fast_acceptor(listener: socket.socket) -> Callable[[], socket.SocketType]:
    """Return a function that accepts one connection on ``listener`` as a bare socket.

    socket.accept() spends about 2 us per call converting family and type to enums and
    running the Python-level constructor: more than the accept4() itself, and a third of
    what a token read costs the server. The bare C socket type has everything a token
    answer needs (getsockopt, send, close). Raises like accept() (BlockingIOError at EAGAIN).
    """
    raw = getattr(listener, "_accept", None)  # private, but stable since Python 3.0
    if raw is None:
        return lambda: listener.accept()[0]
    family, kind, make = int(listener.family), int(listener.type), socket.SocketType

    def accept() -> socket.SocketType:
        fd, _ = raw()
        try:
            return make(family, kind, 0, fd)
        except BaseException:
            os.close(fd)
            raise

    return accept


if sys.platform.startswith("linux"):

    def peer_uid(conn: socket.SocketType) -> int:
        """Return the uid of the process at the other end of ``conn`` (SO_PEERCRED)."""
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(raw)[1])

elif sys.platform == "darwin" or sys.platform.startswith("freebsd"):

    def peer_uid(conn: socket.SocketType) -> int:
        """Return the uid of the process at the other end of ``conn`` (LOCAL_PEERCRED)."""
        raw = conn.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE)
        version, uid = _XUCRED_HEAD.unpack_from(raw)
        if version != _XUCRED_VERSION:
            raise OSError(errno.EPROTO, f"unknown struct xucred version {version}")
        return int(uid)

else:

    def peer_uid(conn: socket.SocketType) -> int:
        """Peer credentials are not implemented on this platform: always raises OSError."""
        raise OSError(errno.ENOTSUP, f"peer credentials are not supported on {sys.platform}")
