"""A refresher for tests: the real transaction, on any store, against a scripted server.

Re-exported by ``aac_tokend.testing``. No process, no socket, no HTTP: ``carry`` itself
runs in the calling thread, so what the engine absorbs is what a courier would have made
durable. The failures a courier has are on demand: dying once its journal is durable, and
a store that refuses the outcome.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.outcome import RefreshOutcome
from ..core.state import ProfileState
from ..errors import StorageError
from ..store.interface import StateStore
from .result import CourierKind, CourierResult
from .transaction import CourierJob, carry

if TYPE_CHECKING:
    from ..daemon.scheduling import Clock

__all__ = ["FakeRefresher"]


class _DiedError(Exception):
    """A courier's death right after its journal (a SIGKILL, an OOM kill)."""


class _ScriptedEndpoint:
    """The token endpoint as a script: each request gets the next outcome."""

    def __init__(self, outcomes: list[RefreshOutcome], sent: list[str]) -> None:
        self.outcomes, self.sent = outcomes, sent
        self.die = False

    def refresh(
        self, endpoint: str, client_id: str, refresh_token: str, *, now: float
    ) -> RefreshOutcome:
        if self.die:
            raise _DiedError
        self.sent.append(refresh_token)
        if not self.outcomes:
            raise AssertionError("FakeRefresher: a request beyond the scripted outcomes")
        return self.outcomes.pop(0)


class _OutcomeRefused:
    """The store, except that it refuses (StorageError) every save but the journal's."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def save(self, state: ProfileState) -> None:
        raise StorageError(f"cannot write {self._store.where(state.profile)} (test: refused)")

    def save_journal(self, journal: ProfileState) -> None:
        self._store.save_journal(journal)

    def load(self, profile: str) -> ProfileState | None:
        return self._store.load(profile)

    def delete(self, profile: str) -> None:
        self._store.delete(profile)

    def where(self, profile: str) -> str:
        return self._store.where(profile)

    def locked(self, profile: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        return self._store.locked(profile, timeout)

    def lock_is_free(self, profile: str) -> bool:
        return self._store.lock_is_free(profile)

    def profiles(self) -> list[str]:
        return self._store.profiles()

    def listing_stamp(self) -> int:
        return self._store.listing_stamp()

    def seal(self, state: ProfileState) -> bytes:
        return self._store.seal(state)

    def unseal(self, profile: str, blob: bytes) -> ProfileState:
        return self._store.unseal(profile, blob)

    def keep_pending(self, profile: str, blob: bytes) -> None:
        self._store.keep_pending(profile, blob)

    def pending(self, profile: str) -> bytes | None:
        return self._store.pending(profile)

    def clear_pending(self, profile: str) -> None:
        self._store.clear_pending(profile)


class FakeRefresher:
    """A Refresher that runs the real transaction on ``store`` against a scripted server.

    ``script`` queues outcomes (``Refreshed``/``Rejected``/``Transient``), one per request
    that leaves. ``die_after_journal`` makes the next courier die once its journal is
    durable (``LOST``, the journal left on the store); ``refuse_outcome`` makes the store
    refuse the next outcome (``STORAGE_FAILED``, the sealed pair kept as pending).
    ``jobs`` are the jobs it got; ``sent`` the refresh tokens that reached the "server".
    ``before_lock`` and ``after_unlock`` run once, if set, in the next refresh: before the
    courier takes the profile's lock, and after it let go, before the engine absorbs (an
    import or a remove landing in that gap).
    """

    def __init__(self, store: StateStore, clock: Clock) -> None:
        self.store, self.clock = store, clock
        self.jobs: list[CourierJob] = []
        self.sent: list[str] = []
        self.results: list[CourierResult] = []
        self._outcomes: list[RefreshOutcome] = []
        self._die = self._refuse = False
        self.before_lock: Callable[[], object] | None = None
        self.after_unlock: Callable[[], object] | None = None

    def script(self, *outcomes: RefreshOutcome) -> None:
        self._outcomes.extend(outcomes)

    def die_after_journal(self) -> None:
        self._die = True

    def refuse_outcome(self) -> None:
        self._refuse = True

    def refresh(self, job: CourierJob) -> CourierResult:
        self.jobs.append(job)
        endpoint = _ScriptedEndpoint(self._outcomes, self.sent)
        endpoint.die, self._die = self._die, False
        store: StateStore = _OutcomeRefused(self.store) if self._refuse else self.store
        self._refuse = False
        before, self.before_lock = self.before_lock, None
        if before is not None:
            before()
        try:
            result = carry(job, store, endpoint, self.clock.now, retry_for=0)
        except _DiedError:  # the lock goes with the process, the journal stays
            result = CourierResult(CourierKind.LOST, "the courier ended without an answer")
        self.results.append(result)
        after, self.after_unlock = self.after_unlock, None
        if after is not None:
            after()
        return result
