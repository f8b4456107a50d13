"""The courier: one refresh, carried by a short-lived process that outlives the daemon.

Under rotation there is an instant when the server has rotated the refresh token and the
new pair exists only in the memory of whoever asked. The courier is that "whoever": a child
in its own session, deaf to SIGTERM/SIGINT/SIGHUP, that holds the profile's lock from
before the request until the outcome is durable. A kill of the daemon (or its process
group, or its terminal) cannot reach it; the restarted daemon waits for its lock and reads
what it wrote.

Fork or spawn? Measured on the 2-core CI machine: a fresh interpreter pays ~120 ms of
imports (requests, cryptography) per refresh, against ~3 ms for a loopback refresh in
process, which misses the 1.5x-or-100-ms budget; a fork costs ~2 ms. Forking a threaded
process is safe only if the child touches nothing another thread may hold: the child
opens its own store (from the ``FileStoreSpec`` the courier was built with, under a fresh
crypto lock) and HTTP session, never logs, never touches the daemon's sockets
(it closes every descriptor but its result pipe), and forks happen under ``FORK_LOCK``,
which every in-daemon encryption also takes, so no OpenSSL lock is held across the fork.
macOS frameworks are not fork-safe (proxy lookup through _scproxy crashes after fork),
so there the courier is spawned (spawn.py: ``python -P -m aac_tokend.refresh.spawned``, a spare
started in advance, its job and its store's spec on a pipe on stdin, never in argv or the
environment). The transaction both run is transaction.py's ``carry``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..store.files import CRYPTO_LOCK, FileStoreSpec
from ..store.interface import StateStore
from .endpoint import TokenEndpoint
from .result import CourierKind, CourierResult
from .transaction import LOCK_WAIT_SECONDS, CourierJob, carry

__all__ = [
    "FORK_LOCK",
    "LOCK_WAIT_SECONDS",
    "WAIT_SECONDS",
    "CourierJob",
    "CourierResult",
    "ForkCourier",
    "InProcessRefresher",
    "Refresher",
    "default_refresher",
]

#: Hard upper bound of a courier's life until the answer, enforced by SIGALRM: lock wait 10 s
#: + the journal's save + the request's one deadline (endpoint.TOTAL_DEADLINE_SECONDS, 25 s),
#: with margin. Once the answer is in, the alarm is cancelled: killing the courier then would
#: lose a rotated pair for sure, and the save has its own bound (SAVE_RETRY_SECONDS). The
#: units do not stop couriers at all (systemd KillMode=process, launchd
#: AbandonProcessGroup); this bound keeps that promise cheap, and stays under the time a
#: logout or shutdown gives the user's processes.
MAX_LIFE_SECONDS = 50
#: Descriptors a forked courier closes: the daemon raises its own limit to at most this.
MAX_FD = 65536
#: How long the daemon waits for a courier's answer before leaving it to finish alone.
WAIT_SECONDS = MAX_LIFE_SECONDS + 5

#: Held around every fork and every in-daemon AES-GCM call (see module docstring).
FORK_LOCK = CRYPTO_LOCK


class Refresher(Protocol):
    """Runs one refresh to a durable outcome."""

    def refresh(self, job: CourierJob) -> CourierResult: ...


class InProcessRefresher:
    """The same transaction in the calling thread, on the store it is given (the
    benchmark's baseline; fake clocks)."""

    def __init__(
        self,
        store: StateStore,
        endpoint: TokenEndpoint | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._endpoint = endpoint or TokenEndpoint()
        self._clock = clock

    def refresh(self, job: CourierJob) -> CourierResult:
        return carry(job, self._store, self._endpoint, self._clock)


def become_courier(life: float = MAX_LIFE_SECONDS) -> None:
    """Leave the daemon's session and signals behind; bound our own life (until the answer).

    The bound is SIGALRM's default action: a courier stopped (SIGSTOP) when its alarm comes
    due is ended by the kernel as SIGCONT resumes it, before it runs any code of its own."""
    if os.getsid(0) != os.getpid():  # a spawned courier is already a session leader
        os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    # setitimer, not alarm(): alarm counts whole seconds, and a spawned courier's bound is
    # what is left of its job's (spawn.py).
    signal.setitimer(signal.ITIMER_REAL, life)


def disarm() -> None:
    """The answer is in: from here to the durable write, nothing may stop the courier."""
    signal.setitimer(signal.ITIMER_REAL, 0)


def _read_answer(fd: int, deadline: float) -> bytes:
    chunks = []
    # A selector, not select.select(): with a thousand profiles' token sockets open this
    # pipe's descriptor is above 1023, which select() cannot watch (ValueError).
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if selector.select(min(left, 1.0)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    return b"".join(chunks)


class ForkCourier:
    """Forks a courier per refresh (Linux default; see the module docstring for why)."""

    def __init__(self, spec: FileStoreSpec, clock: Callable[[], float] = time.time) -> None:
        self._spec, self._clock = spec, clock
        # Import in the parent what the child needs, so the child never imports.
        import encodings.idna  # noqa: F401

        import urllib3.exceptions  # noqa: F401

    def refresh(self, job: CourierJob) -> CourierResult:
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:  # out of descriptors: nothing was sent; the engine backs off
            return _not_started(exc)
        try:
            with FORK_LOCK:
                pid = os.fork()
        except OSError as exc:  # out of processes or memory: as above
            os.close(read_fd)
            os.close(write_fd)
            return _not_started(exc)
        if pid == 0:  # pragma: no cover - runs in the child, measured by the tests' outcomes
            try:
                # First of all, let go of everything inherited: above all the daemon's
                # single-owner lock, which a restarted daemon is waiting to take.
                os.closerange(3, write_fd)
                os.closerange(write_fd + 1, MAX_FD)
                become_courier()
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                if devnull > 2:
                    os.close(devnull)
                # A fresh lock: the inherited one was held by this very thread at fork time.
                store = self._spec.open(crypto_lock=threading.Lock())
                result = carry(job, store, TokenEndpoint(), self._clock, on_answer=disarm)
                os.write(write_fd, result.to_bytes())
            finally:
                os._exit(0)
        os.close(write_fd)
        return _finish(pid, read_fd)


def _not_started(exc: OSError) -> CourierResult:
    return CourierResult(CourierKind.NOT_STARTED, f"the courier could not be started: {exc}")


def _finish(pid: int, read_fd: int) -> CourierResult:
    """The forked courier's answer on ``read_fd``, once it has ended (reaped)."""
    try:
        raw = _read_answer(read_fd, time.monotonic() + WAIT_SECONDS)
    finally:
        os.close(read_fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    if not raw:
        return CourierResult(CourierKind.LOST, "the courier ended without an answer")
    return CourierResult.from_bytes(raw)


def default_refresher(spec: FileStoreSpec) -> Refresher:
    """Fork where it is safe (Linux), spawn elsewhere; either opens the store ``spec`` names."""
    if sys.platform.startswith("linux"):
        return ForkCourier(spec)
    from .spawn import SpawnCourier  # lazy: a Linux daemon never spawns a courier

    return SpawnCourier(spec)
