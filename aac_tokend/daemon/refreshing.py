"""Refreshing: one refresh through the refresher, and absorbing what it made durable.

The refresher (a courier process, or the calling thread) runs the transaction against the
store and answers with a typed ``CourierResult``; the engine then reads the outcome back
from the store under the profile's lock, so an import or a remove that landed meanwhile
wins. A pair the store refused travels sealed and is held unsaved: served, never spent.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NoReturn

import structlog

from ..core.policy import recover_interrupted
from ..core.state import ProfileState, TokenKind
from ..core.tokens import token_hash
from ..errors import AacTokendError, BusyError, ProfileError, StateCorruptError, StorageError
from ..refresh.courier import LOCK_WAIT_SECONDS, WAIT_SECONDS, CourierJob
from ..refresh.result import CourierKind, CourierResult
from ..store.pending import still_owed
from .adoption import Adoption

__all__ = ["Refreshing"]

log = structlog.get_logger("aac_tokend.daemon.engine")


class Refreshing(Adoption):
    """A refresh, one at a time per profile, and its result made current."""

    # -- refreshing -----------------------------------------------------------------
    def refresh(self, name: str, *, wait: bool = False) -> ProfileState:
        """Refresh ``name`` now through a courier; with ``wait``, join one already running."""
        entry = self._profiles.get(name)
        if entry is None:
            raise ProfileError(f"no profile named {name!r}; see `aac-tokend profiles`")
        with entry.done:
            if entry.refreshing:
                if not wait:
                    return entry.state
                entry.done.wait_for(lambda: not entry.refreshing, timeout=WAIT_SECONDS + 5)
                return entry.state
            entry.refreshing = True
        try:
            state = entry.state
            if state.kind is not TokenKind.OAUTH or state.rejection is not None:
                return state
            if not self._fleet.may_refresh(name):
                return state  # a fleet follower: its owner refreshes, the watch brings it
            if entry.unsaved is not None:
                return state  # never spend a token whose successor is not yet on disk
            assert state.refresh_token is not None
            # Retries are logged at debug: while an endpoint keeps failing, status shows the
            # last error, and the log gets only the power-of-two failure lines below.
            started = log.info if state.consecutive_failures == 0 else log.debug
            started("refresh_started", profile=name, refresh_token=token_hash(state.refresh_token))
            job = CourierJob(
                name,
                state.refresh_token,
                lifetime_days=self._lifetime_days(name),
                generation=state.generation,
            )
            result = self._refresher.refresh(job)
            return self._absorb(name, result, state)
        finally:
            with entry.done:
                entry.refreshing = False
                entry.done.notify_all()

    def _absorb(self, name: str, result: CourierResult, started: ProfileState) -> ProfileState:
        """Read back what the courier made durable, then log, serve and reschedule.

        The outcome is read and made current under the profile's lock, as an import or a
        remove does: one that landed since the courier ended wins, never the other way.
        ``started`` is the state the job was made from.
        """
        # A lost courier's pending record must be adopted before the next courier could
        # resend its token: wait as long as for any courier. Otherwise only this daemon's own
        # short sections (an import, a remove, a retry) can hold the lock now.
        wait = WAIT_SECONDS if result.kind is CourierKind.LOST else LOCK_WAIT_SECONDS
        try:
            with self._store.locked(name, wait):
                state = self._absorb_locked(name, result, started)
        except BusyError as exc:
            # Rare (10 s of someone else's short section): whoever holds the lock makes
            # memory current itself. A pair the disk refused is held as unsaved, so it is not
            # spent, and the tick writes it only over its journal (checked under the lock).
            entry = self._profiles.get(name)
            if entry is None:
                raise ProfileError(f"profile {name!r} was removed during the refresh") from exc
            if result.kind is CourierKind.STORAGE_FAILED and result.unsaved:
                self._keep_pending(name, result.unsaved)
                state = self._store.unseal(name, result.unsaved)
                self._hold(state, result.unsaved)
            else:
                state = self._count_failure(entry.state, str(exc))
                self._hold(state, entry.unsaved)
        self._announce(name)
        self._log_result(state, result)
        return state

    def _count_failure(self, state: ProfileState, detail: str | None) -> ProfileState:
        return dataclasses.replace(
            state,
            consecutive_failures=state.consecutive_failures + 1,
            last_attempt_at=self._clock.now(),
            last_error=detail,
            last_failure=None,  # no attempt of ours to classify: never "unreached"
        )

    def _absorb_locked(
        self, name: str, result: CourierResult, started: ProfileState
    ) -> ProfileState:
        unsaved = self._recover_lost(name) if result.kind is CourierKind.LOST else None
        if unsaved is not None:
            state = self._store.unseal(name, unsaved)
        elif result.kind is CourierKind.STORAGE_FAILED and result.unsaved:
            state, unsaved = self._absorb_refused(name, result.unsaved)
        else:
            entry = self._profiles.get(name)
            if entry is None:  # removed since the courier ended (LOST reaches here too)
                raise ProfileError(f"profile {name!r} was removed during the refresh")
            before = entry.state
            detail = result.detail
            try:
                loaded = self._store.load(name)
            except (StorageError, StateCorruptError) as exc:
                loaded, detail = before, str(exc)  # keep serving what we have; report it
            if loaded is None:
                self._gone_locked(name)
            state = loaded
            if _failed_attempt(result.kind, started, before, loaded):
                # Nothing durable happened (the journal could not be written or taken back,
                # the courier died before it, the file cannot be read): count a failure in
                # memory only (the disk may refuse it), so the retry backs off instead of
                # spinning. A journal left on the store stays as it is: its token counts as
                # maybe sent when the next courier recovers it.
                failures = max(before.consecutive_failures, loaded.consecutive_failures) + 1
                state = dataclasses.replace(
                    loaded,
                    consecutive_failures=failures,
                    last_attempt_at=self._clock.now(),
                    last_error=detail,
                    last_failure=None,
                )
        self._hold(state, unsaved)
        return state

    def _absorb_refused(self, name: str, blob: bytes) -> tuple[ProfileState, bytes | None]:
        """The state to hold for a pair the store refused: it, or what the disk moved on to.

        The rule of the late retry (``still_owed``), under the same lock: an import or a
        remove that landed since the courier let go wins, and the pair is dropped.
        """
        held = self._store.unseal(name, blob)
        try:
            disk = self._store.load(name)
        except (StorageError, StateCorruptError):
            # Cannot tell: hold the pair unsaved; the tick's retry applies the rule.
            self._keep_pending(name, blob)  # the courier kept it; again, if its write failed
            return held, blob
        if disk is None:
            self._clear_pending(name)
            self._gone_locked(name)
        if not still_owed(held, disk):
            self._clear_pending(name)
            log.info("unsaved_state_dropped", profile=name, reason="the file moved on")
            return disk, None
        self._keep_pending(name, blob)  # the courier kept it; again, if its write failed
        return held, blob

    def _gone_locked(self, name: str) -> NoReturn:
        """The store has no ``name`` any more (removed): forget it and say so, typed."""
        self._forget_locked(name)
        self._after_forget(name)
        raise ProfileError(f"profile {name!r} was removed during the refresh")

    def _recover_lost(self, name: str) -> bytes | None:
        """Settle a courier that died: its pending record first; the blob still unsaved.

        The caller holds the profile's lock."""
        with contextlib.suppress(AacTokendError):
            state = self._store.load(name)
            if state is not None:
                # A courier killed after keeping a refused pair, before it could report.
                state, unsaved = self._take_pending(name, state)
                if unsaved is not None:
                    return unsaved
            # A fleet journal is resolved by the fenced courier after W, never here: the
            # courier we lost may be another host's to finish (fleet_view.py).
            if state is not None and state.in_flight is not None and not self._fleet.covers(name):
                self._store.save(recover_interrupted(state, self._clock.now()))
        return None

    def _log_result(self, state: ProfileState, result: CourierResult) -> None:
        fields: dict[str, Any] = {"profile": state.profile, "courier": result.kind.value}
        if state.rejection is not None and result.kind is CourierKind.REJECTED:
            log.error(
                "refresh_rejected",
                reason=state.rejection.reason.value,
                error=state.rejection.error,
                error_description=state.rejection.error_description,
                **fields,
            )
        elif result.kind is CourierKind.REFRESHED:
            log.info("refresh_succeeded", refresh_count=state.refresh_count, **fields)
        elif result.kind is CourierKind.STATE_CHANGED and state.consecutive_failures == 0:
            # No failure of ours: an import landed before the courier took the lock.
            log.info("refresh_superseded", detail=result.detail, **fields)
        elif state.consecutive_failures & (state.consecutive_failures - 1) == 0:
            # 1st, 2nd, 4th, 8th... failure: a failing endpoint writes a few lines, not a flood.
            log.warning(
                "refresh_failed",
                failures=state.consecutive_failures,
                error=state.last_error or result.detail,
                **fields,
            )


def _failed_attempt(
    kind: CourierKind, started: ProfileState, before: ProfileState, loaded: ProfileState
) -> bool:
    """True if a courier's result is a failed attempt, to count in memory.

    ``started`` is the state the job was made from, ``before`` memory's now (an import may
    have replaced it since), ``loaded`` the store's. A durable outcome counted itself. A
    journal still on the store (``in_flight``) is a failed attempt whatever its generation
    (its token counts as maybe sent when the next courier recovers it). A courier that found
    the state moved on since the job (``STATE_CHANGED``, a new generation: an import) made
    no attempt: the new state is held as it is. Otherwise an attempt that left nothing new
    (``BUSY``, no journal, a file unreadable) counts, so its retry backs off, not spins.
    """
    if kind.durable:
        return False
    if loaded.in_flight is not None:
        return True
    if kind is CourierKind.STATE_CHANGED and loaded.generation != started.generation:
        return False
    return loaded.generation == before.generation
