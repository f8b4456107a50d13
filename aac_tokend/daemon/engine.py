"""The engine: each profile's state in memory, its next refresh scheduled, its token served.

The durable truth is the store; the engine's copy is refreshed from it after every courier.
``current_token`` is the hot path of every token read: a dict lookup and a clock read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ..core.conditions import condition_of
from ..core.config import Config
from ..core.importer import ImportRequest, build_state
from ..core.ownership import claim, stored_states
from ..core.policy import SERVE_MARGIN_SECONDS, next_refresh_at, recover_interrupted
from ..core.report import RowState, StatusRow, profile_report, report_row
from ..core.state import ProfileState, TokenKind, validate_profile_name
from ..core.tokens import token_hash
from ..errors import AacTokendError, BusyError, ProfileError, StateCorruptError, StorageError
from ..host.logs import register_secret
from ..host.paths import check_token_socket
from ..refresh.courier import LOCK_WAIT_SECONDS, WAIT_SECONDS, CourierJob, CourierResult, Refresher
from ..store.files import SUFFIX, FileStore
from ..store.pending import PendingStore, follows
from .alerts import Alerter
from .scheduling import WAKE_CAP_SECONDS, Clock, Scheduler

__all__ = ["Engine"]

log = structlog.get_logger("aac_tokend.daemon.engine")
TICK_KEY = "__tick__"
#: Courier results after which the state file holds the attempt's outcome.
DURABLE_OUTCOMES = frozenset({"refreshed", "rejected", "transient"})
#: What ``status`` says of a state file the daemon cannot use (each row also says what to do):
#: cannot be decrypted or parsed, cannot be read (EIO, a directory), not a profile's name.
UNUSABLE_STATES = frozenset({"corrupt", "unreadable", "misnamed"})
#: Listing the state directory costs ~5-9 ms at a thousand profiles (measured on the 2-core
#: CI machine), too much for every 2 s tick: it is listed again only when its mtime changed,
#: and at least this often, since a change within one mtime granule could go unseen.
FULL_SCAN_SECONDS = 60.0


@dataclass(frozen=True)
class _Served:
    """A token being served, with its end on both clocks (see ``Engine.current_token``)."""

    token: bytes
    expires_at: float | None  # wall time, as the state says
    expires_mono: float  # monotonic time; inf when the token has no expiry


@dataclass
class _Profile:
    state: ProfileState
    refreshing: bool = False
    unsaved: bytes | None = None  # an encrypted newer state the disk refused
    installed_wall: float = 0.0  # the clocks when ``state`` was installed (see _now_for)
    installed_mono: float = 0.0
    done: threading.Condition = field(default_factory=threading.Condition)


class Engine:
    """Owns every profile's chain for the daemon's lifetime."""

    def __init__(
        self,
        *,
        store: FileStore,
        key: bytes,
        refresher: Refresher,
        scheduler: Scheduler,
        clock: Clock,
        config: Config,
        alerter: Alerter,
        socket_path: Callable[[str], Path],
        on_profiles_changed: Callable[[], None] = lambda: None,
        pending: PendingStore | None = None,
    ) -> None:
        self._store, self._key, self._refresher = store, key, refresher
        self._scheduler, self._clock, self.config = scheduler, clock, config
        self._alerter, self._socket_path = alerter, socket_path
        self._on_profiles_changed = on_profiles_changed
        self._pending = pending
        self._profiles: dict[str, _Profile] = {}
        self._serving: dict[str, _Served] = {}
        # State files we cannot use, by file stem: (status state, what is wrong and what to
        # do). Each tick tries them again, so a fixed file is served without a restart.
        self._unusable: dict[str, tuple[str, str]] = {}
        self._socket_problems: dict[str, str] = {}
        self._scanned: tuple[int, float] | None = None  # (dir mtime_ns, at) of the last listing
        self._waiting: set[str] = set()  # profiles whose earlier courier is still out
        self._lock = threading.Lock()
        self._import_lock = threading.Lock()

    # -- the hot path ---------------------------------------------------------------
    def current_token(self, profile: str) -> bytes | None:
        """The access token if valid at this instant, else None (never a stale token).

        Valid by both clocks: the wall clock (the expiry is wall time, and the wall clock
        also counts a suspend that CLOCK_MONOTONIC does not) and the monotonic one (the
        token's remaining life when installed, run down since, which a wall clock stepped
        back cannot stretch). Whichever says the token is over first, wins.
        """
        entry = self._serving.get(profile)
        if entry is None:
            return None
        if entry.expires_at is not None and (
            self._clock.now() + SERVE_MARGIN_SECONDS >= entry.expires_at
            or self._clock.monotonic() + SERVE_MARGIN_SECONDS >= entry.expires_mono
        ):
            return None
        return entry.token

    def _now_for(self, entry: _Profile, wall_now: float) -> float:
        """``now`` as the state's own times count it: the later of the wall clock and the
        wall time at install run on by the monotonic clock since.

        Every time in a state was written on the wall clock of its install (the courier
        writes it, the engine installs it at once). After the wall clock steps back, this
        keeps counting from there, so a refresh or retry comes due after the time that
        really passed; after a step forward the wall clock is ahead and rules (an early
        refresh, never a late one). Each install starts afresh on the wall clock of the day,
        so a step is absorbed by the next refresh or attempt and can never cause a loop.
        """
        return max(wall_now, entry.installed_wall + self._clock.monotonic() - entry.installed_mono)

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Adopt every stored profile (waiting for a courier of an earlier life) and tick."""
        self._scan()
        self._scheduler.every(TICK_KEY, WAKE_CAP_SECONDS, self.tick)

    def _scan(self) -> None:
        """Adopt each state file not served yet; one that cannot be used is only reported."""
        try:
            stamp = os.stat(self._store.state_dir).st_mtime_ns
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
        except OSError as exc:
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
                self._mark_unusable(name, "misnamed", _misnamed(self._store.state_dir, name, exc))
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

    def _mark_unusable(self, name: str, state: str, error: str) -> None:
        if self._unusable.get(name) != (state, error):  # logged once, not on every tick
            log.error("profile_unusable", profile=name, state=state, error=error)
        self._unusable[name] = (state, error)

    def _adopt_after_courier(self, name: str) -> None:
        try:
            self._adopt(name)
        finally:
            self._waiting.discard(name)

    def waiting_for_courier(self, name: str) -> bool:
        """True while ``name`` is not served yet: a courier from before a restart holds it."""
        return name in self._waiting

    def profiles(self) -> list[str]:
        return sorted(self._profiles)

    def listed(self) -> list[str]:
        """Every profile ``status`` reports: served, waiting for a courier, or unusable."""
        return sorted(set(self._profiles) | set(self._waiting) | set(self._unusable))

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
                if state is not None and state.in_flight is not None:
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
        if self._pending is None:
            return disk, None
        blob = self._pending.get(name)  # StorageError: the profile waits, nothing is resent
        if blob is None:
            return disk, None
        held = self._store.decrypt(name, blob, where=self._pending.path(name))
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

    def _keep_pending(self, name: str, blob: bytes) -> None:
        if self._pending is None:
            return
        try:
            self._pending.put(name, blob)
        except StorageError as exc:
            log.error("pending_state_not_kept", profile=name, error=str(exc))

    def _clear_pending(self, name: str) -> None:
        if self._pending is None:
            return
        try:
            self._pending.clear(name)
        except StorageError as exc:  # harmless: the next start drops it as outdated
            log.error("pending_state_not_cleared", profile=name, error=str(exc))

    def _hold(self, state: ProfileState, unsaved: bytes | None = None) -> None:
        """Make ``state`` current in memory: serve it from now on.

        Called only under the profile's lock, in the same section that wrote (or read) the
        disk: memory then changes in the order the disk did, so ``_holders`` can judge the
        other profiles from memory alone. The alternative, reading every loaded profile's
        file under its lock at each import, would cost most of a second per import at a
        thousand profiles (see ``_holders``); this costs one dict write per change.
        """
        register_secret(state.access_token, owner=state.profile)
        register_secret(state.refresh_token, owner=state.profile)
        with self._lock:
            entry = self._profiles.get(state.profile)
            if entry is None:
                entry = self._profiles[state.profile] = _Profile(state)
            entry.state, entry.unsaved = state, unsaved
            entry.installed_wall, entry.installed_mono = self._clock.now(), self._clock.monotonic()
            self._serving[state.profile] = self._served(state)
            self._unusable.pop(state.profile, None)

    def _announce(self, name: str) -> None:
        """After ``_hold``, outside the profile lock (a webhook may be slow): tell the
        alerter and schedule the next refresh, both of what memory holds now."""
        entry = self._profiles.get(name)
        if entry is None:
            return  # removed meanwhile
        now = self._clock.now()
        self._alerter.observe(name, condition_of(entry.state, now, self._lifetime_days(name)), now)
        self._schedule(entry.state)

    def _served(self, state: ProfileState) -> _Served:
        """What to serve for ``state``, its monotonic end measured from now.

        A token already served keeps the earlier monotonic end: a state reinstalled after a
        failed refresh must not win back the time a stepped wall clock took away.
        """
        token, expires = state.access_token.encode(), state.access_expires_at
        if expires is None:
            return _Served(token, None, math.inf)
        left = expires - self._clock.now()
        mono_end = self._clock.monotonic() + left
        old = self._serving.get(state.profile)
        if old is not None and old.token == token and old.expires_at == expires:
            mono_end = min(mono_end, old.expires_mono)
        return _Served(token, expires, mono_end)

    def _schedule(self, state: ProfileState) -> None:
        now = self._clock.now()
        at = next_refresh_at(state, now, self.config.policy_for(state.profile))
        if at is None:
            self._scheduler.cancel(state.profile)
        else:
            self._scheduler.schedule(state.profile, at, lambda: self.refresh(state.profile))

    def _lifetime_days(self, name: str) -> float | None:
        return self.config.policy_for(name).refresh_lifetime_days

    def set_config(self, config: Config) -> None:
        """Adopt a reloaded config: every schedule is recomputed, every alert looked at again."""
        self.config = config
        now = self._clock.now()
        for name, entry in list(self._profiles.items()):
            self._schedule(entry.state)
            self._alerter.observe(
                name, condition_of(entry.state, now, self._lifetime_days(name)), now
            )

    def tick(self) -> None:
        """Catch what a sleeping scheduler missed (suspend, clock jump); retry unsaved state.

        Also looks for state files not served yet: a fixed or new file is adopted here.
        """
        self._scan()
        now = self._clock.now()
        for name, entry in list(self._profiles.items()):
            if entry.unsaved is not None:
                self._retry_unsaved(name, entry)
            if entry.refreshing:
                continue
            # Due by the time that passed, even if the wall clock stepped back since.
            state_now = self._now_for(entry, now)
            at = next_refresh_at(entry.state, state_now, self.config.policy_for(name))
            if at is not None and at <= state_now:
                self._scheduler.schedule(name, now, lambda n=name: self.refresh(n))  # type: ignore[misc]
            self._alerter.observe(
                name, condition_of(entry.state, now, self._lifetime_days(name)), now
            )

    def _retry_unsaved(self, name: str, entry: _Profile) -> None:
        """Write the pair the disk refused, if the disk still holds the journal it follows.

        An import or a remove may have landed since (each clears ``unsaved`` under the same
        lock): writing the blob then would undo the import or bring the profile back.
        """
        try:
            with self._store.locked(name, 0):
                with self._lock:
                    blob = entry.unsaved if self._profiles.get(name) is entry else None
                if blob is None:
                    return  # imported anew or removed meanwhile
                held = self._store.decrypt(name, blob)
                disk = self._store.load(name)
                if disk is None or not follows(held, disk):
                    if disk is not None:
                        self._hold(disk)  # what the disk moved on to; drops the pair
                    self._clear_pending(name)
                    log.info("unsaved_state_dropped", profile=name, reason="the file moved on")
                    return
                self._store.save_blob(name, blob)
                with self._lock:
                    entry.unsaved = None
            self._clear_pending(name)
            log.warning("state_saved_late", profile=name)
        except (StorageError, BusyError, StateCorruptError) as exc:
            log.error("state_not_saved", profile=name, error=str(exc))

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
            if entry.unsaved is not None:
                return state  # never spend a token whose successor is not yet on disk
            assert state.refresh_token is not None
            # Retries are logged at debug: while an endpoint keeps failing, status shows the
            # last error, and the log gets only the power-of-two failure lines below.
            started = log.info if state.consecutive_failures == 0 else log.debug
            started("refresh_started", profile=name, refresh_token=token_hash(state.refresh_token))
            pending_dir = str(self._pending.directory) if self._pending else ""
            job = CourierJob(
                name,
                state.refresh_token,
                str(self._store.state_dir),
                self._key,
                pending_dir=pending_dir,
                lifetime_days=self._lifetime_days(name),
            )
            result = self._refresher.refresh(job)
            return self._absorb(name, result)
        finally:
            with entry.done:
                entry.refreshing = False
                entry.done.notify_all()

    def _absorb(self, name: str, result: CourierResult) -> ProfileState:
        """Read back what the courier made durable, then log, serve and reschedule.

        The outcome is read and made current under the profile's lock, as an import or a
        remove does: one that landed since the courier ended wins, never the other way.
        """
        # A lost courier's pending record must be adopted before the next courier could
        # resend its token: wait as long as for any courier. Otherwise only this daemon's own
        # short sections (an import, a remove, a retry) can hold the lock now.
        wait = WAIT_SECONDS if result.kind == "lost" else LOCK_WAIT_SECONDS
        try:
            with self._store.locked(name, wait):
                state = self._absorb_locked(name, result)
        except BusyError as exc:
            # Rare (10 s of someone else's short section): whoever holds the lock makes
            # memory current itself. A pair the disk refused is held as unsaved, so it is not
            # spent, and the tick writes it only over its journal (checked under the lock).
            entry = self._profiles.get(name)
            if entry is None:
                raise ProfileError(f"profile {name!r} was removed during the refresh") from exc
            if result.kind == "storage_failed" and result.unsaved:
                self._keep_pending(name, result.unsaved)
                state = self._store.decrypt(name, result.unsaved)
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

    def _absorb_locked(self, name: str, result: CourierResult) -> ProfileState:
        unsaved = self._recover_lost(name) if result.kind == "lost" else None
        if unsaved is not None:
            state = self._store.decrypt(name, unsaved)
        elif result.kind == "storage_failed" and result.unsaved:
            state = self._store.decrypt(name, result.unsaved)
            unsaved = result.unsaved
            # The courier kept it already; again here, in case its write failed.
            self._keep_pending(name, unsaved)
        else:
            before = self._profiles[name].state
            detail = result.detail
            try:
                loaded = self._store.load(name)
            except (StorageError, StateCorruptError) as exc:
                loaded, detail = before, str(exc)  # keep serving what we have; report it
            if loaded is None:
                self._forget_locked(name)
                self._after_forget(name)
                raise ProfileError(f"profile {name!r} was removed during the refresh")
            state = loaded
            if result.kind not in DURABLE_OUTCOMES and loaded.generation == before.generation:
                # Nothing durable happened (the journal could not be written, the courier
                # died before it, the file cannot be read): count a failure in memory only
                # (the disk may refuse it), so the retry backs off instead of spinning.
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
            if state is not None and state.in_flight is not None:
                self._store.save(recover_interrupted(state, self._clock.now()))
        return None

    def _log_result(self, state: ProfileState, result: CourierResult) -> None:
        fields: dict[str, Any] = {"profile": state.profile, "courier": result.kind}
        if state.rejection is not None and result.kind == "rejected":
            log.error(
                "refresh_rejected",
                reason=state.rejection.reason.value,
                error=state.rejection.error,
                error_description=state.rejection.error_description,
                **fields,
            )
        elif result.kind == "refreshed":
            log.info("refresh_succeeded", refresh_count=state.refresh_count, **fields)
        elif state.consecutive_failures & (state.consecutive_failures - 1) == 0:
            # 1st, 2nd, 4th, 8th... failure: a failing endpoint writes a few lines, not a flood.
            log.warning(
                "refresh_failed",
                failures=state.consecutive_failures,
                error=state.last_error or result.detail,
                **fields,
            )

    # -- profile management (import, remove, status) ---------------------------------
    def import_profile(self, request: ImportRequest) -> ProfileState:
        """A new token pair takes effect at once; the old state is replaced durably."""
        return self.claim_import(request)[0]

    def claim_import(self, request: ImportRequest) -> tuple[ProfileState, bool]:
        """Import unless another profile holds the pair or it is spent; (state, changed).

        Re-importing the current pair changes nothing (False). TokenHeldError or
        TokenSpentError leave every chain untouched.
        """
        # config.toml's refresh_lifetime_days is not copied in: it is read at use time
        # (_lifetime_days), so a corrected config applies after a reload.
        state = build_state(request, self._clock.now())
        # Everything that can fail at serve time fails here, before anything is saved.
        check_token_socket(state.profile, self._socket_path(state.profile))
        # One import at a time: two imports of one pair into two profiles must not both
        # pass the check before either is saved.
        with self._import_lock, self._store.locked(state.profile, WAIT_SECONDS):
            own, others = self._holders(state.profile)
            claimed = claim(state, own, others, replace_chain=request.replace_chain)
            if claimed is None:
                log.info("profile_import_unchanged", profile=state.profile)
                return max(own, key=lambda s: s.generation), False
            self._store.save(claimed)
            self._clear_pending(claimed.profile)  # a new chain: an old one's pair is moot
            self._hold(claimed)  # under the lock that wrote it; drops any unsaved pair
        self._announce(claimed.profile)  # the alerter hears the new condition: often a recovery
        self._on_profiles_changed()
        log.info("profile_imported", profile=claimed.profile, kind=claimed.kind.value)
        return claimed, True

    def _holders(self, name: str) -> tuple[list[ProfileState], list[ProfileState]]:
        """Every version of every profile we can see: ``name``'s own, and all others'.

        Memory counts as well as disk: a refresh the disk refused leaves its newer pair
        only here (``unsaved``). Other profiles the engine holds are taken from memory only
        (reading a thousand files costs most of a second, with token reads waiting on the
        GIL): the only newer pair their files can hold is one a courier got a moment ago,
        which nobody but that courier has seen, and memory already names its predecessor.
        Profiles not in memory (still waiting for a courier) are read from disk; while a
        state file cannot be read at all, HolderUnknownError refuses the import.
        """
        with self._lock:
            memory = [entry.state for entry in self._profiles.values()]
        own = [s for s in memory if s.profile == name]
        with contextlib.suppress(AacTokendError):
            on_disk = self._store.load(name)
            if on_disk is not None:
                own.append(on_disk)
        with contextlib.suppress(AacTokendError):  # its generation counts (ownership.claim)
            blob = self._pending.get(name) if self._pending is not None else None
            if blob is not None and self._pending is not None:
                own.append(self._store.decrypt(name, blob, where=self._pending.path(name)))
        others = [s for s in memory if s.profile != name]
        loaded = {s.profile for s in memory} | {name}
        others.extend(stored_states(self._store, skip=loaded))
        return own, others

    def remove(self, name: str) -> None:
        """Stop serving and refreshing ``name`` and delete its state."""
        with self._store.locked(name, WAIT_SECONDS):
            self._store.delete(name)
            self._clear_pending(name)
            self._forget_locked(name)
        self._after_forget(name)
        log.info("profile_removed", profile=name)

    def _forget_locked(self, name: str) -> None:
        """Drop ``name`` from memory (under its profile lock), and any pair still unsaved."""
        with self._lock:
            entry = self._profiles.pop(name, None)
            if entry is not None:
                entry.unsaved = None  # a tick holding this entry must not write it back
            self._serving.pop(name, None)
            self._unusable.pop(name, None)  # a removed unusable file has nothing left to report

    def _after_forget(self, name: str) -> None:
        self._scheduler.cancel(name)
        self._alerter.forget(name)
        self._socket_problems.pop(name, None)
        self._on_profiles_changed()

    def note_socket_problem(self, name: str, problem: str | None) -> None:
        """Record why ``name`` has no token socket (None: it has one); status shows it."""
        if problem is None:
            self._socket_problems.pop(name, None)
        else:
            self._socket_problems[name] = problem

    def status(self, only: str | None = None) -> list[StatusRow]:
        """Each profile's status row (``status --json`` prints their ``to_wire()``); with
        ``only``, just its.

        ``only`` matters at scale: a thousand reports take ~20 ms, paid by every
        `refresh` answer, and token reads wait for the GIL meanwhile.
        """
        now = self._clock.now()
        rows = []
        for name, entry in sorted(self._profiles.items()):
            if only is not None and name != only:
                continue
            # On the state's own clock (see _now_for), shown as a time on today's wall clock.
            state_now = self._now_for(entry, now)
            at = next_refresh_at(entry.state, state_now, self.config.policy_for(name))
            if at is not None:
                at -= state_now - now
            row = profile_report(
                entry.state,
                now,
                next_refresh=at,
                token_socket=str(self._socket_path(name)),
                storage_error=entry.unsaved is not None,
                lifetime_days=self._lifetime_days(name),
            )
            # What a reader gets, by both clocks (the report alone knows only the wall clock).
            valid = row.token_valid and self.current_token(name) is not None
            row = dataclasses.replace(row, token_valid=valid)
            problem = self._socket_problems.get(name)
            if problem is not None:
                row = dataclasses.replace(row, token_socket=None, alert=problem)
            rows.append(row)
        for name in sorted(set(self._waiting) - set(self._profiles)):
            if only is None or name == only:
                # Not served until the courier of the earlier daemon ends (within its bound):
                # no token now, and the daemon will serve it on its own.
                rows.append(
                    report_row(
                        profile=name,
                        state=RowState.RETRYING,
                        last_error="a refresh begun before the daemon restarted is still "
                        "finishing; the profile is served once it ends",
                        token_socket=str(self._socket_path(name)),
                    )
                )
        for name, (state, error) in sorted(dict(self._unusable).items()):
            if only is None or name == only:
                rows.append(report_row(profile=name, state=state, alert=error))
        return rows


def _misnamed(state_dir: Path, name: str, exc: ProfileError) -> str:
    """What to do about a state file whose name is not a profile's (often a sync conflict)."""
    return (
        f"state file {state_dir / (name + SUFFIX)} is not named like a profile ({exc}); if a "
        "sync tool made it, compare it with the profile's own file and move one aside, "
        "else rename it to <profile>.state"
    )
