"""The fenced refresh: a token is spent only with etcd's consent, checked after the fact.

Issue #13 items 4-6, in this order, under the profile's local lock (which orders this
host's writers; across hosts etcd's compares order them):

1. read the chain; the same checks as ``refresh.transaction.carry``. An unresolved journal
   entry of somebody else's is waited out for W from when this host first saw it, then
   resolved as today's ambiguous attempt (a compare on the entry's revision only).
2. (a) open the connection to the token endpoint (DNS, connect, TLS): a failure here sent
   nothing, and is recorded as an unreached attempt.
3. (b) commit the journal entry: one txn comparing the owner key's lease with ours and the
   chain's revision with the one read. D starts before it is sent.
4. (c) just before writing: the lease is alive (an etcd round trip) and less than D has
   passed on the suspend-counting clock; else the entry is cancelled, nothing sent.
5. (d) write the request; its answer is the only copy of the new pair.
6. commit the outcome against the entry's revision, never the lease: exactly one of it and
   an heir's resolution wins. Lost replies are settled by reading for the attempt id; an
   etcd out of reach keeps the outcome pending locally with the entry's revision.

Over 300 lines for one concern: the steps of one transaction, each with the failures it
must tell apart (sent or not, applied or not), and the narrow interfaces it uses of the
chains, the store and etcd (so that tests can give it an in-memory chain store). Split, a
step's failure handling would sit away from the order it guards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..core.outcome import Transient
from ..core.policy import apply_outcome, begin_attempt
from ..core.state import ProfileState
from ..errors import (
    AacTokendError,
    BusyError,
    EtcdOutcomeUnknownError,
    EtcdUnavailableError,
    EtcdUnsentError,
    FenceLostError,
    RollbackError,
    StateCorruptError,
    StorageError,
)
from ..refresh.result import CourierKind, CourierResult
from ..refresh.transaction import (
    LOCK_WAIT_SECONDS,
    SAVE_RETRY_SECONDS,
    CourierJob,
    kind_of,
    still_current,
)
from .chains import SeenKind
from .connection import PreparedRequest
from .etcd_types import LeaseInfo
from .records import (
    Attempt,
    ChainRecord,
    cancelled,
    journal_of,
    new_attempt_id,
    outcome_of,
    resolved_by_heir,
    with_state,
)
from .settings import FleetSettings

__all__ = ["FleetJob", "carry_fenced"]


@dataclass(frozen=True, kw_only=True)
class FleetJob(CourierJob):
    """A refresh of a fleet profile. ``inherited_seen_at``: the suspend-counting time when
    this host first saw the unresolved journal entry ``inherited_attempt`` of the chain
    (ChainFollower.first_seen); an entry found that is not that one (or none was seen) is
    waited for (BUSY): W counts from the sighting of the very entry it resolves."""

    inherited_seen_at: float | None = None
    inherited_attempt: str | None = None

    def __repr__(self) -> str:
        return f"FleetJob(profile={self.profile!r})"


# -- what carry_fenced needs of fleet/chains.py and fleet/store.py (engineer A) ------------
class VersionedLike(Protocol):
    """chains.Versioned: a record and the chain key's mod_revision it was read at."""

    @property
    def record(self) -> ChainRecord: ...
    @property
    def revision(self) -> int: ...


class AttemptSeenLike(Protocol):
    """chains.AttemptSeen: what a read after an unknown outcome found of an attempt."""

    @property
    def kind(self) -> SeenKind: ...
    @property
    def versioned(self) -> VersionedLike | None: ...


class ChainTxns(Protocol):
    """The part of chains.FleetChains the fenced courier uses."""

    def read(self, profile: str) -> VersionedLike | None: ...
    def commit_journal(
        self, profile: str, entry: ChainRecord, *, read_revision: int, lease_id: int
    ) -> int: ...
    def commit_resolution(
        self, profile: str, record: ChainRecord, *, entry_revision: int
    ) -> int | None: ...
    def find_attempt(self, profile: str, attempt_id: str) -> AttemptSeenLike: ...


class CourierStore(Protocol):
    """The part of store.FleetStore the fenced courier uses."""

    def locked(self, profile: str, timeout: float) -> contextlib.AbstractContextManager[None]: ...
    def seal_outcome(self, record: ChainRecord, entry_revision: int) -> bytes: ...
    def keep_pending(self, profile: str, blob: bytes) -> None: ...


class LeaseTtl(Protocol):
    """EtcdClient.time_to_live: the lease's TTL left (None: gone)."""

    def time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo | None: ...


# -- the transaction -----------------------------------------------------------------------
class _EndedError(Exception):
    """Ends the transaction early with its result (nothing was sent, or it is settled)."""

    def __init__(self, result: CourierResult) -> None:
        super().__init__(result.kind.value)
        self.result = result


def _done(kind: CourierKind, detail: str) -> _EndedError:
    return _EndedError(CourierResult(kind, detail))


def carry_fenced(
    job: FleetJob,
    store: CourierStore,
    chains: ChainTxns,
    client: LeaseTtl,
    prepare: Callable[[str], PreparedRequest | Transient],
    settings: FleetSettings,
    host: str,
    lease_id: int,
    boottime: Callable[[], float],
    clock: Callable[[], float],
    *,
    trace: Callable[[str], None] | None = None,
    on_answer: Callable[[], None] | None = None,
    retry_for: float = SAVE_RETRY_SECONDS,
    life_ends: float | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> CourierResult:
    """One fenced refresh of ``job.profile`` (module docstring); never raises for etcd,
    the network or the disk. ``trace`` hears "journaled", "answered" and "persisted";
    ``on_answer`` runs as soon as the request has ended (a courier disarms its alarm)."""
    step = trace or (lambda _name: None)
    try:
        with store.locked(job.profile, LOCK_WAIT_SECONDS):
            versioned = _checked_read(job, chains, settings, boottime, clock)
            state = versioned.record.state
            assert state.token_endpoint and state.client_id  # _checked_read
            request = prepare(state.token_endpoint)
            if isinstance(request, Transient):  # (a) failed: nothing was written
                return _record_unreached(job, chains, versioned, request, clock())
            with _closing(request):
                entry, rev, t0 = _journal(job, chains, versioned, host, lease_id, settings,
                                          boottime, clock)  # fmt: skip
                step("journaled")
                _confirm_fence(job, chains, client, entry, rev, state, lease_id, t0,
                               settings, boottime, _life_left(life_ends, monotonic))  # fmt: skip
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": job.refresh_token,
                    "client_id": state.client_id,
                }
                outcome = request.send(form, now=clock())
            if on_answer is not None:
                on_answer()
            step("answered")
            after = apply_outcome(entry.state, outcome, clock(), job.lifetime_days)
            result = _commit_outcome(
                job.profile, store, chains, entry, rev, outcome_of(entry, after),
                kind_of(outcome), retry_for,
            )  # fmt: skip
            step("persisted")
            return result
    except _EndedError as done:
        return done.result
    except BusyError as exc:
        return CourierResult(CourierKind.BUSY, str(exc))
    except (StateCorruptError, RollbackError) as exc:
        return CourierResult(CourierKind.CORRUPT, str(exc))
    except EtcdUnavailableError as exc:
        return CourierResult(CourierKind.NOT_STARTED, f"etcd out of reach; nothing sent: {exc}")
    except StorageError as exc:
        return CourierResult(CourierKind.STORAGE_FAILED, str(exc))
    except AacTokendError as exc:  # etcd refused us (auth, a bad request): before any send
        return CourierResult(CourierKind.NOT_STARTED, f"nothing sent: {exc}")


@contextlib.contextmanager
def _closing(request: PreparedRequest) -> Iterator[None]:
    try:
        yield
    finally:
        request.close()


def _checked_read(
    job: FleetJob,
    chains: ChainTxns,
    settings: FleetSettings,
    boottime: Callable[[], float],
    clock: Callable[[], float],
) -> VersionedLike:
    """Step 1: the chain as read, an inherited entry resolved once W has passed."""
    versioned = chains.read(job.profile)
    if versioned is None or not still_current(versioned.record.state, job):
        raise _done(CourierKind.STATE_CHANGED, "the state moved on; nothing was sent")
    attempt = versioned.record.unresolved
    if attempt is None:
        return versioned
    wait = settings.resolve_wait_seconds
    seen = job.inherited_seen_at
    if seen is None or job.inherited_attempt != attempt.id or boottime() < seen + wait:
        raise _done(
            CourierKind.BUSY,
            f"an attempt by host {attempt.host} is not resolved yet; waiting {wait:g} s "
            "from when this host first saw it",
        )
    heir = resolved_by_heir(versioned.record, clock())
    revision = chains.commit_resolution(job.profile, heir, entry_revision=versioned.revision)
    if revision is None:  # its courier's outcome won: read again next time
        raise _done(CourierKind.STATE_CHANGED, "the attempt was resolved meanwhile; nothing sent")
    return _Versioned(heir, revision)


@dataclass(frozen=True)
class _Versioned:
    record: ChainRecord
    revision: int


def _record_unreached(
    job: FleetJob, chains: ChainTxns, versioned: VersionedLike, outcome: Transient, now: float
) -> CourierResult:
    """Step 2's failure, committed like an outcome against the revision read."""
    after = apply_outcome(versioned.record.state, outcome, now, job.lifetime_days)
    record = with_state(versioned.record, after)
    try:
        revision = chains.commit_resolution(job.profile, record, entry_revision=versioned.revision)
    except AacTokendError as exc:  # the failure is not recorded; nothing was sent either
        return CourierResult(CourierKind.NOT_STARTED, f"{outcome.reason}; etcd: {exc}")
    if revision is None:
        return CourierResult(CourierKind.STATE_CHANGED, "the state moved on; nothing was sent")
    return CourierResult(CourierKind.TRANSIENT, outcome.reason)


def _journal(
    job: FleetJob,
    chains: ChainTxns,
    versioned: VersionedLike,
    host: str,
    lease_id: int,
    settings: FleetSettings,
    boottime: Callable[[], float],
    clock: Callable[[], float],
) -> tuple[ChainRecord, int, float]:
    """Step (b): the journal entry committed under the lease; (entry, its revision, t0)."""
    t0 = boottime()  # before the commit is sent: D covers the commit's own round trip
    attempt = Attempt(new_attempt_id(), host, settings.send_window_seconds)
    entry = journal_of(versioned.record, begin_attempt(versioned.record.state, clock()), attempt)
    try:
        revision = chains.commit_journal(
            job.profile, entry, read_revision=versioned.revision, lease_id=lease_id
        )
    except FenceLostError as exc:
        raise _done(
            CourierKind.STATE_CHANGED, f"not the owner, or the chain moved on: {exc}"
        ) from exc
    except EtcdUnsentError as exc:
        raise _done(
            CourierKind.NOT_STARTED, f"the journal was not written; nothing sent: {exc}"
        ) from exc
    except EtcdOutcomeUnknownError:
        _settle_unknown_journal(job, chains, entry, versioned.record.state)
        raise _done(
            CourierKind.NOT_STARTED, "the journal commit's reply was lost; not sent"
        ) from None
    return entry, revision, t0


def _settle_unknown_journal(
    job: FleetJob, chains: ChainTxns, entry: ChainRecord, before: ProfileState
) -> None:
    """A journal commit whose reply was lost: if it landed, take it back (not sent)."""
    assert entry.attempt is not None
    with contextlib.suppress(AacTokendError):
        seen = chains.find_attempt(job.profile, entry.attempt.id)
        if seen.kind is SeenKind.JOURNAL and seen.versioned is not None:
            chains.commit_resolution(
                job.profile, cancelled(entry, before), entry_revision=seen.versioned.revision
            )
    # Unreadable: the entry (if it landed) stays unresolved and is resolved after W as
    # ambiguous by whoever owns the chain then: the safe side of a token never sent.


def _life_left(life_ends: float | None, monotonic: Callable[[], float]) -> float:
    return float("inf") if life_ends is None else life_ends - monotonic()


def _confirm_fence(
    job: FleetJob,
    chains: ChainTxns,
    client: LeaseTtl,
    entry: ChainRecord,
    revision: int,
    before: ProfileState,
    lease_id: int,
    t0: float,
    settings: FleetSettings,
    boottime: Callable[[], float],
    life_left: float,
) -> None:
    """Step (c): the lease is alive and D has not passed, just before the first byte; and
    the courier's life holds the whole request (a courier stopped before its journal for
    most of its life would otherwise be ended by its alarm with the request out)."""
    why = ""
    if life_left < settings.request_deadline_seconds:
        why = f"{max(life_left, 0):.1f} s of the courier's life left, under the request's deadline"
    try:
        alive = client.time_to_live(lease_id)
    except AacTokendError:  # out of reach, or refused: unconfirmed is not alive
        why = "the lease could not be confirmed"
    else:
        if not why and (alive is None or alive.ttl <= 0):
            why = "the lease is gone"
    window = settings.send_window_seconds
    if not why and boottime() - t0 >= window:
        why = f"woke past the send window of {window:g} s"
    if not why:
        return
    with contextlib.suppress(AacTokendError):  # left: resolved after W, as ambiguous
        chains.commit_resolution(job.profile, cancelled(entry, before), entry_revision=revision)
    raise _done(CourierKind.STATE_CHANGED, f"not sent: {why}")


#: The longest pause between two tries of an outcome commit while etcd is away.
OUTCOME_RETRY_CAP_SECONDS = 0.5


def _commit_outcome(
    profile: str,
    store: CourierStore,
    chains: ChainTxns,
    entry: ChainRecord,
    entry_revision: int,
    record: ChainRecord,
    kind: CourierKind,
    retry_for: float,
) -> CourierResult:
    """Step 6: the outcome against the entry's revision; kept pending if etcd is away."""
    assert entry.attempt is not None
    deadline = time.monotonic() + retry_for
    delay = 0.25
    unknown = False  # an earlier try may have landed: look before committing again
    while True:
        try:
            if unknown:
                seen = chains.find_attempt(profile, entry.attempt.id)
                if seen.kind is SeenKind.RESOLVED and seen.versioned is not None:
                    # The heir's resolution names the same attempt: ours only if it is ours.
                    if seen.versioned.record == record:
                        return CourierResult(kind)
                    return _superseded()
                if seen.kind is not SeenKind.JOURNAL:
                    return _superseded()
                unknown = False
            revision = chains.commit_resolution(profile, record, entry_revision=entry_revision)
            return CourierResult(kind) if revision is not None else _superseded()
        except EtcdOutcomeUnknownError:
            unknown = True
        except AacTokendError:
            # Out of reach, or refused (auth, a rollback on the read): the answer is the
            # only copy of the pair, so whatever etcd says it is retried, then kept.
            pass
        if time.monotonic() + delay > deadline:
            return _keep_pending(profile, store, record, entry_revision)
        time.sleep(delay)
        delay = min(delay * 2, OUTCOME_RETRY_CAP_SECONDS)  # a healed etcd is seen at once


def _superseded() -> CourierResult:
    return CourierResult(
        CourierKind.STATE_CHANGED,
        "superseded: an heir resolved the attempt first; the pair is lost, the heir's "
        "retry reports after_lost_response",
    )


def _keep_pending(
    profile: str, store: CourierStore, record: ChainRecord, entry_revision: int
) -> CourierResult:
    blob = store.seal_outcome(record, entry_revision)
    # Before the daemon hears of it: a daemon killed meanwhile must not take the only copy.
    with contextlib.suppress(StorageError):
        store.keep_pending(profile, blob)
    return CourierResult(
        CourierKind.STORAGE_FAILED, "etcd out of reach after the answer; kept pending", blob
    )
