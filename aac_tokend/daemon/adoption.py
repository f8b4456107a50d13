"""Adoption: taking up stored profiles, and outcomes kept while the store refused them.

At start and on every tick the store's listing is read (only when its stamp changed, see
``FULL_SCAN_SECONDS``); each entry not served yet is adopted under its lock, after any
courier of an earlier daemon that still holds it. A journal found there is recovered as
ambiguous; a pending record that follows it wins. An entry that cannot be used is reported
(``status``) and tried again each tick.
"""

from __future__ import annotations

import threading
import time

import structlog

from ..core.policy import recover_interrupted
from ..core.state import ProfileState, validate_profile_name
from ..errors import AacTokendError, BusyError, ProfileError, StateCorruptError, StorageError
from ..refresh.courier import WAIT_SECONDS
from ..store.pending import follows, still_owed
from .serving import ProfileEntry, Serving

__all__ = ["FULL_SCAN_SECONDS", "Adoption", "misnamed_advice"]

log = structlog.get_logger("aac_tokend.daemon.engine")
#: Listing the state directory costs ~5-9 ms at a thousand profiles (measured on the 2-core
#: CI machine), too much for every 2 s tick: it is listed again only when its stamp (the
#: directory's mtime) changed, and at least this often, since a change within one mtime
#: granule could go unseen.
FULL_SCAN_SECONDS = 60.0


def misnamed_advice(where: str, exc: ProfileError) -> str:
    """What to do about a stored entry whose name is not a profile's (often a sync conflict)."""
    return (
        f"state file {where} is not named like a profile ({exc}); if a "
        "sync tool made it, compare it with the profile's own file and move one aside, "
        "else rename it to <profile>.state"
    )


class Adoption(Serving):
    """Adopting stored profiles and pending records; writing a refused pair late."""

    def _scan(self) -> None:
        """Adopt each state file not served yet; one that cannot be used is only reported."""
        try:
            stamp = self._store.listing_stamp()
            now = time.monotonic()
            if (
                self._scanned is not None
                and self._scanned[0] == stamp
                and now - self._scanned[1] < FULL_SCAN_SECONDS
            ):
                names = sorted(self._unusable)  # unchanged directory: retry only these
            else:
                names = self._store.profiles()
                self._scanned = (stamp, now)
                for gone in set(self._profiles) - set(names):
                    self._forget_if_gone(gone)
        except StorageError as exc:
            log.error("state_dir_unreadable", error=str(exc))
            return
        for gone in set(self._unusable) - set(names):
            self._unusable.pop(gone, None)  # moved aside or renamed: nothing left to report
        for name in names:
            if name in self._profiles or name in self._waiting:
                continue
            try:
                validate_profile_name(name)
            except ProfileError as exc:
                self._mark_unusable(name, "misnamed", misnamed_advice(self._store.where(name), exc))
                continue
            try:
                free = self._store.lock_is_free(name)
            except AacTokendError as exc:
                self._mark_unusable(name, "unreadable", str(exc))
                continue
            if free:
                self._adopt(name)
            else:
                log.info("waiting_for_courier", profile=name)
                self._waiting.add(name)
                adopt = threading.Thread(target=self._adopt_after_courier, args=(name,))
                adopt.daemon = True
                adopt.start()

    def _forget_if_gone(self, name: str) -> None:
        """Forget a served profile whose stored entry is gone (moved away by hand).

        Checked under its lock, as a remove: a refresh or an import in progress finishes
        first. While the lock is busy the next tick lists the directory again."""
        try:
            with self._store.locked(name, 0):
                if name not in self._profiles or self._store.load(name) is not None:
                    return
                self._clear_pending(name)  # a pair the store refused goes with it
                self._forget_locked(name)
        except BusyError:
            self._scanned = None
            return
        except AacTokendError:
            return  # unreadable now, not gone: still served; a later listing looks again
        self._after_forget(name)
        log.warning("profile_file_gone", profile=name, where=self._store.where(name))

    def _mark_unusable(self, name: str, state: str, error: str) -> None:
        if self._unusable.get(name) != (state, error):  # logged once, not on every tick
            log.error("profile_unusable", profile=name, state=state, error=error)
        self._unusable[name] = (state, error)

    def _adopt_after_courier(self, name: str) -> None:
        try:
            self._adopt(name)
        finally:
            self._waiting.discard(name)

    def _adopt(self, name: str) -> None:
        while True:
            try:
                self._adopt_once(name)
                return
            except BusyError:
                # A profile is never silently dropped: whoever holds its lock (a courier
                # of an earlier life) ends within its own bound; keep waiting for it.
                log.warning("still_waiting_for_courier", profile=name)

    def _adopt_once(self, name: str) -> None:
        unsaved = None
        try:
            with self._store.locked(name, WAIT_SECONDS):
                state = self._store.load(name)
                if state is not None:
                    state, unsaved = self._take_pending(name, state)
                if (
                    state is not None
                    and state.in_flight is not None
                    and not self._fleet.covers(name)  # see fleet_view.py
                ):
                    state = recover_interrupted(state, self._clock.now())
                    self._store.save(state)
                    log.warning("refresh_outcome_unknown", profile=name)
                if state is not None:
                    self._hold(state, unsaved)
        except StateCorruptError as exc:
            self._mark_unusable(name, "corrupt", str(exc))
            return
        except BusyError:
            raise
        except AacTokendError as exc:
            self._mark_unusable(name, "unreadable", str(exc))
            return
        if state is not None:
            self._announce(name)
            self._on_profiles_changed()

    def _take_pending(self, name: str, disk: ProfileState) -> tuple[ProfileState, bytes | None]:
        """The state to serve: the pending record if it follows ``disk``, else ``disk``.

        A pending record is the outcome of the attempt whose journal the state file still
        holds: it wins only then (``in_flight`` set, newer generation). A state file that
        moved on (saved late, imported anew) wins, and the record is dropped. Returns the
        blob still to be saved when the state disk refuses it again.
        """
        # StorageError: the profile waits, nothing is resent. StateCorruptError (a record
        # that is not the profile's) names the pending record, not the state.
        blob = self._store.pending(name)
        if blob is None:
            return disk, None
        held = self._store.unseal(name, blob)
        if not follows(held, disk):
            self._clear_pending(name)
            log.info("pending_state_dropped", profile=name, reason="the state file moved on")
            return disk, None
        try:
            self._store.save(held)
        except StorageError as exc:
            log.error("state_not_saved", profile=name, error=str(exc))
            return held, blob
        self._clear_pending(name)
        log.warning("pending_state_adopted", profile=name)
        return held, None

    def _retry_unsaved(self, name: str, entry: ProfileEntry) -> None:
        """Write the pair the disk refused, if the disk still holds the journal it follows.

        An import or a remove may have landed since (each clears ``unsaved`` under the same
        lock): writing the blob then would undo the import or bring the profile back. A
        state file gone without a remove (moved away by hand) takes the profile with it.
        """
        try:
            with self._store.locked(name, 0):
                with self._lock:
                    blob = entry.unsaved if self._profiles.get(name) is entry else None
                if blob is None:
                    return  # imported anew or removed meanwhile
                held = self._store.unseal(name, blob)
                disk = self._store.load(name)
                if disk is None:  # moved away by hand: forgotten, never written back
                    self._clear_pending(name)
                    self._forget_locked(name)
                elif not still_owed(held, disk):
                    self._hold(disk)  # what the disk moved on to; drops the pair
                    self._clear_pending(name)
                    log.info("unsaved_state_dropped", profile=name, reason="the file moved on")
                    return
                else:
                    self._store.save(held)
                    with self._lock:
                        entry.unsaved = None
            if disk is None:
                self._after_forget(name)
                log.warning("profile_file_gone", profile=name, where=self._store.where(name))
                return
            self._clear_pending(name)
            log.warning("state_saved_late", profile=name)
        except (StorageError, BusyError, StateCorruptError) as exc:
            log.error("state_not_saved", profile=name, error=str(exc))
