"""The per-profile token sockets: connect, read ``<token>\\n`` (or nothing), done.

One thread, one selector, non-blocking listeners. Each ready listener is drained with
accept() until EAGAIN, and each connection gets a peer-uid check, one send and a close; the
thread does nothing else, because this loop is what every local tool waits on. A plain
accept-send-close loop like this is as fast as C here, where asyncio reaches about a
quarter of that and a thread per connection about a tenth (see STYLE.md).

The token is never logged: failures are only counted.

Longer than 300 lines: the serving loop, the listener changes it applies between passes
(add, remove, stop: only its thread touches the selector) and the one-send answer are one
thread's state; the socket helpers are already in ``unixsock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aac_tokend.errors import ProfileError
from aac_tokend.rundir import token_socket_name
from aac_tokend.serve.unixsock import adopt_listener, bind_listener, fast_acceptor, peer_uid

__all__ = ["TokenServer", "TokenSource"]

# How long add_profile/remove_profile wait for the serving thread to apply a change. The loop
# wakes within microseconds; only a ping() that hangs (which the watchdog then reports)
# could make this run out.
_APPLY_TIMEOUT = 5.0

# How long stop() waits for the serving thread to finish its current pass: microseconds,
# unless ping() hangs; then the thread cleans up by itself whenever ping() returns.
_STOP_TIMEOUT = 2.0

# Backoff when accept() fails for lack of descriptors (EMFILE/ENFILE): the listener stays
# readable, so without a pause the loop would spin at 100% CPU until a descriptor frees up.
_ACCEPT_ERROR_PAUSE = 0.01

# send() flags: never block the loop (a token is < 8 KiB and always fits an empty socket
# buffer) and never raise SIGPIPE when a reader hung up early.
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)

# If the one non-blocking send() ever comes up short, the rest may block this long at most.
_SEND_TIMEOUT = 0.05

# Input a reader sent (`echo | nc -U`, a client that writes first) is read and dropped before
# close, up to this much: closing a Unix socket with unread input makes the kernel report
# ECONNRESET to the peer, which then loses the token it was sent. Only FIONREAD is asked on
# every connection (about a microsecond); a reader sending more than this is not a reader.
_DRAIN_BYTES = 64 * 1024
_FIONREAD = getattr(termios, "FIONREAD", 0x541B)
_NO_BYTES = bytes(4)  # ioctl's in-out buffer for an int

# Connections answered per listener per pass before the loop looks at the others again:
# readers that reconnect at once could otherwise keep one listener ready forever, starving
# the other profiles, queued changes and ping() (the watchdog ping). Large enough that a
# pass still amortises its epoll_wait over many connections.
_ACCEPTS_PER_PASS = 256


class TokenSource(Protocol):
    """Where the served token comes from."""

    def current_token(self, profile: str) -> bytes | None:
        """Return the token valid right now (checking expiry itself), or None."""
        ...


@dataclass
class _Listener:
    profile: str
    sock: socket.socket
    path: Path
    owned: bool  # we bound it, so we unlink it; an inherited one belongs to systemd
    accept: Callable[[], socket.SocketType] = field(init=False)

    def __post_init__(self) -> None:
        self.accept = fast_acceptor(self.sock)


@dataclass
class _Change:
    profile: str
    listener: _Listener | None  # None: remove the profile
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None  # raised again in the thread that asked for the change


class TokenServer:
    """Serves each profile's current token on ``<runtime_dir>/<profile>.token.sock``.

    ``ping``, if given, runs on the serving thread every ``ping_interval`` seconds: a call
    that proves the thread alive (the daemon pings the service manager's watchdog with it).
    """

    def __init__(
        self,
        runtime_dir: Path,
        source: TokenSource,
        *,
        uid: int | None = None,
        ping: Callable[[], None] | None = None,
        ping_interval: float = 1.0,
    ) -> None:
        self.runtime_dir = runtime_dir
        self._source = source
        self._uid = os.getuid() if uid is None else uid
        self._ping = ping
        self._ping_interval = ping_interval
        self._selector = selectors.DefaultSelector()
        self._listeners: dict[str, _Listener] = {}
        self._changes: deque[_Change] = deque()
        self._lock = threading.Lock()  # guards _running/_closed against add/start/stop races
        self._running = False
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        #: connections answered with a token
        self.served = 0
        #: connections closed unanswered because the peer had another uid
        self.refused = 0
        #: connections closed unanswered because there was no valid token
        self.empty = 0
        #: failures in the source, ping, accept or send (never fatal to the loop)
        self.errors = 0
        #: ping() calls made
        self.pings = 0

    def socket_path(self, profile: str) -> Path:
        """Return the token socket path of ``profile``."""
        return self.runtime_dir / token_socket_name(profile)

    def profiles(self) -> list[str]:
        """Return the profiles currently served."""
        return sorted(self._listeners.copy())  # copy(): atomic while the loop mutates it

    def add_profile(self, profile: str, listener: socket.socket | None = None) -> Path:
        """Serve ``profile``: bind its socket, or adopt an inherited ``listener``.

        A given ``listener`` is owned by the server from here on: closed on failure too.
        """
        path = self.socket_path(profile)
        try:
            if profile in self._listeners:
                raise ProfileError(f"profile {profile} already has a token socket; remove it first")
            if listener is None:
                entry = _Listener(profile, bind_listener(path), path, owned=True)
            else:
                entry = _Listener(profile, adopt_listener(listener), path, owned=False)
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        try:
            self._submit(_Change(profile, entry))
        except RuntimeError:
            self._discard(entry)  # stopped: the change was never queued
            raise
        return path

    def remove_profile(self, profile: str) -> None:
        """Stop serving ``profile``: close its socket and unlink the path (if we bound it)."""
        self._submit(_Change(profile, None))

    def start(self) -> None:
        """Start the serving thread."""
        with self._lock:
            if self._running or self._closed:
                raise RuntimeError("TokenServer can be started once")
            self._running = True
            self._thread = threading.Thread(target=self._run, name="token-server", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop serving (within about a second), closing and unlinking every socket."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake()
        if thread is None:
            self._close_all()  # never started: nothing else will
        elif thread is not threading.current_thread():
            # The thread closes everything on its way out, even after a hung ping()
            # makes this wait give up.
            thread.join(_STOP_TIMEOUT)

    # -- changes from other threads ----------------------------------------------------------

    def _submit(self, change: _Change) -> None:
        with self._lock:
            if self._closed or self._stopping:
                raise RuntimeError("TokenServer is stopped")
            if not self._running or threading.current_thread() is self._thread:
                # No serving thread yet, or we are it (a source or ping that changes the
                # profiles): the selector is ours alone, and waiting would deadlock.
                self._apply(change)
            else:
                self._changes.append(change)
                self._wake()
        if not change.done.wait(_APPLY_TIMEOUT):
            raise TimeoutError("the token server thread did not apply the change in time")
        if change.error is not None:
            raise change.error

    def _wake(self) -> None:
        # Full means a wake-up is pending anyway; closed means we are shutting down.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _apply_pending(self) -> None:
        while True:
            try:
                self._wake_r.recv(4096)
            except (BlockingIOError, OSError):
                break
        while self._changes:
            self._apply(self._changes.popleft())

    def _apply(self, change: _Change) -> None:
        """Apply one change; a failure goes back to the caller, never kills the loop."""
        try:
            if change.listener is not None and change.profile in self._listeners:
                change.listener.sock.close()  # its path is the served one's: never unlink it
                change.error = ProfileError(
                    f"profile {change.profile} already has a token socket; remove it first"
                )
            elif change.listener is not None:
                self._selector.register(change.listener.sock, selectors.EVENT_READ, change.listener)
                self._listeners[change.profile] = change.listener
            else:
                entry = self._listeners.pop(change.profile, None)
                if entry is not None:
                    self._selector.unregister(entry.sock)
                    self._discard(entry)
        except Exception as exc:
            change.error = exc
            if change.listener is not None:
                self._discard(change.listener)
        finally:
            change.done.set()

    @staticmethod
    def _discard(entry: _Listener) -> None:
        # Unlink first so new readers get ENOENT ("not served") rather than a refusal.
        try:
            if entry.owned:
                entry.path.unlink(missing_ok=True)
        finally:
            entry.sock.close()

    def _close_all(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for entry in self._listeners.values():
            self._discard(entry)
        self._listeners.clear()
        while self._changes:  # changes queued during shutdown: release their sockets too
            change = self._changes.popleft()
            if change.listener is not None:
                self._discard(change.listener)
            change.done.set()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the serving thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close_all()

    def _loop(self) -> None:
        select = self._selector.select
        monotonic = time.monotonic
        interval = self._ping_interval
        next_ping = monotonic() + interval if self._ping is not None else None
        timeout: float | None = None
        while not self._stopping:
            if next_ping is not None:
                timeout = max(0.0, next_ping - monotonic())
            for key, _ in select(timeout):
                if key.data is None:
                    self._apply_pending()
                else:
                    self._serve(key.data)
            if next_ping is not None and monotonic() >= next_ping:
                self._call_ping()
                next_ping = monotonic() + interval

    def _call_ping(self) -> None:
        assert self._ping is not None
        self.pings += 1
        try:
            self._ping()
        except Exception:
            self.errors += 1

    def _serve(self, entry: _Listener) -> None:
        """Answer the connections waiting on ``entry``'s listener, up to a pass's worth."""
        # The hot path: names are bound to locals, since at a few microseconds per
        # connection even attribute lookups show in the reads per second. Counters are
        # bumped before close(), so a reader that sees EOF also sees the count.
        accept = entry.accept
        current_token = self._source.current_token
        profile = entry.profile
        uid = self._uid
        ioctl = fcntl.ioctl
        for _ in range(_ACCEPTS_PER_PASS):
            try:
                conn = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if entry.sock.fileno() < 0:
                    return  # removed earlier in this same batch of events
                self.errors += 1  # EMFILE and friends: let descriptors free up, then retry
                time.sleep(_ACCEPT_ERROR_PAUSE)
                return
            try:
                if peer_uid(conn) != uid:
                    self.refused += 1
                    continue
                token = current_token(profile)
                if not token:
                    self.empty += 1
                    continue
                data = token + b"\n"
                sent = conn.send(data, _SEND_FLAGS)
                if sent < len(data):
                    conn.settimeout(_SEND_TIMEOUT)
                    conn.sendall(data[sent:])
                self.served += 1
            except Exception:
                self.errors += 1  # source failure or a reader that hung up: it reads ""
            finally:
                try:
                    if ioctl(conn.fileno(), _FIONREAD, _NO_BYTES) != _NO_BYTES:
                        _drain(conn)
                except OSError:
                    pass
                conn.close()


def _drain(conn: socket.SocketType) -> None:
    """Read and drop what ``conn`` has pending, without blocking, up to _DRAIN_BYTES."""
    left = _DRAIN_BYTES
    while left > 0:
        chunk = conn.recv(min(left, 16 * 1024), socket.MSG_DONTWAIT)  # EAGAIN ends it
        if not chunk:
            return
        left -= len(chunk)
