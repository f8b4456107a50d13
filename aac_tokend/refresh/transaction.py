"""The refresh transaction: lock, journal, request, durable outcome, on any StateStore.

Under rotation the server's answer is the only copy of the new pair until it is stored, and
a request that may have left must never be sent again. So, under the profile's lock: the
journal (``in_flight``) is durable before the request leaves, and the outcome is durable
before the lock is let go, or handed back sealed and kept as pending. Whoever runs it (a
forked or spawned courier, or the calling thread) gives it the store and the endpoint; it
imports neither requests nor a store of its own, so a spawned courier pays only for those.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Protocol

from ..core.outcome import Refreshed, RefreshOutcome, Rejected
from ..core.policy import apply_outcome, begin_attempt, recover_interrupted
from ..core.state import ProfileState, TokenKind
from ..errors import BusyError, StateCorruptError, StorageError
from ..store.interface import StateStore
from .result import CourierKind, CourierResult

__all__ = [
    "LOCK_WAIT_SECONDS",
    "SAVE_RETRY_SECONDS",
    "CourierJob",
    "Endpoint",
    "carry",
    "kind_of",
    "still_current",
]

#: Waiting for a profile lock held by an earlier courier: that courier's own bound.
LOCK_WAIT_SECONDS = 10.0
#: Saving the outcome is retried this long (a full disk may get space back) before the
#: sealed new state is handed to the daemon to hold and keep retrying.
SAVE_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class CourierJob:
    """What one refresh needs: the profile and the refresh token the daemon believes current.

    ``lifetime_days`` is config.toml's refresh_lifetime_days for the profile: the verdict on
    an invalid_grant needs it when the state has no lifetime of its own. ``generation`` is
    that of the state the job was built from: the courier sends only if the stored state
    still has it (None: the token alone decides). Where the state is kept is not the job's
    business: the refresher was built with its store.
    """

    profile: str
    refresh_token: str
    # Keyword-only: an optional value once took another's place in a positional call.
    _: KW_ONLY
    lifetime_days: float | None = None
    generation: int | None = None

    def __repr__(self) -> str:
        return f"CourierJob(profile={self.profile!r})"


class Endpoint(Protocol):
    """The token endpoint, as the transaction uses it (refresh/endpoint.py's TokenEndpoint)."""

    def refresh(
        self, endpoint: str, client_id: str, refresh_token: str, *, now: float
    ) -> RefreshOutcome: ...


def _persist(
    store: StateStore, state: ProfileState, kind: CourierKind, retry_for: float
) -> CourierResult:
    deadline = time.monotonic() + retry_for
    delay = 0.25
    while True:
        try:
            store.save(state)
            return CourierResult(kind)
        except StorageError as exc:
            if time.monotonic() + delay > deadline:
                blob = store.seal(state)
                # Before the daemon hears of it: a daemon killed before it could keep the
                # pair itself must not take the only copy with it.
                with contextlib.suppress(StorageError):  # the daemon tries again
                    store.keep_pending(state.profile, blob)
                return CourierResult(CourierKind.STORAGE_FAILED, str(exc), blob)
            time.sleep(delay)
            delay *= 2


def _unjournal(store: StateStore, before: ProfileState) -> None:
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


def still_current(state: ProfileState | None, job: CourierJob) -> bool:
    """True if ``state`` is still the one ``job`` was made for, and a refresh of it may be
    sent: any other answer means the state moved on, and nothing may be sent. Shared by the
    single-host transaction and the fleet's fenced one (fleet/fenced.py)."""
    return (
        state is not None
        and state.kind is TokenKind.OAUTH
        and state.rejection is None
        and state.refresh_token == job.refresh_token
        # A fence beside the token: a courier that woke late (a spare stopped with its job,
        # given up on) finds the same token under a journal a retry wrote since, and must
        # not send it again (the server would revoke the family).
        and (job.generation is None or state.generation == job.generation)
        and bool(state.token_endpoint)
        and bool(state.client_id)
    )


def kind_of(outcome: RefreshOutcome) -> CourierKind:
    """The courier's kind of a request's outcome."""
    if isinstance(outcome, Refreshed):
        return CourierKind.REFRESHED
    if isinstance(outcome, Rejected):
        return CourierKind.REJECTED
    return CourierKind.TRANSIENT


def carry(
    job: CourierJob,
    store: StateStore,
    endpoint: Endpoint,
    clock: Callable[[], float],
    *,
    trace: Callable[[str], None] | None = None,
    on_answer: Callable[[], None] | None = None,
    retry_for: float = SAVE_RETRY_SECONDS,
) -> CourierResult:
    """The refresh transaction: lock, journal, request, durable outcome.

    ``trace`` (tests and the crash campaign only) hears each step as it ends: "journaled"
    (the request is about to leave), "answered" (the outcome is known, only in memory) and
    "persisted" (the outcome is durable, or handed over sealed and kept as pending).
    ``on_answer`` runs as soon as the request has ended, before anything else: a courier
    cancels its alarm there. ``retry_for`` bounds the retries of the outcome's save (tests
    of a refused save pass 0, not to wait out a real disk's bound).
    """
    step = trace or (lambda _name: None)
    try:
        with store.locked(job.profile, LOCK_WAIT_SECONDS):
            state = store.load(job.profile)
            if state is None or not still_current(state, job):
                return CourierResult(
                    CourierKind.STATE_CHANGED, "the state moved on; nothing was sent"
                )
            assert state.token_endpoint and state.client_id  # still_current
            endpoint_url, client_id = state.token_endpoint, state.client_id
            if state.in_flight is not None:
                state = recover_interrupted(state, clock())
            journal = begin_attempt(state, clock())
            try:
                store.save_journal(journal)  # durable before the request leaves
            except StorageError:
                _unjournal(store, state)
                raise
            step("journaled")
            outcome = endpoint.refresh(endpoint_url, client_id, job.refresh_token, now=clock())
            if on_answer is not None:
                on_answer()
            step("answered")
            after = apply_outcome(journal, outcome, clock(), job.lifetime_days)
            result = _persist(store, after, kind_of(outcome), retry_for)
            step("persisted")
            return result
    except BusyError as exc:
        return CourierResult(CourierKind.BUSY, str(exc))
    except StateCorruptError as exc:
        return CourierResult(CourierKind.CORRUPT, str(exc))
    except StorageError as exc:
        return CourierResult(CourierKind.STORAGE_FAILED, str(exc))
