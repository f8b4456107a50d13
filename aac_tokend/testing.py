"""Small honest fakes shared by the tests, the benchmarks and the sandbox.

A clock you can jump, a scheduler you can step, a memory store that passes the same
contract as the file store (store/memory.py), a refresher that runs the real transaction
against a scripted server, a file layer that fails on demand, and a recording alert sink.
None of them patches anything: each is a real implementation of the interface it fakes.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .core.conditions import AlertEvent
from .core.state import ProfileState, TokenKind
from .errors import KeyringUnavailableError
from .refresh.fake import FakeRefresher
from .store.fileio import OsFileLayer
from .store.memory import MemoryStore

__all__ = [
    "FailingFileLayer",
    "FakeClock",
    "FakeRefresher",
    "FakeScheduler",
    "MemorySecrets",
    "MemoryStore",
    "RecordingSink",
    "oauth_state",
]

#: The fixed "now" of tests built on ``oauth_state``.
T0 = 1_800_000_000.0


class FakeClock:
    """Wall and monotonic time that move only when told to. Callable, for the sandbox's ``clock``.

    ``advance`` is time passing (both clocks move); ``step`` and ``set`` move the wall clock
    alone, as NTP or a person setting the date does.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._start = start
        self._mono = 1000.0  # arbitrary, like a real monotonic clock's origin
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def true_now(self) -> float:
        """What a wall clock that never stepped would say (the start plus the time passed)."""
        with self._lock:
            return self._start + self._mono - 1000.0

    def __call__(self) -> float:
        return self.now()

    def advance(self, seconds: float) -> None:
        """Move forward (a jump, a suspend, or just time passing)."""
        with self._lock:
            self._now += seconds
            self._mono += seconds

    def step(self, seconds: float) -> None:
        """Step the wall clock alone, forward or (negative) backward."""
        with self._lock:
            self._now += seconds

    def set(self, when: float) -> None:
        with self._lock:
            self._now = when


@dataclass
class _Job:
    at: float
    fn: Callable[[], object]


class FakeScheduler:
    """Records what would run when; ``run_due(now)`` runs what is due, in time order."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Job] = {}
        self.intervals: dict[str, tuple[float, Callable[[], object]]] = {}
        self.started = False

    def schedule(self, key: str, at: float, fn: Callable[[], object]) -> None:
        self.jobs[key] = _Job(at, fn)

    def cancel(self, key: str) -> None:
        self.jobs.pop(key, None)

    def every(self, key: str, seconds: float, fn: Callable[[], object]) -> None:
        self.intervals[key] = (seconds, fn)

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def next_at(self, key: str) -> float | None:
        job = self.jobs.get(key)
        return job.at if job else None

    def run_due(self, now: float) -> int:
        """Run every job due at ``now`` (jobs they schedule wait for the next call)."""
        due = sorted((job.at, key) for key, job in self.jobs.items() if job.at <= now)
        for _, key in due:
            job = self.jobs.pop(key)
            job.fn()
        return len(due)

    def run_intervals(self) -> None:
        """Run every interval job once (what the real scheduler does every few seconds)."""
        for _, fn in list(self.intervals.values()):
            fn()


@dataclass
class FailingFileLayer(OsFileLayer):
    """The real file layer, except that chosen operations fail with a chosen errno.

    ``failures`` maps an operation (``write``, ``fsync``, ``rename``, ``fsync_dir``,
    ``read``) to the errno it raises; ``remaining`` bounds how many times (None: always).
    """

    failures: dict[str, int] = field(default_factory=dict)
    remaining: int | None = None
    raised: int = 0

    def _maybe_fail(self, op: str, path: Path) -> None:
        code = self.failures.get(op)
        if code is None or self.remaining == 0:
            return
        if self.remaining is not None:
            self.remaining -= 1
        self.raised += 1
        raise OSError(code, f"injected {errno.errorcode.get(code, code)} on {op}", str(path))

    def read(self, path: Path) -> bytes:
        self._maybe_fail("read", path)
        return super().read(path)

    def write_durably(self, path: Path, data: bytes) -> None:
        self._maybe_fail("write", path)
        super().write_durably(path, data)
        self._maybe_fail("fsync", path)

    def rename(self, src: Path, dst: Path) -> None:
        self._maybe_fail("rename", dst)
        super().rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        self._maybe_fail("fsync_dir", path)
        super().fsync_dir(path)


@dataclass
class RecordingSink:
    """An alert sink that remembers every alert it was given."""

    sent: list[tuple[str, AlertEvent, str]] = field(default_factory=list)

    def send(self, profile: str, event: AlertEvent, message: str) -> None:
        self.sent.append((profile, event, message))

    def events(self, profile: str | None = None) -> list[AlertEvent]:
        return [e for p, e, _ in self.sent if profile is None or p == profile]


def oauth_state(**changes: Any) -> ProfileState:
    """A healthy OAuth state for profile 'work': obtained at T0, one hour of access life."""
    base = ProfileState(  # the tokens are placeholders, not secrets
        profile="work",
        kind=TokenKind.OAUTH,
        access_token="access-token-aaaaaaaaaaaa",  # noqa: S106
        refresh_token="refresh-token-rrrrrrrrrrrr",  # noqa: S106
        token_endpoint="https://pingauth.alteryxcloud.com/as/token",  # noqa: S106
        client_id="client",
        api_base_url="https://api.us1.alteryxcloud.com",
        access_obtained_at=T0,
        access_expires_at=T0 + 3600,
        imported_at=T0,
        pair_issued_at=T0,  # a pasted JWT pair: its iat, the import at once
    )
    return replace(base, **changes)


class MemorySecrets:
    """An in-memory keystore.SecretBackend: fails on demand, like a locked keyring."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.fail: set[str] = set()  # of "get", "set", "delete"

    def _check(self, op: str) -> None:
        if op in self.fail:
            raise KeyringUnavailableError(f"the OS keyring refused a {op} (test: locked)")

    def get(self, name: str) -> str | None:
        self._check("get")
        return self.values.get(name)

    def set(self, name: str, value: str) -> None:
        self._check("set")
        self.values[name] = value

    def delete(self, name: str) -> None:
        self._check("delete")
        self.values.pop(name, None)
