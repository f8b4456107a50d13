"""What the engine serves: each profile's state in memory, and its token on the hot path.

The durable truth is the store; the engine's copy is made current from it under the
profile's lock (``_hold``), after every courier, adoption, import. ``current_token`` is the
hot path of every token read: a dict lookup and a clock read. The engine's other concerns
build on this base: adoption.py (stored profiles and pending records), refreshing.py
(a refresh and absorbing its result), management.py (import and remove), engine.py (the
public face: lifecycle, tick, status).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ..core.conditions import condition_of
from ..core.config import Config
from ..core.policy import SERVE_MARGIN_SECONDS, next_refresh_at
from ..core.state import ProfileState
from ..errors import StorageError
from ..host.redact import register_secret
from ..refresh.courier import Refresher
from ..store.interface import StateStore
from .alerts import Alerter
from .fleet_view import FleetView
from .scheduling import Clock, Scheduler

__all__ = ["Serving"]

log = structlog.get_logger("aac_tokend.daemon.engine")


@dataclass(frozen=True)
class ServedToken:
    """A token being served, with its end on both clocks (see ``Engine.current_token``)."""

    token: bytes
    expires_at: float | None  # wall time, as the state says
    expires_mono: float  # monotonic time; inf when the token has no expiry


@dataclass
class ProfileEntry:
    state: ProfileState
    refreshing: bool = False
    unsaved: bytes | None = None  # a sealed newer state the store refused
    installed_wall: float = 0.0  # the clocks when ``state`` was installed (see _now_for)
    installed_mono: float = 0.0
    done: threading.Condition = field(default_factory=threading.Condition)


class Serving:
    """The engine's memory and what serves from it; ``Engine.__init__`` sets every field."""

    _store: StateStore
    _refresher: Refresher
    _scheduler: Scheduler
    _clock: Clock
    config: Config
    _alerter: Alerter
    _fleet: FleetView
    _socket_path: Callable[[str], Path]
    _on_profiles_changed: Callable[[], None]
    _profiles: dict[str, ProfileEntry]
    _serving: dict[str, ServedToken]
    # Entries we cannot use, by name: (status state, what is wrong and what to do). Each
    # tick tries them again, so a fixed entry is served without a restart.
    _unusable: dict[str, tuple[str, str]]
    _socket_problems: dict[str, str]
    _scanned: tuple[int, float] | None  # (listing stamp, at) of the last listing
    _waiting: set[str]  # profiles whose earlier courier is still out
    _lock: threading.Lock
    _import_lock: threading.Lock

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

    def _now_for(self, entry: ProfileEntry, wall_now: float) -> float:
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
                entry = self._profiles[state.profile] = ProfileEntry(state)
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

    def _served(self, state: ProfileState) -> ServedToken:
        """What to serve for ``state``, its monotonic end measured from now.

        A token already served keeps the earlier monotonic end: a state reinstalled after a
        failed refresh must not win back the time a stepped wall clock took away.
        """
        token, expires = state.access_token.encode(), state.access_expires_at
        if expires is None:
            return ServedToken(token, None, math.inf)
        # A fleet profile's expiry is on its owner's clock: stop early by the allowed skew.
        expires -= self._fleet.serve_margin(state.profile)
        left = expires - self._clock.now()
        mono_end = self._clock.monotonic() + left
        old = self._serving.get(state.profile)
        if old is not None and old.token == token and old.expires_at == expires:
            mono_end = min(mono_end, old.expires_mono)
        return ServedToken(token, expires, mono_end)

    def _schedule(self, state: ProfileState) -> None:
        now = self._clock.now()
        at = next_refresh_at(state, now, self.config.policy_for(state.profile))
        if at is None:
            self._scheduler.cancel(state.profile)
        else:
            self._scheduler.schedule(state.profile, at, lambda: self.refresh(state.profile))

    def refresh(self, name: str, *, wait: bool = False) -> ProfileState:
        """Refresh ``name`` now (refreshing.py; the schedule calls it from here)."""
        raise NotImplementedError

    def _lifetime_days(self, name: str) -> float | None:
        return self.config.policy_for(name).refresh_lifetime_days

    def _keep_pending(self, name: str, blob: bytes) -> None:
        try:
            self._store.keep_pending(name, blob)
        except StorageError as exc:
            log.error("pending_state_not_kept", profile=name, error=str(exc))

    def _clear_pending(self, name: str) -> None:
        try:
            self._store.clear_pending(name)
        except StorageError as exc:  # harmless: the next start drops it as outdated
            log.error("pending_state_not_cleared", profile=name, error=str(exc))

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
