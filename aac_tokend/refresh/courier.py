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
builds its own store and HTTP session, never logs, never touches the daemon's sockets
(it closes every descriptor but its result pipe), and forks happen under ``FORK_LOCK``,
which every in-daemon encryption also takes, so no OpenSSL lock is held across the fork.
macOS frameworks are not fork-safe (proxy lookup through _scproxy crashes after fork),
so there the courier is spawned (spawn.py: ``python -m aac_tokend.refresh.spawn``, a spare
started in advance, the job on a pipe on stdin, never in argv or the environment).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Protocol

from ..core.outcome import Refreshed, Rejected
from ..core.policy import apply_outcome, begin_attempt, recover_interrupted
from ..core.state import ProfileState, TokenKind
from ..errors import BusyError, StateCorruptError, StorageError
from ..store.files import CRYPTO_LOCK, FileStore
from ..store.pending import PendingStore
from .endpoint import TokenEndpoint

__all__ = [
    "FORK_LOCK",
    "CourierJob",
    "CourierResult",
    "ForkCourier",
    "InProcessRefresher",
    "Refresher",
    "carry",
    "default_refresher",
]

#: Waiting for a profile lock held by an earlier courier: that courier's own bound.
LOCK_WAIT_SECONDS = 10.0
#: Saving the outcome is retried this long (a full disk may get space back) before the
#: encrypted new state is handed to the daemon to hold and keep retrying.
SAVE_RETRY_SECONDS = 5.0
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


@dataclass(frozen=True)
class CourierJob:
    """What a courier needs: the profile, the refresh token the daemon believes current.

    ``lifetime_days`` is config.toml's refresh_lifetime_days for the profile: the verdict on
    an invalid_grant needs it when the state has no lifetime of its own.
    """

    profile: str
    refresh_token: str
    state_dir: str
    key: bytes
    # The optional fields are keyword-only: two of them, of different kinds, once took
    # each other's place in a positional call.
    _: KW_ONLY
    #: Where an outcome the state disk refuses is kept (pending.py); "" for nowhere.
    pending_dir: str = ""
    #: The configured refresh lifetime, for the verdict when the state has none.
    lifetime_days: float | None = None

    def to_bytes(self) -> bytes:
        data = {
            "profile": self.profile,
            "refresh_token": self.refresh_token,
            "state_dir": self.state_dir,
            "key": base64.b64encode(self.key).decode(),
            "pending_dir": self.pending_dir,
            "lifetime_days": self.lifetime_days,
        }
        return json.dumps(data).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CourierJob:
        data = json.loads(raw)
        days = data.get("lifetime_days")
        return cls(
            data["profile"],
            data["refresh_token"],
            data["state_dir"],
            base64.b64decode(data["key"]),
            pending_dir=data.get("pending_dir", ""),
            lifetime_days=float(days) if days is not None else None,
        )

    def pending(self) -> PendingStore | None:
        """The job's pending store, if it has one."""
        return PendingStore(Path(self.pending_dir)) if self.pending_dir else None

    def __repr__(self) -> str:
        return f"CourierJob(profile={self.profile!r})"


@dataclass(frozen=True)
class CourierResult:
    """How a courier's errand ended. ``unsaved`` is an encrypted state it could not save."""

    # refreshed | rejected | transient | state_changed | busy | corrupt | storage_failed | lost
    kind: str
    detail: str = ""
    unsaved: bytes | None = None

    def to_bytes(self) -> bytes:
        blob = base64.b64encode(self.unsaved).decode() if self.unsaved else None
        return json.dumps({"kind": self.kind, "detail": self.detail, "unsaved": blob}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CourierResult:
        try:
            data = json.loads(raw)
            blob = data.get("unsaved")
            return cls(
                str(data["kind"]), str(data["detail"]), base64.b64decode(blob) if blob else None
            )
        except (ValueError, KeyError, TypeError):
            return cls("lost", "courier ended without an answer")


def _persist(
    store: FileStore, state: ProfileState, kind: str, pending: PendingStore | None
) -> CourierResult:
    deadline = time.monotonic() + SAVE_RETRY_SECONDS
    delay = 0.25
    while True:
        try:
            store.save(state)
            return CourierResult(kind)
        except StorageError as exc:
            if time.monotonic() + delay > deadline:
                blob = store.encrypt(state)
                if pending is not None:
                    # Before the daemon hears of it: a daemon killed before it could keep
                    # the pair itself must not take the only copy with it.
                    with contextlib.suppress(StorageError):  # the daemon tries again
                        pending.put(state.profile, blob)
                return CourierResult("storage_failed", str(exc), blob)
            time.sleep(delay)
            delay *= 2


def _unjournal(store: FileStore, before: ProfileState) -> None:
    """Take back a journal whose save failed: nothing was sent, so nothing is in flight.

    The save may have failed after its rename (the directory's fsync), leaving the journal
    on disk; recovery would then mark a token we never sent as ambiguous and call a later
    theft of it our own lost answer. The state before the journal goes back as it was (its
    generation too: the daemon sees that nothing durable happened, and backs off). Best
    effort: if this save fails too, we cannot tell what the disk holds, and the journal (an
    ambiguity we cannot rule out) stays.
    """
    with contextlib.suppress(StorageError):
        store.save(before)


def carry(
    job: CourierJob,
    store: FileStore,
    endpoint: TokenEndpoint,
    clock: Callable[[], float],
    *,
    trace: Callable[[str], None] | None = None,
    on_answer: Callable[[], None] | None = None,
    pending: PendingStore | None = None,
) -> CourierResult:
    """The refresh transaction: lock, journal, request, durable outcome.

    ``trace`` (tests and the crash campaign only) hears each step as it ends: "journaled"
    (the request is about to leave), "answered" (the outcome is known, only in memory) and
    "persisted" (the outcome is durable, or handed over unsaved and kept in ``pending``).
    ``on_answer`` runs as soon as the request has ended, before anything else: a courier
    cancels its alarm there.
    """
    step = trace or (lambda _name: None)
    try:
        with store.locked(job.profile, LOCK_WAIT_SECONDS):
            state = store.load(job.profile)
            if (
                state is None
                or state.kind is not TokenKind.OAUTH
                or state.rejection is not None
                or state.refresh_token != job.refresh_token
                or not state.token_endpoint
                or not state.client_id
            ):
                return CourierResult("state_changed", "the state moved on; nothing was sent")
            endpoint_url, client_id = state.token_endpoint, state.client_id
            if state.in_flight is not None:
                state = recover_interrupted(state, clock())
            journal = begin_attempt(state, clock())
            try:
                store.save(journal)  # durable before the request leaves
            except StorageError:
                _unjournal(store, state)
                raise
            step("journaled")
            outcome = endpoint.refresh(endpoint_url, client_id, job.refresh_token, now=clock())
            if on_answer is not None:
                on_answer()
            step("answered")
            after = apply_outcome(journal, outcome, clock(), job.lifetime_days)
            kind = (
                "refreshed"
                if isinstance(outcome, Refreshed)
                else "rejected"
                if isinstance(outcome, Rejected)
                else "transient"
            )
            result = _persist(store, after, kind, pending)
            step("persisted")
            return result
    except BusyError as exc:
        return CourierResult("busy", str(exc))
    except StateCorruptError as exc:
        return CourierResult("corrupt", str(exc))
    except StorageError as exc:
        return CourierResult("storage_failed", str(exc))


class Refresher(Protocol):
    """Runs one refresh to a durable outcome."""

    def refresh(self, job: CourierJob) -> CourierResult: ...


class InProcessRefresher:
    """The same transaction in the calling thread (the benchmark's baseline; fake clocks)."""

    def __init__(
        self, endpoint: TokenEndpoint | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._endpoint = endpoint or TokenEndpoint()
        self._clock = clock

    def refresh(self, job: CourierJob) -> CourierResult:
        store = FileStore(Path(job.state_dir), job.key)
        return carry(job, store, self._endpoint, self._clock, pending=job.pending())


def _become_courier(life: int = MAX_LIFE_SECONDS) -> None:
    """Leave the daemon's session and signals behind; bound our own life (until the answer)."""
    if os.getsid(0) != os.getpid():  # a spawned courier is already a session leader
        os.setsid()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(life)


def _disarm() -> None:
    """The answer is in: from here to the durable write, nothing may stop the courier."""
    signal.alarm(0)


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

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # Import in the parent what the child needs, so the child never imports.
        import encodings.idna  # noqa: F401

        import urllib3.exceptions  # noqa: F401

    def refresh(self, job: CourierJob) -> CourierResult:
        read_fd, write_fd = os.pipe()
        with FORK_LOCK:
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured by the tests' outcomes
            try:
                # First of all, let go of everything inherited: above all the daemon's
                # single-owner lock, which a restarted daemon is waiting to take.
                os.closerange(3, write_fd)
                os.closerange(write_fd + 1, MAX_FD)
                _become_courier()
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                if devnull > 2:
                    os.close(devnull)
                # A fresh lock: the inherited one was held by this very thread at fork time.
                store = FileStore(Path(job.state_dir), job.key, crypto_lock=threading.Lock())
                result = carry(
                    job,
                    store,
                    TokenEndpoint(),
                    self._clock,
                    on_answer=_disarm,
                    pending=job.pending(),
                )
                os.write(write_fd, result.to_bytes())
            finally:
                os._exit(0)
        os.close(write_fd)
        return _finish(pid, read_fd)


def _finish(pid: int, read_fd: int, proc: subprocess.Popen[bytes] | None = None) -> CourierResult:
    try:
        raw = _read_answer(read_fd, time.monotonic() + WAIT_SECONDS)
    finally:
        if proc is None:
            os.close(read_fd)
    if proc is not None:
        proc.wait(timeout=WAIT_SECONDS)
    else:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if not raw:
        return CourierResult("lost", "the courier ended without an answer")
    return CourierResult.from_bytes(raw)


def default_refresher() -> Refresher:
    """Fork where it is safe (Linux), spawn elsewhere."""
    if sys.platform.startswith("linux"):
        return ForkCourier()
    from .spawn import SpawnCourier  # lazy: a Linux daemon never spawns a courier

    return SpawnCourier()
